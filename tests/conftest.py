"""Shared test fixtures. Server fixtures live in tests/support and are loaded as plugins."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from agent.audit.db import make_engine
from tests.support.databases import EngineFactory, fresh_postgres_database

pytest_plugins = ["tests.support.plugin_servers"]


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's MEDAGENT_* variables and .env out of every test."""
    for key in list(os.environ):
        if key.startswith("MEDAGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Scripted reasoners are not test models, so the "auto" planner would plan with them; tests of
    # the model planner and of "auto" ask for them (tests/graph/test_plan_flow.py), the rest plan
    # from terms. CLI subprocesses (tests/e2e/cli.py) start without it and decide "auto" themselves.
    monkeypatch.setenv("MEDAGENT_AGENT__PLANNER", "terms")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Yield an empty trace database URL: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trace.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture
def new_engine() -> Iterator[EngineFactory]:
    """Make trace engines (agent.audit.db.make_engine) and dispose of them after the test."""
    made: list[Engine] = []

    def factory(url: str) -> Engine:
        engine = make_engine(url)
        made.append(engine)
        return engine

    yield factory
    for engine in made:
        engine.dispose()


@pytest.fixture(scope="session")
def test_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny random-weight MedSigLIP and MedGemma once per session; return their parent folder."""
    from agent.inference.tiny_models import ensure_test_models

    base = tmp_path_factory.mktemp("test-models")
    ensure_test_models(base)
    return base
