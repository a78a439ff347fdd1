"""The similar-case index in PostgreSQL with pgvector: one table of images, one of metadata.

For deployments that already run PostgreSQL: the vectors live next to the trace, are backed up
with it and are searched by pgvector's HNSW index with cosine distance. HNSW was chosen over
IVFFlat because its recall does not depend on lists trained on the first rows loaded (IVFFlat's
lists go stale as studies are added, the very use here) and it needs no retraining; its build
is slower, which matters once, at the first load. Measured here (2 shared cores, 100,000 x 1152
clustered vectors, ``agent.bench.retrieval.measure_pgvector``): HNSW built in 50 s, p50 6.6 ms,
p99 13 ms, recall@10 0.958; IVFFlat (lists = rows / 1000, probes = sqrt(lists)) built in 11 s,
p50 8.0 ms, p99 108 ms, recall@10 0.963.

Tables: ``<table>`` (entry columns + ``embedding vector(dim)``, unique SOP instance UID) and
``<table>_meta`` (the model identity and dim that claimed the index). The first add creates the
table, bulk-loads with binary COPY, then builds the HNSW index (much faster than inserting into
an existing graph); later adds insert and pgvector updates the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from psycopg import sql

from agent.errors import ConfigError, SourceUnavailableError
from agent.retrieval import ivf
from agent.retrieval.entries import ENTRY_COLUMNS, IndexedModel, IndexEntry, IndexInfo, StudyHit, studies_from_hits
from agent.retrieval.protocols import FloatMatrix, check_model

_COLUMNS = ENTRY_COLUMNS
_TYPES = ["text"] * 9 + ["timestamptz", "vector"]
#: Rows per COPY / INSERT batch.
BATCH = 2_000
#: hnsw.ef_search used unless more candidates are needed (pgvector's default is 40).
DEFAULT_EF_SEARCH = 100


def conninfo_of(url: str) -> str:
    """Return a libpq connection string for an SQLAlchemy PostgreSQL URL.

    Raises:
        ConfigError: the URL is not a PostgreSQL URL.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        raise ConfigError(f"the pgvector index needs a PostgreSQL URL, not {parsed.drivername}://...")
    parts = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "dbname": parsed.database,
    }
    from psycopg.conninfo import make_conninfo

    return make_conninfo("", **{k: str(v) for k, v in parts.items() if v is not None}, **dict(parsed.query))  # type: ignore[arg-type]


class PgVectorIndex:
    """An :class:`~agent.retrieval.protocols.ImageIndex` in PostgreSQL with pgvector.

    Args:
        url: SQLAlchemy URL of a database where the ``vector`` extension exists or may be created.
        table: the images table (``<table>_meta`` holds the model identity).
        create: create the extension if missing; otherwise a missing table is an error on search.
        ef_search: HNSW candidate list size per query (recall vs speed); default 100.
        method: ``hnsw`` (default) or ``ivfflat`` (lists = rows / 1000, probes = sqrt(lists)),
            kept for the benchmark's comparison of build times.
    """

    backend = "pgvector"

    def __init__(
        self,
        url: str,
        *,
        table: str,
        create: bool = False,
        ef_search: int | None = None,
        method: Literal["hnsw", "ivfflat"] = "hnsw",
    ) -> None:
        import psycopg
        from pgvector.psycopg import register_vector

        self.table = table
        self.ef_search = ef_search or DEFAULT_EF_SEARCH
        #: The search index made at the first add (an existing table keeps the one it has).
        self.method = method
        try:
            self._conn = psycopg.connect(conninfo_of(url), autocommit=True)
        except psycopg.Error as exc:
            raise SourceUnavailableError(f"cannot connect to the pgvector database ({type(exc).__name__})") from exc
        if create:
            try:
                self._conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as exc:
                raise ConfigError(
                    f"the database has no pgvector extension and it cannot be created here: {exc}"
                ) from exc
        try:
            register_vector(self._conn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError("the database has no pgvector extension (CREATE EXTENSION vector)") from exc
        self._t = sql.Identifier(table)
        self._meta_t = sql.Identifier(f"{table}_meta")
        self._conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, value text NOT NULL)").format(self._meta_t)
        )

    # --- public API ------------------------------------------------------------------------------

    def add(self, entries: Sequence[IndexEntry], vectors: FloatMatrix, model: IndexedModel) -> int:
        """Add entries with their vectors (re-added instances replace their old rows)."""
        if vectors.ndim != 2 or vectors.shape[0] != len(entries):
            raise ValueError(f"{len(entries)} entries but vectors of shape {vectors.shape}")
        if vectors.shape[1] != model.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dimensions, the model {model.dim}")
        if not entries:
            return 0
        with self._conn.transaction():
            # One writer claims the index at a time: the model check and the claim are atomic.
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            recorded = self._recorded_model()
            check_model(recorded, model, f"table {self.table}")
            fresh = recorded is None or not self._table_exists()
            if fresh:
                self._create_table(model.dim)
                self._set_meta("model", model.model_dump_json())
            sops = [e.sop_instance_uid for e in entries]
            self._conn.execute(sql.SQL("DELETE FROM {} WHERE sop_instance_uid = ANY(%s)").format(self._t), (sops,))
            self._copy_rows(entries, vectors)
            if fresh:
                self._create_search_index()
        return len(entries)

    def delete(self, *, study_uid: str | None = None, sop_instance_uids: Sequence[str] = ()) -> int:
        """Delete a study's rows, or the given instances."""
        if study_uid is None and not sop_instance_uids:
            raise ValueError("delete needs a study UID or SOP instance UIDs")
        if not self._table_exists():
            return 0
        count = 0
        with self._conn.transaction():
            if study_uid is not None:
                cur = self._conn.execute(sql.SQL("DELETE FROM {} WHERE study_uid = %s").format(self._t), (study_uid,))
                count += cur.rowcount
            if sop_instance_uids:
                cur = self._conn.execute(
                    sql.SQL("DELETE FROM {} WHERE sop_instance_uid = ANY(%s)").format(self._t),
                    (list(sop_instance_uids),),
                )
                count += cur.rowcount
        return count

    def search(
        self, vector: FloatMatrix, k: int, *, exclude_study_uid: str | None = None, model: IndexedModel | None = None
    ) -> list[StudyHit]:
        """Return the top ``k`` studies by best image cosine (HNSW, over-fetching image rows)."""
        recorded = self._recorded_model()
        if model is not None:
            check_model(recorded, model, f"table {self.table}")
        if k <= 0 or recorded is None or not self._table_exists():
            return []
        query = ivf.unit_rows(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]
        want = max(4 * k, 32)
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
        while True:
            with self._conn.transaction():
                self._conn.execute(
                    sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(max(self.ef_search, want)))
                )
                rows = self._conn.execute(
                    sql.SQL(
                        "SELECT {cols}, 1 - (embedding <=> %(q)s) AS score FROM {t}"
                        " {where} ORDER BY embedding <=> %(q)s LIMIT %(n)s"
                    ).format(
                        cols=columns,
                        t=self._t,
                        where=sql.SQL("WHERE study_uid <> %(ex)s") if exclude_study_uid else sql.SQL(""),
                    ),
                    {"q": query, "n": want, "ex": exclude_study_uid},
                ).fetchall()
            pairs = [(_entry_of(row[:-1]), float(row[-1])) for row in rows]
            hits = studies_from_hits(pairs, k, exclude_study_uid)
            if len(hits) >= k or len(rows) < want or want >= 4000:
                return hits
            want *= 4

    def rebuild(self) -> IndexInfo:
        """Rebuild the HNSW graph from the live rows and reclaim deleted space."""
        if self._table_exists():
            self._conn.execute(sql.SQL("REINDEX TABLE {}").format(self._t))
            self._conn.execute(sql.SQL("VACUUM ANALYZE {}").format(self._t))
        return self.info()

    def info(self) -> IndexInfo:
        """Describe the table: model, dim, rows, studies."""
        model = self._recorded_model()
        count = studies = 0
        if self._table_exists():
            count, studies = self._conn.execute(
                sql.SQL("SELECT count(*), count(DISTINCT study_uid) FROM {}").format(self._t)
            ).fetchone() or (0, 0)
        return IndexInfo(
            backend="pgvector",
            location=f"table {self.table}",
            model_id=model.model_id if model else None,
            revision=model.revision if model else None,
            test_model=model.test_model if model else False,
            dim=model.dim if model else None,
            count=int(count),
            studies=int(studies),
            details={"search": self.method, "ef_search": self.ef_search, "bytes": self.table_bytes()},
        )

    def table_bytes(self) -> int:
        """Return the bytes the table, its TOAST data and its indexes take."""
        if not self._table_exists():
            return 0
        row = self._conn.execute("SELECT pg_total_relation_size(%s::regclass)", (self.table,)).fetchone()
        return int(row[0]) if row else 0

    def drop(self) -> None:
        """Drop both tables (benchmarks and tests; not exposed on the command line)."""
        self._conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._t))
        self._conn.execute(sql.SQL("DELETE FROM {}").format(self._meta_t))

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> PgVectorIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------

    def _table_exists(self) -> bool:
        row = self._conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self.table,)).fetchone()
        return bool(row and row[0])

    def _create_table(self, dim: int) -> None:
        self._conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {t} ("
                " id bigserial PRIMARY KEY,"
                " study_uid text NOT NULL, series_uid text NOT NULL, sop_instance_uid text NOT NULL UNIQUE,"
                " modality text, patient_ref text, imaging_study_ref text, source text NOT NULL,"
                " dicomweb_url text, label text, added_at timestamptz NOT NULL,"
                " embedding vector({dim}) NOT NULL)"
            ).format(t=self._t, dim=sql.Literal(dim))
        )
        self._conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (study_uid)").format(
                sql.Identifier(f"ix_{self.table}_study"), self._t
            )
        )

    def _create_search_index(self) -> None:
        # Parallel HNSW build (pgvector >= 0.6) needs memory for the graph; the default 64 MB
        # spills to disk past a few tens of thousands of 1152-d vectors.
        self._conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
        if self.method == "ivfflat":
            row = self._conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._t)).fetchone()
            lists = max(1, int(row[0] if row else 0) // 1000)
            self._set_meta("ivfflat_lists", str(lists))
            statement = sql.SQL("CREATE INDEX {} ON {} USING ivfflat (embedding vector_cosine_ops) WITH (lists = {})")
            self._conn.execute(
                statement.format(sql.Identifier(f"ix_{self.table}_ivfflat"), self._t, sql.Literal(lists))
            )
            return
        self._conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_cosine_ops)").format(
                sql.Identifier(f"ix_{self.table}_hnsw"), self._t
            )
        )

    def _probes(self) -> int:
        row = self._conn.execute(
            sql.SQL("SELECT value FROM {} WHERE key = 'ivfflat_lists'").format(self._meta_t)
        ).fetchone()
        return max(1, int(int(row[0]) ** 0.5)) if row else 1

    def _copy_rows(self, entries: Sequence[IndexEntry], vectors: FloatMatrix) -> None:
        statement = sql.SQL("COPY {} ({}, embedding) FROM STDIN WITH (FORMAT BINARY)").format(
            self._t, sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
        )
        with self._conn.cursor().copy(statement) as copy:
            copy.set_types(_TYPES)
            for start in range(0, len(entries), BATCH):
                block = ivf.unit_rows(vectors[start : start + BATCH])
                for entry, row in zip(entries[start : start + BATCH], block, strict=True):
                    copy.write_row((*_entry_values(entry), row))

    def _recorded_model(self) -> IndexedModel | None:
        row = self._conn.execute(sql.SQL("SELECT value FROM {} WHERE key = 'model'").format(self._meta_t)).fetchone()
        return IndexedModel.model_validate_json(row[0]) if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._conn.execute(
            sql.SQL(
                "INSERT INTO {} (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ).format(self._meta_t),
            (key, value),
        )


def _entry_values(entry: IndexEntry) -> tuple[Any, ...]:
    values = entry.model_dump()
    return tuple(values[c] for c in _COLUMNS)


def _entry_of(row: Sequence[Any]) -> IndexEntry:
    return IndexEntry.model_validate(dict(zip(_COLUMNS, row, strict=True)))
