"""The training loop: decoder norm, dead-latent revival, validation, checkpoints, exact resume, DDP."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    clean_checkpoint_dir,
    is_checkpoint,
    load_checkpoint,
    load_train_state,
    pick_device,
    read_checkpoint_config,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig
from .data import BlockBatcher, PairedFeatures, Prefetcher
from .metrics import evaluate
from .model import SparcModel

METRICS_LOG = "metrics.jsonl"
CURVES = "training_curves.png"


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), a no-op otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        if not self.enabled:
            return
        for t in tensors:
            dist.all_reduce(t)
            t.div_(self.world)

    def all_reduce_or(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        x = t.to(torch.int32)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x.bool()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        if self.enabled:
            for t in tensors:
                dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last 20% of steps."""
    warmup = min(cfg.warmup_steps, cfg.steps // 10)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_start = int(cfg.steps * 0.8)
    if step >= decay_start:
        return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))
    return cfg.lr


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


def make_optimizer(model: SparcModel, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where this torch build supports it on the model's device (4x faster on CPU)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def _optimizer_state_tensors(opt: torch.optim.Optimizer, model: SparcModel) -> tuple[dict[str, torch.Tensor], list]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for p, st in opt.state.items():
        for key, val in st.items():
            tensors[f"opt.{names[id(p)]}.{key}"] = torch.as_tensor(val).detach().cpu()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return tensors, groups


def _load_optimizer_state(opt: torch.optim.Optimizer, model: SparcModel, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, val in tensors.items():
        if not key.startswith("opt."):
            continue
        name, field = key[4:].rsplit(".", 1)
        if name not in params:
            raise CheckpointError(f"optimizer state names unknown parameter {name!r}")
        p = params[name]
        opt.state[p][field] = val.to(p.device) if field != "step" else val.clone()


def train_step(
    model: SparcModel,
    opt: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    step: int,
    dead: dict[str, torch.Tensor] | None = None,
    alone_select: torch.Tensor | None = None,
    dist_ctx: _Dist | None = None,
) -> tuple[torch.Tensor, Any]:
    """One optimisation step: loss, backward, gradient all-reduce, decoder projection, update, renorm."""
    out = model(
        batch,
        dead=dead,
        alone_select=alone_select,
        cross=cfg.cross_coef > 0,
        align=cfg.align_coef > 0,
        align_anchor=tuple(cfg.align_anchor),
    )
    align_w = cfg.align_coef * min(1.0, step / max(1.0, cfg.align_ramp * cfg.steps))
    align = out.align_loss
    if dist_ctx is not None and dist_ctx.enabled:
        # err / energy over the GLOBAL batch: sum the energies, scale so the gradient mean is exact
        energy = out.align_energy.clone()
        dist_ctx.all_reduce_mean([energy])  # mean over ranks: err_r / mean = world * err_r / total
        align = out.align_err / energy
    loss = out.self_loss + cfg.cross_coef * out.cross_loss + cfg.auxk_coef * out.auxk_loss + align_w * align
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if dist_ctx is not None:
        dist_ctx.all_reduce_mean([p.grad for p in model.parameters() if p.grad is not None])
    model.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    model.set_decoder_norm_to_unit_norm()
    return loss.detach(), out


def kept_by_rate(fires: torch.Tensor, below: float) -> torch.Tensor:
    """[..., streams, latents] firing counts -> [..., latents] bool: the latents that, in their best stream,
    fire at least ``below`` x as often as the mean latent does there (pruning's rule)."""
    rate = fires.float() / fires.sum(-1, keepdim=True).clamp_min(1) * fires.shape[-1]  # 1 = the mean latent
    return ((rate >= below) & (fires > 0)).any(-2)


class RevivalWatch:
    """Whether re-initialising dead latents pays: each revived latent is judged once, ``after`` steps later,
    alive (it fired within ``dead_after`` samples) or dead again. A round of at least ``ROUND`` judged latents
    (or every revived latent judged, when fewer were revived) whose alive share is below ``min_survival``
    stops revival for the rest of the run: where the features hold fewer concepts than the dictionary has
    latents, re-initialised latents find nothing to carry, die again, and re-initialising them again only
    churns every code; where concepts outnumber the live latents they catch one and stay."""

    ROUND = 32

    def __init__(self, n_latents: int, min_survival: float) -> None:
        self.min_survival = min_survival
        self.at = torch.full((n_latents,), -1, dtype=torch.long)  # step of the latent's pending revival, or -1
        self.judged = self.survived = 0  # of the current round
        self.stopped_at: int | None = None
        self.history: list[dict[str, int]] = []  # every closed round: step, judged, survived

    @classmethod
    def restored(cls, n_latents: int, min_survival: float, tensors: dict, meta: dict) -> RevivalWatch:
        w = cls(n_latents, min_survival)
        if "revival.at" in tensors:
            w.at = tensors["revival.at"].to(torch.long).cpu()
        saved = meta.get("revival") or {}
        w.judged, w.survived = int(saved.get("judged", 0)), int(saved.get("survived", 0))
        w.stopped_at = saved.get("stopped_at")
        w.history = list(saved.get("history", []))
        return w

    def meta(self) -> dict[str, Any]:
        return {"judged": self.judged, "survived": self.survived, "stopped_at": self.stopped_at, "history": self.history}

    def revived(self, rows: torch.Tensor, step: int) -> None:
        self.at[rows.cpu()] = step

    def keep(self, keep: torch.Tensor | np.ndarray) -> None:
        self.at = self.at[torch.as_tensor(keep).cpu()]

    def judge(self, step: int, alive: torch.Tensor, after: int) -> dict[str, Any] | None:
        """Judge the latents revived ``after`` steps ago or more; returns the closed round, if one closed."""
        due = (self.at >= 0) & (step - self.at >= after)
        if due.any():
            self.judged += int(due.sum())
            self.survived += int((due & alive.cpu()).sum())
            self.at[due] = -1
        pending = bool((self.at >= 0).any())
        if self.judged == 0 or (self.judged < self.ROUND and pending):
            return None
        share = self.survived / self.judged
        stopped = self.min_survival > 0 and share < self.min_survival and self.stopped_at is None
        if stopped:
            self.stopped_at = step + 1
        verdict = {"judged": self.judged, "survived": self.survived, "share": share, "stopped": stopped}
        self.history.append({"step": step + 1, "judged": self.judged, "survived": self.survived})
        self.judged = self.survived = 0
        return verdict


class Trainer:
    """Trains a SparcModel on paired features according to a TrainConfig."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dist = _Dist(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.out)
        if not resume and is_checkpoint(self.out) and not overwrite:
            raise CheckpointError(
                f"{self.out} already holds a checkpoint: pass --resume to continue it, --overwrite to train a new "
                "one in its place (the old one stays loadable until the first save), or another --out"
            )
        if self.dist.is_main and self.out.is_dir():
            clean_checkpoint_dir(self.out)  # what a killed save left behind
        if len(cfg.features) < 2:
            raise ConfigError(
                f"training needs paired features of at least 2 streams, got {len(cfg.features)} "
                f"({sorted(cfg.features)}): pass --features NAME=PATH once per stream"
            )
        unknown = sorted(set(cfg.align_anchor) - set(cfg.features))
        if unknown or (cfg.align_anchor and set(cfg.align_anchor) >= set(cfg.features)):
            raise ConfigError(
                f"align_anchor must name some, not all, of the streams {sorted(cfg.features)}; got "
                f"{sorted(cfg.align_anchor)}" + (f" ({unknown} are not streams)" if unknown else "")
            )
        self.data = PairedFeatures(cfg.features, cfg.labels)
        self.data.validate(progress=cfg.progress and self.dist.is_main)
        n = self.data.n_rows
        self.val_rows = min(cfg.val_rows, n // 5)
        train_rows = np.arange(n - self.val_rows)
        self.batcher = BlockBatcher(train_rows, cfg.batch_size, cfg.block_size, cfg.shuffle_blocks, cfg.seed)
        self.start_step = 0
        self.pruned: dict[str, int] | None = None  # requested and kept latents, once pruned
        self.dead_counters: dict[str, torch.Tensor] = {}
        self.revival = RevivalWatch(cfg.model.n_latents, cfg.revive_min_survival)
        if resume:
            self._resume()
        else:
            self.model = SparcModel(cfg.model_config_for(self.data.dims), seed=cfg.seed)
            rng = np.random.default_rng(cfg.seed)
            sample_rows = np.sort(rng.choice(len(train_rows), size=min(8192, len(train_rows)), replace=False))
            sample = {s: torch.from_numpy(x) for s, x in self.data.read(sample_rows).items()}
            self.model.fit_input_norm(sample)
            self.model.set_decoder_norm_to_unit_norm()
            self.model.to(self.device)
            self.opt = make_optimizer(self.model, cfg.lr)
            if self.dist.is_main and (self.out / METRICS_LOG).is_file():
                (self.out / METRICS_LOG).unlink()  # a new run starts a new log
            self.dead_counters = {
                s: torch.zeros(cfg.model.n_latents, dtype=torch.long, device=self.device) for s in self.model.streams
            }
        self.dist.broadcast([p.data for p in self.model.parameters()])

    def _resume(self) -> None:
        ckpt = read_checkpoint_config(self.out)
        saved = ckpt.get("model") or {}
        for key, value in self.cfg.model.model_dump().items():  # every model setting must match
            if key in ("n_latents", "auxk") and saved.get("n_latents", 0) < value and self.cfg.prune_unused:
                continue  # the dictionary was pruned at the end of the run; it continues on what it kept
            if key in saved and saved[key] != value:
                raise CheckpointError(
                    f"{self.out}: cannot resume, the checkpoint has {key}={saved[key]!r}, this run has {value!r}"
                )
        self.model = load_checkpoint(self.out, device=self.device)
        if self.model.cfg.streams != self.data.dims:
            raise CheckpointError(
                f"{self.out}: checkpoint streams {self.model.cfg.streams} differ from the features {self.data.dims}"
            )
        self.model.train()
        self.opt = make_optimizer(self.model, self.cfg.lr)
        tensors, meta = load_train_state(self.out)
        _load_optimizer_state(self.opt, self.model, tensors)
        self.dead_counters = {s: tensors[f"dead.{s}"].to(self.device) for s in self.model.streams}
        self.revival = RevivalWatch.restored(self.model.n_latents, self.cfg.revive_min_survival, tensors, meta)
        self.start_step = int(meta["step"])
        log = self.out / METRICS_LOG
        if self.dist.is_main and log.is_file():  # drop log lines from after the checkpoint
            keep = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= self.start_step]
            log.write_text("".join(ln + "\n" for ln in keep))

    # ------------------------------------------------------------------------------------------------
    def _alone_select(self, step: int, batch_rows: int) -> torch.Tensor | None:
        p = self.cfg.alone_select_prob
        if p <= 0 or self.cfg.model.topk != "global":
            return None
        g = _step_generator(self.cfg.seed, step, torch.device("cpu"))
        total = len(self.batcher.batch(step))
        coin = torch.rand(total, generator=g) < p
        which = torch.randint(len(self.model.streams), (total,), generator=g)
        sel = torch.where(coin, which, torch.full_like(which, -1))
        return sel[self.dist.rank :: self.dist.world][:batch_rows].to(self.device)

    @torch.no_grad()
    def _revive(self, step: int, batch: dict[str, torch.Tensor], out: Any) -> int:
        """Re-initialise latents that have been dead for longer than revive_after samples in EVERY stream.

        A latent alive in some stream only carries a concept only that stream sees (DINO sees texture
        CLIP misses): it is kept. A revived latent gets, in every stream, the residual direction of the
        same (paired) sample, so it is born meaning the same thing everywhere; its encoder row is scaled
        so that this sample's logit sits at the batch's selection threshold (the mean k-th largest logit,
        before the activation floor), so it competes for a slot without taking over: thousands of
        latents revived at once at full activation would swamp every reconstruction.
        """
        if self.cfg.revive_after is None or self.revival.stopped_at is not None:
            return 0
        if step >= self.cfg.revive_until * self.cfg.steps:
            return 0
        long_dead = torch.ones(self.model.n_latents, dtype=torch.bool, device=self.device)
        for s in self.model.streams:
            long_dead &= self.dead_counters[s] > self.cfg.revive_after
        rows = long_dead.nonzero().flatten()
        if len(rows) == 0:
            return 0
        g = _step_generator(self.cfg.seed + 7, step, torch.device("cpu"))
        residual, target = {}, {}
        for s in self.model.streams:
            x = self.model.normalize(s, batch[s])
            residual[s] = (x - self.model.decode(out.codes[s], s, "normalized")).float().cpu()
            kth = self.model.logits(s, batch[s]).topk(self.model.k, dim=1).values[:, -1]
            target[s] = float(kth.mean().clamp_min(1e-3))
        energy = torch.nan_to_num(sum(r.pow(2).sum(1) for r in residual.values()), 0.0, 0.0, 0.0) + 1e-12
        pick = torch.multinomial(energy, len(rows), replacement=True, generator=g)
        for s in self.model.streams:
            c = self.model.codecs[s]
            if self.dist.is_main:
                directions = torch.nn.functional.normalize(residual[s][pick], dim=1)
                x_c = (self.model.normalize(s, batch[s]) - c.b_dec).float().cpu()[pick]
                # The sample's projection on its own residual; floored so that a tiny projection
                # cannot produce a huge encoder row.
                proj = torch.maximum((directions * x_c).sum(1, keepdim=True), 0.25 * x_c.norm(dim=1, keepdim=True))
                proj = proj.clamp_min(1e-3)
                c.W_dec[rows] = directions.to(c.W_dec)
                c.W_enc[rows] = (directions * target[s] / proj).to(c.W_enc)
                c.b_enc[rows] = 0.0
            self.dist.broadcast([c.W_dec.data, c.W_enc.data, c.b_enc.data])
            for p in (c.W_enc, c.b_enc, c.W_dec):
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in self.opt.state.get(p, {}):
                        self.opt.state[p][key][rows] = 0.0
            self.dead_counters[s][rows] = 0
        self.revival.revived(rows, step)
        return len(rows)

    def _judge_revival(self, step: int, global_batch: int) -> None:
        """Judge the latents revived ``revive_after`` samples ago (``RevivalWatch``); log a closed round."""
        cfg = self.cfg
        if cfg.revive_after is None:
            return
        alive = torch.zeros(self.model.n_latents, dtype=torch.bool, device=self.device)
        for s in self.model.streams:
            alive |= self.dead_counters[s] <= cfg.dead_after
        verdict = self.revival.judge(step, alive, -(-cfg.revive_after // global_batch))
        if verdict is None:
            return
        self._log({"kind": "revival", "step": step + 1, **verdict})
        if verdict["stopped"] and self.dist.is_main and cfg.progress:
            tqdm.write(
                f"revival stopped at step {step + 1}: {verdict['survived']} of {verdict['judged']} re-initialised "
                f"latents alive {cfg.revive_after} samples later (< {cfg.revive_min_survival:.0%})"
            )

    def _calibration_rows(self, max_rows: int) -> np.ndarray:
        n = len(self.batcher.rows)
        return self.batcher.rows[np.linspace(0, n - 1, min(n, max_rows)).astype(np.int64)]

    def _calibrate(self, step: int, max_rows: int = 32_768) -> None:
        """Per-stream latent thresholds from paired training rows (see ``calibrate``), logged with L0 per stream."""
        from .calibrate import calibrate

        feats = self.data.read(self._calibration_rows(max_rows))
        self.model.eval()
        l0 = calibrate(self.model, feats, rounds=self.cfg.calibrate_rounds)
        self.model.train()
        self._log({"kind": "calibrate", "step": step, "l0": l0, "soft_weight": self.model.soft_weight})

    @torch.no_grad()
    def _prune(self, max_rows: int = 32_768) -> dict[str, int]:
        """Drop the latents that (almost) never fire on up to ``max_rows`` training rows, each stream encoded alone.

        A dictionary larger than the data's concepts leaves latents that never win a slot, or win one
        on a handful of rows: they cost memory and index width and say nothing. A latent is kept when,
        in its best stream, it fires at least ``prune_below`` x as often as the mean latent does there (a
        concept only one stream sees keeps its latent). A calibrated model applies the same rule to its
        agreed code too: a latent that wins top-k slots but (almost) never reaches its threshold is in no
        agreed code, so no name or explanation can use it. The model keeps the rest, in their order, and
        the optimizer state and dead counters follow, so a resumed run continues on the kept dictionary.
        """
        rows = self._calibration_rows(max_rows)
        calibrated = all(bool(c.calibrated) for c in self.model.codecs.values())
        kinds = ("search", "agreed") if calibrated else ("search",)
        fires = torch.zeros(len(kinds), len(self.model.streams), self.model.n_latents, dtype=torch.long, device=self.device)
        self.model.eval()
        for start in range(0, len(rows), 4096):
            feats = self.data.read(rows[start : start + 4096])
            for i, s in enumerate(self.model.streams):
                x = torch.from_numpy(feats[s]).to(self.device)
                for j, kind in enumerate(kinds):
                    code = self.model.encode({s: x}, code=kind)
                    fires[j, i] += torch.bincount(code.indices[code.active], minlength=self.model.n_latents)
        self.model.train()
        if self.dist.enabled:
            dist.all_reduce(fires)
        requested = self.model.n_latents
        kept_by = kept_by_rate(fires, self.cfg.prune_below)  # [kind, latent]
        keep = kept_by.all(0).nonzero().flatten()
        if len(keep) in (0, requested) or len(keep) < self.model.k:
            return {"requested": requested, "kept": requested}
        names = {id(p): n for n, p in self.model.named_parameters()}
        state = {names[id(p)]: st for p, st in self.opt.state.items()}
        self.model.keep_latents(keep)
        lr = self.opt.param_groups[0]["lr"]
        self.opt = make_optimizer(self.model, lr)
        for name, p in self.model.named_parameters():
            old = state.get(name)
            if old is None:
                continue
            sliced = p.shape[0] == len(keep) and name.rsplit(".", 1)[-1] in ("W_enc", "b_enc", "W_dec")
            self.opt.state[p] = {key: (val[keep] if sliced and key != "step" else val) for key, val in old.items()}
        self.dead_counters = {s: c[keep] for s, c in self.dead_counters.items()}
        self.revival.keep(keep)
        out = {"requested": requested, "kept": int(len(keep))}
        if calibrated:  # latents kept for the top-k code, dropped because they (almost) never agree
            out["rarely_agreed"] = int((kept_by[0] & ~kept_by[1]).sum())
        return out

    def _validate(self) -> dict[str, Any]:
        if self.val_rows == 0:
            return {}
        n = self.data.n_rows
        feats = self.data.read_range(n - self.val_rows, n)
        labels = None if self.data.labels is None else np.asarray(self.data.labels[n - self.val_rows : n])
        self.model.eval()
        report = evaluate(self.model, feats, labels=labels, gallery=min(1000, self.val_rows))
        self.model.train()
        return report

    def _save(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        tensors, groups = _optimizer_state_tensors(self.opt, self.model)
        for s, cnt in self.dead_counters.items():
            tensors[f"dead.{s}"] = cnt
        tensors["revival.at"] = self.revival.at
        save_checkpoint(
            self.model,
            self.out,
            step=step,
            train_config=self.cfg.model_dump(),
            metrics=metrics,
            train_state={"tensors": tensors, "meta": {"step": step, "param_groups": groups, "revival": self.revival.meta()}},
        )
        from .plots import plot_training_curves

        plot_training_curves(self.out / METRICS_LOG, self.out / CURVES)

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train from start_step to cfg.steps; returns the checkpoint directory."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model.train()
        streams = self.model.streams
        prefetch = Prefetcher(self.data, self.batcher, self.start_step, self.dist.rank, self.dist.world)
        bar = tqdm(
            total=cfg.steps,
            initial=self.start_step,
            desc="train",
            unit="step",
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        last_val: dict[str, Any] = {}
        revived = 0
        t0 = time.perf_counter()
        global_batch = self.batcher.batch_size
        try:
            for step in range(self.start_step, cfg.steps):
                raw = prefetch.get(step)
                batch = {s: torch.from_numpy(raw[s]).to(self.device, non_blocking=True) for s in streams}
                lr = _lr_at(cfg, step)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                dead = {s: self.dead_counters[s] > cfg.dead_after for s in streams}
                alone = self._alone_select(step, len(raw[streams[0]]))
                loss, out = train_step(self.model, self.opt, batch, cfg, step, dead, alone, self.dist)
                for s in streams:
                    fired = self.dist.all_reduce_or(out.fired[s])
                    self.dead_counters[s] += global_batch
                    self.dead_counters[s][fired] = 0
                revived += self._revive(step, batch, out)
                self._judge_revival(step, global_batch)

                done = step + 1
                dead_pct = {s: 100.0 * float((self.dead_counters[s] > cfg.dead_after).float().mean()) for s in streams}
                if done % cfg.log_every == 0 or done == cfg.steps:
                    record = {
                        "kind": "train",
                        "step": done,
                        "lr": lr,
                        "loss": loss.item(),
                        "self": out.self_loss.item(),
                        "cross": out.cross_loss.item(),
                        "auxk": out.auxk_loss.item(),
                        "align": out.align_loss.item(),
                        "l0_alone": float(out.l0_alone),
                        "revived": revived,  # latents re-initialised since the previous record
                        "nmse": {s: float(v) for s, v in out.stream_nmse.items()},
                        "dead_pct": dead_pct,
                        "elapsed_s": time.perf_counter() - t0,
                    }
                    self._log(record)
                    revived = 0
                    bar.set_postfix(
                        loss=f"{float(loss):.4f}", L0=f"{float(out.l0_alone):.1f}", dead=f"{max(dead_pct.values()):.1f}%"
                    )
                if done == cfg.steps and cfg.calibrate_rounds > 0 and self.model.cfg.topk == "global":
                    self._calibrate(done)
                if done == cfg.steps and cfg.prune_unused and self.model.n_latents > self.model.k:
                    self.pruned = self._prune()
                    self._log({"kind": "prune", "step": done, **self.pruned})
                    kept, req = self.pruned["kept"], self.pruned["requested"]
                    if kept < req and "rarely_agreed" in self.pruned:
                        self._calibrate(done)  # the kept latents now win the dropped ones' slots: fit them again
                    if self.dist.is_main and kept < req:
                        rare = self.pruned.get("rarely_agreed", 0)
                        tqdm.write(
                            f"dictionary: {kept} of {req} latents fire on the training data; "
                            f"{req - kept} (almost) unused latents dropped"
                            + (f", {rare} of them (almost) never in an agreed code" if rare else "")
                        )
                if self.dist.is_main and (done % cfg.eval_every == 0 or done == cfg.steps):
                    report = self._validate()
                    if report:
                        last_val = report["summary"] | {"streams": report["streams"]}
                        self._log({"kind": "val", "step": done, **last_val})
                if done % cfg.save_every == 0 or done == cfg.steps:
                    self._save(done, {"step": done, "val": last_val, "dictionary": self.pruned})
                    self.dist.barrier()
                bar.update(1)
                if not math.isfinite(float(loss)):
                    raise FloatingPointError(f"loss became {float(loss)} at step {done}; lower --lr")
        finally:
            bar.close()
            prefetch.close()
        return self.out


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train (or resume) a SPARC model; returns the checkpoint directory. A directory that already holds a
    checkpoint is refused unless ``resume`` (continue it) or ``overwrite`` (replace it at the first save)."""
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    try:
        return trainer.run()
    finally:
        trainer.data.close()
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()


class _TrainModule(types.ModuleType):
    """``sparc_core.train`` names both this module and its function ``train`` (a public name of the package):
    importing the module sets the package attribute to it, so the module is callable as the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _TrainModule
