"""MCR: the MEC Taylor series and its convergence guard, L_comp / L_mcr against independent formulas, CompMod per
fusion, the second-order ξ update of Algorithm 1 against hand-unrolled autograd, variants, config errors,
determinism, training through the trainer, and the Table 4 augmentation subsets (bilevel_ssl.experiments)."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bilevel_ssl.augment import PRESETS, augment
from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.experiments import TABLE4_SUBSETS, subset_config, subset_tag
from bilevel_ssl.mcr import (MCR, CompMod, MCRConfig, SeriesDivergenceError, check_series, comp_loss, compmod_dims,
                             fuse, mcr_loss, series_bound, series_radius, taylor_logdet)
from bilevel_ssl.meta import SSLNet
from bilevel_ssl.objectives import make_objective, nt_xent
from bilevel_ssl.trainer import CHECKPOINT, build_net, train


def unit_rows(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def series_reference(a, b, lam, order):
    """The series written on the n×n matrix C = λ A Bᵀ with explicit matrix powers (no Gram trick)."""
    c = lam * a @ b.T
    return sum((-1) ** (k + 1) / k * torch.trace(torch.linalg.matrix_power(c, k)) for k in range(1, order + 1))


# ---------------------------------------------------------------------------------------------- the series


def test_series_hand_computed_small_case():
    # A Aᵀ = diag(1/2, 1/4): the series is Σ_i Σ_k (−1)^{k+1} x_i^k / k with x = 1/2, 1/4
    a = torch.tensor([[0.5 ** 0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    assert float(taylor_logdet(a, lam=1.0, order=1)) == pytest.approx(0.75)
    assert float(taylor_logdet(a, lam=1.0, order=2)) == pytest.approx(0.75 - (0.25 + 0.0625) / 2)
    assert float(taylor_logdet(a, lam=1.0, order=3)) == pytest.approx(0.59375 + (0.125 + 0.015625) / 3)
    assert float(taylor_logdet(a, lam=1.0, order=400)) == pytest.approx(math.log(1.5) + math.log(1.25), abs=1e-12)


@pytest.mark.parametrize("n,d", [(6, 4), (4, 6)])  # both branches of the Gram trick (d×d and n×n)
def test_series_matches_torch_logdet_when_it_converges(n, d):
    a, b = unit_rows(n, d, 0), unit_rows(n, d, 1)
    lam = 0.9 / n  # below the bound 1/n for normalised rows
    for bb in (a, b):  # symmetric (Eq. 6) and non-symmetric (Eq. 7)
        exact = torch.logdet(torch.eye(n, dtype=torch.float64) + lam * a @ bb.T)
        assert float(taylor_logdet(a, bb, lam=lam, order=300)) == pytest.approx(float(exact), abs=1e-10)
        for order in (1, 2, 4, 7):
            torch.testing.assert_close(taylor_logdet(a, bb, lam=lam, order=order), series_reference(a, bb, lam, order))
        rho = series_radius(a, bb, lam)
        assert rho < 1
        err = abs(float(taylor_logdet(a, bb, lam=lam, order=4)) - float(exact))
        assert err <= min(n, d) * rho ** 5 / (5 * (1 - rho)) + 1e-12  # the truncation bound of the docstring


def test_series_is_differentiable_like_logdet():
    a = unit_rows(5, 3).requires_grad_(True)
    lam = 0.5 / 5
    g_series, = torch.autograd.grad(taylor_logdet(a, lam=lam, order=200), a)
    g_exact, = torch.autograd.grad(torch.logdet(torch.eye(5, dtype=torch.float64) + lam * a @ a.T), a)
    torch.testing.assert_close(g_series, g_exact)


def test_bound_and_radius():
    a, b = unit_rows(8, 3, 0), unit_rows(8, 3, 1)
    lam = 0.1
    rho, bound = series_radius(a, b, lam), series_bound(a, b, lam)
    assert rho <= bound + 1e-12 <= lam * 8 + 1e-12  # ρ ≤ λ‖A‖‖B‖ ≤ λn for unit rows
    assert series_bound(a, a, lam) == pytest.approx(series_radius(a, a, lam))  # exact for Eq. 6
    collapsed = torch.ones(8, 3, dtype=torch.float64) / 3 ** 0.5
    assert series_radius(collapsed, collapsed, lam) == pytest.approx(lam * 8)  # the bound λn is attained


def test_divergent_series_raises_warns_or_is_silent():
    collapsed = torch.ones(4, 3, dtype=torch.float64) / 3 ** 0.5  # ρ(λ Z Zᵀ) = λ n = 2
    with pytest.raises(SeriesDivergenceError, match=r"spectral radius of λ·A·Bᵀ is 2 >= 1.*1/n = 0.25"):
        taylor_logdet(collapsed, lam=0.5)
    with pytest.raises(ValueError, match="meta_args.lam"):  # a ValueError naming the option to change
        comp_loss(collapsed, lam=0.5)
    with pytest.warns(RuntimeWarning, match="diverges"):
        value = taylor_logdet(collapsed, lam=0.5, order=4, check="warn")
    assert float(value) == pytest.approx(2 - 4 / 2 + 8 / 3 - 16 / 4)  # the truncated (divergent) series
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        taylor_logdet(collapsed, lam=0.5, check="off")
    with pytest.raises(ValueError, match="check: unknown value 'maybe'; allowed: error, warn, off"):
        taylor_logdet(collapsed, lam=0.1, check="maybe")


def test_guard_uses_the_exact_radius_when_the_cheap_bound_fails():
    # A Bᵀ = [[0, 1], [0, 0]] is nilpotent: ρ = 0, log det(I + λ A Bᵀ) = 0, but λ‖A‖‖B‖ = λ = 5
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert check_series(a, b, 5.0) == pytest.approx(5.0)  # no error
    assert float(taylor_logdet(a, b, lam=5.0, order=4)) == pytest.approx(0.0)


@pytest.mark.parametrize("bad,message", [
    ({"order": 0}, "order must be an integer >= 1"),
    ({"lam": 0.0}, "lam must be a finite number > 0"),
    ({"lam": float("nan")}, "lam must be a finite number > 0"),
])
def test_series_argument_errors(bad, message):
    a = unit_rows(3, 2)
    with pytest.raises(ValueError, match=message):
        taylor_logdet(a, **{"lam": 0.1, **bad})
    with pytest.raises(ValueError, match="equal shape"):
        taylor_logdet(a, unit_rows(4, 2), lam=0.1)


# ---------------------------------------------------------------------------------------------- the losses


def test_comp_and_mcr_losses_against_hand_formulas():
    zh, z1, z2 = unit_rows(6, 4, 0), unit_rows(6, 4, 1), unit_rows(6, 4, 2)
    mu, lam = 3.0, 0.1
    # order 2 written out: −μ[λ Tr(M) − λ²/2 Tr(M M)]
    m = zh @ zh.T
    ref = -mu * (lam * torch.trace(m) - lam ** 2 / 2 * (m * m.T).sum())
    torch.testing.assert_close(comp_loss(zh, mu=mu, lam=lam, order=2), ref)
    ref = sum(-mu * (lam * torch.trace(zh @ z.T) - lam ** 2 / 2 * torch.trace(zh @ z.T @ zh @ z.T)) for z in (z1, z2))
    torch.testing.assert_close(mcr_loss(zh, z1, z2, mu=mu, lam=lam, order=2), ref)
    # defaults μ = (n + d)/2, λ = 1/(2n); a long series is −μ log det(I + λ Ẑ Zᵀ)
    eye = torch.eye(6, dtype=torch.float64)
    exact = -(6 + 4) / 2 * torch.logdet(eye + zh @ zh.T / 12)
    torch.testing.assert_close(comp_loss(zh, order=200), exact)
    exact = -(6 + 4) / 2 * sum(torch.logdet(eye + zh @ z.T / 12) for z in (z1, z2))
    torch.testing.assert_close(mcr_loss(zh, z1, z2, order=200), exact)


def test_mcr_loss_is_lowest_when_the_views_equal_the_comprehensive_embedding():
    zh = unit_rows(8, 5, 0)
    aligned = float(mcr_loss(zh, zh, zh))
    for seed in range(1, 6):
        z = unit_rows(8, 5, seed)
        assert aligned < float(mcr_loss(zh, z, z))


def test_comp_loss_prefers_spread_over_collapsed_embeddings():
    spread = torch.eye(4, dtype=torch.float64)
    collapsed = torch.ones(4, 4, dtype=torch.float64) / 2
    assert float(comp_loss(spread)) < float(comp_loss(collapsed))  # maximum entropy = minimum L_comp


# ----------------------------------------------------------------------------------------- CompMod and fusion


@pytest.mark.parametrize("fusion,in_dim,hidden", [("representation", 2 * 10, 10), ("embedding", 2 * 4, 4),
                                                  ("mixup", 10, 10)])
def test_compmod_shapes_per_fusion(fusion, in_dim, hidden):
    h1, h2, z1, z2 = torch.randn(5, 10), torch.randn(5, 10), torch.randn(5, 4), torch.randn(5, 4)
    assert compmod_dims(fusion, 10, 4) == (in_dim, hidden, 4)
    g = CompMod(*compmod_dims(fusion, 10, 4))
    fused = fuse(fusion, h1, h2, z1, z2, alpha=0.3)
    assert fused.shape == (5, in_dim)
    assert g(fused).shape == (5, 4)
    assert [m.out_features for m in g.net if isinstance(m, nn.Linear)] == [hidden, 4]


def test_fusions_compute_eq5_eq11_eq12():
    h1, h2, z1, z2 = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 1), torch.randn(3, 1)
    assert torch.equal(fuse("representation", h1, h2, z1, z2), torch.cat([h1, h2], 1))
    assert torch.equal(fuse("embedding", h1, h2, z1, z2), torch.cat([z1, z2], 1))
    torch.testing.assert_close(fuse("mixup", h1, h2, z1, z2, 0.25), 0.25 * h1 + 0.75 * h2)
    alpha = torch.tensor([[0.0], [1.0], [0.5]])
    mixed = fuse("mixup", h1, h2, z1, z2, alpha)
    torch.testing.assert_close(mixed, torch.stack([h2[0], h1[1], (h1[2] + h2[2]) / 2]))
    with pytest.raises(ValueError, match="fusion: unknown value 'sum'; allowed: representation, embedding, mixup"):
        fuse("sum", h1, h2, z1, z2)
    with pytest.raises(ValueError, match="needs alpha"):
        fuse("mixup", h1, h2, z1, z2)
    with pytest.raises(ValueError, match=r"input must be \(n, 4\)"):
        CompMod(4, 2, 1)(torch.randn(3, 5))


# ------------------------------------------------------------------------------------ the bi-level ξ update


class TinyBackbone(nn.Module):
    """BatchNorm-free, so that a hand-unrolled reference (separate passes) is exact."""

    def __init__(self, d_in=12, d=6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 10), nn.Tanh(), nn.Linear(10, d))
        self.feature_dim = d
        self.spec = {"name": "tiny", "in_channels": 3}

    def forward(self, x):
        return self.net(x)


def tiny_setup(hypergrad="second_order", **meta_args):
    torch.manual_seed(0)
    margs = {"lambda1": 1.0, "lambda2": 0.5, "inner_lr": 0.3, **meta_args}
    cfg = TrainConfig(meta="mcr", hypergrad=hypergrad, batch_size=8, progress=False,
                      objective_args={"temperature": 0.5, "proj_hidden": 5, "proj_dim": 4}, meta_args=margs)
    objective = make_objective("simclr", **cfg.objective_args)
    head = nn.ModuleDict({"projector": nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))})
    net = SSLNet(TinyBackbone(), head)
    method = MCR(objective, net, cfg)
    views = [torch.randn(8, 3, 2, 2) for _ in range(2)]
    return net, method, views


def reference(net, method, views, *, bilevel=True):
    """Algorithm 1 written out by hand (Eq. 6-9) with plain autograd: θ-grad = ∇_θ(L_ssl + λ1 L_mcr) at θ; ξ-grad =
    d/dξ [L_ssl(θ − r∇_θ(L_ssl + λ1 L_mcr)(θ, ξ)) + λ2 L_comp(ξ)] through the unrolled step (or, without bi-level,
    ∇_ξ(λ1 L_mcr + λ2 L_comp))."""
    c = method.cfg
    names = [n for n, _ in net.named_parameters()]
    theta = [p for _, p in net.named_parameters()]
    xi_names = [n for n, _ in method.compmod.named_parameters()]
    xi = list(method.compmod.parameters())
    alpha = c.mixup_alpha
    n = views[0].shape[0]

    def out(params, x):
        return functional_call(net, dict(zip(names, params)), (x,))

    def g(p, inp):
        return functional_call(method.compmod, dict(zip(xi_names, p)), (inp,))

    def fused(o1, o2):
        return fuse(c.fusion, o1["h"], o2["h"], o1["z"], o2["z"], alpha)

    def losses(params, p, x1, x2):
        o1, o2 = out(params, x1), out(params, x2)  # separate passes (no BatchNorm: equals the joint one)
        ssl = nt_xent(o1["z"], o2["z"], 0.5)
        inp = fused(o1, o2)
        zh = F.normalize(g(p, inp.detach() if c.detach_target else inp), dim=1)
        # μ = (n + d)/2, λ = 1/(2n), order 4, from scratch: Σ_k (−1)^{k+1}/k Tr((λ Ẑ Zᵀ)^k)
        mu, lam = (n + 4) / 2, 1 / (2 * n)

        def series(a, b):
            cc = lam * a @ b.T
            return sum((-1) ** (k + 1) / k * torch.trace(torch.linalg.matrix_power(cc, k)) for k in range(1, 5))

        mcr = -mu * (series(zh, F.normalize(o1["z"], dim=1)) + series(zh, F.normalize(o2["z"], dim=1)))
        zc = F.normalize(g(p, inp.detach()), dim=1)
        comp = -mu * series(zc, zc)
        return ssl, mcr, comp

    x1, x2 = views
    ssl, mcr, comp = losses(theta, xi, x1, x2)
    theta_grad = torch.autograd.grad(ssl + c.lambda1 * mcr, theta, retain_graph=True)
    if not bilevel:
        return theta_grad, torch.autograd.grad(c.lambda1 * mcr + c.lambda2 * comp, xi)
    grads = torch.autograd.grad(ssl + c.lambda1 * mcr, theta, create_graph=True)
    adapted = [t - c.inner_lr * gr for t, gr in zip(theta, grads)]
    outer_ssl, _, _ = losses(adapted, xi, x1, x2)
    outer = outer_ssl + c.lambda2 * comp  # L_comp of Ẑ from the features at θ (Algorithm 1, line 8)
    return theta_grad, torch.autograd.grad(outer, xi)


@pytest.mark.parametrize("opts", [{}, {"fusion": "embedding"}, {"fusion": "mixup", "mixup_alpha": 0.3},
                                  {"detach_target": False}])
def test_second_order_xi_update_equals_hand_unrolled_algorithm_1(opts):
    torch.set_default_dtype(torch.float64)
    try:
        net, method, views = tiny_setup(**opts)
        logs = method.compute_grads(net, views)
        ref_theta, ref_xi = reference(net, method, views)
        for p, r in zip(net.parameters(), ref_theta):
            torch.testing.assert_close(p.grad, r)
        for p, r in zip(method.compmod.parameters(), ref_xi):
            torch.testing.assert_close(p.grad, r)
        # the path through θ_ξ matters: ξ's gradient is not just the direct λ2 ∇L_comp
        _, method_fo, _ = tiny_setup(hypergrad="first_order", **opts)
        method_fo.compmod.load_state_dict(method.compmod.state_dict())
        net.zero_grad()
        method_fo.compute_grads(net, views)
        flat = lambda m: torch.cat([p.grad.flatten() for p in m.compmod.parameters()])
        rel = float((flat(method) - flat(method_fo)).norm() / flat(method).norm())
        assert rel > 1e-3  # (about 1e-2 here; float64 rounding would be ~1e-16)
        assert logs["xi_grad_norm"] > 0 and math.isfinite(logs["loss"])
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("engine", ["first_order", "momentum_proxy"])
def test_first_order_engine_without_comp_loss_is_refused(engine):
    """#24: lambda2 = 0 leaves ξ only the inner loss; a first-order engine then gives it zero gradient: refused."""
    with pytest.raises(ValueError, match=r"hypergrad: mcr with engine .* exactly zero gradient.*allow_untrained_meta"):
        TrainConfig(meta="mcr", hypergrad=engine, batch_size=8, meta_args={"lambda2": 0.0})
    TrainConfig(meta="mcr", hypergrad=engine, batch_size=8, meta_args={"lambda2": 0.0, "allow_untrained_meta": True})
    TrainConfig(meta="mcr", hypergrad=engine, batch_size=8)  # lambda2 > 0: ξ gets the direct L_comp gradient


def test_first_order_engine_gives_xi_only_the_direct_comp_gradient():
    torch.set_default_dtype(torch.float64)
    try:
        net, method, views = tiny_setup(hypergrad="first_order")
        method.compute_grads(net, views)
        got = [p.grad.clone() for p in method.compmod.parameters()]
        # λ2 ∇_ξ L_comp alone, from the hand formula with the series of order 4
        h = [net(v)["h"].detach() for v in views]
        zh = F.normalize(method.compmod(torch.cat(h, 1)), dim=1)
        ref = torch.autograd.grad(0.5 * comp_loss(zh, order=4), list(method.compmod.parameters()))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
    finally:
        torch.set_default_dtype(torch.float32)


def test_no_bilevel_variant_is_one_joint_backward():
    torch.set_default_dtype(torch.float64)
    try:
        net, method, views = tiny_setup(variant="no_bilevel")
        method.compute_grads(net, views)
        ref_theta, ref_xi = reference(net, method, views, bilevel=False)
        for p, r in zip(list(net.parameters()) + list(method.compmod.parameters()), list(ref_theta) + list(ref_xi)):
            torch.testing.assert_close(p.grad, r)
    finally:
        torch.set_default_dtype(torch.float32)


def test_aid_fd_agrees_with_second_order_in_float64():
    torch.set_default_dtype(torch.float64)
    try:
        net, method, views = tiny_setup()
        method.compute_grads(net, views)
        exact = [p.grad.clone() for p in method.compmod.parameters()]
        net2, method2, _ = tiny_setup(hypergrad="aid_fd")
        method2.engine = type(method2.engine)(fd_r=1e-5)
        method2.compute_grads(net2, views)
        for p, e in zip(method2.compmod.parameters(), exact):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


def test_lambda1_zero_decouples_xi_from_the_inner_step():
    # with λ1 = 0 the virtual step θ_ξ does not depend on ξ, so the hypergradient is exactly λ2 ∇L_comp
    net, method, views = tiny_setup(lambda1=0.0)
    method.compute_grads(net, views)
    so = [p.grad.clone() for p in method.compmod.parameters()]
    net2, method2, _ = tiny_setup(hypergrad="first_order", lambda1=0.0)
    method2.compute_grads(net2, views)
    for a, p in zip(so, method2.compmod.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_batchnorm_running_stats_advance_once_per_step():
    torch.manual_seed(0)
    cfg = TrainConfig(meta="mcr", hypergrad="aid_fd", batch_size=8, progress=False, backbone_args={"width": 4},
                      objective_args={"proj_hidden": 8, "proj_dim": 4})
    net, objective = build_net(cfg, 3, 28)
    method = MCR(objective, net, cfg)
    bn = net.backbone.features[1]
    method.compute_grads(net, [torch.rand(8, 3, 28, 28) for _ in range(2)])
    assert int(bn.num_batches_tracked) == 1  # the engine evaluated the losses 4 times more, on buffer copies


# ----------------------------------------------------------------------------------------------- config errors

BAD = [
    ({"meta_args": {"lambda3": 1.0}}, r"meta_args: unknown mcr option\(s\) \['lambda3'\]; allowed: lambda1"),
    ({"meta_args": {"fusion": "sum"}}, "meta_args.fusion: unknown value 'sum'; allowed: representation, embedding"),
    ({"meta_args": {"variant": "joint"}}, "meta_args.variant: unknown value 'joint'; allowed: bilevel, no_bilevel"),
    ({"meta_args": {"order": 0}}, "meta_args.order: must be an integer >= 1"),
    ({"meta_args": {"lambda1": -1.0}}, "meta_args.lambda1: must be a finite number >= 0"),
    ({"meta_args": {"mu": 0}}, "meta_args.mu: must be a finite number > 0"),
    ({"meta_args": {"lam": 0.05}}, r"meta_args.lam: .*allowed: 0 < lam < 1/batch_size = 0.03125"),
    ({"meta_args": {"mixup_alpha": 0.5}}, "meta_args.mixup_alpha: only used with fusion 'mixup'"),
    ({"meta_args": {"fusion": "mixup", "mixup_alpha": 1.5}}, r"meta_args.mixup_alpha: must be a number in \[0, 1\]"),
    ({"meta_args": {"check": "maybe"}}, "meta_args.check: unknown value 'maybe'; allowed: error, warn, off"),
    ({"meta_args": {"normalize": 1}}, "meta_args.normalize: must be true or false"),
    ({"objective": "mae", "backbone": "vit_tiny"}, "objective: mcr needs a two-view"),
    ({"hypergrad": "aid_fd", "hypergrad_args": {"cg_iters": 3}},
     r"hypergrad_args: unknown aid_fd option\(s\) \['cg_iters'\]; allowed: fd_r"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_bad_mcr_params_rejected_before_compute(bad, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{"meta": "mcr", "batch_size": 32, **bad})


def test_lam_above_the_bound_is_allowed_when_the_guard_only_warns():
    TrainConfig(meta="mcr", batch_size=32, meta_args={"lam": 0.05, "check": "warn"})
    assert MCRConfig(lam=0.01).lam_for(32) == 0.01 and MCRConfig().lam_for(32) == 1 / 64


def test_check_off_skips_the_guard_and_logs_no_bound():
    net, method, views = tiny_setup(check="off", lam=0.05)
    logs = method.compute_grads(net, views)
    assert "taylor_bound" not in logs and all(math.isfinite(v) for v in logs.values())


def test_divergent_step_raises_with_the_bound_in_the_message():
    net, method, views = tiny_setup(lam=10.0, check="error", normalize=False)
    with pytest.raises(SeriesDivergenceError, match="spectral radius"):
        method.compute_grads(net, views)


# -------------------------------------------------------------------------------- trainer, determinism, resume

TINY_ARGS = {"simclr": {"proj_hidden": 16, "proj_dim": 8},
             "byol": {"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16},
             "barlow_twins": {"proj_hidden": 16, "proj_dim": 16}}


@pytest.mark.parametrize("objective", ["simclr", "byol", "barlow_twins"])
def test_trains_through_the_trainer_with_finite_losses(tiny, objective):
    cfg = TrainConfig(objective=objective, objective_args=TINY_ARGS[objective], meta="mcr", epochs=1, batch_size=32,
                      backbone_args={"width": 8}, lr=0.05, progress=False)
    result = train(cfg, tiny)
    rec = result.history[-1]
    for key in ("loss", "mcr", "comp", "outer_loss", "xi_grad_norm", "taylor_bound"):
        assert math.isfinite(rec[key]), key
    assert rec["taylor_bound"] <= 0.5 + 1e-6  # default λ = 1/(2n) on normalised rows
    assert rec["xi_grad_norm"] > 0


def test_deterministic_and_resumes_exactly(tiny, tmp_path):
    cfg = TrainConfig(objective="simclr", objective_args=TINY_ARGS["simclr"], meta="mcr", epochs=2, batch_size=32,
                      meta_args={"fusion": "mixup"}, backbone_args={"width": 8}, lr=0.05, checkpoint_every=1,
                      progress=False)  # random mixup α: torch's RNG must be checkpointed too
    full = train(cfg, tiny, tmp_path / "full")
    again = train(cfg, tiny, tmp_path / "again")
    assert [r["loss"] for r in again.history] == [r["loss"] for r in full.history]

    def stop(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny, tmp_path / "resumed", callbacks=(stop,))
    resumed = train(cfg, tiny, tmp_path / "resumed")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=False)["meta"]["compmod"]
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["meta"]["compmod"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------- Table 4 augmentation subsets


def test_table4_rows():
    assert TABLE4_SUBSETS[1] == ("flip", "rotate") and TABLE4_SUBSETS[6] == ("rotate", "jitter")
    assert TABLE4_SUBSETS[7] == ("flip", "crop", "grey") and len(TABLE4_SUBSETS[8]) == 5


def test_subset_config_switches_ops_on_and_off():
    base = PRESETS["mnistm"]  # no flips in the preset
    only_flip = subset_config(["flip"], base)
    assert only_flip.flip_p == 0.5 and only_flip.jitter_p == 0 and only_flip.grayscale_p == 0
    assert only_flip.crop_scale == (1.0, 1.0) and only_flip.blur_p == 0
    crop = subset_config(["crop", "grey", "jitter"], base)
    assert crop.crop_scale == base.crop_scale and crop.grayscale_p == base.grayscale_p
    assert crop.jitter_p == base.jitter_p and crop.flip_p == 0
    with pytest.raises(ValueError, match="ops: unknown or empty augmentation subset \\['blur'\\]; allowed"):
        subset_config(["blur"], base)
    # a flip-only view is the image or its mirror, exactly (the full-image crop is an identity resampling)
    x = torch.rand(16, 3, 8, 8)
    out = augment(x, only_flip, torch.Generator().manual_seed(0))
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_subsets_are_augment_args_of_the_training_config(tiny, tmp_path):
    from bilevel_ssl.cache import cached_train
    from bilevel_ssl.experiments import augment_subset_config, subset_args

    base = PRESETS["mnistm"]
    args = subset_args(["rotate", "jitter"], base)
    assert args == {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "grayscale_p": 0.0, "rotate90_p": 0.75}
    assert subset_args(["flip", "rotate", "crop", "grey", "jitter"], base) == {"flip_p": 0.5, "rotate90_p": 0.75}
    cfg = TrainConfig(objective="simclr", objective_args=TINY_ARGS["simclr"], epochs=1, batch_size=32,
                      backbone_args={"width": 8}, lr=0.05, progress=False)
    sub = augment_subset_config(cfg, ["jitter", "rotate"])
    assert sub.augment_args == args and sub.augmentation() == subset_config(["rotate", "jitter"], base)
    assert sub.objective_args == cfg.objective_args and cfg.augment_args == {}  # the rest untouched, cfg not mutated
    # augment_args already set are kept unless the subset overrides them
    assert augment_subset_config(cfg.__class__(**{**cfg.to_dict(), "augment_args": {"blur_p": 0.0,
                                                                                      "flip_p": 0.3}}),
                                 ["flip"]).augment_args["flip_p"] == 0.3
    run = cached_train(sub, tiny, root=tmp_path)
    assert "augment_args" in run.out_dir.joinpath("key.json").read_text()
    assert run.history[-1]["loss"] != train(cfg, tiny).history[-1]["loss"]  # other views, other numbers
    assert subset_tag(["crop", "flip"]) == "augment-subset:flip+crop"
