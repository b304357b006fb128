"""TC²'s networks and losses (Eq. 1-3 and L_sse): the statistics S, the factor network f_v, the weight network
f_w, the calibration ẑ = f_w(z)Vᵀ, L_v, L_w and the query loss L_sse.  The meta-method and the choices behind
these pieces are in :mod:`bilevel_ssl.tc2` (which re-exports every name here).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["REDUCTIONS", "batch_statistics", "FactorNet", "WeightNet", "calibrate", "orthogonality_loss",
           "reconstruction_loss", "l1_loss", "loss_v", "loss_w", "sse_loss"]

REDUCTIONS = ("mean", "sum")


def batch_statistics(z: Tensor) -> Tensor:
    """S = [μ; Σ] ∈ R^{(d+1)×d}: row 0 the mean of the rows of ``z`` (N, d), rows 1..d their covariance with the
    unbiased 1/(N−1) normalisation."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"batch_statistics: z must be (N, d) with N >= 2, got {tuple(z.shape)}")
    mu = z.mean(dim=0, keepdim=True)
    zc = z - mu
    return torch.cat([mu, zc.T @ zc / (z.shape[0] - 1)])


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """App. IV: "a lightweight three-layer MLP, two hidden layers with ReLU activation and an output layer"."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


class FactorNet(nn.Module):
    """f_v: S = [μ; Σ] ∈ R^{(d+1)×d} -> V ∈ R^{d×n_f}: the 3-layer MLP of App. IV on the flattened S scaled to unit
    Frobenius norm, its d·n_f outputs read as V row by row (:mod:`bilevel_ssl.tc2` says why flattened).

    Why S/‖S‖_F: f_v sees *one* input per batch, so a gradient step on its first layer (ΔW₁ ∝ g·sᵀ) changes its
    pre-activations by α‖s‖²·g - an effective step size α·‖S‖²_F, about 900·α on Conv-4 features (d = 256): one
    inner step of Eq. 4 diverged even at α = 0.001.  The map f_v has to learn does not need the scale: the
    minimisers of Eq. 1 (the top-n_f eigenvectors of the second moment ZᵀZ/N = Σ·(N−1)/N + μᵀμ) are unchanged when
    Z, hence S, is rescaled."""

    def __init__(self, d: int, n_f: int, hidden: int = 64):
        super().__init__()
        self.d, self.n_f = d, n_f
        self.mlp = _mlp((d + 1) * d, hidden, d * n_f)

    def forward(self, s: Tensor) -> Tensor:
        if tuple(s.shape) != (self.d + 1, self.d):
            raise ValueError(f"FactorNet: S must be ({self.d + 1}, {self.d}), got {tuple(s.shape)}")
        flat = s.reshape(-1)
        return self.mlp(flat / flat.norm().clamp_min(1e-12)).view(self.d, self.n_f)


class WeightNet(nn.Module):
    """f_w: a representation z ∈ R^d -> its factor weights W = f_w(z) ∈ R^{n_f} (rows of a batch independently)."""

    def __init__(self, d: int, n_f: int, hidden: int = 128):
        super().__init__()
        self.d, self.n_f = d, n_f
        self.mlp = _mlp(d, hidden, n_f)

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.d:
            raise ValueError(f"WeightNet: z must be (..., {self.d}), got {tuple(z.shape)}")
        return self.mlp(z)


def calibrate(w: Tensor, v: Tensor) -> Tensor:
    """ẑ = W Vᵀ: the calibrated representation (§Task Conflict Calibration, question iii); ``w`` (N, n_f),
    ``v`` (d, n_f) -> (N, d)."""
    return w @ v.T


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"meta_args.reduction: unknown value {reduction!r}; allowed: {', '.join(REDUCTIONS)}")


def _reduce(sq: Tensor, reduction: str) -> Tensor:
    _check_reduction(reduction)
    return sq.sum() if reduction == "sum" else sq.mean()


def orthogonality_loss(v: Tensor, reduction: str = "mean") -> Tensor:
    """‖VᵀV − I‖²_F (first term of Eq. 1); ``mean`` divides by n_f²."""
    eye = torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
    return _reduce((v.T @ v - eye) ** 2, reduction)


def reconstruction_loss(z: Tensor, z_hat: Tensor, reduction: str = "mean") -> Tensor:
    """‖Z − Ẑ‖²_F (second term of Eq. 1, first of Eq. 2); ``mean`` divides by rows·d."""
    return _reduce((z - z_hat) ** 2, reduction)


def l1_loss(w: Tensor, reduction: str = "mean") -> Tensor:
    """Σ_j ‖W_j‖₁ (second term of Eq. 2); ``mean`` divides by rows·n_f."""
    return _reduce(w.abs(), reduction)


def loss_v(v: Tensor, z: Tensor, reduction: str = "mean") -> Tensor:
    """Eq. 1: L_v = ‖VᵀV − I‖²_F + ‖Z − Z V Vᵀ‖²_F, ``z`` the (N, d) representations of the whole batch."""
    return orthogonality_loss(v, reduction) + reconstruction_loss(z, z @ v @ v.T, reduction)


def loss_w(w: Tensor, z: Tensor, v: Tensor, reduction: str = "mean") -> Tensor:
    """Eq. 2: L_w = Σ_j ‖z_j − W_j Vᵀ‖²₂ + ‖W_j‖₁ with W_j = f_w(z_j) the rows of ``w`` (N, n_f) and ``z`` (N, d),
    V = ``v`` (d, n_f)."""
    return reconstruction_loss(z, calibrate(w, v), reduction) + l1_loss(w, reduction)


def sse_loss(support: list[Tensor], query: list[Tensor], *, normalize: bool = True, reduction: str = "mean") -> Tensor:
    """Our reading of L_sse^q (below Eq. 5): Σ_j Σ_{v∈Q} ‖e_{j,v} − c_j‖² with c_j = mean_{v∈S} e_{j,v}, the
    support prototype of image j, and e = ẑ (L2-normalised with ``normalize``).  ``support`` / ``query``: one
    (n, d) tensor per view, row j = image j.  ``mean`` averages over the (image, query view) pairs."""
    if not support or not query:
        raise ValueError("sse_loss: needs >= 1 support and >= 1 query view")
    prep = (lambda t: F.normalize(t, dim=-1)) if normalize else (lambda t: t)
    proto = torch.stack([prep(s) for s in support]).mean(dim=0)
    err = torch.stack([((prep(q) - proto) ** 2).sum(dim=-1) for q in query])  # (views, n)
    return _reduce(err, reduction)
