"""Hypergradient engines for one bi-level step: inner descent on the support set, outer loss on the query set.

Notation (GeSSL §3.2, Eq. 4-5; note that GeSSL's App. G.4 calls the upper-level parameters θ and the lower-level
ones φ, the opposite of here):

* ``theta`` θ - *inner* parameters, adapted by the inner loop (GeSSL: encoder f + projector).
* ``phi`` φ - *outer-only* parameters, fixed during the inner loop (GeSSL: threshold network g).
* ``inner_loss(theta, phi)`` L_in (support set), ``outer_loss(theta, phi)`` L_out (query set); both are closures
  over lists of tensors that return a scalar.  Modules are evaluated inside them with
  ``torch.func.functional_call(module, dict(zip(names, theta)), x)``; the engines only use
  ``torch.autograd.grad`` (``torch.func.grad`` rejects train-mode BatchNorm).
* θ' = θ_ς, with θ_{k+1} = θ_k − α ∇_θ L_in(θ_k, φ), θ_0 = θ, ς = ``inner_steps``, α = ``inner_lr`` (GeSSL Eq. 4).

Every engine returns an estimate of the meta-gradient of F(θ, φ) = L_out(θ'(θ, φ), φ) with respect to the
*initial* θ (MAML-style; GeSSL Eq. 5 updates f this way) and to φ, together with θ' and a dict of floats to log.
The caller writes them into ``.grad`` (:func:`set_grads`) and steps its own optimizer.

Which engine is exact when:

* ``second_order`` - exact for every ς (reverse mode through the unrolled inner loop).
* ``aid_fd`` - the reverse pass of ``second_order`` with every Hessian-vector product replaced by a central
  difference of gradients.  Its error is O(ε²) only where L_in is twice continuously differentiable along the
  segment θ ± εv (and zero for quadratic L_in).  **Not so on the default Conv-4**: ReLU and max-pool make the
  Hessian jump, the difference straddles the kinks, and at DARTS' ``fd_r`` = 0.01 (the earlier default) the
  θ-gradient is off by 177-621 % (φ 3-11 %) on the float64 Conv-4 of ``tests/test_hypergrad_conv4.py``; exact (to
  1e-7) at ``fd_r`` <= 1e-4 in float64, hence the default 1e-4.  With softplus / average pooling the error is
  O(fd_r²) again.
* Measured on that Conv-4 (one inner step from a random init): ``second_order`` exact; ``aid_fd`` (1e-4) exact to
  1e-7; ``aid_cg`` / ``aid_neumann`` estimate the implicit (inner-optimum) hypergradient, which is not the
  one-step one: φ 0.9-1.6 off with the default damping 1/α (undamped, the earlier default: 2-64x, residual 3-74);
  Neumann with the earlier step α = inner_lr diverged (φ 1e3-1e7 off; now 1/λ̂ by power iteration);
  ``first_order`` / ``momentum_proxy`` give φ exactly zero.  Each engine logs its own quality measure
  (``fd_check_error``, ``cg_residual``, ``neumann_growth``) and warns or stops (option ``on_bad``).
* ``aid_cg`` / ``aid_neumann`` - the φ-gradient is exact (up to solver error) in the limit where θ' is the
  minimiser of L_in(·, φ) with a positive definite Hessian (implicit function theorem), i.e. ς → ∞.  Their θ-gradient
  is the first-order one (see :class:`AidCG`).
* ``first_order`` - exact only if θ' does not depend on θ and φ (never, for ς ≥ 1); φ then receives only ∂_φ L_out.
* ``momentum_proxy`` - GeSSL App. C: θ' is an EMA copy; no gradient flows through it at all.

The functional core (:func:`hvp`, :func:`mixed_hvp`, :func:`inner_hessian`, :func:`conjugate_gradient`,
:func:`neumann_inverse`) works on lists of tensors and is shared with BiSSL's implicit upper-level gradient; it
lives in :mod:`bilevel_ssl.hessian` and is re-exported here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

from .hessian import (InnerHessian, LossFn, Params, _cg, _check_int, _check_like, _check_real, _grad, _leaves, _neumann,
                      _norm, conjugate_gradient, hvp, inner_hessian, mixed_hvp, neumann_inverse)
from .options import Options, option

__all__ = [
    "HyperGrad",
    "HypergradQualityError",
    "ON_BAD",
    "InnerHessian",
    "inner_hessian",
    "hvp",
    "mixed_hvp",
    "conjugate_gradient",
    "neumann_inverse",
    "SecondOrder",
    "FirstOrder",
    "AidFD",
    "AidCG",
    "AidNeumann",
    "MomentumProxy",
    "ENGINES",
    "make_engine",
    "hypergradient",
    "set_grads",
]

ON_BAD = ("warn", "stop")  # what an engine does when its own quality measure is bad (option ``on_bad``)


class HypergradQualityError(FloatingPointError):
    """An engine's quality measure is bad and its option ``on_bad`` is ``stop``.  Raised inside the step, i.e.
    before the optimizer step (a FloatingPointError: the trainer and the notebooks treat it as a diverged run)."""


def _check_problem(theta: Params, phi: Params, inner_lr, inner_steps) -> tuple[list[Tensor], list[Tensor]]:
    theta, phi = list(theta), list(phi)
    if not theta:
        raise ValueError("hypergrad: theta must be a non-empty list of tensors")
    for name, ts in (("theta", theta), ("phi", phi)):
        for t in ts:
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"hypergrad: {name} must be a list of floating-point tensors, got {type(t).__name__}"
                                 + (f" of dtype {t.dtype}" if isinstance(t, Tensor) else ""))
    _check_real("inner_lr", inner_lr, lo=0.0, lo_open=True)
    _check_int("inner_steps", inner_steps, 1)
    return theta, phi


# --------------------------------------------------------------------------------------------------------------------
# engines


@dataclass
class HyperGrad:
    """What an engine returns: gradients w.r.t. the initial θ and φ (shaped like them, detached), θ' and logs."""

    theta_grads: list[Tensor]
    phi_grads: list[Tensor]
    theta_adapted: list[Tensor]
    logs: dict[str, float] = field(default_factory=dict)


def _inner_descent(inner_loss: LossFn, theta: Params, phi: Params, lr: float, steps: int
                   ) -> tuple[list[list[Tensor]], float]:
    """ς plain gradient-descent steps without a graph; returns the trajectory [θ_0, ..., θ_ς] and L_in(θ_0, φ)."""
    phi_d = [p.detach() for p in phi]
    traj = [[t.detach() for t in theta]]
    first = float("nan")
    for k in range(steps):
        cur = _leaves(traj[-1])
        loss = inner_loss(cur, phi_d)
        if k == 0:
            first = float(loss.detach())
        g = _grad(loss, cur)
        traj.append([c.detach() - lr * gi for c, gi in zip(cur, g)])
    return traj, first


def _outer_grads(outer_loss: LossFn, theta_adapted: Params, phi: Params) -> tuple[list[Tensor], list[Tensor], float]:
    """v = ∇_θ' L_out(θ', φ) and the direct ∂_φ L_out(θ', φ) (exact zeros if L_out does not use φ)."""
    th, ph = _leaves(theta_adapted), _leaves(phi)
    loss = outer_loss(th, ph)
    gs = _grad(loss, th + ph)
    return gs[:len(th)], gs[len(th):], float(loss.detach())


class _Engine(Options):
    """Base of the engines.  An engine is a dataclass of its options (``hypergrad_args``, validated by
    :mod:`bilevel_ssl.options`; errors name ``hypergrad_args.<key>``) with the step in :meth:`_run`."""

    where = "hypergrad_args"
    name = ""
    QUALITY_LOGS: tuple[str, ...] = ()  # the log keys of the engine's own quality measure (#24)
    on_bad = "warn"
    _warned = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.what = f"{cls.name} option"  # "hypergrad_args: unknown aid_fd option(s) [...]"

    def _judge(self, measure: str, value: float, limit: float, fix: str) -> None:
        """``on_bad`` when ``value`` of ``measure`` is above ``limit`` (or not finite): ``warn`` - one
        ``warnings.warn`` per engine object, i.e. per run; ``stop`` - raise :class:`HypergradQualityError`."""
        if value <= limit:
            return
        msg = (f"hypergrad: engine {self.name!r}: {measure} = {value:.3g} (above {limit:g}), so its hypergradient is "
               f"not the exact one; {fix}")
        if self.on_bad == "stop":
            raise HypergradQualityError(msg + " (on_bad: stop)")
        if not self._warned:
            self._warned = True
            warnings.warn(msg + " (warned once per run; hypergrad_args on_bad: stop makes it an error)",
                          RuntimeWarning, stacklevel=4)

    def __call__(self, inner_loss: LossFn, outer_loss: LossFn, theta: Params, phi: Params, *, inner_lr: float,
                 inner_steps: int = 1) -> HyperGrad:
        theta, phi = _check_problem(theta, phi, inner_lr, inner_steps)
        return self._run(inner_loss, outer_loss, theta, phi, float(inner_lr), inner_steps)

    def _run(self, inner_loss, outer_loss, theta, phi, lr, steps) -> HyperGrad:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> dict:
        """State kept between calls (empty for the stateless engines), for a resumed run to continue exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"hypergrad: engine {self.name!r} keeps no state, got {sorted(state)}")


_engine = dataclass(eq=False, kw_only=True)  # an engine: its options are keyword-only fields, compared by identity


@_engine
class SecondOrder(_Engine):
    """Exact meta-gradient by reverse mode through the unrolled inner loop (GeSSL §3.2, Eq. 4-5: "the gradient ...
    with respect to f involves both the first and second order derivatives"; App. G.4 "ITD-RMAD", Finn et al. 2017).

    The ς inner steps are taken with ``create_graph=True``, then one ``torch.autograd.grad`` of L_out(θ_ς, φ) w.r.t.
    (θ_0, φ) gives dF/dθ = Π_k (I − α∇²_θθ L_in(θ_k))ᵀ ∇L_out (in reverse order) and
    dF/dφ = ∂_φ L_out − α Σ_k ∇²_φθ L_in(θ_k) · v_{k+1}.

    Cost: ς forward + ς backward (with ``create_graph``) of L_in, 1 forward of L_out, then one backward through the
    whole graph (≈ 1 backward of L_out + ς Hessian-vector products, each ≈ 2 backward passes).  Memory: all ς
    inner graphs including their double-backward parts.
    """

    name = "second_order"

    def _run(self, inner_loss, outer_loss, theta, phi, lr, steps):
        th0, ph = _leaves(theta), _leaves(phi)
        cur, first = th0, float("nan")
        for k in range(steps):
            loss = inner_loss(cur, ph)
            if k == 0:
                first = float(loss.detach())
            g = _grad(loss, cur, create_graph=True)
            cur = [c - lr * gi for c, gi in zip(cur, g)]
        out = outer_loss(cur, ph)
        gs = _grad(out, th0 + ph)
        return HyperGrad([g.detach() for g in gs[:len(th0)]], [g.detach() for g in gs[len(th0):]],
                         [c.detach() for c in cur], {"inner_loss": first, "outer_loss": float(out.detach())})


@_engine
class FirstOrder(_Engine):
    """First-order approximation (FOMAML; GeSSL §3.2 with f' treated as a constant): θ' is computed by ς inner steps
    and then treated as *independent of θ and φ*, so

    * θ-gradient = ∇_θ' L_out(θ', φ)  (applied to the initial θ),
    * φ-gradient = ∂_φ L_out(θ', φ) only - the *direct* dependence.

    Consequence: if L_out does not depend on φ directly - GeSSL, where g enters only the inner loss through
    L_disc (Eq. 3-4) - φ receives **exactly zero** gradient, so g is never trained by this engine.

    Cost: ς (forward + backward) of L_in and 1 (forward + backward) of L_out; no second derivatives, one graph at a
    time.
    """

    name = "first_order"

    def _run(self, inner_loss, outer_loss, theta, phi, lr, steps):
        traj, first = _inner_descent(inner_loss, theta, phi, lr, steps)
        v, dphi, out = _outer_grads(outer_loss, traj[-1], phi)
        return HyperGrad(v, dphi, traj[-1], {"inner_loss": first, "outer_loss": out})


@_engine
class AidFD(_Engine):
    """Finite-difference hypergradient, DARTS-style (Liu et al. 2019, Eq. 7-8; GeSSL App. G.4 "AID-FD", the setting
    GeSSL reports using, App. G.1 and the last paragraph of G.4).

    With v = ∇_θ' L_out, one inner step gives dF/dφ = ∂_φ L_out − α ∇²_φθ L_in(θ, φ) · v and
    dF/dθ = v − α ∇²_θθ L_in(θ, φ) · v.  Both second-order terms come from the *same two* gradient evaluations:

        ∇²_{(θ,φ)θ} L_in · v ≈ [∇_{θ,φ} L_in(θ + εv, φ) − ∇_{θ,φ} L_in(θ − εv, φ)] / (2ε),   ε = r / ‖v‖,

    with r = ``fd_r`` and ‖v‖ the norm over all tensors of θ.  Default r = 1e-4, *not* DARTS' (and GeSSL's) 0.01:
    on the default Conv-4 (float64, seeds 0-3 of ``tests/test_hypergrad_conv4.py``) the spot check below measures a
    relative error of 1.0-6.4 at 0.01, up to 11 at 3e-3 and 5.5 at 1e-3, and <= 4.2e-7 at 1e-4; in float32 1e-4 gives
    1e-3-3e-3 on 9 of 10 draws (one draw with a kink inside the difference: 21).  Pass ``fd_r: 0.01`` for the
    paper's setting.  The central difference has error
    O(ε²) *where L_in is C² on the segment θ ± εv* and is exact (up to rounding) for quadratic L_in.  It is not on
    a ReLU / max-pool network: on the default Conv-4 (``tests/test_hypergrad_conv4.py``, float64) the default
    r = 0.01 gives a θ-gradient 177-621 % off the exact one (φ 3-11 %), r = 1e-3 up to 430 %; r <= 1e-4 is exact
    to 1e-7.  The difference straddles activation / pooling kinks, where the Hessian is discontinuous.  GeSSL's Eq. 25 writes a one-sided difference with θ and
    φ swapped; we follow the cited source (DARTS Eq. 8).

    ς > 1: the same reverse pass as ``second_order``, with each Hessian-vector product replaced by the central
    difference at the stored iterate θ_k: for k = ς−1 … 0, φ-grad −= α FD_φ(θ_k, v), v ← v − α FD_θ(θ_k, v),
    ε recomputed from the current ‖v‖.  This reduces to DARTS for ς = 1, stays exact for quadratics at any ς,
    and needs no graph beyond one gradient at a time (it stores ς+1 copies of θ).  Applying the correction only at
    the last step would differentiate w.r.t. θ_{ς−1} instead of the initial θ.

    Cost: ς (F+B) of L_in for the trajectory, 1 (F+B) of L_out, 2ς (F+B) of L_in for the differences; no double
    backward.  Note: L_in is evaluated 3ς times, so a train-mode BatchNorm inside it updates its running statistics
    3ς times per call.

    Quality (#24): every ``check_every`` calls (the first call included; 0: never) the finite difference of the
    last inner step is compared with the exact product ∇²_{(θ,φ)θ} L_in · v by double backward at the same point
    and batch; ``fd_check_error`` = ‖FD − exact‖ / ‖exact‖ is logged (the last measured value between checks), and
    above ``check_tol`` (default 0.1) ``on_bad`` acts (``warn`` once per run, or ``stop``).  Cost of a check:
    one forward and a double backward of L_in, every ``check_every`` steps.  The call counter is not checkpointed
    (a resumed run checks on its first call).
    """

    name = "aid_fd"
    QUALITY_LOGS = ("fd_check_error",)

    fd_r: float = option(1e-4, lo=0, lo_open=True)
    check_every: int = option(50, lo=0)
    check_tol: float = option(0.1, lo=0, lo_open=True)
    on_bad: str = option("warn", choices=ON_BAD)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.calls, self.last_check = 0, None

    def _fix(self, dtype: torch.dtype) -> str:
        """The advice of a failed spot check.  Not "a 10x smaller step": while the difference straddles kinks its
        error is erratic, not monotone in ``fd_r`` (notebook 05, float64 tiny Conv-4: 1e-4 off by 9.6, 1e-5 by 80,
        1e-6 exact to 1e-8), so the float64 advice is 100x smaller (0.01 -> 1e-4 was exact on the Conv-4 of
        ``tests/test_hypergrad_conv4.py``).  In float32 rounding dominates below ~1e-3, so no step is reliable on a
        ReLU network (README, engine table) and the advice is the exact engine."""
        where = f"the difference at fd_r = {self.fd_r:g} straddles ReLU/max-pool kinks"
        if dtype == torch.float64:
            return (f"{where}; try a much smaller step (fd_r = {self.fd_r / 100:g}; the error is erratic, not "
                    f"monotone, while the difference crosses kinks) or hypergrad second_order, which is exact")
        return (f"{where} or {dtype} rounding dominates it; in {dtype} no fd_r is reliable on a ReLU/max-pool "
                f"network, so use hypergrad second_order, which is exact (or float64 with a smaller fd_r)")

    def _spot_check(self, inner_loss, theta_k, phi, v, diff) -> float:
        H = inner_hessian(inner_loss, theta_k, phi)
        exact = H.hvp(v) + H.mixed(v)
        den = float(_norm(exact))
        err = float(_norm([d - e for d, e in zip(diff, exact)]))
        return err / den if den > 0 else (0.0 if err == 0 else float("inf"))

    def _run(self, inner_loss, outer_loss, theta, phi, lr, steps):
        traj, first = _inner_descent(inner_loss, theta, phi, lr, steps)
        v, dphi, out = _outer_grads(outer_loss, traj[-1], phi)
        eps_log = float("nan")
        n = len(theta)
        for k in range(steps - 1, -1, -1):
            norm = float(_norm(v))
            if norm == 0.0:                         # v = 0: every remaining product is zero
                break
            eps = self.fd_r / norm
            if k == steps - 1:
                eps_log = eps
            grads = []
            for sign in (1.0, -1.0):
                th = _leaves([t + sign * eps * vi for t, vi in zip(traj[k], v)])
                ph = _leaves(phi)
                grads.append(_grad(inner_loss(th, ph), th + ph))
            diff = [(gp - gm) / (2 * eps) for gp, gm in zip(*grads)]
            if k == steps - 1 and self.check_every and self.calls % self.check_every == 0:
                self.last_check = self._spot_check(inner_loss, traj[k], phi, v, diff)
                self._judge("fd_check_error (relative error of the finite-difference Hessian-vector product against "
                            "the exact one)", self.last_check, self.check_tol, self._fix(v[0].dtype))
            dphi = [d - lr * h for d, h in zip(dphi, diff[n:])]
            v = [vi - lr * h for vi, h in zip(v, diff[:n])]
        self.calls += 1
        logs = {"inner_loss": first, "outer_loss": out, "fd_eps": eps_log}
        if self.last_check is not None:
            logs["fd_check_error"] = self.last_check
        return HyperGrad([t.detach() for t in v], [t.detach() for t in dphi], traj[-1], logs)


@_engine
class _Aid(_Engine):
    """Shared implicit-differentiation core: θ' by ς plain steps, then the implicit function theorem at θ'."""

    def _solve(self, H: InnerHessian, v: list[Tensor], lr: float) -> tuple[list[Tensor], dict[str, float]]:
        raise NotImplementedError  # pragma: no cover

    def _run(self, inner_loss, outer_loss, theta, phi, lr, steps):
        traj, first = _inner_descent(inner_loss, theta, phi, lr, steps)
        v, dphi, out = _outer_grads(outer_loss, traj[-1], phi)
        H = inner_hessian(inner_loss, traj[-1], phi)
        w, logs = self._solve(H, v, lr)
        mixed = H.mixed(w)
        phi_grads = [d - m for d, m in zip(dphi, mixed)]
        logs = {"inner_loss": first, "inner_loss_adapted": H.loss, "inner_grad_norm": float(_norm(H.grad_theta)),
                "outer_loss": out, **logs}
        return HyperGrad(v, phi_grads, traj[-1], logs)


@_engine
class AidCG(_Aid):
    """Approximate implicit differentiation with conjugate gradient (Rajeswaran et al. 2019; Grazzi et al. 2020;
    GeSSL App. G.4 "AID-CG", Eq. 24).

    Assumes θ' ≈ θ*(φ) = argmin_θ L_in(θ, φ), so ∇_θ L_in(θ*, φ) = 0 and, by the implicit function theorem,

        dF/dφ = ∂_φ L_out − ∇²_φθ L_in · [∇²_θθ L_in]⁻¹ ∇_θ' L_out,      all at (θ', φ).

    w = [∇²_θθ L_in + λI]⁻¹ v is found by ``cg_iters`` CG iterations (λ = ``cg_damping``) on double-backward
    Hessian-vector products that share one gradient graph.  Default λ = 1/``inner_lr`` (``cg_damping: null``): the
    iMAML proximal weight that makes α(I + αH)⁻¹ ≈ α(I − αH) the one-step unrolled map to first order; undamped
    (λ = 0, the earlier default) CG on the indefinite Hessian of the default Conv-4 after one step (eigenvalues
    about [−130, 263]) gave relative residuals 2.9-74 and φ-gradients 2-64x off the unrolled one; with λ = 1/α
    (10) residuals 0.5-2.2 and φ 0.9-1.6 off (``tests/test_hypergrad_conv4.py``, seeds 0-2).  No damping makes
    the implicit φ-gradient equal the one-step hypergradient away from an inner optimum.
    (GeSSL's Eq. 22-24 write this formula with the second derivatives dropped; we implement the standard one.)

    θ-gradient: the first-order one, ∇_θ' L_out.  Implicit differentiation defines θ' through φ alone; at an exact
    inner minimum θ' does not depend on the initialisation θ at all (dθ*/dθ = 0), and iMAML obtains a θ-dependence
    only by adding a proximal term λ/2‖θ' − θ‖² to L_in (then dθ'/dθ = (I + H/λ)⁻¹, which callers can obtain with
    :func:`conjugate_gradient`, as BiSSL does).  Returning ∇_θ' L_out keeps θ trained with the query loss, as
    ``first_order`` does, while φ gets the implicit hypergradient.

    Cost: ς (F+B) of L_in, 1 (F+B) of L_out, 1 F + 1 B with ``create_graph`` of L_in at θ', ``cg_iters`` + 1
    backward passes through that gradient graph (≈ 2 backward passes each).

    Quality (#24), every call at no extra cost: ``cg_residual`` = ‖v − (H + λI)w‖ / ‖v‖, logged; above
    ``max_residual`` (default 0.1) ``on_bad`` acts (``warn`` once per run, or ``stop``).  On the float64 Conv-4 of
    ``tests/test_hypergrad_conv4.py`` at the defaults (indefinite Hessian after one step) it is 3-74.
    """

    name = "aid_cg"
    QUALITY_LOGS = ("cg_residual",)

    cg_iters: int = option(5, lo=1)
    cg_damping: float | None = option(None, lo=0, help="None: 1/inner_lr")
    cg_layerwise: bool = option(False)
    max_residual: float = option(0.1, lo=0, lo_open=True)
    on_bad: str = option("warn", choices=ON_BAD)

    def _solve(self, H, v, lr):
        damping = 1.0 / lr if self.cg_damping is None else self.cg_damping
        w, r = _cg(H.hvp, v, self.cg_iters, damping, self.cg_layerwise)
        bn = float(_norm(v))
        res = float(_norm(r)) / bn if bn > 0 else 0.0
        self._judge("cg_residual (relative residual of the CG solve)", res, self.max_residual,
                    "the inner Hessian is likely indefinite or ill-conditioned here; raise cg_damping (e.g. 1.0) "
                    "and/or cg_iters, or use hypergrad second_order")
        return w, {"cg_residual": res}


@_engine
class AidNeumann(_Aid):
    """Approximate implicit differentiation with a truncated Neumann series (Lorraine et al. 2020, Alg. 3; GeSSL
    App. G.4 "AID-NMN", Eq. 23).  Same formula and same θ-gradient as :class:`AidCG`, with

        [∇²_θθ L_in]⁻¹ v ≈ α_N Σ_{k=0}^{K} (I − α_N ∇²_θθ L_in)^k v,    K = ``neumann_iters``,

    α_N = ``neumann_alpha``; it needs the spectral radius of I − α_N H below 1.  Default (``null``): 1/λ̂ with λ̂
    the largest |eigenvalue| of ∇²_θθ L_in by power iteration.  The earlier default, ``inner_lr`` (Lorraine et al.
    use the inner optimiser's step), diverged on the default Conv-4 (λ_max 50-263 against 2/α = 20: growth
    1e3-1e5, φ 1e3-1e7 off); with 1/λ̂ the growth is 1.0-7 (the remaining excess: negative eigenvalues, for which
    no step converges - the quality check says so).  (GeSSL's Eq. 23 writes the series as Σ(−1)^k H^k, which
    converges only for ‖H‖ < 1; the scaled form is the cited method's.)

    Power iteration, warm-started (#24): the first call runs ``power_iters`` (10) iterations from v; every later
    call on parameters of the same shapes runs ``power_iters_warm`` (1) iterations from the previous call's vector,
    so the iteration continues across steps (and across GeSSL's m per-task calls) on a Hessian that training changes
    slowly, instead of restarting from v each time.  On a fixed Hessian, n calls give exactly the estimate of one
    cold start with ``power_iters`` + (n − 1) ``power_iters_warm`` iterations (``tests/test_hypergrad.py``).  The
    estimate stays a lower bound, λ̂ = ‖H x‖ ≤ |λ|_max for a unit x, so the step only errs towards 1/λ̂ too large,
    which ``neumann_growth`` reports.  Why: the cold start was the engine's main cost - notebook 13's default ran 3
    power and 2 series products per step, 56 s/epoch against ``aid_cg``'s 32 (2 products) - and on a Hessian that
    training changes slowly the warm chain goes on improving its estimate where a cold start repeats the same few
    iterations.  The vectors (one per parameter-shape signature: TC² calls the engine on two parameter sets) are
    in :meth:`state_dict`, so a resumed run continues exactly.  ``power_iters_warm: null`` restarts cold every call
    (the behaviour before).

    Cost: as :class:`AidCG` with ``neumann_iters`` (+ ``power_iters_warm``, on the first call ``power_iters``, for
    the default step) Hessian-vector products.

    Quality (#24), every call at no extra cost: ``neumann_growth`` = ‖(I − α_N H)^K v‖ / ‖v‖, the last term of
    the series against the first, logged.  H is symmetric, so a growth above 1 means a spectral radius of
    I − α_N H above 1: the series diverges; above ``max_growth`` (default 1.0) ``on_bad`` acts (``warn`` once per
    run, or ``stop``).  On the float64 Conv-4 of ``tests/test_hypergrad_conv4.py`` the default step diverges.
    """

    name = "aid_neumann"
    QUALITY_LOGS = ("neumann_growth",)

    neumann_iters: int = option(5, lo=1)
    neumann_alpha: float | None = option(None, lo=0, lo_open=True, help="None: 1/λ̂ by power iteration")
    max_growth: float = option(1.0, lo=0, lo_open=True)
    on_bad: str = option("warn", choices=ON_BAD)
    power_iters: int = option(10, lo=1, help="power iterations of the first call (cold start from v)")
    power_iters_warm: int | None = option(1, lo=1, help="iterations of each later call from the previous vector; "
                                                        "None: a cold start of power_iters every call")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._power: dict[tuple, list[Tensor]] = {}  # parameter shapes -> the last unit power vector

    def state_dict(self) -> dict:
        return {"power_vectors": [list(x) for x in self._power.values()]} if self._power else {}

    def load_state_dict(self, state: dict) -> None:
        """Copies the vectors.  An empty state (a checkpoint of another engine, or of a run before its first
        step) starts cold on the next call."""
        unknown = set(state) - {"power_vectors"}
        if unknown:
            raise ValueError(f"hypergrad: engine {self.name!r}: unknown state {sorted(unknown)}; "
                             f"allowed: power_vectors")
        self._power = {tuple(tuple(t.shape) for t in x): [t.detach().clone() for t in x]
                       for x in state.get("power_vectors", [])}

    def _power_alpha(self, H, v) -> float:
        """1 / λ̂ with λ̂ = ‖H x‖ after power iterations (x of unit norm), which is ≤ |λ|_max, so 1/λ̂ ≥ 1/λ_max and
        the positive part of the spectrum of I − αH lies in [1 − λ_max/λ̂, 1): the series converges while
        λ̂ > λ_max / 2.  Starts from the vector the previous call left for these parameter shapes
        (``power_iters_warm`` iterations) or, the first time, from v (``power_iters``)."""
        key = tuple(tuple(t.shape) for t in v)
        warm = self._power.get(key) if self.power_iters_warm is not None else None
        if warm is not None:
            x, iters = [w.to(t) for w, t in zip(warm, v)], self.power_iters_warm
        else:
            x, iters = [t.detach().clone() for t in v], self.power_iters
        lam = 0.0
        for _ in range(iters):
            nx = float(_norm(x))
            if nx == 0.0:
                break
            x = [t / nx for t in x]
            hx = [h.detach() for h in H.hvp(x)]
            lam, x = float(_norm(hx)), hx
        if self.power_iters_warm is not None and lam > 0:
            self._power[key] = [t / lam for t in x]
        return 1.0 / lam if lam > 0 else 1.0

    def _solve(self, H, v, lr):
        alpha = self._power_alpha(H, v) if self.neumann_alpha is None else self.neumann_alpha
        w, last = _neumann(H.hvp, v, self.neumann_iters, alpha)
        bn = float(_norm(v))
        growth = float(_norm(last)) / bn if bn > 0 else 0.0
        self._judge("neumann_growth (norm of the last series term over the first)", growth, self.max_growth,
                    f"the series diverges with step neumann_alpha = {alpha:g} (needs < 2/λ_max of the inner Hessian, "
                    f"and a positive definite one); set a smaller neumann_alpha, or use aid_cg with cg_damping or "
                    f"second_order")
        return w, {"neumann_alpha": alpha, "neumann_growth": growth}


@_engine
class MomentumProxy(_Engine):
    """GeSSL's momentum proxy (App. C, "How to integrate GeSSL in the ViT setting"): "to avoid costly differentiable
    second-order optimization, we instantiate f' and g' as momentum copies of f and g.  Their parameters are updated
    as θ' ← τθ' + (1 − τ)θ and they do not participate in backpropagation, thereby providing a stable one-step proxy
    for query-set evaluation and pseudo-label generation."

    Stateful: the copies θ̄ (f') and φ̄ (g') are created from (θ, φ) on the first call (cloned, so the caller's
    in-place optimizer steps do not touch them) and, on every later call, updated *at the start* with the θ, φ passed
    in - i.e. after the caller's previous optimizer step, the BYOL/MoCo order:

        θ̄ ← τ θ̄ + (1 − τ) θ,   φ̄ ← τ φ̄ + (1 − τ) φ,   τ = ``momentum``.

    The proxy is θ' = θ̄ itself (f' *is* the momentum copy, replacing the inner step of Eq. 4), so L_in is not
    evaluated.  With ``adapt_proxy=True`` θ' is instead θ̄ after ς gradient steps on L_in(·, φ̄) without a graph
    (g' used as the pseudo-label generator of the support loss) - an alternative reading of "one-step proxy".

    Gradients (nothing is differentiated through θ̄, φ̄):

    * θ-gradient = ∇_θ' L_out(θ', φ), applied to θ (straight-through, as ``first_order``);
    * φ-gradient = ∂_φ L_out(θ', φ) only, with the live φ.  Consequence: **no gradient reaches φ (g) from the outer
      loss through the proxy**; in GeSSL, where L_out does not use g, g gets exactly zero from this engine and is
      trained only if the caller adds another term (e.g. ∇_φ L_in of the live model).

    ``theta_ema`` / ``phi_ema`` expose f' and g' (e.g. to generate pseudo-labels with g'); :meth:`reset` drops them.
    τ is not given in the paper; the default 0.996 is BYOL's base value.

    Cost: 1 (F+B) of L_out and two EMA updates (+ ς (F+B) of L_in with ``adapt_proxy``); no second derivatives.
    """

    name = "momentum_proxy"

    momentum: float = option(0.996, lo=0, hi=1)
    adapt_proxy: bool = option(False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.theta_ema: list[Tensor] | None = None
        self.phi_ema: list[Tensor] | None = None
        self.calls = 0

    def reset(self) -> None:
        self.theta_ema, self.phi_ema, self.calls = None, None, 0

    def state_dict(self) -> dict:
        return {"theta_ema": self.theta_ema, "phi_ema": self.phi_ema, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        """Copies the tensors (as ``nn.Module.load_state_dict`` does): the EMA updates act in place, so sharing them
        with the source would advance both engines.  An empty state (a checkpoint of a run with a stateless engine,
        e.g. a second-order run loaded to compare engines at the same point) resets: the next call starts a new copy."""
        if not state:
            return self.reset()
        copy = lambda ts: None if ts is None else [t.detach().clone() for t in ts]
        self.theta_ema, self.phi_ema, self.calls = copy(state["theta_ema"]), copy(state["phi_ema"]), state["calls"]

    @torch.no_grad()
    def _update(self, theta: list[Tensor], phi: list[Tensor]) -> None:
        if self.theta_ema is None:
            self.theta_ema = [t.detach().clone() for t in theta]
            self.phi_ema = [p.detach().clone() for p in phi]
            return
        for name, ema, live in (("theta", self.theta_ema, theta), ("phi", self.phi_ema, phi)):
            _check_like(f"{name} (vs. the momentum copy made on the first call)", live, ema)
            for e, t in zip(ema, live):
                e.mul_(self.momentum).add_(t.detach(), alpha=1.0 - self.momentum)

    def _run(self, inner_loss, outer_loss, theta, phi, lr, steps):
        self._update(theta, phi)
        self.calls += 1
        logs: dict[str, float] = {"momentum": self.momentum}
        proxy = [t.clone() for t in self.theta_ema]
        if self.adapt_proxy:
            traj, logs["inner_loss"] = _inner_descent(inner_loss, proxy, self.phi_ema, lr, steps)
            proxy = traj[-1]
        v, dphi, logs["outer_loss"] = _outer_grads(outer_loss, proxy, phi)
        logs["proxy_distance"] = float(_norm([p - t.detach() for p, t in zip(self.theta_ema, theta)]))
        return HyperGrad(v, dphi, proxy, logs)


ENGINES: dict[str, type[_Engine]] = {
    "second_order": SecondOrder,
    "first_order": FirstOrder,
    "aid_fd": AidFD,
    "aid_cg": AidCG,
    "aid_neumann": AidNeumann,
    "momentum_proxy": MomentumProxy,
}

EngineLike = Union[str, _Engine]


def make_engine(name: str, **opts) -> _Engine:
    """The engine called ``name`` with its options validated (unknown options and bad values raise ValueError)."""
    if name not in ENGINES:
        raise ValueError(f"hypergrad: unknown engine {name!r}; allowed: {', '.join(ENGINES)}")
    return ENGINES[name].from_dict(opts)


def hypergradient(engine: EngineLike, inner_loss: LossFn, outer_loss: LossFn, theta: Params, phi: Params, *,
                  inner_lr: float, inner_steps: int = 1, **opts) -> HyperGrad:
    """Meta-gradients of L_out(θ'(θ, φ), φ) w.r.t. the initial θ and φ, by the engine ``engine``.

    ``engine`` is a name from :data:`ENGINES` (options in ``opts``) or an engine object from :func:`make_engine`.
    ``momentum_proxy`` keeps state between calls, so it must be created once with :func:`make_engine` and passed as
    an object.
    """
    if isinstance(engine, str):
        if engine == "momentum_proxy":
            raise ValueError("hypergrad: engine 'momentum_proxy' keeps EMA copies between calls; create it once with "
                             "make_engine('momentum_proxy', ...) and pass that object")
        engine = make_engine(engine, **opts)
    elif isinstance(engine, _Engine):
        if opts:
            raise ValueError(f"hypergrad: options {sorted(opts)} given with an engine object; pass them to make_engine")
    else:
        raise ValueError(f"hypergrad: engine must be a name ({', '.join(ENGINES)}) or an engine object, "
                         f"got {type(engine).__name__}")
    return engine(inner_loss, outer_loss, theta, phi, inner_lr=inner_lr, inner_steps=inner_steps)


def set_grads(params: Params, grads: Params, accumulate: bool = False) -> None:
    """Write ``grads`` into ``p.grad`` (or add them to it with ``accumulate=True``)."""
    grads = _check_like("grads", grads, list(params))
    for p, g in zip(params, grads):
        g = g.detach().to(dtype=p.dtype, device=p.device)
        if accumulate and p.grad is not None:
            p.grad.add_(g)
        else:
            p.grad = g.clone()
