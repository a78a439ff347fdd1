"""(being built) routes: summaries."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
