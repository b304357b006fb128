"""The upper-level gradient of BiSSL (Eq. 7, Alg. 2) and its diagnostics: the CG operator
``A v = v + ∇²L_P v / (λ + λ_damp)`` (:func:`ig_matvec`), its CG solve (:func:`cg_solve`, the arithmetic of
:func:`bilevel_ssl.hypergrad.conjugate_gradient`, which also returns CG's own residual) in :func:`implicit_gradient`,
g_θD = v_IG + γ·∇_θ L_D(θ_D, ϕ_D) (:func:`upper_backbone_gradient`), the ends of the Hessian spectrum
(:func:`hessian_extremes`) and the clipping of both levels (:func:`clip_gradients`).  The Hessian-vector products come
from :class:`bilevel_ssl.hypergrad.InnerHessian` (built in :meth:`bilevel_ssl.bissl.BiSSLStage.pretext_hessian`).
:class:`CGResidualWarning` / :class:`CGResidualError` are what a bad solve raises (``bissl.cg_on_residual``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..hessian import _cg

Tensors = Sequence[Tensor]


class CGResidualWarning(RuntimeWarning):
    """BiSSL's CG left a relative residual above ``bissl.cg_max_residual`` (``cg_on_residual: warn``)."""


class CGResidualError(RuntimeError):
    """BiSSL's CG left a relative residual above ``bissl.cg_max_residual`` (``cg_on_residual: stop``); raised before
    the upper optimizer step."""


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


def cg_solve(matvec, b: Tensors, iters: int, layerwise: bool) -> tuple[list[Tensor], list[Tensor]]:
    """``iters`` CG iterations on A x = b from x₀ = 0 (``iters`` calls of ``matvec``): the CG of
    :func:`bilevel_ssl.hypergrad.conjugate_gradient` with damping 0 (the same code), also returning its recursively
    updated residual r.  ``layerwise``: one α, β per tensor (the reference's default,
    reference-facts "BiSSL"), else α = rᵀr / Σ dᵀAd.  For global CG, r = b − A x up to rounding; for layer-wise CG
    it is *not* b − A x unless A is block-diagonal (the per-tensor steps update each block of r with that block's α
    only), so its true residual needs one more product (:func:`implicit_gradient`)."""
    return _cg(matvec, b, iters, 0.0, bool(layerwise))


def implicit_gradient(hvp_fn, v: Tensors, *, lam: float, damping: float, iters: int, layerwise: bool,
                      residual: bool | str = False) -> tuple[list[Tensor], float]:
    """v_IG ≈ [I + ∇²L_P/(λ + λ_damp)]⁻¹ v by ``iters`` conjugate-gradient iterations from 0 (Algorithm 1's CG step,
    App. B.3): :func:`cg_solve` on :func:`ig_matvec`.  ``layerwise``: one step size α, β per tensor (reference
    default).  Returns ``(v_IG, rel_residual)``, ``rel_residual = ‖v − A v_IG‖ / ‖v‖`` (0 = solved, 1 = no better
    than v_IG = 0), by ``residual``:

    * ``False``: not measured (nan);
    * ``True``: the true residual, from one more HVP (A v_IG);
    * ``"auto"``: as cheaply as it is exact - global CG: CG's own residual (no HVP; equal to the true one up to
      rounding), layer-wise CG: the true residual (one more HVP; its recursive residual is not b − A x, see
      :func:`cg_solve`).  What :class:`~bilevel_ssl.bissl.BiSSLStage` measures at every upper step.
    """
    if residual not in (False, True, "auto"):
        raise ValueError(f"residual: must be False, True or 'auto', got {residual!r}")
    A = ig_matvec(hvp_fn, lam, damping)
    v = [t.detach() for t in v]
    x, r = cg_solve(A, v, iters, layerwise)
    res = float("nan")
    if residual is not False:
        bn = norm(v)
        if residual == "auto" and not layerwise:
            res = norm(r) / bn if bn > 0 else 0.0
        else:
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

