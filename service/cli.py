"""``sparc serve``: registered into the sparc command via the sparc.commands entry point."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from sparc_core.cli import add_encoder_flags, encoder_overrides

DEMO_ROOT = Path("runs/demo")
DEMO_INDEXES = {"demo-dino": "dino", "demo-clip-img": "clip_img"}  # index name -> gallery stream


def register(sub: Any) -> None:
    """Add the ``serve`` command to the sparc parser."""
    p = sub.add_parser("serve", help="run the gRPC retrieval service (default: the demo's model and indexes)", allow_abbrev=False)
    p.add_argument("--config", help="YAML/JSON ServiceSettings (env SPARC_* and flags override it)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--metrics-port", dest="metrics_port", type=int, help="Prometheus /metrics port (0 disables)")
    p.add_argument("--checkpoint")
    p.add_argument(
        "--deployment", dest="deployment_file", help="a deployment file (sparc deploy): checkpoint and indexes, switched whole"
    )
    p.add_argument(
        "--index",
        action="append",
        metavar="NAME=DIR[,DIR...]",
        help="an index and its shard bundles, or NAME=milvus://HOST:PORT/COLLECTION (or milvus-lite:PATH.db/NAME)",
    )
    p.add_argument("--token-file", dest="token_file", help="require the bearer token in this file (or set SPARC_AUTH_TOKEN)")
    p.add_argument("--admin-token-file", dest="admin_token_file", help="turn the admin calls (ReloadIndex) on, behind this token")
    p.add_argument("--workers", type=int, help="gRPC worker threads: calls served at once (default 16)")
    p.add_argument("--no-reflection", dest="reflection", action="store_false", default=None, help="turn reflection off")
    add_encoder_flags(p)  # local CLIP / DINOv2 weights for text and image queries
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_serve)

    d = sub.add_parser("deploy", help="switch a running service to a checkpoint and the bundles built with it, as a whole")
    d.add_argument("--file", required=True, help="the deployment file the service reads (sparc serve --deployment FILE)")
    d.add_argument("--checkpoint", help="the checkpoint to deploy")
    d.add_argument("--index", action="append", metavar="NAME=DIR[,DIR...]", help="an index built with that checkpoint")
    d.add_argument("--rollback", action="store_true", help="switch back to the previous deployment")
    d.set_defaults(func=_deploy)

    u = sub.add_parser("ui", help="a search page beside a running service: type a caption or drop an image, see the hits")
    u.add_argument("--target", default="127.0.0.1:50051", help="the running sparc service (HOST:PORT)")
    u.add_argument("--token-file", dest="token_file", help="the service's bearer token, read from this file")
    u.add_argument("--captions", help="the extraction's captions file: item ids -> images (thumbnails, heatmaps)")
    u.add_argument("--images", help="the image folder the captions file's paths are relative to")
    u.add_argument("--host", default="127.0.0.1", help="bind address (beyond loopback: --login-token-file is required)")
    u.add_argument("--port", type=int, default=8080)
    u.add_argument("--allow-host", dest="allow_hosts", action="append", default=[],
                   help="a host name the page answers to (repeatable; loopback names always)")  # fmt: skip
    u.add_argument("--login-token-file", dest="login_token_file", help="require signing in with the token in this file")
    u.add_argument("--request-timeout", dest="request_timeout", type=float, default=30.0, help="seconds (default 30)")
    u.add_argument("--max-threads", dest="max_threads", type=int, default=16, help="requests served at once (default 16)")
    u.add_argument("--tls-ca", dest="tls_ca", help="PEM roots: talk TLS to the service")
    u.add_argument("--tls-cert", dest="tls_cert", help="PEM client certificate (with --tls-key) for a service requiring one")
    u.add_argument("--tls-key", dest="tls_key")
    u.set_defaults(func=_ui)


def demo_artefacts(root: Path = DEMO_ROOT) -> dict[str, list[str]]:
    """Train the demo model and build its indexes over the held-out gallery, unless already there."""
    from index import build_bundle
    from index.bundle import BundleError, read_manifest
    from sparc_core import checkpoint_hash
    from sparc_core.checkpoint import is_checkpoint
    from sparc_core.worlds.demo import demo_paths, run_demo

    paths = demo_paths(root)
    if not is_checkpoint(paths["sparc"]):
        print(
            f"sparc serve with no checkpoint or index: serving the demo; its model is not in {root} yet, so the "
            "demo trains it first (a few minutes on a CPU; `sparc serve --checkpoint DIR --index NAME=DIR` serves yours)",
            flush=True,
        )
        run_demo(root)
    else:
        print(f"sparc serve with no checkpoint or index: serving the demo model in {paths['sparc']}", flush=True)
    indexes = {}
    for name, stream in DEMO_INDEXES.items():
        out = root / "indexes" / name
        try:
            fresh = read_manifest(out).checkpoint_sha256 == checkpoint_hash(paths["sparc"])
        except BundleError:
            fresh = False
        if not fresh:
            print(f"building index {name} from {stream} features of the held-out demo data -> {out}")
            build_bundle(paths["sparc"], stream, paths["data"] / "eval" / f"{stream}.npy", out)
        indexes[name] = [str(out)]
    return indexes


def _serve(args: argparse.Namespace) -> int:
    from sparc_core.config import ConfigError

    from .engine import ServiceError
    from .server import SparcServer
    from .settings import load_settings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "checkpoint": args.checkpoint,
        "auth_token_file": args.token_file,
        "deployment_file": args.deployment_file,
        "admin_token_file": args.admin_token_file,
        "workers": args.workers,
        "reflection": args.reflection,
    }
    if args.index:
        overrides["indexes"] = index_specs(args.index)
    settings = load_settings(args.config, overrides)
    encoders = encoder_overrides(args, settings.encoders.model_dump() if settings.encoders is not None else {})
    if encoders:
        settings = load_settings(args.config, {**overrides, "encoders": encoders})
    if not settings.indexes and args.config is None and args.checkpoint is None and settings.deployment_file is None:
        settings = settings.model_copy(update={"indexes": demo_artefacts(), "checkpoint": str(DEMO_ROOT / "sparc")})
    try:
        server = SparcServer(settings).start()
    except ServiceError as e:
        raise ConfigError(f"cannot start: {e.message}") from None
    print(
        f"sparc serving {sorted(settings.indexes)} on {settings.host}:{server.port}"
        + (f", metrics on :{settings.metrics_port}/metrics" if settings.metrics_port else ""),
        flush=True,
    )
    server.serve_forever()
    return 0


def index_specs(specs: list[str]) -> dict[str, list[str]]:
    """``--index NAME=DIR[,DIR...]`` flags as index name -> bundle directories (ConfigError naming a bad one)."""
    from sparc_core.config import ConfigError

    indexes = {}
    for spec in specs:
        name, sep, dirs = spec.partition("=")
        if not sep or not name or not dirs:
            raise ConfigError(f"--index expects NAME=DIR[,DIR...], got {spec!r}")
        indexes[name] = dirs.split(",")
    return indexes


def _deploy(args: argparse.Namespace) -> int:
    from sparc_core import checkpoint_hash
    from sparc_core.config import ConfigError

    from .deployment import read_deployment, rollback, write_deployment

    if args.rollback:
        if args.checkpoint or args.index:
            raise ConfigError("--rollback takes only --file")
        d = read_deployment(rollback(args.file))
        print(f"deployment {args.file}: back to checkpoint {d.checkpoint} ({sorted(d.indexes)})")
        return 0
    if not args.checkpoint or not args.index:
        raise ConfigError("give --checkpoint and at least one --index NAME=DIR (or --rollback)")
    indexes = index_specs(args.index)
    from index import read_manifest
    from index.manifest import require_checkpoint

    def remote(x: str) -> bool:
        return x.startswith(("milvus://", "milvus-lite:"))

    sha = checkpoint_hash(args.checkpoint)
    for name, dirs in indexes.items():  # refused here already: bundles of another checkpoint never go live
        for d in dirs:
            if not remote(d):
                fix = f"build index {name!r} with {args.checkpoint}"
                require_checkpoint(read_manifest(d).checkpoint_sha256, sha, d, remedy=fix)
    resolved = {n: [x if remote(x) else str(Path(x).resolve()) for x in v] for n, v in indexes.items()}
    write_deployment(args.file, str(Path(args.checkpoint).resolve()), resolved)
    print(f"deployment {args.file}: checkpoint {args.checkpoint} with {sorted(indexes)} (switched at the service's next check)")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from .client import SparcClient
    from .ui import LOOPBACK, SearchPage, UiSettings, is_loopback, serve_ui

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    login = Path(args.login_token_file).read_text().strip() if args.login_token_file else None
    if (args.tls_cert is None) != (args.tls_key is None):
        print("sparc ui: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not login:
        print(f"sparc ui: bound to {args.host}, the page needs --login-token-file (it searches with the service token)",
              file=sys.stderr)  # fmt: skip
        return 2
    bound = set() if is_loopback(args.host) or args.host in ("0.0.0.0", "::") else {args.host.lower()}
    hosts = sorted(LOOPBACK | {h.lower() for h in args.allow_hosts} | bound)
    settings = UiSettings(
        allow_hosts=hosts, login_token=login, request_timeout=args.request_timeout, max_threads=args.max_threads
    )
    if login is None:
        print(f"sparc ui: no sign-in (--login-token-file): anyone who can open http://{args.host}:{args.port}/ on this "
              "machine searches with the service's token", file=sys.stderr, flush=True)  # fmt: skip
    tls = {"root_certificates": read(args.tls_ca), "client_cert": read(args.tls_cert), "client_key": read(args.tls_key)}
    with SparcClient(args.target, token=token, **tls) as client:
        page = SearchPage.from_captions(client, args.captions, args.images, settings=settings)
        server = serve_ui(page, args.host, args.port)
        print(f"sparc ui on http://{args.host}:{server.server_address[1]}/ (service {args.target})", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0
