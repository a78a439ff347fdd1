"""Open the similar-case index the settings name: the embedded folder, or pgvector.

Called by the CLI (``medagent index ...``) and by whatever builds the run context; the rest of
the code sees only the :class:`~agent.retrieval.protocols.ImageIndex` interface.
"""

from __future__ import annotations

from agent.config import ImagingSettings
from agent.errors import ConfigError
from agent.retrieval.protocols import ImageIndex


def open_index(settings: ImagingSettings, *, create: bool) -> ImageIndex:
    """Return the configured index backend.

    Args:
        settings: the ``imaging`` settings group (``index_backend``, ``index_path``, ``index_url``,
            ``index_table``).
        create: create the folder / table on first use (adds); searches pass False so a typo in
            the path fails instead of searching a new empty index.

    Raises:
        ConfigError: pgvector without ``index_url``, or no index where one should exist.
    """
    if settings.index_backend == "pgvector":
        if settings.index_url is None:
            raise ConfigError("imaging.index_backend=pgvector needs imaging.index_url (MEDAGENT_IMAGING__INDEX_URL)")
        from agent.retrieval.pgvector_index import PgVectorIndex

        return PgVectorIndex(settings.index_url.get_secret_value(), table=settings.index_table, create=create)
    from agent.retrieval.file_index import FileIndex

    return FileIndex(settings.index_path, create=create)
