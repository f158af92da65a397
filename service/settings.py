"""Service settings: a YAML/JSON file, then SPARC_* environment variables, then command-line flags."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sparc_core.config import EncodersConfig, build_config, load_config_file

ENV_PREFIX = "SPARC_"


class ServiceSettings(BaseModel):
    """Everything `sparc serve` needs; every field has an env override SPARC_<NAME> (JSON for maps)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = "runs/demo/sparc"
    indexes: dict[str, list[str]] = {}  # index name -> bundle directories (its shards)
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0 picks a free port
    metrics_port: int = Field(9464, ge=0, le=65535)  # Prometheus /metrics; 0 disables
    workers: int = Field(16, ge=1)  # gRPC handler threads
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_top_k: int = Field(1000, ge=1)
    max_batch: int = Field(1024, ge=1)  # queries per SearchBatch call
    max_text_chars: int = Field(4096, ge=1)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_in_flight: int = Field(256, ge=1)  # concurrent calls before RESOURCE_EXHAUSTED
    batch_max_size: int = Field(256, ge=1)  # micro-batching: queries encoded together
    batch_max_wait_ms: float = Field(0.0, ge=0)  # micro-batching: extra wait for company (0: batch what is queued)
    default_path: Literal["sparse", "dense"] = "sparse"
    auth_token: str | None = None  # if set, calls need "authorization: Bearer <token>"
    tls_cert: str | None = None
    tls_key: str | None = None
    grace_seconds: float = Field(10.0, ge=0)  # SIGTERM: in-flight calls get this long to finish
    device: str = "auto"
    encoders: EncodersConfig | None = None  # CLIP / DINOv2 local weights; without them only vector queries are served
    text_stream: str | None = None  # default stream for text queries (default: the only text encoder's)
    image_stream: str | None = None  # default stream for image queries (default: the first image encoder's)
    max_image_pixels: int = Field(40_000_000, ge=1)  # larger images are refused before decoding

    @field_validator("indexes")
    @classmethod
    def _names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, paths in v.items():
            if not name or not paths:
                raise ValueError(f"index {name!r} needs a name and at least one bundle directory")
        return v


def load_settings(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> ServiceSettings:
    """Settings from an optional file, SPARC_* environment variables and explicit overrides, validated."""
    data: dict[str, Any] = load_config_file(path) if path else {}
    env = os.environ if environ is None else environ
    for name, field in ServiceSettings.model_fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if field.annotation in (int, float, str) or name in ("auth_token", "tls_cert", "tls_key"):
            data[name] = raw
        else:
            try:
                data[name] = json.loads(raw)
            except json.JSONDecodeError:
                data[name] = raw
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(ServiceSettings, data, str(path) if path else "service settings")
