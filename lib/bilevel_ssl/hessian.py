"""Hessian-vector products and linear solvers on lists of tensors: the functional core of the hypergradient
engines (:mod:`bilevel_ssl.hypergrad`, which re-exports the public names) and of BiSSL's implicit gradient.

* :func:`hvp`, :func:`mixed_hvp`, :func:`inner_hessian` / :class:`InnerHessian` - products with ∇²_θθ L and
  ∇²_φθ L by double backward (``torch.autograd.grad``; ``torch.func`` rejects train-mode BatchNorm).
* :func:`conjugate_gradient`, :func:`neumann_inverse` - A⁻¹b for a symmetric operator given as a product.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["InnerHessian", "inner_hessian", "hvp", "mixed_hvp", "conjugate_gradient", "neumann_inverse"]

Params = Sequence[Tensor]
LossFn = Callable[[list, list], Tensor]          # (theta, phi) -> scalar
MatVec = Callable[[list], list]                  # list[Tensor] -> list[Tensor]


# --------------------------------------------------------------------------------------------------------------------
# small list-of-tensors helpers


def _leaves(ts: Params) -> list[Tensor]:
    """Fresh autograd leaves sharing no graph with the caller's tensors (storage is shared; nothing writes to it)."""
    return [t.detach().requires_grad_(True) for t in ts]


def _grad(loss: Tensor, inputs: Sequence[Tensor], *, create_graph: bool = False, retain_graph: bool | None = None
          ) -> list[Tensor]:
    """``torch.autograd.grad`` that returns exact zeros for inputs the loss does not depend on."""
    inputs = list(inputs)
    if not inputs:
        return []
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    gs = torch.autograd.grad(loss, inputs, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)]


def _norm(a: Params) -> Tensor:
    return torch.sqrt(sum((x.detach() * x.detach()).sum() for x in a))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (a converged CG block, or a zero operator)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _check_like(name: str, v: Params, ref: Params) -> list[Tensor]:
    v = list(v)
    if len(v) != len(ref) or any(a.shape != b.shape for a, b in zip(v, ref)):
        raise ValueError(f"hypergrad: {name} must match the parameter list in length and shapes; got "
                         f"{[tuple(a.shape) for a in v]} for {[tuple(b.shape) for b in ref]}")
    return v


# --------------------------------------------------------------------------------------------------------------------
# Hessian-vector products (double backward)


class InnerHessian:
    """Second derivatives of ``loss_fn(theta, phi)`` at one point, sharing one gradient graph.

    ∇_θ L is computed once with ``create_graph=True``; then every :meth:`hvp` (∇²_θθ L · v) and :meth:`mixed`
    (∇²_φθ L · v = ∇_φ ⟨∇_θ L, v⟩) is one backward pass through that graph - the double backward of the BiSSL
    authors (``grad(loss, params, create_graph=True)``, then ``grad(Σ g·v, params)``; reference-facts, BiSSL).
    Evaluating ``loss_fn`` once also means one batch (and one BatchNorm batch) serves all products.
    Results are detached.
    """

    def __init__(self, loss_fn: LossFn, theta: Params, phi: Params = ()):
        self.theta = _leaves(theta)
        self.phi = _leaves(phi)
        loss = loss_fn(self.theta, self.phi)
        self.loss = float(loss.detach())
        self._g = _grad(loss, self.theta, create_graph=True)
        self.grad_theta = [g.detach() for g in self._g]

    def _backward(self, v: Params, inputs: list[Tensor]) -> list[Tensor]:
        v = _check_like("v", v, self.theta)
        pairs = [(g, x) for g, x in zip(self._g, v) if g.requires_grad]
        if not pairs or not inputs:
            return [torch.zeros_like(t) for t in inputs]
        out = torch.autograd.grad([g for g, _ in pairs], inputs, grad_outputs=[x.detach() for _, x in pairs],
                                  retain_graph=True, allow_unused=True)
        return [torch.zeros_like(t) if o is None else o.detach() for o, t in zip(out, inputs)]

    def hvp(self, v: Params) -> list[Tensor]:
        """∇²_θθ L · v (shaped like θ)."""
        return self._backward(v, self.theta)

    def mixed(self, v: Params) -> list[Tensor]:
        """∇²_φθ L · v = ∇_φ ⟨∇_θ L, v⟩ (v shaped like θ, result shaped like φ)."""
        return self._backward(v, self.phi)


def inner_hessian(loss_fn: LossFn, theta: Params, phi: Params = ()) -> InnerHessian:
    """Build an :class:`InnerHessian` of ``loss_fn(theta, phi)`` at (θ, φ)."""
    return InnerHessian(loss_fn, theta, phi)


def hvp(loss_fn: Callable[[list], Tensor], params: Params, v: Params) -> list[Tensor]:
    """Hessian-vector product ∇²L(params) · v by double backward.  Cost: 1 forward, 1 backward with
    ``create_graph=True``, 1 backward through that graph (≈ 2-3 backward passes in all)."""
    return InnerHessian(lambda th, _ph: loss_fn(th), params).hvp(v)


def mixed_hvp(loss_fn: LossFn, theta: Params, phi: Params, v: Params) -> list[Tensor]:
    """Mixed second-derivative product ∇²_φθ L(θ, φ) · v = ∇_φ ⟨∇_θ L, v⟩, with v shaped like θ; the result is
    shaped like φ (zeros where ∇_θ L does not depend on φ)."""
    return InnerHessian(loss_fn, theta, phi).mixed(v)


# --------------------------------------------------------------------------------------------------------------------
# linear solvers on lists of tensors


def _cg(matvec: MatVec, b: Params, iters: int, damping: float, layerwise: bool) -> tuple[list[Tensor], list[Tensor]]:
    b = [t.detach() for t in b]
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]                      # r = b − (A + λI) x₀ with x₀ = 0
    d = [t.clone() for t in r]
    rr = [(t * t).sum() for t in r]
    for _ in range(iters):
        ad = [a.detach() + damping * di for a, di in zip(matvec(d), d)]
        dad = [(di * a).sum() for di, a in zip(d, ad)]
        if layerwise:                               # one α, β per tensor (BiSSL's default)
            alpha = [_safe_div(n, m) for n, m in zip(rr, dad)]
        else:                                       # α = rᵀr / Σ dᵀAd (BiSSL 2025-11)
            alpha = [_safe_div(sum(rr), sum(dad))] * len(b)
        x = [xi + a * di for xi, a, di in zip(x, alpha, d)]
        r = [ri - a * adi for ri, a, adi in zip(r, alpha, ad)]
        rr_new = [(t * t).sum() for t in r]
        if layerwise:
            beta = [_safe_div(n, o) for n, o in zip(rr_new, rr)]
        else:
            beta = [_safe_div(sum(rr_new), sum(rr))] * len(b)
        d = [ri + bt * di for ri, bt, di in zip(r, beta, d)]
        rr = rr_new
    return [torch.nan_to_num(t) for t in x], r


def conjugate_gradient(matvec: MatVec, b: Params, iters: int = 5, damping: float = 0.0, layerwise: bool = False
                       ) -> list[Tensor]:
    """Solve (A + damping·I) x = b by ``iters`` conjugate-gradient iterations from x₀ = 0 (cost: ``iters`` calls of
    ``matvec``).  A must be symmetric positive definite for the usual guarantees (exact after n iterations for n
    unknowns, in exact arithmetic).

    ``layerwise=True`` keeps a separate step size α and β for each tensor of the list, as the BiSSL authors' default
    (reference-facts, BiSSL); it is true CG for each block of a block-diagonal A, a heuristic otherwise.
    Divisions by zero (a converged block, a zero operator) give a zero step, and the result passes through
    ``nan_to_num`` as in BiSSL's code.
    """
    _check_int("iters", iters, 0)
    _check_real("damping", damping, lo=0.0)
    return _cg(matvec, b, iters, float(damping), bool(layerwise))[0]


def neumann_inverse(matvec: MatVec, b: Params, iters: int, alpha: float) -> list[Tensor]:
    """Truncated Neumann series x ≈ α Σ_{k=0}^{K} (I − αA)^k b ≈ A⁻¹ b with K = ``iters`` (cost: K calls of
    ``matvec``).  Converges iff the spectral radius of I − αA is < 1, i.e. 0 < α < 2/λ_max for SPD A
    (Lorraine et al. 2020, Eq. 9 and Alg. 3)."""
    _check_int("iters", iters, 0)
    _check_real("alpha", alpha, lo=0.0, lo_open=True)
    return _neumann(matvec, b, iters, float(alpha))[0]


def _neumann(matvec: MatVec, b: Params, iters: int, alpha: float) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`neumann_inverse` and its last term (I − αA)^K b (its norm against ‖b‖ says whether it converges)."""
    p = [t.detach().clone() for t in b]
    acc = [t.clone() for t in p]
    for _ in range(iters):
        p = [pi - alpha * a.detach() for pi, a in zip(p, matvec(p))]
        acc = [ai + pi for ai, pi in zip(acc, p)]
    return [alpha * a for a in acc], p


# --------------------------------------------------------------------------------------------------------------------
# validation


def _check_real(name: str, value, *, lo: float | None = None, lo_open: bool = False) -> float:
    where = f"hypergrad: option {name!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{where} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    return float(value)


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"hypergrad: option {name!r} must be an integer >= {lo}, got {value!r}")
    return value
