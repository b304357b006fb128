"""Hypergradient engines and their linear-algebra core, checked against closed forms and explicit autograd.

Tolerances are stated per test; float64 is used wherever the check is about the maths (exact up to rounding), and
float32 only where the point is the finite-difference rounding error.
"""

import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from bilevel_ssl.hypergrad import (
    ENGINES,
    AidFD,
    HyperGrad,
    MomentumProxy,
    conjugate_gradient,
    hvp,
    hypergradient,
    inner_hessian,
    make_engine,
    mixed_hvp,
    neumann_inverse,
    set_grads,
)

DT = torch.float64
THETA_SHAPES = [(3,), (2, 2)]          # θ: 7 numbers in two tensors
PHI_SHAPES = [(2,), (1,)]              # φ: 3 numbers in two tensors


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def split(x, shapes):
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(x[i:i + n].reshape(s).clone())
        i += n
    return out


def spd(n, lo, hi, gen, dtype=DT):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    return q @ torch.diag(torch.linspace(lo, hi, n, dtype=dtype)) @ q.T


def close(a, b, atol, rtol=0.0):
    a, b = flat(a) if isinstance(a, list) else a, flat(b) if isinstance(b, list) else b
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------------
# Hessian-vector products


def test_hvp_matches_explicit_hessian():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 7, generator=g, dtype=DT)

    def f_flat(z):
        return (torch.sin(z) * (W @ z)).sum() + (z @ z) ** 2 / 4

    z = torch.randn(7, generator=g, dtype=DT)
    v = torch.randn(7, generator=g, dtype=DT)
    H = torch.autograd.functional.hessian(f_flat, z)
    out = hvp(lambda ps: f_flat(flat(ps)), split(z, THETA_SHAPES), split(v, THETA_SHAPES))
    assert [tuple(t.shape) for t in out] == THETA_SHAPES
    close(out, H @ v, atol=1e-10)                          # float64: exact up to rounding


def test_mixed_hvp_matches_explicit_hessian_block():
    g = torch.Generator().manual_seed(1)
    C, E = torch.randn(4, 7, generator=g, dtype=DT), torch.randn(4, 3, generator=g, dtype=DT)

    def f_flat(th, ph):
        return (torch.tanh(C @ th) * (E @ ph)).sum() + (th @ th) * (ph @ ph) + (ph ** 3).sum()

    th, ph, v = (torch.randn(n, generator=g, dtype=DT) for n in (7, 3, 7))
    H = torch.autograd.functional.hessian(lambda z: f_flat(z[:7], z[7:]), torch.cat([th, ph]))
    out = mixed_hvp(lambda a, b: f_flat(flat(a), flat(b)), split(th, THETA_SHAPES), split(ph, PHI_SHAPES),
                    split(v, THETA_SHAPES))
    assert [tuple(t.shape) for t in out] == PHI_SHAPES
    close(out, H[7:, :7] @ v, atol=1e-10)                  # ∇²_φθ L · v is the (φ-rows, θ-columns) block
    # one shared gradient graph serves repeated products
    ops = inner_hessian(lambda a, b: f_flat(flat(a), flat(b)), split(th, THETA_SHAPES), split(ph, PHI_SHAPES))
    for _ in range(2):
        close(ops.hvp(split(v, THETA_SHAPES)), H[:7, :7] @ v, atol=1e-10)


def test_hvp_zero_where_gradient_is_constant():
    # L linear in the second tensor: its gradient has no graph; the product must be exact zeros, not an error
    out = hvp(lambda ps: (ps[0] ** 2).sum() + ps[1].sum(), [torch.ones(2, dtype=DT), torch.ones(3, dtype=DT)],
              [torch.ones(2, dtype=DT), torch.ones(3, dtype=DT)])
    close(out, torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0], dtype=DT), atol=0)


def test_hvp_rejects_mismatched_vector():
    with pytest.raises(ValueError, match="hypergrad: v must match"):
        hvp(lambda ps: (ps[0] ** 2).sum(), [torch.ones(3)], [torch.ones(2)])


# ---------------------------------------------------------------------------------------------------------------------
# linear solvers


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(2)
    A = spd(7, 0.5, 5.0, g)
    b = torch.randn(7, generator=g, dtype=DT)
    mv = lambda xs: split(A @ flat(xs), THETA_SHAPES)  # noqa: E731
    x = conjugate_gradient(mv, split(b, THETA_SHAPES), iters=7)
    close(x, torch.linalg.solve(A, b), atol=1e-8)          # n iterations: exact up to rounding
    x = conjugate_gradient(mv, split(b, THETA_SHAPES), iters=7, damping=0.7)
    close(x, torch.linalg.solve(A + 0.7 * torch.eye(7, dtype=DT), b), atol=1e-8)
    # one iteration is the steepest-descent step α r with α = rᵀr / rᵀAr (a global step, not a sum of ratios)
    x1 = conjugate_gradient(mv, split(b, THETA_SHAPES), iters=1)
    close(x1, (b @ b) / (b @ A @ b) * b, atol=1e-12)


def test_conjugate_gradient_layerwise():
    g = torch.Generator().manual_seed(3)
    A = spd(7, 0.5, 5.0, g)
    b = torch.randn(7, generator=g, dtype=DT)
    # block-diagonal operator: layer-wise CG is exact CG per block -> converges in max block size (4) iterations
    Ab = torch.block_diag(spd(3, 0.5, 4.0, g), spd(4, 1.0, 3.0, g))
    mvb = lambda xs: split(Ab @ flat(xs), THETA_SHAPES)  # noqa: E731
    x = conjugate_gradient(mvb, split(b, THETA_SHAPES), iters=4, layerwise=True, damping=0.3)
    close(x, torch.linalg.solve(Ab + 0.3 * torch.eye(7, dtype=DT), b), atol=1e-8)
    # coupled operator, one iteration: a separate step α_i = r_iᵀr_i / r_iᵀ(Ar)_i per tensor
    ar = A @ b
    expect = torch.cat([(b[:3] @ b[:3]) / (b[:3] @ ar[:3]) * b[:3], (b[3:] @ b[3:]) / (b[3:] @ ar[3:]) * b[3:]])
    mv = lambda xs: split(A @ flat(xs), THETA_SHAPES)  # noqa: E731
    close(conjugate_gradient(mv, split(b, THETA_SHAPES), iters=1, layerwise=True), expect, atol=1e-12)


def test_conjugate_gradient_zero_operator_gives_finite_zero():
    x = conjugate_gradient(lambda xs: [torch.zeros_like(t) for t in xs], [torch.ones(3)], iters=5, layerwise=True)
    assert torch.equal(x[0], torch.zeros(3))


def test_neumann_inverse():
    g = torch.Generator().manual_seed(4)
    A = spd(7, 0.5, 2.0, g)
    b = torch.randn(7, generator=g, dtype=DT)
    mv = lambda xs: split(A @ flat(xs), THETA_SHAPES)  # noqa: E731
    alpha = 0.5                                            # I − αA has spectrum in [0, 0.75]
    close(neumann_inverse(mv, split(b, THETA_SHAPES), iters=150, alpha=alpha), torch.linalg.solve(A, b), atol=1e-10)
    # the truncation is α Σ_{k=0}^{K} (I − αA)^k b, K = iters (K matrix-vector products)
    M = torch.eye(7, dtype=DT) - alpha * A
    expect = alpha * sum(torch.linalg.matrix_power(M, k) @ b for k in range(4))
    close(neumann_inverse(mv, split(b, THETA_SHAPES), iters=3, alpha=alpha), expect, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# closed-form quadratic bilevel problem
#   L_in(θ, φ) = ½ θᵀAθ − θᵀBφ,   L_out(θ, φ) = ½‖θ − c‖² + ½ φᵀDφ,   θ_{k+1} = Mθ_k + αBφ with M = I − αA


class Quadratic:
    def __init__(self, seed=5, dtype=DT, D=True):
        g = torch.Generator().manual_seed(seed)
        self.A = spd(7, 0.5, 2.0, g, dtype)
        self.B = torch.randn(7, 3, generator=g, dtype=dtype)
        self.c = torch.randn(7, generator=g, dtype=dtype)
        self.D = spd(3, 0.5, 1.5, g, dtype) if D else torch.zeros(3, 3, dtype=dtype)
        self.theta = torch.randn(7, generator=g, dtype=dtype)
        self.phi = torch.randn(3, generator=g, dtype=dtype)

    def inner(self, th, ph):
        t, p = flat(th), flat(ph)
        return 0.5 * t @ self.A @ t - t @ self.B @ p

    def outer(self, th, ph):
        t, p = flat(th), flat(ph)
        return 0.5 * (t - self.c) @ (t - self.c) + 0.5 * p @ self.D @ p

    def args(self, theta=None):
        th = self.theta if theta is None else theta
        return self.inner, self.outer, split(th, THETA_SHAPES), split(self.phi, PHI_SHAPES)

    def exact(self, lr, steps):
        n = 7
        M = torch.eye(n, dtype=self.A.dtype) - lr * self.A
        t = self.theta.clone()
        for _ in range(steps):
            t = M @ t + lr * self.B @ self.phi
        S = sum(torch.linalg.matrix_power(M, j) for j in range(steps))
        r = t - self.c
        return torch.linalg.matrix_power(M, steps).T @ r, (S @ (lr * self.B)).T @ r + self.D @ self.phi, t

    def implicit_phi(self):
        ts = torch.linalg.solve(self.A, self.B @ self.phi)
        return ts, self.B.T @ torch.linalg.solve(self.A, ts - self.c) + self.D @ self.phi


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_exact_on_quadratic(steps):
    q, lr = Quadratic(), 0.3
    gt, gp, t = q.exact(lr, steps)
    hg = hypergradient("second_order", *q.args(), inner_lr=lr, inner_steps=steps)
    assert isinstance(hg, HyperGrad)
    assert [tuple(x.shape) for x in hg.theta_grads] == THETA_SHAPES
    assert [tuple(x.shape) for x in hg.phi_grads] == PHI_SHAPES
    close(hg.theta_grads, gt, atol=1e-5)                   # the brief's 1e-5 (float64: in fact ~1e-15)
    close(hg.phi_grads, gp, atol=1e-5)
    close(hg.theta_adapted, t, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_aid_fd_exact_on_quadratic(steps):
    # L_in quadratic -> its gradient is linear -> the central difference is exact up to rounding
    q, lr = Quadratic(), 0.3
    gt, gp, _ = q.exact(lr, steps)
    hg = hypergradient("aid_fd", *q.args(), inner_lr=lr, inner_steps=steps)
    close(hg.theta_grads, gt, atol=1e-9)                   # float64 rounding / (2ε‖v‖ = 0.02): ~1e-13
    close(hg.phi_grads, gp, atol=1e-9)
    assert hg.logs["fd_eps"] > 0


def test_aid_fd_float32_rounding():
    q, lr = Quadratic(dtype=torch.float32), 0.3
    gt, gp, _ = q.exact(lr, 1)
    hg = hypergradient("aid_fd", *q.args(), inner_lr=lr, fd_r=0.01)
    # float32: gradient rounding ~6e-8·‖∇L_in‖ divided by 2ε‖v‖ = 0.02, times α -> well below 1e-4
    close(hg.theta_grads, gt, atol=1e-4)
    close(hg.phi_grads, gp, atol=1e-4)
    # the default fd_r = 1e-4 (right on ReLU/max-pool networks, #24) pays 100x that rounding: measured 2.5e-3
    hg = hypergradient("aid_fd", *q.args(), inner_lr=lr)
    close(hg.theta_grads, gt, atol=1e-2)
    close(hg.phi_grads, gp, atol=1e-2)


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_formula_on_quadratic(steps):
    q, lr = Quadratic(), 0.3
    gt, gp, t = q.exact(lr, steps)
    hg = hypergradient("first_order", *q.args(), inner_lr=lr, inner_steps=steps)
    close(hg.theta_grads, t - q.c, atol=1e-12)             # ∇_θ' L_out
    close(hg.phi_grads, q.D @ q.phi, atol=1e-12)           # only the direct ∂_φ L_out
    assert (flat(hg.theta_grads) - gt).abs().max() > 1e-2   # ... which is not the exact meta-gradient
    assert (flat(hg.phi_grads) - gp).abs().max() > 1e-2


@pytest.mark.parametrize("engine,opts", [("aid_cg", {"cg_iters": 7, "cg_damping": 0.0}),
                                         ("aid_neumann", {"neumann_iters": 150}),
                                         ("aid_neumann", {"neumann_iters": 150, "neumann_alpha": 0.5})])
def test_aid_on_quadratic_at_inner_optimum(engine, opts):
    q = Quadratic()
    ts, gp = q.implicit_phi()
    hg = hypergradient(engine, *q.args(theta=ts), inner_lr=0.5, **opts)
    close(hg.phi_grads, gp, atol=1e-8)                     # IFT: Dφ + Bᵀ A⁻¹ (θ* − c); n CG its / 0.75^150
    close(hg.theta_grads, ts - q.c, atol=1e-10)            # the first-order θ-gradient
    close(hg.theta_adapted, ts, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# ridge regression: implicit differentiation in closed form
#   L_in(θ, φ) = ½‖Xθ − y‖²/n + ½ Σ_j exp(φ_j) θ_j²,  L_out(θ) = ½‖X_v θ − y_v‖²/m
#   θ* = H⁻¹Xᵀy/n with H = XᵀX/n + diag(e^φ),  dF/dφ = −e^φ ⊙ θ* ⊙ H⁻¹ ∇L_out(θ*)

RIDGE_SHAPES = [(4,), (2,)]


class Ridge:
    def __init__(self, seed=6):
        g = torch.Generator().manual_seed(seed)
        d, n, m = 6, 40, 30
        w = torch.randn(d, generator=g, dtype=DT)
        self.X, self.Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(m, d, generator=g, dtype=DT)
        self.y = self.X @ w + 0.5 * torch.randn(n, generator=g, dtype=DT)
        self.yv = self.Xv @ w + 0.5 * torch.randn(m, generator=g, dtype=DT)
        self.phi = torch.log(torch.linspace(0.2, 1.5, d, dtype=DT))

    def inner(self, th, ph):
        t, p = flat(th), flat(ph)
        r = self.X @ t - self.y
        return 0.5 * r @ r / len(self.y) + 0.5 * (torch.exp(p) * t ** 2).sum()

    def outer(self, th, ph):
        r = self.Xv @ flat(th) - self.yv
        return 0.5 * r @ r / len(self.yv)

    def theta_star(self, phi):
        n = len(self.y)
        return torch.linalg.solve(self.X.T @ self.X / n + torch.diag(torch.exp(phi)), self.X.T @ self.y / n)

    def closed_form(self):
        H = self.X.T @ self.X / len(self.y) + torch.diag(torch.exp(self.phi))
        ts = self.theta_star(self.phi)
        v = self.Xv.T @ (self.Xv @ ts - self.yv) / len(self.yv)
        return ts, -torch.exp(self.phi) * ts * torch.linalg.solve(H, v)


def test_ridge_closed_form_is_right():
    # the reference itself, against autograd through torch.linalg.solve
    rp = Ridge()
    phi = rp.phi.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(rp.outer([rp.theta_star(phi)], []), phi)
    close(rp.closed_form()[1], g, atol=1e-12)


@pytest.mark.parametrize("start", ["optimum", "zeros"])
@pytest.mark.parametrize("engine,opts", [("aid_cg", {"cg_iters": 6, "cg_damping": 0.0}),
                                         ("aid_neumann", {"neumann_iters": 250})])
def test_aid_on_ridge(engine, opts, start):
    rp = Ridge()
    ts, gp = rp.closed_form()
    # start at θ* (one step keeps it there) or at 0 with 300 inner steps (contraction ≤ 0.85 per step)
    theta0, steps = (ts, 1) if start == "optimum" else (torch.zeros(6, dtype=DT), 300)
    hg = hypergradient(engine, rp.inner, rp.outer, split(theta0, RIDGE_SHAPES), [rp.phi.clone()],
                       inner_lr=0.25, inner_steps=steps, **opts)
    close(hg.theta_adapted, ts, atol=1e-10)
    close(hg.phi_grads, gp, atol=1e-8)                     # 6 CG its on 6 unknowns / Neumann rate ≤ 0.85^250


def test_aid_cg_few_iterations_is_approximate_and_logs_residual():
    rp = Ridge()
    ts, gp = rp.closed_form()
    hg = hypergradient("aid_cg", rp.inner, rp.outer, split(ts, RIDGE_SHAPES), [rp.phi.clone()], inner_lr=0.25,
                       cg_iters=2)
    assert hg.logs["cg_residual"] > 1e-6
    assert (flat(hg.phi_grads) - gp).abs().max() > 1e-8


def test_second_order_long_unroll_approaches_implicit_gradient_on_ridge():
    rp = Ridge()
    _, gp = rp.closed_form()
    hg = hypergradient("second_order", rp.inner, rp.outer, split(torch.zeros(6, dtype=DT), RIDGE_SHAPES),
                       [rp.phi.clone()], inner_lr=0.25, inner_steps=300)
    close(hg.phi_grads, gp, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# tiny networks through torch.func.functional_call: full autograd through the unrolled step


def _net_problem(seed, batchnorm):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 6)] + ([nn.BatchNorm1d(6)] if batchnorm else []) + [nn.Tanh(), nn.Linear(6, 2)]
    net = nn.Sequential(*layers).to(DT).train()
    names = [n for n, _ in net.named_parameters()]
    g = torch.Generator().manual_seed(seed)
    xs, ys, xq, yq = (torch.randn(8, k, generator=g, dtype=DT) for k in (3, 2, 3, 2))
    phi = [0.3 * torch.randn(2, generator=g, dtype=DT)]

    def f(th, x):
        return functional_call(net, dict(zip(names, th)), (x,))

    def inner(th, ph):                                     # φ weights the support residuals (GeSSL: g in L_disc)
        return (torch.exp(ph[0]) * (f(th, xs) - ys) ** 2).mean()

    def outer(th, ph):                                     # no direct φ dependence
        return ((f(th, xq) - yq) ** 2).mean()

    return net, inner, outer, [p.detach().clone() for p in net.parameters()], phi


def _unrolled_reference(inner, outer, theta, phi, lr, steps):
    th0 = [t.clone().requires_grad_(True) for t in theta]
    ph = [p.clone().requires_grad_(True) for p in phi]
    th = th0
    for _ in range(steps):
        gs = torch.autograd.grad(inner(th, ph), th, create_graph=True)
        th = [t - lr * g for t, g in zip(th, gs)]
    gs = torch.autograd.grad(outer(th, ph), th0 + ph)
    return list(gs[:len(th0)]), list(gs[len(th0):])


def _objective(inner, outer, theta, phi, lr, steps):
    th = theta
    for _ in range(steps):
        th = [t.detach().requires_grad_(True) for t in th]
        gs = torch.autograd.grad(inner(th, phi), th)
        th = [t - lr * g for t, g in zip(th, gs)]
    return float(outer(th, phi).detach())


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_matches_unrolled_autograd_on_network(batchnorm, steps):
    net, inner, outer, theta, phi = _net_problem(7, batchnorm)
    lr = 0.2
    ref_t, ref_p = _unrolled_reference(inner, outer, theta, phi, lr, steps)
    hg = hypergradient("second_order", inner, outer, theta, phi, inner_lr=lr, inner_steps=steps)
    close(hg.theta_grads, ref_t, atol=1e-10)
    close(hg.phi_grads, ref_p, atol=1e-10)
    assert flat(hg.phi_grads).abs().max() > 1e-4          # φ reaches L_out through θ'
    # independent check: central differences of F(θ, φ) along a random direction (float64, h = 1e-5: error ~1e-9)
    g = torch.Generator().manual_seed(8)
    ut = [torch.randn(t.shape, generator=g, dtype=DT) for t in theta]
    up = [torch.randn(p.shape, generator=g, dtype=DT) for p in phi]
    h = 1e-5
    Fp = _objective(inner, outer, [t + h * u for t, u in zip(theta, ut)], [p + h * u for p, u in zip(phi, up)], lr,
                    steps)
    Fm = _objective(inner, outer, [t - h * u for t, u in zip(theta, ut)], [p - h * u for p, u in zip(phi, up)], lr,
                    steps)
    directional = float(sum((a * b).sum() for a, b in zip(hg.theta_grads + hg.phi_grads, ut + up)))
    assert abs((Fp - Fm) / (2 * h) - directional) < 1e-7


@pytest.mark.parametrize("steps", [1, 2])
def test_aid_fd_close_to_second_order_on_network(steps):
    _, inner, outer, theta, phi = _net_problem(9, False)
    exact = hypergradient("second_order", inner, outer, theta, phi, inner_lr=0.2, inner_steps=steps)
    for r, tol in ((1e-2, 1e-4), (1e-4, 1e-8)):           # O(ε²) error: shrinks 1e4-fold with r/100
        hg = hypergradient("aid_fd", inner, outer, theta, phi, inner_lr=0.2, inner_steps=steps, fd_r=r)
        close(hg.theta_grads, exact.theta_grads, atol=tol)
        close(hg.phi_grads, exact.phi_grads, atol=tol)


def test_engines_leave_caller_parameters_alone():
    net, inner, outer, _, phi = _net_problem(10, True)
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    for name in ("second_order", "first_order", "aid_fd", "aid_cg", "aid_neumann"):
        hg = hypergradient(name, inner, outer, params, phi, inner_lr=0.1, cg_damping=1.0) if name == "aid_cg" else \
            hypergradient(name, inner, outer, params, phi, inner_lr=0.1)
        assert all(p.grad is None for p in params)
        assert all(torch.isfinite(t).all() for t in hg.theta_grads + hg.phi_grads)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    set_grads(params, hg.theta_grads)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, hg.theta_grads))
    set_grads(params, hg.theta_grads, accumulate=True)
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(params, hg.theta_grads))


# ---------------------------------------------------------------------------------------------------------------------
# φ gets nothing when L_out does not use it: first_order and momentum_proxy


def test_first_order_phi_gradient_is_exactly_zero_without_direct_dependence():
    _, inner, outer, theta, phi = _net_problem(11, True)
    hg = hypergradient("first_order", inner, outer, theta, phi, inner_lr=0.2)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in hg.phi_grads)
    exact = hypergradient("second_order", inner, outer, theta, phi, inner_lr=0.2)
    assert flat(exact.phi_grads).abs().max() > 1e-4        # whereas the exact one is not zero


def test_momentum_proxy_ema_and_gradients():
    q = Quadratic(D=False)                                 # L_out = ½‖θ − c‖², no φ
    tau = 0.9
    eng = make_engine("momentum_proxy", momentum=tau)
    th1, ph1 = split(q.theta, THETA_SHAPES), split(q.phi, PHI_SHAPES)
    hg1 = hypergradient(eng, q.inner, q.outer, th1, ph1, inner_lr=0.3)
    close(hg1.theta_adapted, q.theta, atol=0)              # first call: the copy is θ itself
    close(hg1.theta_grads, q.theta - q.c, atol=1e-12)
    # the caller's optimizer changes its tensors in place: the copies must not follow
    th2 = [t.add_(1.0) for t in th1]
    ph2 = [p.mul_(-2.0) for p in ph1]
    hg2 = hypergradient(eng, q.inner, q.outer, th2, ph2, inner_lr=0.3)
    ema_t = tau * q.theta + (1 - tau) * (q.theta + 1.0)
    ema_p = tau * q.phi + (1 - tau) * (-2.0 * q.phi)
    close(eng.theta_ema, ema_t, atol=1e-12)
    close(eng.phi_ema, ema_p, atol=1e-12)
    close(hg2.theta_adapted, ema_t, atol=1e-12)            # θ' = θ̄ (f' is the momentum copy)
    close(hg2.theta_grads, ema_t - q.c, atol=1e-12)        # ∇_θ' L_out at the proxy, handed to θ
    assert all(torch.equal(g, torch.zeros_like(g)) for g in hg1.phi_grads + hg2.phi_grads)
    assert eng.calls == 2
    eng.reset()
    assert eng.theta_ema is None


def test_momentum_proxy_state_dict_resumes_exactly():
    q = Quadratic(D=True)
    th, ph = split(q.theta, THETA_SHAPES), split(q.phi, PHI_SHAPES)
    run = make_engine("momentum_proxy", momentum=0.8)
    hypergradient(run, *q.args(), inner_lr=0.3)
    resumed = make_engine("momentum_proxy", momentum=0.8)
    resumed.load_state_dict(run.state_dict())
    assert resumed.calls == 1
    step = [t + 0.5 for t in th], [p - 0.25 for p in ph]     # the caller's next parameters
    a = hypergradient(run, q.inner, q.outer, *step, inner_lr=0.3)
    b = hypergradient(resumed, q.inner, q.outer, *step, inner_lr=0.3)
    assert all(torch.equal(x, y) for x, y in zip(a.theta_grads + a.phi_grads, b.theta_grads + b.phi_grads))
    assert all(torch.equal(x, y) for x, y in zip(run.theta_ema + run.phi_ema, resumed.theta_ema + resumed.phi_ema))
    fresh = make_engine("momentum_proxy", momentum=0.8)     # without the state it would start a new copy
    c = hypergradient(fresh, q.inner, q.outer, *step, inner_lr=0.3)
    assert not all(torch.equal(x, y) for x, y in zip(a.theta_grads, c.theta_grads))
    resumed.load_state_dict({})                              # a stateless engine's checkpoint: start afresh
    assert resumed.theta_ema is None and resumed.calls == 0


@pytest.mark.parametrize("name", [n for n in ENGINES if n not in ("momentum_proxy", "aid_neumann")])
def test_stateless_engines_have_empty_state_and_reject_foreign_state(name):
    eng = make_engine(name)
    assert eng.state_dict() == {}
    eng.load_state_dict({})
    with pytest.raises(ValueError, match=f"engine '{name}' keeps no state"):
        eng.load_state_dict({"theta_ema": None})


def test_momentum_proxy_phi_only_direct_and_adapted_variant():
    q, tau, lr = Quadratic(D=True), 0.5, 0.3
    eng = MomentumProxy(momentum=tau, adapt_proxy=True)
    hypergradient(eng, *q.args(), inner_lr=lr)
    theta2, phi2 = q.theta + 0.5, q.phi - 0.25
    hg = hypergradient(eng, q.inner, q.outer, split(theta2, THETA_SHAPES), split(phi2, PHI_SHAPES), inner_lr=lr)
    tb, pb = tau * q.theta + (1 - tau) * theta2, tau * q.phi + (1 - tau) * phi2
    proxy = tb - lr * (q.A @ tb - q.B @ pb)                # one step from θ̄ with g' = φ̄, no graph
    close(hg.theta_adapted, proxy, atol=1e-12)
    close(hg.theta_grads, proxy - q.c, atol=1e-12)
    close(hg.phi_grads, q.D @ phi2, atol=1e-12)           # the direct term with the live φ, nothing through θ'


def test_momentum_proxy_rejects_changed_shapes():
    q = Quadratic()
    eng = make_engine("momentum_proxy")
    hypergradient(eng, *q.args(), inner_lr=0.1)
    with pytest.raises(ValueError, match="momentum copy"):
        hypergradient(eng, q.inner, q.outer, [torch.zeros(7, dtype=DT)], split(q.phi, PHI_SHAPES), inner_lr=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# aid_neumann's step 1/λ̂: power iteration warm-started across calls (#24)


def _spectrum_problem(n, seed=0):
    """L_in = ½θᵀAθ + θᵀBφ with A of eigenvalues 1..3 (ratio of the top two near 1: power iteration converges
    slowly, so each iteration count gives a different estimate), L_out = ½‖θ − 1‖²."""
    g = torch.Generator().manual_seed(seed)
    A, B = spd(n, 1.0, 3.0, g), torch.randn(n, 2, generator=g, dtype=DT)
    inner = lambda th, ph: 0.5 * th[0] @ A @ th[0] + th[0] @ B @ ph[0]  # noqa: E731
    outer = lambda th, ph: 0.5 * ((th[0] - 1) ** 2).sum()  # noqa: E731
    return (inner, outer, [torch.randn(n, generator=g, dtype=DT)], [torch.randn(2, generator=g, dtype=DT)]), A


def _alpha(engine, problem):
    return hypergradient(engine, *problem, inner_lr=0.1).logs["neumann_alpha"]


def test_neumann_warm_start_continues_one_power_iteration_chain():
    problem, A = _spectrum_problem(6)
    lam_max = float(torch.linalg.eigvalsh(A).max())
    warm = make_engine("aid_neumann", power_iters=2, power_iters_warm=1)
    alphas = [_alpha(warm, problem) for _ in range(8)]
    # call n on a fixed Hessian = one cold start of 2 + (n - 1) iterations from the same v
    cold = [_alpha(make_engine("aid_neumann", power_iters=2 + n, power_iters_warm=None), problem) for n in range(8)]
    close(torch.tensor(alphas), torch.tensor(cold), atol=0, rtol=1e-12)
    assert abs(cold[0] - cold[7]) > 1e-3 * cold[7]             # the iteration counts give different estimates
    assert all(a >= 1 / lam_max * (1 - 1e-12) for a in alphas)  # λ̂ <= λ_max: the step never undershoots 1/λ_max
    assert abs(alphas[-1] * lam_max - 1) < abs(alphas[0] * lam_max - 1)
    # without warm start every call repeats the cold estimate
    off = make_engine("aid_neumann", power_iters=2, power_iters_warm=None)
    assert [_alpha(off, problem) for _ in range(3)] == [cold[0]] * 3
    assert off.state_dict() == {}


def test_neumann_warm_vectors_are_kept_per_parameter_shapes():
    (p4, _), (p6, _) = _spectrum_problem(4, seed=1), _spectrum_problem(6, seed=2)
    eng = make_engine("aid_neumann", power_iters=3, power_iters_warm=2)
    _alpha(eng, p4), _alpha(eng, p6)                           # TC²-like: two parameter sets, one engine
    assert len(eng.state_dict()["power_vectors"]) == 2
    cold = make_engine("aid_neumann", power_iters=5, power_iters_warm=None)
    assert _alpha(eng, p4) == pytest.approx(_alpha(cold, p4), rel=1e-12)  # p4's chain goes on: 3 + 2 iterations


def test_neumann_warm_state_resumes_exactly():
    problem, _ = _spectrum_problem(6)
    a = make_engine("aid_neumann", power_iters=1)
    for _ in range(3):
        hypergradient(a, *problem, inner_lr=0.1)
    b = make_engine("aid_neumann", power_iters=1)
    b.load_state_dict(a.state_dict())
    ha, hb = hypergradient(a, *problem, inner_lr=0.1), hypergradient(b, *problem, inner_lr=0.1)
    assert ha.logs == hb.logs
    assert all(torch.equal(x, y) for x, y in zip(ha.phi_grads, hb.phi_grads))
    state = a.state_dict()
    b.load_state_dict(state)
    state["power_vectors"][0][0].zero_()                       # b loaded a copy: the source's tensors can change
    assert float(b.state_dict()["power_vectors"][0][0].norm()) == pytest.approx(1.0, rel=1e-12)
    c = make_engine("aid_neumann", power_iters=1)
    c.load_state_dict({})                                      # a checkpoint of a stateless engine: a cold start
    assert _alpha(c, problem) == _alpha(make_engine("aid_neumann", power_iters=1), problem)
    with pytest.raises(ValueError, match="aid_neumann.*unknown state \\['theta_ema'\\]; allowed: power_vectors"):
        c.load_state_dict({"theta_ema": None})


def test_neumann_warm_start_finds_the_spectral_radius_on_conv4():
    """The default Conv-4 (ReLU, max-pool, train-mode BatchNorm; tests/conv4_problem.py): its inner Hessian is
    indefinite, and power iteration estimates the largest |eigenvalue|; the warm chain of 1 iteration per call
    reaches it within 2 % after 20 calls, where one cold iteration per call stays far below."""
    from conv4_problem import INNER_LR, conv4_problem
    inner, outer, theta, phi = problem = conv4_problem(0)
    eng = make_engine("aid_neumann", power_iters=1, power_iters_warm=1)
    alphas = [eng(*problem, inner_lr=INNER_LR).logs["neumann_alpha"] for _ in range(20)]
    t_adapt = eng(*problem, inner_lr=INNER_LR).theta_adapted
    shapes = [t.shape for t in theta]
    flat_loss = lambda z: inner(split(z, shapes), phi)  # noqa: E731
    H = torch.autograd.functional.hessian(flat_loss, flat(t_adapt).detach())
    rho = float(torch.linalg.eigvalsh((H + H.T) / 2).abs().max())
    assert 1 / alphas[-1] == pytest.approx(rho, rel=0.02)
    assert 1 / alphas[0] < 0.9 * rho                            # a single cold iteration underestimates it
    assert all(1 / a <= rho * (1 + 1e-9) for a in alphas)       # a lower bound throughout


# ---------------------------------------------------------------------------------------------------------------------
# registry and errors


def test_registry_names():
    assert set(ENGINES) == {"second_order", "first_order", "aid_fd", "aid_cg", "aid_neumann", "momentum_proxy"}
    assert isinstance(make_engine("aid_fd"), AidFD) and make_engine("aid_fd").fd_r == 1e-4


def test_unknown_engine_lists_names():
    q = Quadratic()
    with pytest.raises(ValueError) as e:
        hypergradient("third_order", *q.args(), inner_lr=0.1)
    msg = str(e.value)
    assert msg.startswith("hypergrad:") and "third_order" in msg
    assert all(name in msg for name in ENGINES)


@pytest.mark.parametrize("kwargs,needle", [
    ({"engine": "aid_fd", "fd_r": -1.0}, "fd_r"),
    ({"engine": "aid_fd", "fd_r": float("nan")}, "fd_r"),
    ({"engine": "aid_cg", "cg_iters": 0}, "cg_iters"),
    ({"engine": "aid_cg", "cg_iters": 2.5}, "cg_iters"),
    ({"engine": "aid_cg", "cg_damping": -0.1}, "cg_damping"),
    ({"engine": "aid_cg", "cg_layerwise": 1}, "cg_layerwise"),
    ({"engine": "aid_cg", "cg_iter": 3}, "'cg_iter'"),
    ({"engine": "aid_neumann", "neumann_alpha": 0.0}, "neumann_alpha"),
    ({"engine": "aid_neumann", "neumann_iters": True}, "neumann_iters"),
    ({"engine": "aid_neumann", "power_iters_warm": 0}, "power_iters_warm: must be an integer >= 1 or None"),
    ({"engine": "second_order", "fd_r": 0.1}, "'fd_r'"),
    ({"engine": "second_order", "inner_lr": 0.0}, "inner_lr"),
    ({"engine": "second_order", "inner_steps": 0}, "inner_steps"),
    ({"engine": "first_order", "inner_steps": 1.0}, "inner_steps"),
    ({"engine": "momentum_proxy"}, "make_engine"),
])
def test_bad_options_are_named(kwargs, needle):
    q = Quadratic()
    kwargs = {"inner_lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match="hypergrad") as e:
        hypergradient(kwargs.pop("engine"), *q.args(), **kwargs)
    assert needle in str(e.value)


def test_make_engine_option_errors():
    with pytest.raises(ValueError, match="momentum"):
        make_engine("momentum_proxy", momentum=1.5)
    with pytest.raises(ValueError, match="allowed: cg_iters, cg_damping, cg_layerwise"):
        make_engine("aid_cg", neumann_iters=3)
    with pytest.raises(ValueError, match="make_engine"):
        q = Quadratic()
        hypergradient(make_engine("aid_cg"), *q.args(), inner_lr=0.1, cg_iters=3)
