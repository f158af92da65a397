"""Evaluation metrics over one-stream codes: nMSE, L0, dead fraction, Jaccard, retrieval Recall@k and MRR.

Every code here is computed with each stream encoded ALONE, as the service encodes a query; the
joint (all-streams) code is reported next to it for comparison with the paper's setting.
"""

from __future__ import annotations

from itertools import permutations
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import CodeKind, SparcModel, SparseCode


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def encode_alone(
    model: SparcModel, feats: dict[str, np.ndarray | Tensor], batch_size: int = 2048, code: CodeKind = "search"
) -> dict[str, SparseCode]:
    """Each stream's codes (of kind ``code``) computed from that stream alone."""
    out = {}
    for s, x in feats.items():
        parts = []
        for sl in _batches(len(x), batch_size):
            xb = torch.tensor(np.asarray(x[sl]), device=model.device)
            parts.append(model.encode({s: xb}, code=code).to("cpu"))
        out[s] = SparseCode(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]), model.n_latents)
    return out


def active_sets(code: SparseCode) -> Tensor:
    """[n, n_latents] bool of active latents."""
    return code.to_dense() > 0


def per_sample_jaccard(a: SparseCode, b: SparseCode) -> float:
    """Mean over rows of |A ∩ B| / |A ∪ B| of the active latent sets; 0 where both are empty (two silent
    codes agree on nothing: a model that silences every latent must not score a perfect agreement)."""
    scores = []
    for sl in _batches(len(a), 4096):
        sa = active_sets(SparseCode(a.indices[sl], a.values[sl], a.n_latents))
        sb = active_sets(SparseCode(b.indices[sl], b.values[sl], b.n_latents))
        inter = (sa & sb).sum(1).float()
        union = (sa | sb).sum(1).float()
        scores.append(inter / union.clamp_min(1))
    return float(torch.cat(scores).mean())


def empty_share(code: SparseCode) -> float:
    """Share of rows with no active latent (reported beside every Jaccard)."""
    return float((code.l0() == 0).float().mean()) if len(code) else 0.0


def fired_latents(code: SparseCode) -> Tensor:
    """[n_latents] bool: latents active on at least one row."""
    fired = torch.zeros(code.n_latents, dtype=torch.bool)
    fired[code.indices[code.active]] = True
    return fired


def dead_fraction(code: SparseCode) -> float:
    """Share of latents never active over the rows of ``code``."""
    return 1.0 - float(fired_latents(code).float().mean())


def latent_rates(code: SparseCode) -> Tensor:
    """[n_latents] float64: the share of ``code``'s rows on which each latent is active."""
    counts = torch.zeros(code.n_latents, dtype=torch.float64)
    counts.index_add_(0, code.indices[code.active].cpu(), torch.ones(int(code.active.sum()), dtype=torch.float64))
    return counts / max(1, len(code))


def dead_expected(rates: Tensor, n_rows: int) -> float:
    """The share of latents expected to be absent from ``n_rows`` fresh rows if each latent fired there at
    its ``rates`` (independent rows): the dead fraction that sampling alone gives a dictionary whose
    latents are all alive but rare, to report beside a measured ``dead_fraction`` of ``n_rows`` rows."""
    return float((1.0 - rates.double().clamp(0, 1)).pow(n_rows).mean())


def label_weighted_jaccard(a: SparseCode, b: SparseCode, labels: np.ndarray) -> float:
    """Mean over latents of the weighted Jaccard between the latent's concept profiles in two streams.

    A latent's profile in a stream is its activation mass per ground-truth label, normalised to sum 1;
    the weighted Jaccard sum(min)/sum(max) is 1 when the latent means the same concepts in both streams.
    Latents active in neither stream are skipped; a latent active in only one stream scores 0.
    """
    lab = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    profiles = []
    for code in (a, b):
        prof = lab.new_zeros(lab.shape[1], code.n_latents)
        for sl in _batches(len(code), 4096):
            dense = SparseCode(code.indices[sl], code.values[sl], code.n_latents).to_dense()
            prof += lab[sl].T @ dense
        profiles.append(prof / prof.sum(0, keepdim=True).clamp_min(1e-12))
    pa, pb = profiles
    used = (pa.sum(0) > 0) | (pb.sum(0) > 0)
    if not used.any():
        return 0.0
    wj = torch.minimum(pa, pb).sum(0) / torch.maximum(pa, pb).sum(0).clamp_min(1e-12)
    return float(wj[used].mean())


def retrieval_scores(scores: Tensor) -> dict[str, float]:
    """Recall@1/5/10 and MRR for a [nq, ng] score matrix whose true match of query i is item i.

    Ties count against the query (the rank is 1 + the number of other items scoring >= the match).
    """
    true = scores.diagonal().unsqueeze(1)
    ge = (scores >= true).sum(1) - 1
    rank = (ge + 1).float()
    return {
        "R@1": float((rank <= 1).float().mean()),
        "R@5": float((rank <= 5).float().mean()),
        "R@10": float((rank <= 10).float().mean()),
        "MRR": float((1.0 / rank).mean()),
    }


def code_cosine(q: SparseCode, g: SparseCode) -> Tensor:
    """[nq, ng] cosine similarity between codes."""
    return F.normalize(q.to_dense(), dim=1) @ F.normalize(g.to_dense(), dim=1).T


@torch.no_grad()
def cross_decoded(model: SparcModel, code: SparseCode, target: str, batch_size: int = 2048) -> Tensor:
    """Code decoded by ``target``'s decoder, centred on its b_dec: [n, d_target] on CPU."""
    parts = []
    b_dec = model.codecs[target].b_dec
    for sl in _batches(len(code), batch_size):
        part = SparseCode(code.indices[sl], code.values[sl], code.n_latents).to(model.device)
        parts.append((model.decode(part, target, "normalized") - b_dec).cpu())
    return torch.cat(parts)


@torch.no_grad()
def centred_features(model: SparcModel, stream: str, x: np.ndarray | Tensor) -> Tensor:
    """The stream's normalised features minus its b_dec: the space cross-decoded retrieval searches."""
    xt = torch.tensor(np.asarray(x), device=model.device)
    return (model.normalize(stream, xt.float()) - model.codecs[stream].b_dec).cpu()


@torch.no_grad()
def evaluate(
    model: SparcModel,
    features: dict[str, np.ndarray],
    labels: np.ndarray | None = None,
    gallery: int = 2000,
) -> dict[str, Any]:
    """The evaluation report: per stream and per ordered pair, with each stream encoded alone."""
    model.eval()
    streams = [s for s in model.streams if s in features]
    n = len(next(iter(features.values())))
    # Agreement (Jaccard, L0, dead latents) is measured on the agreed code, retrieval and reconstruction on
    # the search code the service serves, and retrieval again on the plain top-k code for comparison.
    codes = encode_alone(model, {s: features[s] for s in streams}, code="agreed")
    search = encode_alone(model, {s: features[s] for s in streams}, code="search")
    plain = encode_alone(model, {s: features[s] for s in streams}, code="full")
    normed = {s: model.normalize(s, torch.tensor(np.asarray(features[s]), device=model.device).float()).cpu() for s in streams}
    g = min(gallery, n)
    report: dict[str, Any] = {"n_samples": n, "gallery": g, "streams": {}, "pairs": {}}

    # Joint code (all streams together), the paper's setting, for reference.
    joint_nmse = {s: [] for s in streams}
    if len(streams) > 1 and model.cfg.topk == "global":
        for sl in _batches(n, 2048):
            batch = {s: torch.tensor(np.asarray(features[s][sl]), device=model.device) for s in streams}
            joint = model.encode_streams(batch)
            for s in streams:
                x = normed[s][sl]
                err = (model.decode(joint[s], s, "normalized").cpu() - x).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-8)
                joint_nmse[s].append(err)

    for s in streams:
        x = normed[s]
        shared = cross_decoded(model, search[s], s) + model.codecs[s].b_dec.cpu()
        full = torch.cat(
            [
                model.reconstruct(s, torch.tensor(np.asarray(features[s][sl]), device=model.device), "normalized").cpu()
                for sl in _batches(n, 2048)
            ]
        )
        nmse = ((full - x).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-8)).mean()
        nmse_shared = ((shared - x).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-8)).mean()
        report["streams"][s] = {
            "nmse_self": float(nmse),  # the model's reconstruction: shared code + the stream's private dictionary
            "nmse_self_shared": float(nmse_shared),  # the shared code alone
            "nmse_self_joint": float(torch.cat(joint_nmse[s]).mean()) if joint_nmse[s] else None,
            "l0": float(codes[s].l0().float().mean()),  # agreed latents
            "l0_search": float(search[s].l0().float().mean()),
            "empty_share": empty_share(codes[s]),  # rows with no agreed latent
            "dead_fraction": dead_fraction(codes[s]),  # never agreed
            "dead_fraction_search": dead_fraction(search[s]),  # never in a search code
        }

    for s, t in permutations(streams, 2):
        recon = cross_decoded(model, search[s], t)
        target = centred_features(model, t, features[t])
        x = normed[t]
        full = recon + model.codecs[t].b_dec.cpu()
        nmse = ((full - x).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-8)).mean()
        head = lambda c: SparseCode(c.indices[:g], c.values[:g], c.n_latents)  # noqa: E731
        xrecon_scores = F.normalize(recon[:g], dim=1) @ F.normalize(target[:g], dim=1).T
        entry = {
            "nmse_cross": float(nmse),
            "jaccard": per_sample_jaccard(codes[s], codes[t]),
            "retrieval_latent": retrieval_scores(code_cosine(head(search[s]), head(search[t]))),  # what is served
            "retrieval_latent_topk": retrieval_scores(code_cosine(head(plain[s]), head(plain[t]))),  # plain top-k
            "retrieval_xrecon": retrieval_scores(xrecon_scores),
        }
        if labels is not None:
            entry["label_jaccard"] = label_weighted_jaccard(codes[s], codes[t], labels)
        report["pairs"][f"{s}->{t}"] = entry

    pairs = report["pairs"].values()
    per_stream = report["streams"].values()
    report["summary"] = {
        "mean_jaccard": float(np.mean([p["jaccard"] for p in pairs])) if pairs else None,
        "max_empty_share": max(v["empty_share"] for v in per_stream),
        "max_dead_fraction": max(v["dead_fraction"] for v in per_stream),
        "mean_nmse_self": float(np.mean([v["nmse_self"] for v in per_stream])),
        "mean_nmse_self_shared": float(np.mean([v["nmse_self_shared"] for v in per_stream])),
        "mean_nmse_cross": float(np.mean([p["nmse_cross"] for p in pairs])) if pairs else None,
        "mean_R@1_latent": float(np.mean([p["retrieval_latent"]["R@1"] for p in pairs])) if pairs else None,
        "mean_R@1_latent_topk": float(np.mean([p["retrieval_latent_topk"]["R@1"] for p in pairs])) if pairs else None,
        "mean_R@1_xrecon": float(np.mean([p["retrieval_xrecon"]["R@1"] for p in pairs])) if pairs else None,
        "mean_l0": float(np.mean([v["l0"] for v in per_stream])),
        "mean_l0_search": float(np.mean([v["l0_search"] for v in per_stream])),
        "max_dead_fraction_search": max(v["dead_fraction_search"] for v in per_stream),
        "soft_weight": model.soft_weight,
    }
    if labels is not None and pairs:
        report["summary"]["mean_label_jaccard"] = float(np.mean([p["label_jaccard"] for p in pairs]))
    return report
