"""Agreement and retrieval over a family of planted-concept worlds: shipped defaults vs the paper's recipe vs Local TopK.

Each world differs from the demo's in the ways real model pairs differ (concepts only some streams see,
hierarchies, a correlated text tower, unpaired nuisance variation, many more concepts than latents, or
far fewer, samples holding one to four concepts). Every configuration trains with the same budget on the
same files and is measured on 5,000 held-out samples with each stream encoded ALONE, against what the
world allows: the ceiling of one-stream agreement (the Jaccard of the concept sets each stream can see)
and the oracle's text->image Recall@1 (each stream's code is the set of planted concepts it can see;
cosine over the gallery of 2,000, ties shared at random), beside raw CLIP text->image retrieval. The
served search code is set against the same model's plain top-k code. Ablation rows switch off one
addition of the defaults at a time on one world.

    python bench/alignment.py [--steps 800] [--worlds few-vitl,open-vitl] [--configs defaults,paper] [--json out.json]
    python bench/alignment.py --work DIR --remeasure ...   # measure the models an earlier run left in DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from sparc_core.worlds.alignment import LOCAL, PAPER, WORLDS, measure, run, world_data
from sparc_core.worlds.synthetic import preset

CONFIGS = {"defaults": {}, "paper": PAPER, "local": LOCAL}
ABLATION_WORLD = "groups-6x"
ABLATIONS = {  # the defaults less one addition
    "no calibration (floor 0.2)": {"calibrate_rounds": 0},
    "no floor, no calibration": {"min_rel_activation": 0.0, "calibrate_rounds": 0},
    "no private dictionary": {"private_latents": 0},
    "no alignment loss": {"align_coef": 0.0},
    "no one-stream selection": {"alone_select_prob": 0.0},
    "no pruning": {"prune_unused": False},
}
PAIRS = ("clip_txt->dino", "clip_txt->clip_img")


def _r1(r: dict, key: str) -> float:
    return r.get(key, {}).get("R@1", float("nan"))


def fmt_row(world: str, config: str, r: dict) -> str:
    cells = [
        world,
        config,
        f"{r['n_latents']['kept']}/{r['n_latents']['requested']}",
        f"{r['jaccard']:.3f} / {r['ceiling']:.3f} = {r['jaccard_vs_ceiling']:.2f}",
    ]
    for pair in PAIRS:
        cells.append(
            f"{_r1(r, f'{pair} latent'):.3f} / {_r1(r, f'{pair} latent_topk'):.3f} / "
            f"{_r1(r, f'{pair} xrecon'):.3f} / {r.get(f'{pair} oracle R@1', float('nan')):.3f}"
        )
    cells += [
        f"{r.get('raw clip_txt->clip_img R@1', float('nan')):.3f}",
        f"{r['nmse_self_shared']:.3f} / {r['nmse_self']:.3f}",
        f"{r['l0']:.1f} / {r['l0_search']:.1f}",
        f"{r.get('soft_weight', 0):.2f}",
        _dead(r),
        f"{r['train_s']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _dead(r: dict) -> str:
    """Worst stream: agreed on held-out rows (what sampling alone leaves absent; never agreed on training
    rows) / search code on held-out rows."""
    w = max(r["dead"], key=r["dead"].get)
    extra = f" ({100 * r['dead_sampling'][w]:.1f}; {100 * r['dead_train'][w]:.1f})" if "dead_sampling" in r else ""
    return f"{100 * r['dead'][w]:.1f}{extra} / {100 * max(r.get('dead_search', r['dead']).values()):.1f}"


HEADER = (
    "| world | config | latents kept/requested | one-stream Jaccard / ceiling = ratio"
    " | txt→dino R@1: served / plain top-k / cross-decoded / oracle"
    " | txt→clip_img R@1: served / plain top-k / cross-decoded / oracle"
    " | raw CLIP txt→img R@1 | self nMSE: search code / + private | L0: agreed / search | soft weight"
    " | dead % worst stream: agreed (sampling floor; on training rows) / search | train s |\n" + "|---" * 12 + "|"
)


def targets(rows: list[dict]) -> str:
    """Each world's targets for the defaults, with the paper's recipe beside them: the number, then ✓ or ✗."""
    by = {(r["world"], r["config"]): r for r in rows}
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    out = [
        "| world | served txt→dino R@1 ≥ 0.9 × oracle | served txt→img R@1 ≥ 0.9 × oracle | served ≥ raw CLIP txt→img"
        " | served ≥ plain top-k − 0.02 (both pairs) | Jaccard ≥ 0.85 × ceiling | self nMSE (search code) ≤ paper's"
        " | dead (search code, worst stream) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, world_over, latents, _, _, _) in WORLDS.items():
        ours, paper = by.get((name, "defaults")), by.get((name, "paper"))
        if ours is None:
            continue
        n_concepts = world_over.get("n_concepts") or preset(WORLDS[name][0]).n_concepts
        n_latents = latents if isinstance(latents, int) else int(latents * n_concepts)
        cells = [name]
        for pair in PAIRS:
            r1, oracle = _r1(ours, f"{pair} latent"), ours.get(f"{pair} oracle R@1", float("nan"))
            cells.append(f"{r1:.3f} vs {0.9 * oracle:.3f} {mark(r1 >= 0.9 * oracle)}")
        raw = ours.get("raw clip_txt->clip_img R@1", float("nan"))
        served_img = _r1(ours, "clip_txt->clip_img latent")
        cells.append(f"{served_img:.3f} vs {raw:.3f} {mark(served_img >= raw)}")
        gap = min(_r1(ours, f"{p} latent") - _r1(ours, f"{p} latent_topk") for p in PAIRS)
        cells.append(f"{gap:+.3f} {mark(gap >= -0.02)}")
        jc = ours["jaccard_vs_ceiling"]
        cells.append(f"{jc:.2f} {mark(jc >= 0.85)}" + (f" (paper {paper['jaccard_vs_ceiling']:.2f})" if paper else ""))
        if paper:
            nm, pnm = ours["nmse_self_shared"], paper["nmse_self_shared"]
            cells.append(f"{nm:.3f} vs {pnm:.3f} {mark(nm <= pnm)}")
        else:
            cells.append("- (paper not run)")
        dead, limit = max(ours.get("dead_search", ours["dead"]).values()), 0.01 if n_latents <= n_concepts else 0.10
        cells.append(f"{100 * dead:.1f}% {mark(dead <= limit)} (≤ {100 * limit:.0f}%)")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def remeasure(model_dir: Path, data: dict, n_latents: int) -> dict:
    """The row of a model trained by an earlier run (its training time is in its metrics.jsonl only)."""
    from sparc_core.checkpoint import load_checkpoint

    model = load_checkpoint(model_dir)
    return measure(model, data) | {"train_s": float("nan"), "n_latents": {"requested": n_latents, "kept": model.n_latents}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800, help="steps of the worlds that do not fix their own")
    ap.add_argument("--worlds", help=f"comma-separated subset of {', '.join(WORLDS)}")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--work", help="keep data and models here (default: a temp dir, removed)")
    ap.add_argument("--from-json", help="print the tables of an earlier run's --json file instead of training")
    ap.add_argument(
        "--remeasure", action="store_true",
        help="measure the models an earlier run left under --work (trained there, on the same data) instead of training",
    )  # fmt: skip
    args = ap.parse_args()
    if args.remeasure and not args.work:
        ap.error("--remeasure needs the --work folder of the run that trained the models")
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        print(HEADER)
        print("\n".join(fmt_row(r["world"], r["config"], r) for r in rows))
        print("\n" + targets(rows))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="sparc-align-"))
    chosen = [w for w in WORLDS if not args.worlds or w in args.worlds.split(",")]
    configs = {c: CONFIGS[c] for c in args.configs.split(",")}
    jobs = [(w, c, o) for w in chosen for c, o in configs.items()]
    if not args.no_ablations:
        jobs += [(w, c, o) for w in chosen if w == ABLATION_WORLD for c, o in ABLATIONS.items()]
    rows, t0 = [], time.perf_counter()
    print(HEADER, flush=True)
    try:
        for name, config, overrides in jobs:
            base, over, latents, dims, n_train, steps = WORLDS[name]
            world = preset(base, **over, streams=dims, n_train=n_train, n_eval=5000)
            data = world_data(world, work / name / "data")
            n_latents = latents if isinstance(latents, int) else int(latents * world.n_concepts)
            train_over = {"n_latents": n_latents, "k": 32, "steps": steps or args.steps} | overrides
            model_dir = work / name / config.replace(" ", "_")
            if args.remeasure:
                r = remeasure(model_dir / "model", data, n_latents)
            else:
                r = run(world, train_over, model_dir, data=data)
            rows.append({"world": name, "config": config, **r})
            print(fmt_row(name, config, r), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(rows)} runs in {(time.perf_counter() - t0) / 60:.1f} min; k 32, batch 256")
    print("\n" + targets(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
