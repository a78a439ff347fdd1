"""Who is calling the API, and what they may do: API keys and OIDC bearer tokens, mapped to roles.

Roles:

- clinician: ask questions; see clinical content in traces;
- auditor: list, show (metadata), verify, export and replay traces — clinical content only when
  also clinician;
- admin: everything an auditor may, and operations;
- service: machine callers (subscriptions, CDS Hooks).

Where it sits: :mod:`agent.service.middleware` identifies the caller of every request once
(:meth:`Authenticator.identify`) and keeps the outcome in the ASGI scope, so the per-caller rate
limit and the access log key on a verified identity; the :func:`authenticate` dependency then
hands that :class:`Principal` to the route (or raises the error the identification ended in),
adding the caller's purpose of use. The credential is tried in this order: an API key
(``X-API-Key``, or a bearer value that is not a JWT), then an OIDC JWT when ``oidc.issuer`` is
set (:mod:`agent.service.oidc`). Keys are configured by their SHA-256 only. With neither keys nor
OIDC configured a development process runs open, as a local "dev" user with every role;
production refuses to start that way (settings).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, Request
from pydantic import BaseModel

from agent.config import ApiKeySpec, Role, Settings
from agent.errors import MedagentError
from agent.service.oidc import (
    IdentityProviderUnavailableError,
    OidcVerifier,
    TokenRejectedError,
    check_oidc_settings,
    looks_like_jwt,
)

ALL_ROLES: tuple[Role, ...] = ("clinician", "auditor", "admin", "service")

#: The HL7 v3 PurposeOfUse codes (code system v3-ActReason) a caller may give in
#: ``X-Purpose-Of-Use``: those that fit a clinical decision-support service, each a member of
#: the v3 PurposeOfUse value set (2.16.840.1.113883.1.11.20448). The trace and its FHIR export
#: record the code as given.
PURPOSES_OF_USE: dict[str, str] = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "BTG": "break the glass",
    "CAREMGT": "care management",
    "PATRQT": "patient requested",
    "PATSFTY": "patient safety",
    "HOPERAT": "healthcare operations",
    "HQUALIMP": "health quality improvement",
    "HSYSADMIN": "health system administration",
    "RECORDMGT": "records management",
    "HPAYMT": "healthcare payment",
    "COVERAGE": "coverage under policy or program",
    "PUBHLTH": "public health",
    "HRESCH": "healthcare research",
    "CLINTRL": "clinical trial research",
    "TRAIN": "training",
}

#: Where the middleware leaves the outcome of identifying the caller, in the ASGI scope.
IDENTITY_SCOPE_KEY = "medagent.identity"

AuthMethod = Literal["api_key", "oidc", "dev"]


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


class InvalidPurposeOfUseError(MedagentError):
    """``X-Purpose-Of-Use`` is not one of the accepted HL7 v3 PurposeOfUse codes."""

    code = "invalid_purpose_of_use"
    exit_code = 2
    http_status = 422


class Principal(BaseModel):
    """The caller: user id, roles, how they authenticated, and their purpose of use."""

    user: str
    roles: list[Role]
    key_name: str
    purpose_of_use: str | None = None
    auth_method: AuthMethod = "api_key"
    #: The token's ``iss`` and ``sub`` for OIDC callers (the stable identity behind ``user``).
    issuer: str | None = None
    subject: str | None = None

    def has(self, *roles: Role) -> bool:
        """Return whether the caller holds any of ``roles``."""
        return any(role in self.roles for role in roles)

    @property
    def caller_id(self) -> str:
        """Return a stable, PHI-free name for the caller, for rate limits and the access log.

        API keys go by their configured name; OIDC users by a hash of issuer and subject (a
        subject is often an e-mail address, which has no place in a log).
        """
        if self.auth_method == "oidc":
            digest = hashlib.sha256(f"{self.issuer}\0{self.subject}".encode()).hexdigest()[:16]
            return f"oidc:{digest}"
        if self.auth_method == "dev":
            return "dev"
        return f"key:{self.key_name}"


def new_api_key(user: str, roles: list[Role], name: str) -> tuple[str, ApiKeySpec]:
    """Return a fresh random key and the settings entry that admits it (only its hash)."""
    key = "mak_" + secrets.token_urlsafe(32)
    return key, ApiKeySpec(name=name, key_sha256=hashlib.sha256(key.encode()).hexdigest(), user=user, roles=roles)


def purpose_of_use(headers: Mapping[str, str]) -> str | None:
    """Return the caller's purpose of use from ``X-Purpose-Of-Use`` (upper-cased), or None when absent.

    Raises:
        InvalidPurposeOfUseError: the header holds anything but an accepted code.
    """
    raw = headers.get("x-purpose-of-use")
    if raw is None or not raw.strip():
        return None
    code = raw.strip().upper()
    if code in PURPOSES_OF_USE:
        return code
    # Echo the value only when it is code-shaped: free text here could be anything, PHI included.
    shown = f"{raw.strip()!r} " if re.fullmatch(r"[A-Za-z]{1,20}", raw.strip()) else ""
    raise InvalidPurposeOfUseError(
        f"X-Purpose-Of-Use {shown}is not an accepted HL7 v3 PurposeOfUse code (one of {', '.join(PURPOSES_OF_USE)})"
    )


class Authenticator:
    """Identify callers for one app's settings (holds the OIDC verifier and its JWKS cache)."""

    def __init__(self, settings: Settings) -> None:
        service = settings.service
        check_oidc_settings(service.oidc)
        self._keys = list(service.api_keys)
        self.verifier = OidcVerifier(service.oidc) if service.oidc.issuer else None
        #: Whether the API runs open (development with neither keys nor OIDC configured).
        self.open = not self._keys and self.verifier is None

    async def identify(self, headers: Mapping[str, str]) -> Principal:
        """Return the caller named by the request's credentials (purpose of use not yet set).

        Raises:
            NotAuthenticatedError: no credential, or one that is not valid (with the reason).
            IdentityProviderUnavailableError: a JWT came but the provider's keys cannot be fetched.
        """
        if self.open:
            return Principal(user="dev", roles=list(ALL_ROLES), key_name="none (dev, open)", auth_method="dev")
        api_key = headers.get("x-api-key") or None
        bearer = _bearer(headers)
        if api_key is None and bearer is not None and (self.verifier is None or not looks_like_jwt(bearer)):
            api_key = bearer
            bearer = None
        if api_key is not None:
            return self._by_key(api_key)
        if bearer is not None and self.verifier is not None:
            return await self._by_token(bearer)
        raise NotAuthenticatedError(f"credentials are required: {self._accepted()}")

    def _accepted(self) -> str:
        ways = []
        if self._keys:
            ways.append("an API key (Authorization: Bearer <key> or X-API-Key)")
        if self.verifier is not None:
            ways.append("an OIDC bearer token (Authorization: Bearer <JWT>)")
        return " or ".join(ways)

    def _by_key(self, presented: str) -> Principal:
        if not self._keys:
            raise NotAuthenticatedError("API keys are not accepted here; send an OIDC bearer token")
        digest = hashlib.sha256(presented.encode()).hexdigest()
        for spec in self._keys:
            if hmac.compare_digest(digest, spec.key_sha256):
                return Principal(user=spec.user, roles=list(spec.roles), key_name=spec.name, auth_method="api_key")
        raise NotAuthenticatedError("the API key is not valid")

    async def _by_token(self, token: str) -> Principal:
        assert self.verifier is not None
        try:
            verified = await self.verifier.verify(token)
        except TokenRejectedError as exc:
            raise NotAuthenticatedError(exc.message) from exc
        return Principal(
            user=verified.user,
            roles=verified.roles,
            key_name="oidc",
            auth_method="oidc",
            issuer=verified.issuer,
            subject=verified.subject,
        )


def _bearer(headers: Mapping[str, str]) -> str | None:
    header = headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def authenticator_for(app: FastAPI) -> Authenticator:
    """Return the app's authenticator, building it on first use from the app's settings."""
    authenticator: Authenticator | None = getattr(app.state, "authenticator", None)
    if authenticator is None:
        authenticator = Authenticator(app.state.runtime.settings)
        app.state.authenticator = authenticator
    return authenticator


_PURPOSE_HEADER_DOC = Header(
    alias="X-Purpose-Of-Use",
    description="Why the caller reads this data: an HL7 v3 PurposeOfUse code, recorded in the trace (default TREAT).",
    json_schema_extra={"enum": list(PURPOSES_OF_USE)},
)


async def authenticate(
    request: Request,
    x_purpose_of_use: Annotated[str | None, _PURPOSE_HEADER_DOC] = None,
) -> Principal:
    """Return the caller (a FastAPI dependency).

    ``x_purpose_of_use`` is declared so that the OpenAPI spec documents the header; it is read
    and checked by :func:`purpose_of_use`, which names the accepted codes when it is wrong.

    Raises:
        NotAuthenticatedError: credentials are required and none valid was presented.
        IdentityProviderUnavailableError: a bearer JWT came but the identity provider is unreachable.
        InvalidPurposeOfUseError: ``X-Purpose-Of-Use`` is not an accepted code.
    """
    identity = request.scope.get(IDENTITY_SCOPE_KEY)
    if identity is None:
        # Not identified by the middleware (an app built without it): do it here.
        try:
            identity = await authenticator_for(request.app).identify(request.headers)
        except (NotAuthenticatedError, IdentityProviderUnavailableError) as exc:
            identity = exc
    if isinstance(identity, MedagentError):
        raise identity
    principal: Principal = identity
    return principal.model_copy(update={"purpose_of_use": purpose_of_use(request.headers)})


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
