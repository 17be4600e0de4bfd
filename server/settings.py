"""Process-wide settings, read once from the environment (prefix ``ALIGNGATE_``).

Owns: where aligngate keeps its data, where it listens, default engine sizing.
Does not know: which models are served (that is the models file, see ``registry``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "aligngate"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNGATE_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Data directory.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    config: Path | None = Field(default=None, description="Models file (YAML).")
    # KV cache per engine on CPU, in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = Field(default=2, ge=1, le=64)
    # On CPU, engine cores fork from a process that imported vLLM during start-up (~7 s
    # sooner ready); false: vLLM's own spawn (engine.core_process).
    engine_core_preload: bool = True
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (comma-separated
    # addresses or networks, as uvicorn's --forwarded-allow-ips; "*": any). Unset: none,
    # the client address is the socket's, so no header can make a remote client loopback.
    forwarded_allow_ips: str | None = None
    log_level: str = "info"
    # text | json (one JSON object per line, with the request id; vLLM's loggers too).
    log_format: Literal["text", "json"] = "text"
    # OpenTelemetry traces (as vLLM's --otlp-traces-endpoint): the gateway's spans and each
    # engine's; OTEL_EXPORTER_OTLP_TRACES_PROTOCOL picks grpc (default) or http/protobuf.
    otlp_traces_endpoint: str | None = None
    # One log line per request on the event loop; request counts and latencies are in /metrics.
    access_log: bool = False
    # LoRA adapters: the admin API and `aligngate align` read and write folders only here
    # (relative: against the working directory at start).
    adapters_dir: Path = Path("adapters")
    # The promotion gate's instructions (a JSON list or JSONL of {instruction}); unset: the
    # official AlpacaEval set through the `datasets` library.
    gate_instructions: Path | None = None
    # The share of each model's stored traffic held out from training and exports, for
    # evaluation (chosen by a hash of the completion id); a models-file entry's
    # `online.holdout` overrides it.
    holdout: float = Field(default=0.1, ge=0, lt=1)
    # Bearer key for the /admin routes; unset, they answer loopback clients only.
    admin_key: str | None = Field(default=None, repr=False)
    # Bearer key that opens /metrics alone (a Prometheus scraper's); /metrics otherwise
    # needs the admin key (unset: loopback clients), unless `metrics_public`.
    metrics_key: str | None = Field(default=None, repr=False)
    # API keys for inference and feedback: comma-separated, and/or a file of `KEY` or
    # `ID KEY` lines. None configured: loopback clients only.
    api_keys: str | None = Field(default=None, repr=False)
    api_keys_file: Path | None = None
    # One inference key, as vLLM's VLLM_API_KEY (`aligngate serve --api-key` wins over it).
    api_key: str | None = Field(default=None, repr=False)
    # Backpressure: requests in flight per engine (running + waiting) before 429; a
    # models-file entry's `max_pending_requests` overrides it. On a cluster: per replica
    # serving the model (the limit grows and shrinks with them).
    max_pending_requests: int = Field(default=128, ge=1, le=1_000_000)
    # Request bodies larger than this get 413 (before they are read, when declared).
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # SIGTERM: how long running requests may finish (new ones get 503) before the stop.
    shutdown_timeout_s: int = Field(default=30, ge=0, le=3600)
    # API key ids whose judgments the online loop trains on without review (comma-separated;
    # "loopback" is the keyless mode's one tenant). Trust comes from keys, never from the
    # `annotator` label a request carries.
    trusted_annotators: str = ""
    # Feedback per API key per minute (429 past it); 0: no limit.
    feedback_per_minute: int = Field(default=120, ge=0)
    # Generation requests / tokens (prompt + completion) per API key per minute (429 past
    # them); 0: no limit. A keys-file line's `rpm=` / `tpm=` overrides them for its key; the
    # admin key has none.
    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    # Without keys (loopback trust), Host names accepted beside loopback ones (comma-separated;
    # "*": any). Guards against DNS rebinding; irrelevant once keys are configured.
    allowed_hosts: str = ""
    # /metrics without a key (Prometheus scrapers); /health is always open.
    metrics_public: bool = False
    # SQLAlchemy URL of the store; default: SQLite at <home>/aligngate.db.
    # PostgreSQL: postgresql+psycopg://user:password@127.0.0.1:5432/aligngate
    database_url: str | None = None

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def trusted_annotator_list(self) -> list[str]:
        return [a.strip() for a in self.trusted_annotators.split(",") if a.strip()]

    def inline_api_keys(self) -> str | None:
        """ALIGNGATE_API_KEYS and ALIGNGATE_API_KEY (or `--api-key`) together."""
        keys = [k for k in (self.api_keys, self.api_key) if k]
        return ",".join(keys) or None

    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'aligngate.db'}"
