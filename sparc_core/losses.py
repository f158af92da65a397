"""Loss functions: pure, shape-documented, no state."""

from __future__ import annotations

from torch import Tensor

EPS = 1e-8


def normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean over rows of ||x_hat - x||^2 / ||x||^2. x_hat, x: [B, d] -> scalar."""
    err = (x_hat - x).pow(2).sum(-1)
    return (err / x.pow(2).sum(-1).clamp_min(EPS)).mean()


def cross_reconstruction(recon: dict[tuple[str, str], Tensor], targets: dict[str, Tensor]) -> Tensor:
    """Mean nMSE over ordered pairs (s, t), s != t, of recon[(s, t)] (code of s decoded by t) vs targets[t]."""
    terms = [normalized_mse(r, targets[t]) for (s, t), r in recon.items() if s != t]
    if not terms:
        return next(iter(targets.values())).new_zeros(())
    return sum(terms) / len(terms)  # type: ignore[return-value]


def auxk_loss(residual_hat: Tensor, residual: Tensor) -> Tensor:
    """AuxK: dead latents' reconstruction of the detached residual, normalised by the residual's norm.

    residual_hat, residual: [B, d] -> scalar. NaN-safe when there is no residual left.
    """
    return normalized_mse(residual_hat, residual).nan_to_num(0.0)
