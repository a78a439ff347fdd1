"""Who is calling the API, and what they may do: API keys mapped to a user and roles.

Roles (the service issue adds OIDC bearer tokens on the same :class:`Principal`):

- clinician: ask questions; see clinical content in traces;
- auditor: list, show (metadata), verify, export and replay traces — clinical content only when
  also clinician;
- admin: everything an auditor may, and operations;
- service: machine callers (subscriptions, CDS Hooks).

Keys are configured by their SHA-256 only. Without any configured key a development process runs
open, as a local "dev" user with every role; production refuses to start that way (settings).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated

from fastapi import Depends, Request
from pydantic import BaseModel

from agent.config import ApiKeySpec, Role, Settings
from agent.errors import MedagentError

ALL_ROLES: tuple[Role, ...] = ("clinician", "auditor", "admin", "service")


class NotAuthenticatedError(MedagentError):
    """No valid credentials came with the request."""

    code = "not_authenticated"
    exit_code = 2
    http_status = 401


class ForbiddenError(MedagentError):
    """The caller is authenticated but lacks the role."""

    code = "forbidden"
    exit_code = 2
    http_status = 403


class Principal(BaseModel):
    """The caller: user id, roles, the key that authenticated them, and their purpose of use."""

    user: str
    roles: list[Role]
    key_name: str
    purpose_of_use: str | None = None

    def has(self, *roles: Role) -> bool:
        """Return whether the caller holds any of ``roles``."""
        return any(role in self.roles for role in roles)


def new_api_key(user: str, roles: list[Role], name: str) -> tuple[str, ApiKeySpec]:
    """Return a fresh random key and the settings entry that admits it (only its hash)."""
    key = "mak_" + secrets.token_urlsafe(32)
    return key, ApiKeySpec(name=name, key_sha256=hashlib.sha256(key.encode()).hexdigest(), user=user, roles=roles)


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def authenticate(request: Request) -> Principal:
    """Return the caller (a FastAPI dependency).

    Raises:
        NotAuthenticatedError: keys are configured and none valid was presented.
    """
    settings: Settings = request.app.state.runtime.settings
    purpose = request.headers.get("x-purpose-of-use") or None
    if not settings.service.api_keys:
        return Principal(user="dev", roles=list(ALL_ROLES), key_name="none (dev, open)", purpose_of_use=purpose)
    presented = _presented_key(request)
    if presented is None:
        raise NotAuthenticatedError("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    digest = hashlib.sha256(presented.encode()).hexdigest()
    for spec in settings.service.api_keys:
        if hmac.compare_digest(digest, spec.key_sha256):
            return Principal(user=spec.user, roles=list(spec.roles), key_name=spec.name, purpose_of_use=purpose)
    raise NotAuthenticatedError("the API key is not valid")


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require(principal: Principal, *roles: Role) -> None:
    """Refuse the request unless the caller holds one of ``roles``.

    Raises:
        ForbiddenError: naming the roles that would be needed.
    """
    if not principal.has(*roles):
        raise ForbiddenError(f"this needs the role {' or '.join(roles)}")


def require_content_access(principal: Principal, wants_content: bool) -> None:
    """Clinical content in traces (prompts, outputs, answers) is for clinicians only."""
    if wants_content:
        require(principal, "clinician")
