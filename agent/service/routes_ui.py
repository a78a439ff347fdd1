"""(being built) routes: ui."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
