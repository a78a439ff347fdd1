"""HTTP authentication shared by the FHIR and DICOMweb clients: none, basic, or static bearer.

SMART on FHIR Backend Services (issue 3) will add a token-fetching ``httpx.Auth`` here.
"""

from __future__ import annotations

from typing import Any, Protocol

import httpx
from pydantic import SecretStr


def http_auth(
    username: str | None, password: str | None, bearer_token: str | None
) -> tuple[dict[str, str], httpx.Auth | None]:
    """Return the extra headers and the ``httpx.Auth`` for the configured credentials.

    A bearer token wins over basic credentials; with neither, requests go unauthenticated.
    """
    if bearer_token:
        return {"Authorization": f"Bearer {bearer_token}"}, None
    if username is not None:
        return {}, httpx.BasicAuth(username, password or "")
    return {}, None


class _HasCredentials(Protocol):
    username: str | None
    password: SecretStr | None
    bearer_token: SecretStr | None
    timeout_s: float


def client_kwargs(settings: _HasCredentials) -> dict[str, Any]:
    """Return the timeout and credentials of a FHIR or DICOM settings group, secrets revealed for use."""
    return {
        "timeout_s": settings.timeout_s,
        "username": settings.username,
        "password": settings.password.get_secret_value() if settings.password else None,
        "bearer_token": settings.bearer_token.get_secret_value() if settings.bearer_token else None,
    }
