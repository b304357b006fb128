"""The upper-level gradient of BiSSL (Eq. 7, Alg. 2) and its diagnostics: the CG operator
``A v = v + ∇²L_P v / (λ + λ_damp)`` (:func:`ig_matvec`), its CG solve through
:func:`bilevel_ssl.hypergrad.conjugate_gradient` (:func:`implicit_gradient`), g_θD = v_IG + γ·∇_θ L_D(θ_D, ϕ_D)
(:func:`upper_backbone_gradient`), the ends of the Hessian spectrum (:func:`hessian_extremes`) and the clipping of
both levels (:func:`clip_gradients`).  The Hessian-vector products come from
:class:`bilevel_ssl.hypergrad.InnerHessian` (built in :meth:`bilevel_ssl.bissl.BiSSLStage.pretext_hessian`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..hypergrad import conjugate_gradient

Tensors = Sequence[Tensor]


def ig_matvec(hvp_fn, lam: float, damping: float):
    """The CG operator of Algorithm 2: ``v -> v + ∇²L_P·v / (λ + λ_damp)``.

    With λ_damp = 0 this is Eq. 6-7's I + H/λ exactly; the paper's and the reference code's λ_damp = 10 make it
    I + H/(λ + 10) (reference-facts, BiSSL: "effectively I + H/10.001").  ``hvp_fn`` maps a list of tensors to
    ∇²L_P times it (:meth:`bilevel_ssl.hypergrad.InnerHessian.hvp`)."""
    scale = 1.0 / (float(lam) + float(damping))
    return lambda v: [vi + scale * hi for vi, hi in zip(v, hvp_fn(v))]


def norm(ts: Tensors) -> float:
    """The joint Euclidean norm of a list of tensors, in float64."""
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in ts)))


def implicit_gradient(hvp_fn, v: Tensors, *, lam: float, damping: float, iters: int, layerwise: bool,
                      residual: bool = False) -> tuple[list[Tensor], float]:
    """v_IG ≈ [I + ∇²L_P/(λ + λ_damp)]⁻¹ v by ``iters`` conjugate-gradient iterations from 0 (Algorithm 1's CG step,
    App. B.3), through :func:`bilevel_ssl.hypergrad.conjugate_gradient` on :func:`ig_matvec` (its own damping 0).

    ``layerwise``: one step size α, β per tensor (reference default).  Returns ``(v_IG, rel_residual)`` where
    ``rel_residual = ‖v − A v_IG‖ / ‖v‖`` of the *true* residual (one more HVP) when ``residual`` is set, else nan.
    """
    A = ig_matvec(hvp_fn, lam, damping)
    v = [t.detach() for t in v]
    x = conjugate_gradient(A, v, iters=iters, damping=0.0, layerwise=layerwise)
    res = float("nan")
    if residual:
        bn = norm(v)
        res = norm([b - a for b, a in zip(v, A(x))]) / bn if bn > 0 else 0.0
    return x, res


def upper_backbone_gradient(v_ig: Tensors, direct: Tensors, direct_weight: float = 1.0) -> list[Tensor]:
    """g_θD = v_IG + γ·∇_θ L_D(θ_D, ϕ_D) (Algorithm 1; Eq. 7 for γ = 1)."""
    return [a + direct_weight * b for a, b in zip(v_ig, direct)]


def hessian_extremes(hvp_fn, like: Tensors, *, iters: int = 20, seed: int = 0) -> tuple[float, float]:
    """Estimates of the two ends of the spectrum of a symmetric operator (``hvp_fn``) by power iteration: first the
    eigenvalue of largest magnitude μ₁, then, on the shifted operator H − μ₁I, the eigenvalue farthest from μ₁ (the
    other end).  Returns ``(lowest, highest)``.  Used to see whether the CG operator I + H/(λ + λ_damp) is positive
    definite (needs lowest > −(λ + λ_damp)); ``iters`` HVPs per end.  The values are Rayleigh quotients of the last
    iterates, so the true spectrum is at least as wide: a ``lowest`` below −(λ + λ_damp) proves the operator
    indefinite, one above it does not prove it definite (the low end converges slowly when the top eigenvalue is
    large)."""
    g = torch.Generator().manual_seed(seed)

    def power(shift: float) -> float:
        v = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in like]
        mu = 0.0
        for _ in range(iters):
            n = norm(v)
            v = [x / n for x in v]
            hv = [h - shift * x for h, x in zip(hvp_fn(v), v)]
            mu = float(sum((a.double() * b.double()).sum() for a, b in zip(v, hv)))
            v = hv
        return mu + shift

    first = power(0.0)
    second = power(first)
    return (min(first, second), max(first, second))


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Scale the ``.grad`` of ``params`` so that their joint norm is at most ``max_norm`` (0: no clipping); returns
    the norm before clipping (§4.2.2: "gradient normalization is employed on gradients exceeding ℓ2-norms of 10")."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return norm([p.grad for p in grads])

