"""(being built) routes: cds."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
