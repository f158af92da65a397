"""``sparc index build|add|export|info|search``: registered into the sparc command via the sparc.commands entry point."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sparc_core.cli import add_cluster_flags, add_encoder_flags, cluster_from_args, encoder_overrides

from .params import PATHS


def register(sub: Any) -> None:
    """Add the ``index`` command group (and ``report``, which reads bundles) to the sparc parser."""
    r = sub.add_parser("report", help="write a static HTML concept report (names, firing rates, top items per index)")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--index", action="append", required=True, metavar="NAME=BUNDLE", help="repeat per index")
    r.add_argument("--captions", help="the extraction's captions file (image_path, caption, id): captions and thumbnails")
    r.add_argument("--images", help="the image folder the captions file's paths are relative to (thumbnails)")
    r.add_argument("--max-latents", type=int, default=200)
    r.add_argument("--heatmaps", type=int, default=0, metavar="N", help="heatmaps of each latent on its top N images")
    r.add_argument("--heatmap-method", default="relevance", choices=["relevance", "gradcam"])
    r.add_argument("--out", required=True, help="report folder (index.html + pictures)")
    add_encoder_flags(r)  # the image encoders the heatmaps need (local weights only)
    r.set_defaults(func=_report)

    p = sub.add_parser("index", help="build, extend, inspect and query index bundles")
    isub = p.add_subparsers(dest="index_command", required=True)

    b = isub.add_parser("build", help="encode one stream's gallery and write an index bundle")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--stream", required=True, help="the gallery's stream, e.g. dino")
    b.add_argument("--features", required=True, help=".npy, .safetensors or .h5 gallery features")
    b.add_argument("--ids", help="item ids: .npy (ints or strings) or text, one per line (default: row numbers)")
    b.add_argument("--out", required=True, help="bundle directory")
    b.add_argument("--faiss", default="Flat", help="FAISS factory string for the dense path (default exact Flat)")
    b.add_argument("--no-dense", action="store_true", help="sparse latent search only (default without FAISS installed)")
    b.add_argument("--shard", default="0/1", help="build shard I/N of the rows (default 0/1)")
    b.add_argument("--seismic", action="store_true", help="also build a Seismic index (the seismic path)")
    b.add_argument(
        "--code", choices=["search", "agreed", "full"], default="search",
        help="which of the model's codes the items hold (queries are encoded the same way; default search)",
    )  # fmt: skip
    b.add_argument("--batch-size", type=int, default=8192)
    b.add_argument(
        "--shards", type=int, help="build every shard of N into OUT/shard-0000I (with --engine ray: default one per actor)"
    )
    b.add_argument("--quiet", action="store_true")
    add_cluster_flags(b)
    b.set_defaults(func=_build)

    a = isub.add_parser("add", help="append items to a bundle")
    a.add_argument("--bundle", required=True)
    a.add_argument("--features", required=True)
    a.add_argument("--ids")
    a.add_argument("--checkpoint", help="default: the checkpoint the bundle records")
    a.add_argument("--replace", action="store_true", help="an id the bundle holds is replaced (its old row deleted)")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=_add)

    d = isub.add_parser("delete", help="delete items by id (a new version with tombstones; compact drops them)")
    d.add_argument(
        "--bundle", required=True, help="a bundle, or a Milvus collection (milvus://HOST:PORT/NAME, milvus-lite:PATH/NAME)"
    )
    d.add_argument("--ids", required=True, help=".npy or a text file, one id per line")
    d.set_defaults(func=_delete)

    c = isub.add_parser("compact", help="rewrite the parts holding deleted items without them")
    c.add_argument("--bundle", required=True)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_compact)

    e = isub.add_parser("export", help="export a bundle into a Milvus collection (resumes an interrupted export)")
    e.add_argument("--bundle", required=True)
    e.add_argument("--to", required=True, metavar="URI", help="milvus://HOST:PORT/COLLECTION or milvus-lite:PATH.db/COLLECTION")
    e.add_argument("--batch", type=int, default=5000, help="items per insert")
    e.add_argument("--dense-index", metavar="TYPE", help="also export the dense vectors, indexed as TYPE (FLAT, HNSW, ...)")
    e.add_argument("--replace", action="store_true", help="a collection holding another bundle is dropped and re-exported")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_export)

    x = isub.add_parser("seismic", help="add a Seismic index to every part of a bundle (the seismic path)")
    x.add_argument("--bundle", required=True)
    _seismic_flags(x)
    x.set_defaults(func=_seismic)
    _seismic_flags(b)

    i = isub.add_parser("info", help="print a bundle's manifest")
    i.add_argument("bundle", nargs="?", help="the bundle (or --bundle, as every other index command takes it)")
    i.add_argument("--bundle", dest="bundle_flag", metavar="BUNDLE")
    i.set_defaults(func=_info)

    s = isub.add_parser("search", help="query bundles with raw vectors of any stream (one .npy row per query)")
    s.add_argument("--bundle", action="append", required=True, help="repeat for every shard")
    s.add_argument("--stream", required=True, help="the queries' stream")
    s.add_argument("--queries", required=True, help=".npy [nq, d]")
    s.add_argument("--top-k", type=int, default=10)
    s.add_argument("--path", choices=PATHS)
    s.add_argument("--budget", type=float, help="approx path: share of the query's postings read, in (0, 1]")
    s.add_argument("--candidates", type=int, help="approx path: rows rescored exactly")
    s.add_argument("--query-cut", type=int, help="seismic path: the query's largest entries used")
    s.add_argument("--heap-factor", type=float, help="seismic path: in (0, 1], higher is faster and less exact")
    s.add_argument("--nprobe", type=int)
    s.add_argument("--explain", action="store_true")
    s.add_argument("--checkpoint", help="default: the checkpoint the bundle records (its hash must match)")
    s.set_defaults(func=_search)


def _build(args: argparse.Namespace) -> int:
    from .bundle import BundleError, build_bundle

    if args.engine == "ray" or args.shards is not None:
        return _build_shards(args)

    try:
        i, n = (int(x) for x in args.shard.split("/"))
    except ValueError:
        raise BundleError(f"--shard expects I/N, got {args.shard!r}") from None
    out = build_bundle(
        args.checkpoint,
        args.stream,
        args.features,
        args.out,
        ids=args.ids,
        dense=False if args.no_dense else None,
        faiss_factory=args.faiss,
        shard=(i, n),
        batch_size=args.batch_size,
        progress=not args.quiet,
        seismic=_seismic_settings(args) if args.seismic else None,
        code=args.code,
    )
    print(f"bundle: {args.out} (version {out.name})")
    return 0


def _build_shards(args: argparse.Namespace) -> int:
    from sparc_core.config import ClusterConfig, build_config

    from .cluster import build_shards
    from .errors import BundleError

    if args.shard != "0/1":
        raise BundleError("--shard I/N builds one shard; --shards N (or --engine ray) builds all of them: give one")
    paths = build_shards(
        args.checkpoint, args.stream, args.features, args.out, n_shards=args.shards, engine=args.engine or "local",
        cluster=build_config(ClusterConfig, cluster_from_args(args), "command line"), ids=args.ids,
        dense=False if args.no_dense else None, faiss_factory=args.faiss, batch_size=args.batch_size,
        seismic=_seismic_settings(args) if args.seismic else None, progress=not args.quiet, code=args.code,
    )  # fmt: skip
    print(f"{len(paths)} shards under {args.out}; serve them with --index NAME={','.join(str(p) for p in paths)}")
    return 0


def _seismic_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-postings", type=int, default=0, help="Seismic: mean entries kept per posting list (0: its default)")
    p.add_argument("--summary-energy", type=float, default=0.4, help="Seismic: share of a block's mass its summary keeps")
    p.add_argument("--query-cut", type=int, default=0, help="default per call: the query's largest entries used (0: all)")
    p.add_argument("--heap-factor", type=float, default=0.9, help="default per call, in (0, 1]: higher is faster, less exact")


def _seismic_settings(args: argparse.Namespace) -> Any:
    from .seismic_backend import SeismicSettings

    return SeismicSettings(n_postings=args.n_postings, summary_energy=args.summary_energy, query_cut=args.query_cut,
                           heap_factor=args.heap_factor)  # fmt: skip


def _seismic(args: argparse.Namespace) -> int:
    from .bundle import add_seismic_index

    out = add_seismic_index(args.bundle, _seismic_settings(args))
    print(f"bundle: {args.bundle} (version {out.name}) has a Seismic index (search with --path seismic)")
    return 0


def _add(args: argparse.Namespace) -> int:
    from .bundle import append_to_bundle, read_manifest

    append_to_bundle(args.bundle, args.features, ids=args.ids, checkpoint=args.checkpoint, progress=not args.quiet,
                     replace=args.replace)  # fmt: skip
    print(f"bundle: {args.bundle} now holds {read_manifest(args.bundle).n_items} items")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from .bundle import delete_items, load_ids, read_manifest

    if str(args.bundle).startswith(("milvus://", "milvus-lite:")):
        from .milvus_backend import delete_from_collection

        n, unknown = delete_from_collection(args.bundle, load_ids(args.ids).tolist())
        print(f"{args.bundle}: {n} items deleted" + (f"; {len(unknown)} ids not found" if unknown else ""))
        return 0
    _, unknown, n = delete_items(args.bundle, load_ids(args.ids))
    m = read_manifest(args.bundle)
    live = m.n_items - sum(p.n_deleted for p in m.parts)
    print(f"bundle: {args.bundle}: {n} items deleted, {live} live" + (f"; {len(unknown)} ids not found" if unknown else ""))
    for x in unknown[:20]:
        print(f"  not found: {x}")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from .bundle import compact_bundle, read_manifest

    compact_bundle(args.bundle, progress=not args.quiet)
    print(f"bundle: {args.bundle} holds {read_manifest(args.bundle).n_items} items, none deleted")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .bundle import BundleError
    from .milvus_backend import export_bundle

    if args.batch < 1:
        raise BundleError(f"--batch must be >= 1, got {args.batch}")
    n = export_bundle(
        args.bundle, args.to, batch=args.batch, dense_index=args.dense_index, progress=not args.quiet, replace=args.replace
    )
    print(f"exported {n} items to {args.to}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .bundle import BundleError, read_manifest

    bundle = args.bundle_flag or args.bundle
    if not bundle or (args.bundle_flag and args.bundle and args.bundle_flag != args.bundle):
        raise BundleError("give one bundle: sparc index info --bundle DIR")
    print(json.dumps(read_manifest(bundle).model_dump(), indent=2))
    return 0


def _search(args: argparse.Namespace) -> int:
    from sparc_core.explain.naming import load_latent_names

    from .bundle import BundleError, checkpoint_of
    from .params import SearchParams
    from .searcher import Searcher

    searcher = Searcher(args.bundle, checkpoint=args.checkpoint)
    names = (
        load_latent_names(args.checkpoint or checkpoint_of(searcher.shards[0].path, searcher.manifest)) if args.explain else {}
    )
    try:
        xq = np.load(args.queries, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{args.queries}: not a readable .npy of query vectors ({e})") from None
    if xq.ndim == 1:
        xq = xq[None]
    code = searcher.encode(args.stream, xq)
    try:
        params = SearchParams.create(top_k=args.top_k, path=args.path, nprobe=args.nprobe, query_cut=args.query_cut,
                                     heap_factor=args.heap_factor, budget=args.budget, candidates=args.candidates)  # fmt: skip
    except ValueError as e:
        raise BundleError(f"index search: {e}") from None
    res = searcher.search(code, params)
    for q, (ids, scores) in enumerate(zip(res.ids, res.scores)):
        explained = searcher.explain_hits(code, res, q, range(len(ids)), row=q) if args.explain else []
        hits = []
        for j, (item, score) in enumerate(zip(ids, scores)):
            hit: dict[str, Any] = {"id": item, "score": round(score, 6)}
            if args.explain:
                hit["shared_latents"] = [
                    e.__dict__ | ({"name": names[e.latent]} if e.latent in names else {}) for e in explained[j]
                ]
            hits.append(hit)
        json.dump({"query": q, "path": res.path, "hits": hits}, sys.stdout)
        sys.stdout.write("\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json as _json

    from sparc_core.checkpoint import checkpoint_hash
    from sparc_core.config import ConfigError
    from sparc_core.explain.concept_report import CodeSet, firing_rates, write_concept_report
    from sparc_core.explain.naming import NAMES_FILE

    from .bundle import Bundle, BundleError

    sha = checkpoint_hash(args.checkpoint)
    captions, images = {}, {}
    if args.captions:
        from sparc_core.extract import read_captions

        for item in read_captions(args.captions):
            captions[item.id] = item.caption
            if args.images:
                images[item.id] = Path(args.images) / item.image
    galleries, rates, n_latents = [], {}, None
    for spec in args.index:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--index expects NAME=BUNDLE, got {spec!r}")
        b = Bundle(path, expected_checkpoint=sha)
        m = b.manifest
        n_latents = m.n_latents
        ids = b.all_ids()  # the items not deleted, and their codes
        codes_idx, codes_val = b.codes(np.flatnonzero(b.alive_at(np.arange(m.n_items))))
        galleries.append(
            CodeSet(name, m.stream, codes_idx, codes_val, ids,
                    {i: captions[str(i)] for i in ids if str(i) in captions},
                    {i: images[str(i)] for i in ids if str(i) in images})
        )  # fmt: skip
        r = firing_rates(codes_idx, codes_val, m.n_latents)
        rates[m.stream] = r if m.stream not in rates else np.maximum(rates[m.stream], r)
    names = {}
    f = Path(args.checkpoint) / NAMES_FILE
    if f.is_file():
        data = _json.loads(f.read_text())
        if data.get("checkpoint_sha256") == sha:
            names = {int(k): [(x["name"], x["score"]) for x in v] for k, v in data["latents"].items()}
    if n_latents is None:
        raise BundleError("no index given")
    heat: dict[int, list[Path]] = {}
    with tempfile.TemporaryDirectory(prefix="sparc-report-heat-") as tmp:
        if args.heatmaps > 0:
            heat = _report_heatmaps(args, galleries, rates, {k: v[0][0] for k, v in names.items()}, Path(tmp))
        out = write_concept_report(args.out, n_latents, rates, galleries, names, max_latents=args.max_latents, heatmaps=heat)
    print(f"concept report: {out}")
    return 0


def _report_heatmaps(args, galleries, rates, names, tmp):
    """latent -> heatmap PNGs of the latent on its top images, for galleries whose stream has an image encoder."""
    from PIL import Image
    from tqdm.auto import tqdm

    from sparc_core.checkpoint import load_checkpoint, pick_device
    from sparc_core.config import ConfigError, EncodersConfig, build_config
    from sparc_core.encoders import load_encoders
    from sparc_core.explain.attribution import latent_target, localize, save_heatmap_png
    from sparc_core.explain.concept_report import shown_latents, top_items

    streams = {g.stream for g in galleries}
    enc_cfg = encoder_overrides(args, {}, always=False)
    if not enc_cfg:
        raise ConfigError("--heatmaps needs the image encoders: --dino-weights and/or --clip-weights")
    encoders = load_encoders(build_config(EncodersConfig, enc_cfg, "encoder flags"))
    model = load_checkpoint(args.checkpoint, device=pick_device())
    shown = shown_latents(rates, args.max_latents)
    jobs = []
    for g in galleries:
        enc = encoders.get(g.stream)
        if enc is None or enc.modality != "image" or not g.images:
            continue
        tops = top_items(g, model.n_latents, args.heatmaps * 4)
        for lat in shown:
            rows = [r for r, _ in tops.get(lat, []) if g.ids[r] in g.images][: args.heatmaps]
            jobs += [(lat, enc, g.images[g.ids[r]], f"{g.name}-{r}") for r in rows]
    if not jobs and streams:
        print(f"no heatmaps: no image encoder for {sorted(streams)} or no image paths (--captions/--images)")
    out: dict[int, list[Path]] = {}
    for lat, enc, path, tag in tqdm(jobs, desc="heatmaps", unit="image"):
        with Image.open(path) as im:
            hm = localize(model, enc, im.convert("RGB"), latent_target(model, [lat]), method=args.heatmap_method, names=names)
        dest = tmp / f"{lat}-{tag}.png".replace("/", "_")
        save_heatmap_png(hm, dest)
        out.setdefault(lat, []).append(dest)
    return out
