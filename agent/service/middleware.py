"""(being built) Cross-cutting HTTP behaviour: rate limits, CORS, security headers, PHI-free access log."""

from __future__ import annotations

from fastapi import FastAPI

from agent.config import Settings


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Add the service's middleware to ``app``."""
    return None
