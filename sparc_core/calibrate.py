"""Per-stream, per-latent activation thresholds calibrated on paired training rows.

The relative floor of training (drop activations below rho x the row's strongest) is one number for
every latent, stream and world: it keeps noise latents whose activations happen to be large, and drops
real concepts that are weak next to a strong one. Calibration replaces it with a threshold for each
stream and latent, chosen from the data so that a stream's latent fires where the OTHER streams' same
latent fires for the same paired sample: for latent i of stream s, the threshold maximises the F1
between "i fires in s" and the share of the other streams in which i fires, over the calibration rows,
among the activations the floor accepted. Starting from the floor's decisions, a few rounds let every
stream adjust to the others. A latent only
one stream uses gets no support from the others and stops firing: the shared code keeps what the
streams share, and what one stream alone sees is left to its private dictionary.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import SparcModel

SOFT_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)  # search-code weights of unagreed latents tried
NEVER = float(np.finfo(np.float32).max)  # the threshold of a latent that must not fire (finite: stored safely)


@torch.no_grad()
def _activations(model: SparcModel, stream: str, x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-threshold one-stream activations as (row, latent, value) entries with value > 0."""
    rows, lats, vals = [], [], []
    for a in range(0, len(x), batch):
        xb = torch.as_tensor(np.asarray(x[a : a + batch], dtype=np.float32), device=model.device)
        top = model.logits(stream, xb).topk(model.k, dim=1, sorted=False)
        v = top.values.relu().cpu().numpy()
        i = top.indices.cpu().numpy()
        r = np.broadcast_to(np.arange(a, a + len(xb))[:, None], v.shape)
        keep = v > 0
        rows.append(r[keep])
        lats.append(i[keep])
        vals.append(v[keep])
    return np.concatenate(rows).astype(np.int64), np.concatenate(lats).astype(np.int64), np.concatenate(vals)


def _floor_on(rows: np.ndarray, vals: np.ndarray, n_rows: int, rho: float) -> np.ndarray:
    """The training rule's decisions: value >= rho x the row's strongest."""
    row_max = np.zeros(n_rows, dtype=np.float32)
    np.maximum.at(row_max, rows, vals)
    return vals >= rho * row_max[rows]


def f1_thresholds(
    lats: np.ndarray, vals: np.ndarray, target: np.ndarray, positives: np.ndarray, allowed: np.ndarray | None = None
) -> np.ndarray:
    """Per latent, the threshold on ``vals`` maximising F1 against ``target``; NEVER where no F1 is > 0.

    lats, vals, target: one entry per (row, latent) with a positive activation. positives: [n_latents],
    rows where the target holds (also rows without an entry, which no threshold can recover). allowed:
    the entries whose value may become a threshold (every entry still counts in the F1).
    """
    n_latents = len(positives)
    out = np.full(n_latents, NEVER, dtype=np.float32)
    if len(lats) == 0:
        return out
    order = np.lexsort((-vals, lats))
    lat, val, tgt = lats[order], vals[order], target[order].astype(np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(lat)) + 1]
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(lat)]))
    cum = np.cumsum(tgt)
    before = np.r_[0, cum][starts][group]
    tp = cum - before
    rank = np.arange(len(lat)) - starts[group] + 1
    f1 = 2.0 * tp / (rank + positives[lat]).clip(1)
    if allowed is not None:
        f1 = np.where(allowed[order], f1, -1.0)
    best = np.maximum.reduceat(f1, starts)
    # the first (highest-threshold) entry reaching the group's best F1
    hit = np.flatnonzero(f1 == best[group])
    first = hit[np.r_[True, group[hit][1:] != group[hit][:-1]]]
    good = best[group[first]] > 0
    out[lat[first][good]] = val[first][good]
    return out


def calibrate(model: SparcModel, features: dict[str, np.ndarray], rounds: int = 3) -> dict[str, float]:
    """Set the model's per-stream thresholds from paired rows; returns the mean L0 per stream after."""
    streams = [s for s in model.streams if s in features]
    if len(streams) < 2:
        raise ValueError("calibration needs paired rows of at least 2 streams")
    n = len(features[streams[0]])
    L = model.n_latents
    entries = {s: _activations(model, s, features[s]) for s in streams}
    on = {s: _floor_on(r, v, n, model.cfg.min_rel_activation) for s, (r, _, v) in entries.items()}
    # Thresholds are chosen among the activations the training rule accepted, so calibration can move a
    # latent's cut between its real firings but never down into values the model treats as nothing.
    candidate = {s: on[s].copy() for s in streams}
    keys = {s: r * L + lat for s, (r, lat, _) in entries.items()}
    thresholds: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        on_keys = {s: keys[s][on[s]] for s in streams}
        new_on = {}
        for s in streams:
            others = [t for t in streams if t != s]
            # soft target: the share of the other streams in which (row, latent) is on
            votes, counts = np.unique(np.concatenate([on_keys[t] for t in others]), return_counts=True)
            share = counts / len(others)
            target = np.zeros(len(keys[s]))
            if len(votes):
                pos = np.searchsorted(votes, keys[s]).clip(0, len(votes) - 1)
                target = np.where(votes[pos] == keys[s], share[pos], 0.0)
            positives = np.bincount(votes % L, weights=share, minlength=L)
            thresholds[s] = f1_thresholds(entries[s][1], entries[s][2], target, positives, allowed=candidate[s])
            new_on[s] = entries[s][2] >= thresholds[s][entries[s][1]]
        on = new_on
    model.set_thresholds({s: torch.from_numpy(t) for s, t in thresholds.items()})
    model.set_soft_weight(choose_soft_weight(model, features)[0])
    return {s: float(on[s].sum()) / n for s in streams}


@torch.no_grad()
def _code_parts(model: SparcModel, stream: str, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k indices, agreed values, below-threshold values) [n, k] each of the full code of ``x``, on the CPU."""
    xt = torch.as_tensor(np.array(x, dtype=np.float32), device=model.device)
    top = model.logits(stream, xt).topk(model.k, dim=1, sorted=False)
    full = model.activate(top.values, stream, top.indices, "full")
    agreed = model.activate(top.values, stream, top.indices, "agreed")
    return top.indices.cpu(), agreed.float().cpu(), (full - agreed).float().cpu()


def choose_soft_weight(
    model: SparcModel, features: dict[str, np.ndarray], rows: int = 2000, grid: tuple[float, ...] = SOFT_WEIGHTS
) -> tuple[float, dict[float, float]]:
    """The search code's weight of below-threshold latents that retrieves best across streams.

    For each candidate weight, every ordered stream pair s -> t retrieves t's row of each paired sample
    among ``rows`` samples by cosine of the search codes (ties count against); the weight with the best
    mean Recall@1 wins (the smaller on a tie) and is set on the model. Returns it and the mean Recall@1
    of every candidate. The thresholds must be set first.
    """
    streams = [s for s in model.streams if s in features]
    n = min(rows, min(len(features[s]) for s in streams))
    codes = {s: _code_parts(model, s, features[s][:n]) for s in streams}
    # dense over the latents the sample uses only (a wide dictionary would not fit otherwise)
    used = torch.unique(torch.cat([i.flatten() for i, _, _ in codes.values()]))
    dense = lambda i, v: torch.zeros(n, len(used)).scatter(1, torch.searchsorted(used, i), v)  # noqa: E731
    parts = {s: (dense(i, a), dense(i, u)) for s, (i, a, u) in codes.items()}
    # A search code is a + w u with disjoint supports: its norms and every pair's cosines follow from a few
    # products computed once, whatever the weight.
    sq = {s: (a.pow(2).sum(1), u.pow(2).sum(1)) for s, (a, u) in parts.items()}
    recall: dict[float, list[float]] = {w: [] for w in grid}
    for s in streams:
        for t in streams:
            if s == t:
                continue
            (a_s, u_s), (a_t, u_t) = parts[s], parts[t]
            aa, uu, mixed = a_s @ a_t.T, u_s @ u_t.T, a_s @ u_t.T + u_s @ a_t.T
            for w in grid:
                norm_s = (sq[s][0] + w * w * sq[s][1]).sqrt().clamp_min(1e-12)
                norm_t = (sq[t][0] + w * w * sq[t][1]).sqrt().clamp_min(1e-12)
                sim = (aa + w * mixed + w * w * uu) / norm_s[:, None] / norm_t[None, :]
                true = sim.diagonal().unsqueeze(1)
                recall[w].append(float(((sim >= true).sum(1) == 1).float().mean()))
    scores = {w: float(np.mean(r)) for w, r in recall.items()}
    best = max(scores.values())
    chosen = min(w for w, r in scores.items() if r >= best - 1e-9)
    model.set_soft_weight(chosen)
    return chosen, scores
