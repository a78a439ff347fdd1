"""Where conversation threads live: a LangGraph checkpointer chosen by settings (SQLite or PostgreSQL).

Where it sits: :func:`agent.runner.run_ask` opens one around a run that has a ``thread_id``, and
compiles the graph with it; the thread's state (earlier turns, pending interrupts) is kept there.
The serializer is told exactly which of our types the state holds, so nothing else is revived
from a checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langgraph.checkpoint.serde.base import CipherProtocol, SerializerProtocol
from langgraph.checkpoint.serde.encrypted import EncryptedSerializer
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pydantic import SecretStr

from agent.config import DEFAULT_DATA_DIR, AgentSettings
from agent.domain.answer import Citation
from agent.domain.imaging import Finding, LabelScore
from agent.domain.plan import Plan
from agent.domain.refs import InstanceRef
from agent.domain.similar import SimilarCase
from agent.errors import AuditError, ConfigError

#: The default thread store beside the trace database.
DEFAULT_THREADS_PATH = DEFAULT_DATA_DIR / "threads.db"
_STATE_TYPES = (Plan, Finding, LabelScore, InstanceRef, SimilarCase, Citation)


class FernetCipher(CipherProtocol):
    """Encrypts checkpoints with the audit content key (Fernet: AES-128-CBC + HMAC).

    A thread's state holds clinical text (earlier questions, answers, cited facts), so when trace
    content is encrypted at rest, so is this.
    """

    name = "fernet"

    def __init__(self, key: str) -> None:
        from cryptography.fernet import Fernet

        try:
            self._fernet = Fernet(key.encode())
        except Exception as exc:
            raise ConfigError("the audit content key must be a Fernet key (32 url-safe base64 bytes)") from exc

    def encrypt(self, plaintext: bytes) -> tuple[str, bytes]:
        """Return the cipher's name and the token."""
        return self.name, self._fernet.encrypt(plaintext)

    def decrypt(self, ciphername: str, ciphertext: bytes) -> bytes:
        """Return the plaintext of a token.

        Raises:
            AuditError: another cipher, the wrong key or a damaged checkpoint.
        """
        from cryptography.fernet import InvalidToken

        if ciphername != self.name:
            raise AuditError(f"a thread checkpoint is encrypted with {ciphername!r}, not {self.name!r}")
        try:
            return self._fernet.decrypt(ciphertext)
        except InvalidToken as exc:
            raise AuditError("a thread checkpoint cannot be decrypted with the configured content key") from exc


def serializer(content_key: SecretStr | None = None) -> SerializerProtocol:
    """Return the checkpoint serializer, allowing exactly the domain types the graph state holds.

    Args:
        content_key: the audit content key; when set, checkpoints are encrypted with it (older
            unencrypted checkpoints still load).
    """
    plain = JsonPlusSerializer(allowed_msgpack_modules=list(_STATE_TYPES))
    if content_key is None:
        return plain
    return EncryptedSerializer(FernetCipher(content_key.get_secret_value()), plain)


def checkpointer_location(settings: AgentSettings) -> tuple[str, str]:
    """Return ``("postgres", conninfo)`` or ``("sqlite", path)`` for the configured thread store.

    Raises:
        ConfigError: a URL of another database kind.
    """
    url = settings.checkpointer_url.get_secret_value() if settings.checkpointer_url else None
    if not url:
        return "sqlite", str(DEFAULT_THREADS_PATH)
    if re.match(r"^postgres(ql)?(\+\w+)?://", url):
        # psycopg takes a libpq URL: drop SQLAlchemy's driver suffix
        return "postgres", re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)
    if url.startswith("sqlite:///"):
        return "sqlite", url.removeprefix("sqlite:///")
    if "://" in url:
        raise ConfigError("agent.checkpointer_url must be a SQLite path, a sqlite:/// URL or a postgresql:// URL")
    return "sqlite", url


@asynccontextmanager
async def open_checkpointer(settings: AgentSettings, content_key: SecretStr | None = None) -> AsyncIterator[Any]:
    """Open the thread store for one run (tables created on first use) and close it afterwards.

    Args:
        content_key: ``audit.content_key``: checkpoints are then encrypted at rest.
    """
    serde = serializer(content_key)
    kind, where = checkpointer_location(settings)
    if kind == "postgres":
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        async with AsyncPostgresSaver.from_conn_string(where, serde=serde) as saver:
            await saver.setup()
            yield saver
        return
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    Path(where).parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(where) as conn:
        lite = AsyncSqliteSaver(conn, serde=serde)
        await lite.setup()
        yield lite
