"""(being built) routes: notifications."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
