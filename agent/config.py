"""Settings for every stage of the flow, in one object with nested groups.

Sources, in increasing priority: defaults (the embedded, no-set-up configuration), an optional
``.env`` file, environment variables prefixed ``MEDAGENT_`` with groups split by ``__``
(``MEDAGENT_DB__URL``), and CLI flags (applied by the CLI as overrides). Settings are built by
:func:`get_settings`, never at import, so tests construct their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.errors import ConfigError

#: The repository root (the package is installed editable; fixtures and migrations live beside it).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURES = PROJECT_ROOT / "fixtures"
DEFAULT_DATA_DIR = Path(".medagent")


class FhirSettings(BaseModel):
    """Where patient history comes from: a FHIR R4 server, or a folder of bundles."""

    base_url: str | None = Field(None, description="FHIR R4 base URL; wins over bundle_dir when set.")
    bundle_dir: Path | None = Field(None, description="Folder of FHIR bundles (the embedded default).")
    timeout_s: float = 30.0
    username: str | None = None
    password: SecretStr | None = None
    bearer_token: SecretStr | None = None
    max_pages: int = Field(50, description="Upper bound on `next` links followed per search.")
    concurrency: int = Field(4, ge=1, le=32, description="FHIR requests in flight at once per run.")
    max_retries: int = Field(3, ge=0, le=10, description="Retries of 429, 5xx, timeouts and connection errors.")
    backoff_base_s: float = Field(0.2, gt=0, description="First retry wait; doubles per retry, with jitter.")
    backoff_max_s: float = Field(5.0, gt=0, description="Longest wait between retries.")
    retry_after_max_s: float = Field(30.0, gt=0, description="Longest Retry-After honoured; beyond it, fail.")
    smart_client_id: str | None = Field(
        None, description="SMART Backend Services client id; setting it turns SMART auth on."
    )
    smart_private_key_file: Path | None = Field(
        None, description="PEM private key: RSA >= 2048 bits for RS384, EC P-384 for ES384."
    )
    smart_algorithm: Literal["RS384", "ES384"] = "RS384"
    smart_key_id: str | None = Field(None, description="kid of the assertion; default: RFC 7638 thumbprint.")
    smart_scopes: str = Field("system/*.rs", description="Scopes requested with client_credentials.")
    smart_token_url: str | None = Field(None, description="Token endpoint; skips .well-known discovery.")
    smart_renew_before_s: float = Field(60.0, ge=0, description="Renew a token when less than this remains.")

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> FhirSettings:
        if self.smart_client_id:
            if self.smart_private_key_file is None:
                raise ValueError("fhir.smart_client_id needs fhir.smart_private_key_file")
            if self.bearer_token or self.username:
                raise ValueError("use SMART auth or basic/bearer auth for FHIR, not both")
        return self

    def effective_bundle_dir(self) -> Path:
        """Return the bundle folder to use when no server URL is configured."""
        return self.bundle_dir or DEFAULT_FIXTURES / "fhir"


class DicomSettings(BaseModel):
    """Where images come from: a DICOMweb server, or a folder of DICOM files."""

    dicomweb_url: str | None = Field(None, description="DICOMweb root; wins over dicom_dir when set.")
    dicom_dir: Path | None = Field(None, description="Folder of DICOM files (the embedded default).")
    timeout_s: float = 30.0
    username: str | None = None
    password: SecretStr | None = None
    bearer_token: SecretStr | None = None
    max_instances: int = Field(4, description="Images of one study sent on to the models.")
    endpoint_allowed_origins: list[str] = Field(
        default_factory=list,
        description=(
            "Other DICOMweb origins (scheme://host:port) an ImagingStudy's Endpoint may send the agent to. "
            "The configured server's origin is always allowed; any other Endpoint is ignored, so a record "
            "cannot make the agent contact a host of its choosing."
        ),
    )

    def effective_dicom_dir(self) -> Path:
        """Return the DICOM folder to use when no DICOMweb URL is configured."""
        return self.dicom_dir or DEFAULT_FIXTURES / "dicom"


class ModelSettings(BaseModel):
    """Which checkpoints to load and how."""

    medgemma: str = Field("google/medgemma-4b-it", description="Hub id or local folder.")
    medsiglip: str = Field("google/medsiglip-448", description="Hub id or local folder.")
    test_models_dir: Path = Field(
        DEFAULT_DATA_DIR / "test-models",
        description="Where tiny random-weight models are built when real weights are missing.",
    )
    use_test_models: bool = Field(False, description="Force the tiny random-weight models.")
    fallback_to_test_models: bool = Field(
        False, description="Use tiny models (with a banner) when real weights are missing."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_new_tokens: int = Field(256, ge=1, le=8192)
    context_token_budget: int = Field(
        3000, ge=200, description="Upper bound on the patient record's size in the prompt (tokens, estimated)."
    )
    backend: Literal["local", "remote"] = Field(
        "local", description="MedGemma in-process (transformers) or behind an OpenAI-compatible chat endpoint."
    )
    remote_url: str | None = Field(None, description="OpenAI-compatible API root, e.g. http://127.0.0.1:8001/v1.")
    remote_model: str | None = Field(None, description="Model name the remote server serves (request's `model`).")
    remote_api_key: SecretStr | None = Field(None, description="Bearer key for the remote endpoint.")
    remote_timeout_s: float = Field(120.0, gt=0, description="Per-call timeout of the remote endpoint.")
    remote_max_retries: int = Field(3, ge=0, le=10, description="Retries on 429/5xx/connection errors.")
    call_timeout_s: float = Field(600.0, gt=0, description="Upper bound on any one model call (both backends).")
    reasoner_max_images: int = Field(
        1, ge=0, le=8, description="Images sent to MedGemma (frontal first); each costs ~9 s on a 2-core CPU."
    )


class ImagingSettings(BaseModel):
    """What MedSigLIP adds beyond zero-shot labels: a trained classifier and similar-case search."""

    classifier_path: Path | None = Field(
        None, description="A probe saved by `medagent classify fit`; its predictions join the zero-shot findings."
    )
    index_backend: Literal["file", "pgvector"] = Field(
        "file", description="Similar-case index: an embedded index folder, or PostgreSQL with pgvector."
    )
    index_path: Path = Field(DEFAULT_DATA_DIR / "image-index", description="Folder of the embedded index.")
    index_url: SecretStr | None = Field(
        None, description="SQLAlchemy URL of a PostgreSQL database with the vector extension (pgvector backend)."
    )
    index_table: str = Field("medagent_image_index", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    similar_cases: int = Field(3, ge=0, le=20, description="Similar prior cases put before MedGemma (0: none).")

    @field_validator("classifier_path", "index_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value


class DbSettings(BaseModel):
    """The trace database."""

    url: SecretStr = Field(
        SecretStr(f"sqlite:///{DEFAULT_DATA_DIR / 'medagent.db'}"),
        description="SQLAlchemy URL; secret because it may hold a password.",
    )
    auto_migrate: bool = Field(True, description="Apply migrations before the first run (dev only).")
    max_concurrent_runs: int = Field(
        8,
        ge=1,
        le=256,
        description="Runs of one process that record at once; more wait their turn (each holds a pooled connection).",
    )


class AuditSettings(BaseModel):
    """Integrity and confidentiality of the trace; keys live here, never in the database."""

    hmac_key: SecretStr | None = Field(None, description="Shared secret for HMAC-SHA256 checkpoint signatures.")
    ed25519_private_key_file: Path | None = Field(None, description="PEM Ed25519 key that signs checkpoints.")
    ed25519_public_key_file: Path | None = Field(None, description="PEM public key: verify without signing.")
    content_key: SecretStr | None = Field(
        None, description="Fernet key encrypting prompts, outputs and notes in the trace, and thread checkpoints."
    )
    checkpoint_every: int = Field(100, ge=1, description="Write a signed checkpoint every N records (and per run).")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector: each finished run's spans are sent there (content never)."
    )

    @field_validator(
        "hmac_key", "content_key", "ed25519_private_key_file", "ed25519_public_key_file", "otlp_endpoint", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker-compose passes unset optional secrets as empty strings.
        return None if value == "" else value


Role = Literal["clinician", "auditor", "admin", "service"]

#: Record types holding clinical content (everything but the Patient itself and imaging metadata).
#: Billing resources (Claim, ExplanationOfBenefit) are not clinical context and are never read.
CLINICAL_TYPES = [
    "Condition",
    "Observation",
    "MedicationRequest",
    "AllergyIntolerance",
    "Encounter",
    "DiagnosticReport",
    "DocumentReference",
    "Procedure",
    "Immunization",
    "CarePlan",
    "Goal",
    "Device",
    "FamilyMemberHistory",
    "ServiceRequest",
]


class AgentSettings(BaseModel):
    """How the ask graph plans, limits and remembers runs."""

    planner: Literal["auto", "model", "terms"] = Field(
        "auto",
        description="'model': MedGemma plans from a manifest of the record (one call, one repair, then terms); "
        "'terms': the plan comes from the question's terms, with no model call; 'auto': model with real "
        "weights, terms with the tiny test models (whose output is noise).",
    )
    fetch: Literal["auto", "plan", "all"] = Field(
        "auto",
        description="'plan': fetch only the plan's record types; 'all': every history type; 'auto': plan when "
        "the model plans, else all.",
    )
    images: Literal["auto", "plan", "always"] = Field(
        "auto",
        description="'plan': retrieve images only when the plan needs them; 'always': whenever the patient has "
        "a study; 'auto': plan when the model plans, else always.",
    )
    max_steps: int = Field(25, ge=1, le=1000, description="Graph steps a run may take (LangGraph recursion limit).")
    checkpointer_url: SecretStr | None = Field(
        None,
        description="Where conversation threads are kept: a SQLite path or sqlite:/// URL (default "
        ".medagent/threads.db), or a postgresql:// URL for the service; secret as it may hold a password.",
    )
    restricted_types: dict[str, list[str]] = Field(
        default_factory=lambda: {"auditor": list(CLINICAL_TYPES)},
        description="Role -> record types it may not read without confirming a purpose; the graph asks first.",
    )
    thread_turns: int = Field(3, ge=0, le=20, description="Earlier turns of a thread put in the prompt.")


class ApiKeySpec(BaseModel):
    """One API key: only its SHA-256 is configured, never the key itself."""

    name: str = Field(description="A label for the key (shown in logs and the trace, never the key).")
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    user: str
    roles: list[Role]


class OidcSettings(BaseModel):
    """OIDC bearer tokens: JWTs verified against the issuer's JWKS (off unless ``issuer`` is set)."""

    issuer: str | None = Field(None, description="The expected `iss`; setting it turns OIDC on.")
    audience: str | None = Field(None, description="The expected `aud`.")
    jwks_url: str | None = Field(None, description="Where the signing keys are (default: discovered from the issuer).")
    roles_claim: str = Field("roles", description="The claim (dotted path allowed) holding the caller's roles.")
    user_claim: str = Field("sub", description="The claim naming the caller.")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "PS256"])
    leeway_s: int = Field(30, ge=0, le=300)
    jwks_cache_s: int = Field(300, ge=0)

    @model_validator(mode="after")
    def _audience_with_issuer(self) -> OidcSettings:
        if self.issuer and not self.audience:
            raise ValueError(
                "service.oidc.audience is required with an issuer: tokens minted for other apps are refused"
            )
        return self


class ServiceSettings(BaseModel):
    """The HTTP API."""

    host: str = "127.0.0.1"
    port: int = 8000
    public_base_url: str | None = Field(
        None, description="The URL clients reach the service at (links in CDS cards); default http://host:port."
    )
    api_keys: list[ApiKeySpec] = Field(
        default_factory=list,
        description="API keys (JSON list; `medagent config api-key` makes one). Without any, dev runs open.",
    )
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    rate_limit_per_minute: int = Field(
        120,
        ge=0,
        description="Token bucket per caller (key, user or address): bursts up to N, N per minute; 0 or an open "
        "dev process: no limit.",
    )
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to call the API from a browser.")
    subscription_secret: SecretStr | None = Field(
        None, description="The shared secret FHIR servers send in the subscription's header (required in prod)."
    )
    subscription_secret_header: str = "X-Subscription-Secret"


class JobsSettings(BaseModel):
    """Triggered summaries: the job queue and what a job does."""

    backend: Literal["inprocess", "saq"] = Field(
        "inprocess", description="inprocess: a worker task in the API process over the SQL jobs table; saq: Redis."
    )
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), description="The saq backend's Redis.")
    queue_name: str = "medagent-summaries"
    max_attempts: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(2.0, ge=0, description="First retry delay; doubled each attempt, with jitter.")
    job_timeout_s: float = Field(600, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    concurrency: int = Field(1, ge=1, le=32)
    summary_question: str = Field(
        "Summarize this patient's current problems, medications, allergies, recent results and imaging.",
        description="The question a summary job asks.",
    )
    write_back: bool = Field(
        False, description="Write each summary to the FHIR server (DocumentReference + Provenance)."
    )


class Settings(BaseSettings):
    """The effective configuration of one process."""

    model_config = SettingsConfigDict(
        env_prefix="MEDAGENT_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    environment: Literal["dev", "prod"] = "dev"
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    imaging: ImagingSettings = Field(default_factory=ImagingSettings)
    db: DbSettings = Field(default_factory=DbSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)

    @model_validator(mode="after")
    def _write_back_needs_a_server(self) -> Settings:
        if self.jobs.write_back and not self.fhir.base_url:
            raise ValueError(
                "jobs.write_back needs a FHIR server (fhir.base_url); with SMART auth add "
                "system/DocumentReference.c and system/Provenance.c to fhir.smart_scopes"
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "prod":
            if self.models.use_test_models or self.models.fallback_to_test_models:
                raise ValueError("test models are refused when environment=prod")
            if self.db.url.get_secret_value().startswith("sqlite"):
                raise ValueError("environment=prod needs a server database, not SQLite")
            if not (self.service.api_keys or self.service.oidc.issuer):
                raise ValueError(
                    "environment=prod needs API keys (MEDAGENT_SERVICE__API_KEYS) or OIDC: the API is never open"
                )
            if self.service.subscription_secret is None:
                raise ValueError("environment=prod needs MEDAGENT_SERVICE__SUBSCRIPTION_SECRET for FHIR notifications")
            if not (self.audit.hmac_key or self.audit.ed25519_private_key_file):
                raise ValueError(
                    "environment=prod needs an audit signing key (MEDAGENT_AUDIT__HMAC_KEY or an Ed25519 key file)"
                )
        return self

    def masked(self) -> dict[str, Any]:
        """Return the settings as plain data with every secret replaced by ``**********``."""
        data = self.model_dump(mode="json")
        url = self.db.url.get_secret_value()
        data["db"]["url"] = _mask_url_password(url)
        data["jobs"]["redis_url"] = _mask_url_password(self.jobs.redis_url.get_secret_value())
        if self.imaging.index_url is not None:
            data["imaging"]["index_url"] = _mask_url_password(self.imaging.index_url.get_secret_value())
        return data


def _mask_url_password(url: str) -> str:
    """Hide the password in a database URL but keep the rest readable."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "**********"


def get_settings(**overrides: Any) -> Settings:
    """Build settings from defaults, ``.env`` and the environment, then apply overrides.

    Args:
        **overrides: values for top-level groups, e.g. ``fhir={"base_url": ...}``; nested
            dicts are merged into the group rather than replacing it.

    Raises:
        ConfigError: when the result is invalid.
    """
    try:
        base = Settings()
        if not overrides:
            return base
        merged = base.model_dump()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update({k: v for k, v in value.items() if v is not None})
            elif value is not None:
                merged[key] = value
        return Settings.model_validate(merged)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
