"""Evaluation reports as readable text tables (one column per model)."""

from __future__ import annotations

from typing import Any

ROWS = [
    ("mean_jaccard", "per-sample Jaccard, streams encoded alone (agreed code)", "{:.3f}"),
    ("mean_label_jaccard", "label-weighted latent Jaccard", "{:.3f}"),
    ("max_dead_fraction", "never agreed latents, worst stream", "{:.2%}"),
    ("max_dead_fraction_search", "latents in no search code, worst stream", "{:.2%}"),
    ("mean_l0", "agreed latents per sample (L0)", "{:.1f}"),
    ("mean_l0_search", "latents in a search code", "{:.1f}"),
    ("soft_weight", "search weight of unagreed latents", "{:.2f}"),
    ("mean_nmse_self", "self-reconstruction nMSE", "{:.4f}"),
    ("mean_nmse_self_shared", "self nMSE, search code alone", "{:.4f}"),
    ("mean_nmse_cross", "cross-reconstruction nMSE", "{:.4f}"),
    ("mean_R@1_latent", "cross-stream R@1, latent cosine, search code (served)", "{:.3f}"),
    ("mean_R@1_latent_topk", "cross-stream R@1, latent cosine, plain top-k code", "{:.3f}"),
    ("mean_R@1_xrecon", "cross-stream R@1, cross-decoded", "{:.3f}"),
]


def _fmt(fmt: str, v: Any) -> str:
    return "-" if v is None else fmt.format(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]])


def format_report(reports: dict[str, dict[str, Any]]) -> str:
    """Summary rows for each named report, then per-pair retrieval for each."""
    names = list(reports)
    first = next(iter(reports.values()))
    out = [f"evaluated on {first['n_samples']} samples, retrieval gallery {first['gallery']}, each stream encoded alone", ""]
    rows = [[label, *[_fmt(fmt, reports[n]["summary"].get(key)) for n in names]] for key, label, fmt in ROWS]
    out.append(_table(["metric", *names], rows))
    for n in names:
        pair_rows = []
        for pair, e in reports[n]["pairs"].items():
            pair_rows.append(
                [
                    pair,
                    f"{e['jaccard']:.3f}",
                    f"{e['nmse_cross']:.4f}",
                    f"{e['retrieval_latent']['R@1']:.3f}",
                    f"{e['retrieval_latent']['R@10']:.3f}",
                    f"{e['retrieval_latent']['MRR']:.3f}",
                    f"{e['retrieval_latent_topk']['R@1']:.3f}" if "retrieval_latent_topk" in e else "-",
                    f"{e['retrieval_xrecon']['R@1']:.3f}",
                    f"{e['retrieval_xrecon']['R@10']:.3f}",
                    f"{e['retrieval_xrecon']['MRR']:.3f}",
                ]
            )
        header = [
            "pair (" + n + ")",
            "jaccard",
            "x-nMSE",
            "lat R@1",
            "lat R@10",
            "lat MRR",
            "top-k R@1",
            "xdec R@1",
            "xdec R@10",
            "xdec MRR",
        ]
        out += ["", _table(header, pair_rows)]
    return "\n".join(out)
