"""The config file as a user writes it: strict (unknown keys are errors), frozen, no behaviour.

`config.compile` turns a validated `RootConfig` into a runtime; nothing here talks to the network.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = [
    "AccountingConfig",
    "AdminConfig",
    "AnthropicProviderConfig",
    "BreakerConfig",
    "BudgetConfig",
    "CacheConfig",
    "ConcurrencyConfig",
    "EstimateConfig",
    "DeploymentConfig",
    "FaultsConfig",
    "HttpUpstreamConfig",
    "KeyConfig",
    "LatencyConfig",
    "LoggingConfig",
    "ModelConfig",
    "OpenAICompatibleProviderConfig",
    "OutputLengthConfig",
    "PricingConfig",
    "ProviderConfig",
    "RateLimitConfig",
    "ResilienceConfig",
    "RetryBudgetConfig",
    "RootConfig",
    "ServerConfig",
    "SimulatedProviderConfig",
    "StateConfig",
    "TimeoutsConfig",
]

RESERVED_PREFIX = "setpoint:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutsConfig(_Strict):
    connect_s: float = Field(5.0, gt=0)
    ttft_s: float | None = Field(None, gt=0, description="time to the first byte of the answer")
    idle_s: float | None = Field(None, gt=0, description="longest gap between two stream chunks")
    read_s: float = Field(600.0, gt=0, description="total time for one upstream call")


class HttpUpstreamConfig(_Strict):
    """What every HTTP provider has: its timeouts, its connection pool and a bound on what it may send."""

    timeouts: TimeoutsConfig = TimeoutsConfig()
    max_connections: int = Field(1024, ge=1)
    max_response_bytes: int = Field(
        256 * 1024 * 1024, ge=1024,
        description="a longer non-streamed answer is a 502 (streams are relayed, not held); "
        "the default holds a full float-JSON embeddings batch",
    )


class OpenAICompatibleProviderConfig(HttpUpstreamConfig):
    """Any upstream that speaks OpenAI's HTTP API: OpenAI, vLLM, llama.cpp, Ollama, Groq, Together."""

    type: Literal["openai_compatible"]
    base_url: str
    api_key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    supports_stream_usage: bool = Field(
        True, description="upstream honours stream_options.include_usage (set false for old servers)"
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class AnthropicProviderConfig(HttpUpstreamConfig):
    """Anthropic's Messages API (`POST {base_url}/v1/messages`), translated to and from OpenAI's chat format."""

    type: Literal["anthropic"]
    base_url: str = "https://api.anthropic.com"
    api_key: str | None = Field(None, description="sent as x-api-key")
    headers: dict[str, str] = Field(default_factory=dict, description="e.g. anthropic-beta; may override anthropic-version")
    default_max_tokens: int = Field(
        4096, ge=1, description="max_tokens sent when the request sets none (Anthropic requires one)"
    )

    @field_validator("base_url")
    @classmethod
    def _root_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        v = v.rstrip("/")
        if v.endswith("/v1"):
            raise ValueError("leave out the trailing /v1: the adapter appends /v1/messages")
        return v


class LatencyConfig(_Strict):
    ttft_ms: float = Field(30.0, ge=0, description="time to first token")
    per_token_ms: float = Field(2.0, ge=0, description="cadence between streamed tokens")
    jitter: float = Field(0.2, ge=0, le=1, description="relative uniform jitter on both")


class OutputLengthConfig(_Strict):
    min_tokens: int = Field(8, ge=1)
    max_tokens: int = Field(64, ge=1)


class FaultsConfig(_Strict):
    """Probability of each fault per request (drawn deterministically from the seed)."""

    rate_limit: float = Field(0.0, ge=0, le=1, description="429 with Retry-After")
    retry_after_s: float = Field(1.0, ge=0)
    server_error: float = Field(0.0, ge=0, le=1, description="500")
    unavailable: float = Field(0.0, ge=0, le=1, description="503")
    stall: float = Field(0.0, ge=0, le=1, description="no answer for stall_s (a timeout upstream)")
    stall_s: float = Field(30.0, ge=0)
    cut_stream: float = Field(0.0, ge=0, le=1, description="stream ends mid-answer, no [DONE]")
    malformed_sse: float = Field(0.0, ge=0, le=1, description="a garbage line inside the stream")
    slow_drip: float = Field(0.0, ge=0, le=1, description="tokens arrive at 10x the cadence")


class SimulatedProviderConfig(_Strict):
    """The built-in deterministic, fault-injecting upstream (demo, tests, simulator)."""

    type: Literal["simulated"]
    timeouts: TimeoutsConfig = TimeoutsConfig()
    seed: int = 0
    latency: LatencyConfig = LatencyConfig()
    output: OutputLengthConfig = OutputLengthConfig()
    faults: FaultsConfig = FaultsConfig()
    embedding_dim: int = Field(64, ge=1, le=4096)


ProviderConfig = Annotated[
    OpenAICompatibleProviderConfig | AnthropicProviderConfig | SimulatedProviderConfig, Field(discriminator="type")
]


class PricingConfig(_Strict):
    """USD per one million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0, description="default: the input price")
    output_per_mtok: float = Field(0.0, ge=0)
    reasoning_per_mtok: float | None = Field(None, ge=0, description="default: the output price")


class DeploymentConfig(_Strict):
    provider: str
    model: str = Field(description="model name sent upstream")
    weight: float = Field(1.0, gt=0, description="share of traffic under the weighted strategy")
    context_window: int | None = Field(None, ge=1, description="prompt + output tokens it accepts")
    pricing: PricingConfig | None = None
    extra_body: dict[str, object] = Field(
        default_factory=dict, description="fields merged into every upstream request body"
    )


class SemanticCacheConfig(_Strict):
    """Serve a cached answer to a prompt that means the same (all-MiniLM-L6-v2; `setpoint[semantic]`)."""

    threshold: float = Field(0.95, ge=0.8, le=1.0, description="cosine similarity needed for a hit")
    guard: bool = Field(True, description="refuse hits whose numbers, negations, antonyms or names differ")
    multi_turn: bool = Field(False, description="also match the last user turn of a conversation (same earlier turns)")
    tools: bool = Field(False, description="also match requests that offer tools (same tool set)")
    max_entries: int = Field(10_000, ge=1, description="entries kept per partition (oldest evicted)")


class CacheConfig(_Strict):
    """Response cache for one model alias (shared state store: `state.url`)."""

    ttl_s: float = Field(3600.0, gt=0)
    nondeterministic: bool = Field(False, description="also cache requests without temperature 0")
    partition: Literal["team", "key"] = Field("team", description="tenant boundary: a team (or the key if it has none), or each key")
    semantic: SemanticCacheConfig | None = Field(None, description="also match prompts by meaning (opt-in)")


class ModelConfig(_Strict):
    deployments: list[DeploymentConfig] = Field(min_length=1)
    kind: Literal["chat", "embedding"] = "chat"
    strategy: Literal["fallback", "weighted", "least_latency", "least_busy", "cost"] = Field(
        "fallback", description="order in which deployments are tried"
    )
    degrade_to: str | None = Field(
        None, description="alias to use when every deployment's breaker is open or overloaded"
    )
    degrade_priorities: list[Literal["critical", "default", "sheddable"]] = Field(
        default_factory=lambda: ["default", "sheddable"], description="priority classes that may be degraded"
    )
    max_output_tokens: int = Field(
        4096, ge=1, description="worst-case output when a request sets no max_tokens (budget reservations)"
    )
    cache: CacheConfig | None = Field(None, description="exact response cache; off when absent")


class RetryBudgetConfig(_Strict):
    ratio: float = Field(0.2, ge=0, le=10, description="extra attempts allowed per client request")
    min_per_s: float = Field(1.0, ge=0, description="floor so that a quiet gateway can still retry")
    window_s: float = Field(10.0, gt=0)


class BreakerConfig(_Strict):
    window_s: float = Field(60.0, gt=0)
    min_calls: int = Field(20, ge=1)
    failure_rate: float = Field(0.5, gt=0, le=1)
    slow_call_s: float | None = Field(None, gt=0, description="time to first token counted as slow")
    slow_call_rate: float = Field(1.0, gt=0, le=1)
    open_s: float = Field(30.0, gt=0)
    half_open_probes: int = Field(3, ge=1)


class ConcurrencyConfig(_Strict):
    initial: int | None = Field(
        None, ge=1,
        description="the limit before the upstream has signalled anything; default max_limit: nothing waits "
        "until a 429 or a slow first token says the deployment is saturated",
    )
    min_limit: int = Field(1, ge=1)
    max_limit: int = Field(1024, ge=1)
    queue: int = Field(256, ge=0, description="requests waiting per deployment")
    queue_timeout_s: float = Field(10.0, ge=0)
    ttft_target_s: float | None = Field(None, gt=0, description="slower first tokens lower the limit")


class ResilienceConfig(_Strict):
    max_attempts: int = Field(3, ge=1, le=10, description="per client request, across retries and fallbacks")
    backoff_base_s: float = Field(0.1, ge=0)
    backoff_cap_s: float = Field(2.0, ge=0)
    max_retry_after_s: float = Field(5.0, ge=0, description="longest upstream Retry-After honoured by waiting")
    max_cooldown_s: float = Field(30.0, ge=0, description="after a 429 a deployment is skipped for its Retry-After, at most this")
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    breaker: BreakerConfig = BreakerConfig()
    concurrency: ConcurrencyConfig = ConcurrencyConfig()


class StateConfig(_Strict):
    """Where shared limit and budget state lives."""

    url: str = Field("memory://", description="memory:// | sqlite:///path.db (relative to data_dir) | redis://host:port/db")
    timeout_s: float = Field(0.5, gt=0, description="per operation; past it the store counts as unavailable")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(("memory://", "sqlite://", "redis://", "rediss://", "unix://")):
            raise ValueError("must start with memory://, sqlite://, redis://, rediss:// or unix://")
        return v


class EstimateConfig(_Strict):
    """How output tokens are estimated before a call (TPM reservations, stream budget holds)."""

    default_output_tokens: int = Field(256, ge=1, description="until a key/model has history")
    quantile: float = Field(0.95, gt=0, le=1)
    window: int = Field(200, ge=1, description="recent outputs remembered per key and model")


class AccountingConfig(_Strict):
    prices: dict[str, PricingConfig] = Field(
        default_factory=dict, description="per upstream model name; overrides the shipped price table"
    )
    estimate: EstimateConfig = EstimateConfig()


StoreFailure = Literal["open", "closed"]


class RateLimitConfig(_Strict):
    """Requests and tokens per minute for each entity of a scope (or one named entity)."""

    scope: Literal["key", "team", "user", "model", "deployment"]
    name: str | None = Field(None, description="only this key/team/user/model/deployment; default: each one")
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1, description="input + output tokens per minute")
    input_tpm: int | None = Field(None, ge=1)
    output_tpm: int | None = Field(None, ge=1)
    on_store_error: StoreFailure = "open"


class BudgetConfig(_Strict):
    """A money budget for each entity of a scope (or one named entity), per period."""

    scope: Literal["key", "team", "user", "run"]
    name: str | None = None
    period: Literal["total", "daily", "monthly"] = "monthly"
    limit_usd: float = Field(gt=0)
    hard: bool = Field(True, description="hard: refuse and cut streams; soft: record an alert only")
    on_store_error: StoreFailure | None = Field(None, description="default: closed for hard, open for soft")
    degrade_to: str | None = Field(None, description="model alias to use when the remaining budget is low")
    degrade_below: float = Field(0.1, gt=0, lt=1, description="fraction of the limit under which degrade_to applies")


class KeyConfig(_Strict):
    """A virtual key declared in the file (its secret usually from `${ENV}`)."""

    name: str
    priority: Literal["critical", "default", "sheddable"] = "default"
    key: str = Field(min_length=16)
    team: str | None = None
    user: str | None = None
    models: list[str] = Field(default_factory=lambda: ["*"])
    metadata: dict[str, str] = Field(default_factory=dict)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    edge: bool = Field(
        True, description="serve the API endpoints with setpoint's own HTTP/1.1 edge (false: aiohttp serves everything)"
    )
    keepalive_timeout_s: float = Field(75.0, gt=0, description="close a kept-alive client connection idle this long")
    auth_cache_ttl_s: float = Field(
        5.0, ge=0, description="how long a key lookup is cached; bounds revocation delay across workers"
    )


class TracingConfig(_Strict):
    """OpenTelemetry traces (GenAI semantic conventions) over OTLP/HTTP; off by default."""

    enabled: bool = False
    endpoint: str = Field("http://127.0.0.1:4318/v1/traces", description="OTLP/HTTP traces endpoint")
    headers: dict[str, str] = Field(default_factory=dict, description="sent with each export (e.g. an API key)")
    service_name: str = "setpoint"
    sample_ratio: float = Field(1.0, ge=0, le=1, description="fraction of new traces recorded (a parent's decision wins)")


class ObservabilityConfig(_Strict):
    metrics: bool = Field(True, description="serve Prometheus metrics at /metrics")
    metrics_auth: Literal["none", "master_key"] = Field("none", description="require the master key as a bearer token")
    overhead_header: bool = Field(True, description="send x-setpoint-overhead-ms (gateway time excluding upstream)")
    tracing: TracingConfig = TracingConfig()


class AdminConfig(_Strict):
    master_key: str | None = Field(None, min_length=16, description="empty or unset disables /admin")

    @field_validator("master_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v == "" else v


class LoggingConfig(_Strict):
    store: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="sqlite: data_dir/requests.db; postgres: one database shared by every replica"
    )
    postgres_url: str | None = Field(
        None, validate_default=True, repr=False,  # it may hold a password
        description="postgresql://user:pass@host:5432/db, usually ${SETPOINT_PG_URL}",
    )
    store_content: bool = Field(False, description="store prompts and outputs in the request log")
    batch_size: int = Field(1000, ge=1)
    flush_interval_ms: int = Field(200, ge=1)
    spool_segment_bytes: int = Field(64 * 1024 * 1024, ge=4096)
    retention_days: int = Field(0, ge=0, description="delete request rows and rollups older than this many days; 0 (default) keeps everything")

    @field_validator("postgres_url")
    @classmethod
    def _url_for_postgres(cls, v: str | None, info: ValidationInfo) -> str | None:
        v = v or None  # an empty ${VAR:-} means unset
        if info.data.get("store") == "postgres":
            if v is None:
                raise ValueError("required when logging.store is postgres (e.g. ${SETPOINT_PG_URL})")
            if not v.startswith(("postgresql://", "postgres://")):
                raise ValueError("must be a URL starting with postgresql://")  # never echo it: it may hold a password
        return v


class RootConfig(_Strict):
    data_dir: str = ".setpoint"
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    logging: LoggingConfig = LoggingConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    state: StateConfig = StateConfig()
    accounting: AccountingConfig = AccountingConfig()
    resilience: ResilienceConfig = ResilienceConfig()
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    keys: list[KeyConfig] = Field(default_factory=list)
    rate_limits: list[RateLimitConfig] = Field(default_factory=list)
    budgets: list[BudgetConfig] = Field(default_factory=list)

    @field_validator("providers", "models")
    @classmethod
    def _no_reserved_names(cls, v: dict[str, object]) -> dict[str, object]:
        for name in v:
            if name.startswith(RESERVED_PREFIX):
                raise ValueError(f"name {name!r} uses the reserved prefix {RESERVED_PREFIX!r}")
        return v
