"""A deployment: one file naming a checkpoint and the index bundles built with it, switched as a whole.

A new checkpoint changes every code, so it can only go live together with bundles built from it. The
service reads ``deployment_file`` at start and checks it like its indexes (``reload_poll_seconds``, SIGHUP,
``ReloadIndex``): when its content changes, a complete new engine (the checkpoint, its encoders and every
index, each checked against that checkpoint) is loaded beside the serving one and switched in with one
assignment; a call takes the engine once, so no query is ever encoded with one checkpoint and scored
against another's codes, and the old engine is closed when its last call ends. A deployment that cannot
load is refused and the old one keeps serving.

``sparc deploy --file F --checkpoint C --index NAME=DIR[,DIR...]`` writes the file atomically and keeps the
previous one beside it (``F.previous``); ``sparc deploy --file F --rollback`` switches back to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparc_core.atomic import atomic_write_json
from sparc_core.config import ConfigError

PREVIOUS = ".previous"


class Deployment(BaseModel):
    """What a deployment file holds."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    indexes: dict[str, list[str]] = Field(min_length=1)  # index name -> bundle directories (or one Milvus location)


def read_deployment(path: str | Path) -> Deployment:
    """The checked deployment file (paths relative to it resolved); ConfigError naming the problem."""
    p = Path(path)
    try:
        d = Deployment.model_validate(json.loads(p.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"{p}: deployment file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not JSON ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{p}: invalid deployment ({'.'.join(map(str, err['loc']))}: {err['msg']})") from None

    def resolve(x: str) -> str:
        if x.startswith(("milvus://", "milvus-lite:")) or Path(x).is_absolute():
            return x
        return str((p.parent / x).resolve())

    return Deployment(checkpoint=resolve(d.checkpoint), indexes={n: [resolve(x) for x in v] for n, v in d.indexes.items()})


def write_deployment(path: str | Path, checkpoint: str, indexes: dict[str, list[str]]) -> Path:
    """Write a deployment file atomically; the one it replaces is kept as ``PATH.previous`` (for rollback)."""
    p = Path(path)
    new = Deployment(checkpoint=checkpoint, indexes=indexes).model_dump()
    if p.is_file():
        atomic_write_json(p.with_name(p.name + PREVIOUS), json.loads(p.read_text()))
    atomic_write_json(p, new)
    return p


def rollback(path: str | Path) -> Path:
    """Point the deployment file back at the previous deployment (and keep the current one as previous)."""
    p = Path(path)
    prev = p.with_name(p.name + PREVIOUS)
    if not prev.is_file():
        raise ConfigError(f"{prev}: no previous deployment to roll back to")
    before, now = json.loads(prev.read_text()), json.loads(p.read_text())
    atomic_write_json(p, before)
    atomic_write_json(prev, now)
    return p


def fingerprint(path: str | Path) -> str:
    """What identifies a deployment file's content (a change means a new deployment)."""
    return Path(path).read_text()


__all__ = ["Deployment", "fingerprint", "read_deployment", "rollback", "write_deployment"]
