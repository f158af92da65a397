"""Service settings: a YAML/JSON file, then SPARC_* environment variables (read by pydantic-settings), then
command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import EnvSettingsSource, SettingsError

from index.params import DEFAULT_PATH, SearchPath
from sparc_core.config import ConfigError, EncodersConfig, build_config, load_config_file

ENV_PREFIX = "SPARC_"
_MAP_FIELDS = ("indexes",)  # values, replaced whole by a variable (nested settings merge instead)


class ServiceSettings(BaseModel):
    """Everything `sparc serve` needs; every field has an env override SPARC_<NAME> (JSON for maps)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = "runs/demo/sparc"
    # a deployment file (service/deployment.py: a checkpoint and the bundles built with it); when set, its
    # checkpoint and indexes replace the two settings above, and a change to it is switched in as a whole
    deployment_file: str | None = None
    indexes: dict[str, list[str]] = {}  # index name -> bundle directories (its shards)
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0 picks a free port
    metrics_port: int = Field(9464, ge=0, le=65535)  # Prometheus /metrics; 0 disables
    workers: int = Field(16, ge=1)  # gRPC handler threads; calls beyond them are refused (RESOURCE_EXHAUSTED)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_top_k: int = Field(1000, ge=1)
    max_batch: int = Field(1024, ge=1)  # queries per SearchBatch call
    max_hits_per_call: int = Field(200_000, ge=1)  # queries x top_k x indexes of one call, refused before any work
    max_explained_hits_per_call: int = Field(20_000, ge=1)  # the same, for hits with explanations
    max_text_chars: int = Field(4096, ge=1)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(16_000_000, ge=1)  # larger images are refused before decoding
    image_decoders: int = Field(2, ge=1)  # images decoded at once (each can take ~4 bytes per pixel)
    max_abs_value: float = Field(1e6, gt=0)  # vector queries with larger entries are refused
    max_abs_boost: float = Field(100.0, gt=0)  # latent boosts must lie in [-max_abs_boost, max_abs_boost]
    max_in_flight: int | None = Field(None, ge=1)  # concurrent calls doing work (default and at most: workers)
    # open streaming calls, all clients (default: workers // 4, at least 1, and always leaving unary calls a
    # worker: 0 with one worker, when streams are refused)
    max_streams: int | None = Field(None, ge=0)
    max_streams_per_client: int = Field(4, ge=1)  # open streaming calls per client address
    max_stream_buffer_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # requests one stream may have read ahead
    stream_idle_seconds: float = Field(30.0, gt=0)  # a stream with no message either way for this long is ended
    # open health Watch streams (default: workers // 8, at least 1, within what streams leave: 0 with two
    # workers or fewer, where Watch is refused and the unary health Check answers)
    max_health_watches: int | None = Field(None, ge=0)
    request_wait_seconds: float = Field(10.0, gt=0)  # a call whose request message has not arrived by then is ended
    # seconds between checks for a new complete version of each served bundle (its CURRENT moved): found, it
    # is opened, checked and swapped in without a restart (0: only on SIGHUP / SparcServer.reload_now)
    reload_poll_seconds: float = Field(10.0, ge=0)
    max_gradient_calls: int = Field(2, ge=1)  # Localize / AttributeText / ExplainPair calls queued or running at once
    gradient_replica: bool = True  # gradient work on its own copy of the models (search never waits for it)
    batch_max_size: int = Field(256, ge=1)  # micro-batching: queries encoded together
    batch_max_wait_ms: float = Field(0.0, ge=0)  # micro-batching: extra wait for company (0: batch what is queued)
    default_path: SearchPath = DEFAULT_PATH
    auth_token: str | None = None  # if set, calls need "authorization: Bearer <token>" (env SPARC_AUTH_TOKEN)
    auth_token_file: str | None = None  # or read the token from this file (never from the command line)
    # the admin calls' own bearer token (SparcAdminService: ReloadIndex), read from this file; without it the
    # admin calls are off (FAILED_PRECONDITION) and the search token never opens them
    admin_token_file: str | None = None
    reflection: bool = True  # gRPC server reflection (behind the token when auth is on)
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, the server speaks TLS only
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    grace_seconds: float = Field(10.0, ge=0)  # SIGTERM: in-flight calls get this long to finish, then are cancelled
    device: str = "auto"
    faiss_gpus: str | None = None  # GPUs holding dense indexes: none, all, or 0,1 (default: none when device is cpu, else all)
    faiss_gpu_shard: bool = False  # over several GPUs: shard each dense index (larger than one GPU) instead of replicating
    encoders: EncodersConfig | None = None  # CLIP / DINOv2 local weights; without them only vector queries are served
    text_stream: str | None = None  # default stream for text queries (default: the only text encoder's)
    image_stream: str | None = None  # default stream for image queries (default: the first image encoder's)

    @field_validator("indexes")
    @classmethod
    def _names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, paths in v.items():
            if not name or not paths:
                raise ValueError(f"index {name!r} needs a name and at least one bundle directory")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            have, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{have} is set but {missing} is not: TLS needs both (refusing to serve plaintext)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (client certificates) needs tls_cert and tls_key")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("set auth_token or auth_token_file, not both")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token is empty")
        if self.max_in_flight is not None and self.max_in_flight > self.workers:
            raise ValueError(f"max_in_flight {self.max_in_flight} exceeds workers {self.workers}: it could never be reached")
        if self.stream_limit + self.health_watch_limit >= self.workers:
            raise ValueError(
                f"max_streams ({self.stream_limit}) + max_health_watches ({self.health_watch_limit}) must be below "
                f"workers ({self.workers}), so that unary calls always have a worker"
            )
        return self

    @property
    def in_flight_limit(self) -> int:
        return self.max_in_flight or self.workers

    @property
    def stream_limit(self) -> int:
        if self.max_streams is not None:
            return self.max_streams
        return min(max(1, self.workers // 4), self.workers - 1)

    @property
    def health_watch_limit(self) -> int:
        if self.max_health_watches is not None:
            return self.max_health_watches
        return min(max(1, self.workers // 8), max(0, self.workers - 1 - self.stream_limit))

    def admin_token(self) -> str | None:
        """The admin calls' bearer token, read from admin_token_file (ConfigError naming the file)."""
        if self.admin_token_file is None:
            return None
        token = _read_token(self.admin_token_file, "admin_token_file")
        if token == self.token():
            raise ConfigError("admin_token_file holds the search token: the admin calls need a credential of their own")
        return token

    def token(self) -> str | None:
        """The bearer token, from auth_token or read from auth_token_file (ConfigError naming the file)."""
        if self.auth_token_file is None:  # stripped, as clients' tokens are: "tok\n" from an env file is "tok"
            return self.auth_token.strip() if self.auth_token is not None else None
        return _read_token(self.auth_token_file, "auth_token_file")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, key by key, recursing into nested dicts."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def environment_settings(environ: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """The SPARC_* variables of ``environ`` (default: the process environment) as settings values, read by
    pydantic-settings: names case-insensitive, maps / lists / nested settings as JSON
    (``SPARC_INDEXES='{"a": ["bundles/a"]}'``), one key of a nested setting with ``__``
    (``SPARC_ENCODERS__DEVICE=cpu``), every other value verbatim ("0,1" stays a GPU list)."""
    source = _Environment(ServiceSettings, environ if environ is not None else os.environ)
    return source()


class _Environment(EnvSettingsSource):
    def __init__(self, settings_cls: type[BaseModel], environ: Mapping[str, str | None]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX, env_nested_delimiter="__")

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # the mapping given instead of os.environ; names compared lower-cased (case_sensitive is off)
        return {k.lower(): v for k, v in self._environ.items()}


def load_settings(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> ServiceSettings:
    """Settings from an optional file, SPARC_* environment variables and explicit overrides, validated. A
    variable replaces the file's value of its field; nested settings (``encoders``) merge key by key."""
    data: dict[str, Any] = load_config_file(path) if path else {}
    where = str(path) if path else "service settings"
    try:
        env = environment_settings(environ)
    except SettingsError as e:
        raise ConfigError(f"{where}: environment: {e} (a SPARC_* variable of a map, list or nested setting holds JSON)") from None
    for name, value in env.items():
        nested = isinstance(value, dict) and isinstance(data.get(name), dict) and name not in _MAP_FIELDS
        data[name] = _merge(data[name], value) if nested else value
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(ServiceSettings, data, where)


def _read_token(path: str, setting: str) -> str:
    """A token from a file, stripped (ConfigError naming the setting and the file when unreadable or empty)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"{setting} {path}: unreadable ({e.strerror})") from None
    if not token:
        raise ConfigError(f"{setting} {path}: empty")
    return token
