"""Settings: MEDAGENT_ env with __ groups, .env, overrides, masking, unsafe production refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import get_settings
from agent.errors import ConfigError


def test_env_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDAGENT_FHIR__BASE_URL", "http://fhir.example/r4")
    monkeypatch.setenv("MEDAGENT_DB__URL", "postgresql+psycopg://u:hunter2@db/medagent")
    monkeypatch.setenv("MEDAGENT_MODELS__MAX_NEW_TOKENS", "64")
    settings = get_settings()
    assert settings.fhir.base_url == "http://fhir.example/r4"
    assert settings.models.max_new_tokens == 64
    assert settings.db.url.get_secret_value().endswith("@db/medagent")


def test_dotenv_file_is_read_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        "MEDAGENT_DICOM__DICOMWEB_URL=http://from-dotenv/dicom-web\nMEDAGENT_SERVICE__PORT=9000\n"
    )
    monkeypatch.setenv("MEDAGENT_SERVICE__PORT", "9100")
    settings = get_settings()
    assert settings.dicom.dicomweb_url == "http://from-dotenv/dicom-web"
    assert settings.service.port == 9100


def test_overrides_merge_into_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDAGENT_FHIR__TIMEOUT_S", "5")
    settings = get_settings(fhir={"base_url": "http://x"})
    assert settings.fhir.base_url == "http://x"
    assert settings.fhir.timeout_s == 5


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDAGENT_DB__URL", "postgresql+psycopg://u:hunter2@db/medagent")
    monkeypatch.setenv("MEDAGENT_FHIR__BEARER_TOKEN", "tok-123")
    masked = get_settings().masked()
    assert "hunter2" not in str(masked) and "tok-123" not in str(masked)
    assert masked["db"]["url"] == "postgresql+psycopg://u:***@db/medagent"
    assert masked["fhir"]["bearer_token"] == "**********"


def test_production_refuses_test_models_and_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDAGENT_ENVIRONMENT", "prod")
    with pytest.raises(ConfigError, match="server database"):
        get_settings()
    monkeypatch.setenv("MEDAGENT_DB__URL", "postgresql+psycopg://u@db/medagent")
    monkeypatch.setenv("MEDAGENT_MODELS__USE_TEST_MODELS", "true")
    with pytest.raises(ConfigError, match="test models"):
        get_settings()


def test_invalid_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDAGENT_SERVICE__PORT", "not-a-port")
    with pytest.raises(ConfigError, match="invalid settings"):
        get_settings()
