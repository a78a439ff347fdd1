"""HTTP authentication shared by the FHIR and DICOMweb clients: none, basic, or static bearer.

SMART on FHIR Backend Services (issue 3) will add a token-fetching ``httpx.Auth`` here.
"""

from __future__ import annotations

import httpx


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
