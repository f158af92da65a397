"""SparcModel: per-stream affine encoders, a Global (or Local) TopK, per-stream decoders; and SparseCode."""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SparcConfig
from .kernels import (
    compact_decode,
    dense_decode,
    gather_logits,
    gather_logits_dense,
    sparse_decode,
    sparse_decode_many,
    use_compact_decode,
)
from .losses import auxk_loss, cross_reconstruction, normalized_mse

CodeKind = Literal["search", "agreed", "full"]
"""Which code ``encode`` returns; all three share the top-k indices and differ in their values.

- "search": what indexes store and queries score with: the agreed latents at full value, the rest of the
  top k scaled by the stream's calibrated ``soft_weight`` (chosen for cross-stream retrieval).
- "agreed": only the latents whose activation reaches the stream's calibrated threshold, where the
  streams agree: explanations, latent names, one-stream agreement.
- "full": the plain top-k ReLU values, none dropped.
Before calibration "search" and "agreed" are both the relative-floor code of training.
"""
CODE_KINDS: tuple[str, ...] = ("search", "agreed", "full")


class SparseCode(NamedTuple):
    """The k chosen latents of each row: indices and values, never a dense [n, n_latents] tensor."""

    indices: Tensor
    """[n, k] int64 latent ids (unique within a row)."""
    values: Tensor
    """[n, k] float activations, >= 0; a latent is active where its value is > 0."""
    n_latents: int
    """Width of the latent space the indices point into."""

    def to_dense(self) -> Tensor:
        """[n, n_latents] dense code."""
        out = self.values.new_zeros(self.values.shape[0], self.n_latents)
        return out.scatter(1, self.indices, self.values)

    @property
    def active(self) -> Tensor:
        """[n, k] bool: which chosen latents actually fire."""
        return self.values > 0

    def l0(self) -> Tensor:
        """[n] number of active latents per row."""
        return self.active.sum(-1)

    def to(self, device: torch.device | str) -> SparseCode:
        """The same code on another device."""
        return SparseCode(self.indices.to(device), self.values.to(device), self.n_latents)

    def __len__(self) -> int:
        return self.indices.shape[0]


class SparcOutput(NamedTuple):
    """What one training forward pass produces."""

    codes: dict[str, SparseCode]
    """Per stream, the code used for reconstruction (shared indices under Global TopK)."""
    self_loss: Tensor
    """Mean over streams of the self-reconstruction nMSE."""
    cross_loss: Tensor
    """Mean over ordered pairs s != t of the nMSE of code s decoded by stream t's decoder."""
    auxk_loss: Tensor
    """Mean over streams of the AuxK nMSE (zero when no latent is dead)."""
    align_loss: Tensor
    """Mean over streams of the distance between the stream's logits and the cross-stream mean, at the
    shared and every one-stream selection (so one-stream top-k sets agree)."""
    align_err: Tensor
    """Sum over rows (mean over streams) of the alignment squared error: align_loss's numerator."""
    align_energy: Tensor
    """Detached sum over rows of the alignment target's energy: align_loss's denominator."""
    stream_nmse: dict[str, Tensor]
    """Detached per-stream self-reconstruction nMSE."""
    fired: dict[str, Tensor]
    """[n_latents] bool per stream: latents active when that stream is encoded alone."""
    l0_alone: Tensor
    """Detached mean number of active latents when a stream is encoded alone."""


class _Selection(NamedTuple):
    """A training batch's selection: logits, each stream's own top-k, the indices each stream's code uses."""

    logits: dict[str, Tensor]
    alone: dict[str, Tensor]
    codes: dict[str, Tensor]
    shared: Tensor | None  # Global TopK's shared indices; None under Local TopK


class _AuxK(NamedTuple):
    """Per stream with dead latents: AuxK indices, (dead ids, positions among them), activations."""

    idx: dict[str, Tensor]
    pos: dict[str, tuple[Tensor, Tensor]]
    vals: dict[str, Tensor]


class _Encoded(NamedTuple):
    """The batch's codes (with gradient) and the alignment logits."""

    codes: dict[str, SparseCode]
    align_logits: dict[str, Tensor]


class StreamCodec(nn.Module):
    """One stream's affine encoder and decoder (sparsify's names: W_enc, b_enc, W_dec, b_dec), and its
    private residual dictionary (W_enc_p, b_enc_p, W_dec_p), which is never part of the shared code."""

    def __init__(self, d_in: int, n_latents: int, generator: torch.Generator | None = None, n_private: int = 0) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        W = torch.empty(n_latents, d_in).uniform_(-bound, bound, generator=generator)
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        # Decoder rows are latent directions: initialised as the (row-normalised) encoder transpose.
        self.W_dec = nn.Parameter(W / W.norm(dim=1, keepdim=True).clamp_min(1e-8))
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # b_pre: subtracted before encoding, added after decoding
        self.register_buffer("input_scale", torch.ones(()))  # per-stream input normalisation (mode "scale")
        self.register_buffer("threshold", torch.zeros(n_latents))  # per-latent activation thresholds (calibrated)
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))  # thresholds replace the floor
        # weight of a calibrated search code's latents that miss their threshold (0: the agreed code alone)
        self.register_buffer("soft_weight", torch.zeros(()))
        if n_private:
            P = torch.empty(n_private, d_in).uniform_(-bound, bound, generator=generator)
            self.W_enc_p = nn.Parameter(P.clone())
            self.b_enc_p = nn.Parameter(torch.zeros(n_private))
            self.W_dec_p = nn.Parameter(P / P.norm(dim=1, keepdim=True).clamp_min(1e-8))


class SparcModel(nn.Module):
    """A SPARC sparse autoencoder over several streams sharing one latent space."""

    def __init__(self, cfg: SparcConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        self.codecs = nn.ModuleDict({s: StreamCodec(d, cfg.n_latents, g, cfg.private_latents) for s, d in cfg.streams.items()})

    # ---- shape ------------------------------------------------------------------------------------
    @property
    def streams(self) -> list[str]:
        """Stream names, in config order."""
        return list(self.cfg.streams)

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- input normalisation ----------------------------------------------------------------------
    def normalize(self, stream: str, x: Tensor) -> Tensor:
        """The stream's stored input transform (the same in training, evaluation and serving)."""
        if self.cfg.input_norm == "l2":
            return F.normalize(x, dim=-1)
        if self.cfg.input_norm == "scale":
            return x * self.codecs[stream].input_scale
        return x

    @torch.no_grad()
    def fit_input_norm(self, sample: dict[str, Tensor]) -> None:
        """Estimate per-stream scales (mean row norm -> 1) and set b_dec to the normalised mean."""
        for s, x in sample.items():
            c = self.codecs[s]
            x = x.to(c.b_dec)
            if self.cfg.input_norm == "scale":
                c.input_scale.fill_(1.0 / x.norm(dim=-1).mean().clamp_min(1e-8).item())
            c.b_dec.copy_(self.normalize(s, x).mean(0))

    # ---- encoding ---------------------------------------------------------------------------------
    def activate(
        self, selected: Tensor, stream: str | None = None, idx: Tensor | None = None, code: CodeKind = "search"
    ) -> Tensor:
        """The values of the k selected logits in one of the three codes (see ``CodeKind``).

        "full": their ReLU. Before calibration, "search" and "agreed" drop those weaker than
        min_rel_activation x the row's strongest: the relative floor gives each sample as many active
        latents as it has clear concepts (at most k) and drops the weak tail, where one-stream codes of the
        same item disagree most. After calibration (``calibrate``), stream s's latent i is agreed where its
        activation reaches s's threshold for i; the search code keeps the other top-k latents too, scaled
        by the stream's calibrated ``soft_weight``.
        """
        if code not in CODE_KINDS:
            raise ValueError(f"code must be one of {CODE_KINDS}, got {code!r}")
        values = selected.relu()
        if code == "full":
            return values
        if stream is not None and idx is not None and bool(self.codecs[stream].calibrated):
            c = self.codecs[stream]
            agreed = values >= c.threshold[idx]
            if code == "agreed":
                return values * agreed
            return torch.where(agreed, values, values * c.soft_weight)
        rho = self.cfg.min_rel_activation
        if rho > 0:
            floor = rho * values.detach().amax(dim=1, keepdim=True)
            values = values * (values >= floor)
        return values

    @torch.no_grad()
    def set_thresholds(self, thresholds: dict[str, Tensor]) -> None:
        """Per stream, [n_latents] activation thresholds that replace the relative floor from now on."""
        for s, t in thresholds.items():
            c = self.codecs[s]
            c.threshold.copy_(t.to(c.threshold))
            c.calibrated.fill_(True)

    @torch.no_grad()
    def set_soft_weight(self, weight: float) -> None:
        """The search code's weight, in every stream, of the top-k latents below their calibrated threshold."""
        if not 0 <= weight <= 1:
            raise ValueError(f"soft_weight must be in [0, 1], got {weight}")
        for c in self.codecs.values():
            c.soft_weight.fill_(weight)

    @property
    def soft_weight(self) -> float:
        """The search code's weight of below-threshold latents (0 before calibration chose one)."""
        return float(next(iter(self.codecs.values())).soft_weight)

    def _check_inputs(self, inputs: dict[str, Tensor]) -> list[str]:
        if not inputs:
            raise ValueError("encode needs at least one stream")
        present = []
        for s, x in inputs.items():
            if s not in self.codecs:
                raise KeyError(f"unknown stream {s!r}; this model has {self.streams}")
            d = self.cfg.streams[s]
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"stream {s!r} expects input of shape [n, {d}], got {list(x.shape)}")
            present.append(s)
        n = {x.shape[0] for x in inputs.values()}
        if len(n) != 1:
            raise ValueError(f"streams have different row counts: { {s: x.shape[0] for s, x in inputs.items()} }")
        return [s for s in self.streams if s in present]

    def _centered(self, stream: str, x: Tensor) -> Tensor:
        c = self.codecs[stream]
        return self.normalize(stream, x.to(c.W_enc.dtype)) - c.b_dec

    def logits(self, stream: str, x: Tensor) -> Tensor:
        """Pre-activation logits h_s = W_enc (norm(x) - b_dec) + b_enc, [n, n_latents]."""
        c = self.codecs[stream]
        return F.linear(self._centered(stream, x), c.W_enc, c.b_enc)

    @torch.no_grad()
    def encode_streams(self, inputs: dict[str, Tensor], code: CodeKind = "search") -> dict[str, SparseCode]:
        """Per-stream codes; under Global TopK all present streams share one set of indices."""
        streams = self._check_inputs(inputs)
        h = {s: self.logits(s, inputs[s]) for s in streams}
        if self.cfg.topk == "global":
            idx = torch.stack(list(h.values())).sum(0).topk(self.k, dim=1, sorted=False).indices
            return {s: SparseCode(idx, self.activate(h[s].gather(1, idx), s, idx, code), self.n_latents) for s in streams}
        out = {}
        for s in streams:
            top = h[s].topk(self.k, dim=1, sorted=False)
            out[s] = SparseCode(top.indices, self.activate(top.values, s, top.indices, code), self.n_latents)
        return out

    @torch.no_grad()
    def encode(self, inputs: dict[str, Tensor], code: CodeKind = "search") -> SparseCode:
        """The shared sparse code of each row, from any non-empty subset of streams.

        One stream alone is the query case. With several streams the indices come from the summed
        logits (Global TopK) and the values are the mean of the streams' activations. ``code`` picks
        which of the three codes (``CodeKind``): the search code by default, what indexes store.
        """
        codes = self.encode_streams(inputs, code)
        if len(codes) == 1:
            return next(iter(codes.values()))
        if self.cfg.topk == "local":
            raise ValueError("a Local-TopK model has no joint code: encode one stream at a time")
        first = next(iter(codes.values()))
        values = torch.stack([c.values for c in codes.values()]).mean(0)
        return SparseCode(first.indices, values, self.n_latents)

    # ---- decoding ---------------------------------------------------------------------------------
    def decode(self, code: SparseCode, stream: str, space: str = "input") -> Tensor:
        """Reconstruct ``stream``'s features from a code, [n, d_stream].

        space "input" (default) is the stream's own feature space (the stored input transform undone:
        a DINO row decodes at DINO's raw scale); "normalized" is W_dec z + b_dec, the space the model
        trains and searches in. Under ``input_norm: l2`` a row's original norm is unknown, so both
        spaces are the unit-norm one.
        """
        if stream not in self.codecs:
            raise KeyError(f"unknown stream {stream!r}; this model has {self.streams}")
        if space not in ("input", "normalized"):
            raise ValueError(f"space must be 'input' or 'normalized', got {space!r}")
        if code.n_latents != self.n_latents:
            raise ValueError(f"code has n_latents={code.n_latents}, model has {self.n_latents}")
        c = self.codecs[stream]
        decode = sparse_decode if self.cfg.sparse_kernels else dense_decode
        out = decode(code.indices, code.values, c.W_dec) + c.b_dec
        if space == "input" and self.cfg.input_norm == "scale":
            out = out / c.input_scale
        return out

    def private_recon(self, stream: str, x_centered: Tensor) -> Tensor:
        """The stream's private residual reconstruction of centred normalised input (zeros without one)."""
        c = self.codecs[stream]
        if not self.cfg.private_latents:
            return torch.zeros_like(x_centered)
        h = F.linear(x_centered, c.W_enc_p, c.b_enc_p)
        top = h.topk(self.cfg.private_k, dim=1, sorted=False)
        z = torch.zeros_like(h).scatter(1, top.indices, top.values.relu())
        return z @ c.W_dec_p

    @torch.no_grad()
    def reconstruct(self, stream: str, x: Tensor, space: str = "input") -> Tensor:
        """The model's reconstruction of one stream's rows from themselves: the shared code plus the
        stream's private residual dictionary. [n, d_stream], in ``space`` as ``decode``."""
        self._check_inputs({stream: x})
        code = self.encode({stream: x})
        out = self.decode(code, stream, "normalized") + self.private_recon(stream, self._centered(stream, x))
        if space == "input" and self.cfg.input_norm == "scale":
            out = out / self.codecs[stream].input_scale
        return out

    # ---- training ---------------------------------------------------------------------------------
    def _gather(self, stream: str, h: Tensor, x: Tensor, idx: Tensor) -> Tensor:
        c = self.codecs[stream]
        if self.cfg.sparse_kernels:
            return gather_logits(h, x, c.b_dec, c.W_enc, c.b_enc, idx)
        return gather_logits_dense(x, c.b_dec, c.W_enc, c.b_enc, idx)

    def forward(
        self,
        inputs: dict[str, Tensor],
        dead: dict[str, Tensor] | None = None,
        alone_select: Tensor | None = None,
        cross: bool = True,
        align: bool = True,
        solo_select: Tensor | None = None,
        align_anchor: tuple[str, ...] = (),
    ) -> SparcOutput:
        """One training pass over a paired batch: select, encode, decode, losses.

        dead: per stream, [n_latents] bool of latents counted dead (they feed AuxK).
        alone_select: [B] long; row b takes its shared indices from stream ``streams[alone_select[b]]``
            alone where >= 0, from the summed logits otherwise (``solo_select``: its earlier name).
        align_anchor: streams the alignment pulls the others towards and never moves (their mean logits are
            the target); empty: every stream is pulled towards the mean of all.
        """
        if solo_select is not None:
            warnings.warn("SparcModel.forward's solo_select is now called alone_select", DeprecationWarning, stacklevel=2)
            alone_select = solo_select if alone_select is None else alone_select
        streams = self._check_inputs(inputs)
        xs = {s: self.normalize(s, inputs[s].to(self.codecs[s].W_enc.dtype)) for s in streams}
        sel = self._select(xs, alone_select)
        aux = self._auxk_select(sel.logits, dead)
        do_align = align and self.cfg.topk == "global" and len(streams) > 1
        # Alignment reads every stream's raw logits at the same positions: the shared selection and
        # each stream's own one-stream selection (what it would pick if encoded alone).
        align_pos = torch.cat([sel.shared] + [sel.alone[s] for s in streams], dim=1) if do_align else None
        enc = self._encode_selected(xs, sel, aux, align_pos)
        recon, aux_hat = self._decode_all(xs, enc, aux, cross)
        return self._losses(xs, sel, enc, recon, aux_hat, cross, align_anchor)

    def _select(self, xs: dict[str, Tensor], alone_select: Tensor | None) -> _Selection:
        """Which latents each row uses: Global TopK over the summed logits (or one stream's, where
        ``alone_select`` asks), or each stream's own top-k under Local TopK. No gradient flows here."""
        with torch.no_grad():
            h = {s: F.linear(xs[s] - self.codecs[s].b_dec, self.codecs[s].W_enc, self.codecs[s].b_enc) for s in xs}
            alone = {s: h[s].topk(self.k, dim=1, sorted=False).indices for s in xs}
            if self.cfg.topk != "global":
                return _Selection(h, alone, dict(alone), None)
            stacked = torch.stack(list(h.values()))
            total = stacked.sum(0)
            if alone_select is not None and bool((alone_select >= 0).any()):
                rows = torch.arange(total.shape[0], device=total.device)
                picked = stacked[alone_select.clamp_min(0), rows]
                total = torch.where((alone_select >= 0).unsqueeze(1), picked, total)
            shared = total.topk(self.k, dim=1, sorted=False).indices
            return _Selection(h, alone, {s: shared for s in xs}, shared)

    def _auxk_select(self, h: dict[str, Tensor], dead: dict[str, Tensor] | None) -> _AuxK:
        """Per stream, the top-auxk latents among its dead ones (the AuxK code's indices)."""
        aux = _AuxK({}, {}, {})
        if dead is None or self.cfg.auxk <= 0:
            return aux
        with torch.no_grad():
            for s in h:
                dead_ids = dead[s].nonzero().squeeze(1)
                if len(dead_ids):  # top-auxk among the dead columns only
                    top = h[s].index_select(1, dead_ids).topk(min(self.cfg.auxk, len(dead_ids)), dim=1, sorted=False)
                    aux.idx[s] = dead_ids[top.indices]
                    aux.pos[s] = (dead_ids, top.indices)
        return aux

    def _encode_selected(self, xs: dict[str, Tensor], sel: _Selection, aux: _AuxK, align_pos: Tensor | None) -> _Encoded:
        """The codes (with gradient), the alignment logits and the AuxK activations. One gather per
        stream for everything the loss reads from the logits: the code, the alignment positions (which
        start with the shared code's) and the AuxK latents -> one sparse W_enc gradient per stream."""
        k, enc = self.k, _Encoded({}, {})
        for s in xs:
            parts = [sel.codes[s] if align_pos is None else align_pos] + ([aux.idx[s]] if s in aux.idx else [])
            raw = self._gather(s, sel.logits[s], xs[s], torch.cat(parts, dim=1))
            enc.codes[s] = SparseCode(sel.codes[s], self.activate(raw[:, :k], s, sel.codes[s]), self.n_latents)
            if align_pos is not None:
                enc.align_logits[s] = raw[:, : align_pos.shape[1]]
            if s in aux.idx:
                aux.vals[s] = raw[:, raw.shape[1] - aux.idx[s].shape[1] :].relu()
        return enc

    def _decode_all(
        self, xs: dict[str, Tensor], enc: _Encoded, aux: _AuxK, cross: bool
    ) -> tuple[dict[tuple[str, str], Tensor], dict[str, Tensor]]:
        """recon[(s, t)]: stream s's code decoded by stream t's decoder (s == t only without ``cross``),
        and each stream's AuxK reconstruction. One decode call per target stream."""
        recon: dict[tuple[str, str], Tensor] = {}
        aux_hat: dict[str, Tensor] = {}
        for t in xs:
            sources = [s for s in xs if s == t or cross]
            parts = [(enc.codes[s].indices, enc.codes[s].values) for s in sources]
            c = self.codecs[t]
            compact = self.cfg.sparse_kernels and t in aux.pos and use_compact_decode(*aux.pos[t])
            if t in aux.idx and not compact:
                parts.append((aux.idx[t], aux.vals[t]))
            if self.cfg.sparse_kernels:
                outs = sparse_decode_many(parts, c.W_dec)
            else:
                outs = [dense_decode(i, v, c.W_dec) for i, v in parts]
            for s, o in zip(sources, outs):
                recon[(s, t)] = o + c.b_dec
            if self.cfg.private_latents:  # the private dictionary adds to self-reconstruction only
                recon[(t, t)] = recon[(t, t)] + self.private_recon(t, xs[t] - c.b_dec)
            if compact:
                aux_hat[t] = compact_decode(*aux.pos[t], aux.vals[t], c.W_dec)
            elif t in aux.idx:
                aux_hat[t] = outs[-1]
        return recon, aux_hat

    def _losses(
        self, xs: dict[str, Tensor], sel: _Selection, enc: _Encoded, recon: dict[tuple[str, str], Tensor],
        aux_hat: dict[str, Tensor], cross: bool, align_anchor: tuple[str, ...] = (),
    ) -> SparcOutput:  # fmt: skip
        """Self- and cross-reconstruction, AuxK and alignment losses, and what each stream fires alone."""
        streams = list(xs)
        self_terms = {s: normalized_mse(recon[(s, s)], xs[s]) for s in streams}
        self_loss = torch.stack(list(self_terms.values())).mean()
        zero = self_loss.new_zeros(())
        cross_loss = cross_reconstruction(recon, xs) if cross and len(streams) > 1 else zero
        aux_terms = [auxk_loss(aux_hat[s], (xs[s] - recon[(s, s)]).detach()) for s in aux_hat]
        aux = torch.stack(aux_terms).mean() if aux_terms else zero
        align_err, align_energy = zero, self_loss.new_ones(())
        if enc.align_logits:
            # Pull every stream's logits at those positions towards their cross-stream mean: equal
            # logits give equal one-stream top-k sets. The loss is err / energy with the batch's
            # target energy (not per row, which blows up on rows with tiny targets); both are sums
            # over rows, so data-parallel ranks can add them up exactly.
            # With anchors, the target is the anchors' mean and only the other streams move towards it.
            anchors = [s for s in streams if s in align_anchor] or streams
            pulled = [s for s in streams if s not in anchors] or streams
            with torch.no_grad():
                target = torch.stack([enc.align_logits[s] for s in anchors]).mean(0)
                align_energy = target.pow(2).sum().clamp_min(1e-6)
            align_err = torch.stack([(enc.align_logits[s] - target).pow(2).sum() for s in pulled]).mean()
        fired, l0_alone = self._fired_alone(sel)
        return SparcOutput(
            codes=enc.codes, self_loss=self_loss, cross_loss=cross_loss, auxk_loss=aux,
            align_loss=align_err / align_energy, align_err=align_err, align_energy=align_energy,
            stream_nmse={s: v.detach() for s, v in self_terms.items()}, fired=fired, l0_alone=l0_alone,
        )  # fmt: skip

    @torch.no_grad()
    def _fired_alone(self, sel: _Selection) -> tuple[dict[str, Tensor], Tensor]:
        """Per stream, [n_latents] bool of the latents active when it is encoded alone; the mean L0 then."""
        fired, l0 = {}, []
        for s, idx in sel.alone.items():
            vals = self.activate(sel.logits[s].gather(1, idx), s, idx)
            f = torch.zeros(self.n_latents, dtype=torch.bool, device=vals.device)
            f[idx[vals > 0]] = True
            fired[s] = f
            l0.append((vals > 0).sum(-1).float().mean())
        return fired, torch.stack(l0).mean()

    @torch.no_grad()
    def keep_latents(self, keep: Tensor) -> None:
        """Shrink the dictionary to the latents ``keep`` ([m] ids, in their new order) in every stream."""
        keep = keep.to(self.device)
        for c in self.codecs.values():
            c.W_enc = nn.Parameter(c.W_enc.data[keep].clone())
            c.b_enc = nn.Parameter(c.b_enc.data[keep].clone())
            c.W_dec = nn.Parameter(c.W_dec.data[keep].clone())
            c.threshold = c.threshold[keep].clone()
        self.cfg = self.cfg.model_copy(update={"n_latents": int(len(keep)), "auxk": min(self.cfg.auxk, int(len(keep)))})

    # ---- decoder geometry -------------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Renormalise every decoder row (latent direction) to unit L2 norm."""
        for c in self.codecs.values():
            for W in self._decoders(c):
                W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of W_dec's gradient the component along each (unit) decoder row."""
        for c in self.codecs.values():
            for W in self._decoders(c):
                if W.grad is None:
                    continue
                parallel = torch.einsum("nd,nd->n", W.grad, W).unsqueeze(1)  # einsum: ~3x vecdot on CPU
                W.grad.addcmul_(parallel, W, value=-1.0)

    def _decoders(self, c: StreamCodec) -> list[nn.Parameter]:
        return [c.W_dec, c.W_dec_p] if self.cfg.private_latents else [c.W_dec]
