"""Keys for the trace: checkpoint signatures (HMAC-SHA256 or Ed25519) and content encryption.

Keys come from settings (environment or files outside the database), never from the database
itself, so an attacker who can write the trace cannot re-sign it. Without a signing key,
checkpoints are plain SHA-256 digests: they still detect accidental truncation, but not a
forger; ``audit verify`` says so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Protocol

from agent.errors import AuditError, ConfigError

UNSIGNED = "sha256"
HMAC_SHA256 = "hmac-sha256"
ED25519 = "ed25519"


class CheckpointSigner(Protocol):
    """Signs and verifies checkpoint statements."""

    algorithm: str
    key_id: str

    def sign(self, message: bytes) -> str:
        """Return the signature of ``message`` (text)."""
        ...

    def verify(self, message: bytes, signature: str) -> bool:
        """Return whether ``signature`` is valid for ``message``."""
        ...


class DigestSigner:
    """No key: the 'signature' is a SHA-256 digest (detects damage, not forgery)."""

    algorithm = UNSIGNED
    key_id = "none"

    def sign(self, message: bytes) -> str:
        """Return the hex SHA-256 of the message."""
        return hashlib.sha256(message).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        """Return whether the digest matches."""
        return hmac.compare_digest(self.sign(message), signature)


class HmacSigner:
    """HMAC-SHA256 with a shared secret."""

    algorithm = HMAC_SHA256

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("the audit HMAC key must be at least 16 bytes")
        self._key = key
        self.key_id = hashlib.sha256(b"medagent-key-id:" + key).hexdigest()[:16]

    def sign(self, message: bytes) -> str:
        """Return the hex HMAC of the message."""
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        """Return whether the HMAC matches (constant time)."""
        return hmac.compare_digest(self.sign(message), signature)


class Ed25519Signer:
    """Ed25519: sign with the private key; auditors verify with the public key alone."""

    algorithm = ED25519

    def __init__(self, private_key_pem: bytes | None = None, public_key_pem: bytes | None = None) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

        try:
            self._private: Ed25519PrivateKey | None = None
            if private_key_pem is not None:
                loaded = serialization.load_pem_private_key(private_key_pem, password=None)
                if not isinstance(loaded, Ed25519PrivateKey):
                    raise ConfigError("the audit signing key is not an Ed25519 private key")
                self._private = loaded
                public = loaded.public_key()
            elif public_key_pem is not None:
                loaded_public = serialization.load_pem_public_key(public_key_pem)
                if not isinstance(loaded_public, Ed25519PublicKey):
                    raise ConfigError("the audit verify key is not an Ed25519 public key")
                public = loaded_public
            else:
                raise ConfigError("Ed25519 needs a private key (to sign) or a public key (to verify)")
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"cannot read the Ed25519 key: {type(exc).__name__}") from exc
        self._public = public
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    def sign(self, message: bytes) -> str:
        """Return the base64 Ed25519 signature."""
        if self._private is None:
            raise AuditError("this process holds only the Ed25519 public key: it can verify, not sign")
        return base64.b64encode(self._private.sign(message)).decode()

    def verify(self, message: bytes, signature: str) -> bool:
        """Return whether the signature is valid."""
        from cryptography.exceptions import InvalidSignature

        try:
            self._public.verify(base64.b64decode(signature), message)
            return True
        except (InvalidSignature, ValueError):
            return False


class ContentCipher:
    """Fernet (AES-128-CBC + HMAC) encryption of PHI-bearing trace content."""

    media_type = "application/json+fernet"

    def __init__(self, key: str) -> None:
        from cryptography.fernet import Fernet

        try:
            self._fernet = Fernet(key.encode())
        except Exception as exc:
            raise ConfigError("the audit content key must be a Fernet key (32 url-safe base64 bytes)") from exc

    def encrypt(self, text: str) -> str:
        """Return the token for ``text``."""
        return self._fernet.encrypt(text.encode()).decode()

    def decrypt(self, token: str) -> str:
        """Return the text of a token.

        Raises:
            AuditError: wrong key or damaged token.
        """
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise AuditError("trace content cannot be decrypted with the configured key") from exc


def signer_from_settings(
    hmac_key: str | None, ed25519_private_key_file: Path | None, ed25519_public_key_file: Path | None
) -> CheckpointSigner:
    """Choose the checkpoint signer the settings describe (Ed25519, else HMAC, else digest only)."""
    if ed25519_private_key_file is not None or ed25519_public_key_file is not None:
        try:
            private = ed25519_private_key_file.read_bytes() if ed25519_private_key_file else None
            public = ed25519_public_key_file.read_bytes() if ed25519_public_key_file else None
        except OSError as exc:
            raise ConfigError(f"cannot read the audit key file: {exc.strerror}") from exc
        return Ed25519Signer(private, public)
    if hmac_key:
        return HmacSigner(hmac_key.encode())
    return DigestSigner()


def verifiers_for(signer: CheckpointSigner) -> dict[str, CheckpointSigner]:
    """Return the verifiers available for checkpoints, by algorithm (digest always included)."""
    verifiers: dict[str, CheckpointSigner] = {UNSIGNED: DigestSigner()}
    verifiers[signer.algorithm] = signer
    return verifiers
