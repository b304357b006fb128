"""TC² (bilevel_ssl.tc2): Eq. 1-2 and L_sse against hand-computed values, f_v / f_w shapes, the task split, the
two-stage bi-level step against a hand-unrolled autograd reference (every variant), option errors, determinism,
objectives, BatchNorm policy and training through the trainer."""

from itertools import combinations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.meta import SSLNet
from bilevel_ssl.models import make_backbone
from bilevel_ssl.objectives import OBJECTIVES, make_objective, nt_xent, objective_class
from bilevel_ssl.tc2 import (TC2, VARIANTS, FactorNet, TC2Config, WeightNet, batch_statistics, calibrate, l1_loss,
                             loss_v, loss_w, make_tasks, orthogonality_loss, reconstruction_loss, split_views,
                             sse_loss)
from bilevel_ssl.trainer import CHECKPOINT, train

T = torch.tensor


# ---------------------------------------------------------------------------------------------- Eq. 1-2 by hand


def test_batch_statistics_hand_computed():
    z = T([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    # mean (3, 4); deviations (-2,-2), (0,2), (2,0); unbiased covariance = [[8, 4], [4, 8]] / 2
    torch.testing.assert_close(batch_statistics(z), T([[3.0, 4.0], [4.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="N >= 2"):
        batch_statistics(z[:1])


def test_loss_v_hand_computed():
    z = T([[1.0, 2.0], [3.0, 4.0]])
    v = T([[1.0], [0.0]])  # orthonormal: VᵀV = 1; Z V Vᵀ keeps column 0, residual (0, 2), (0, 4)
    assert loss_v(v, z, "sum").item() == pytest.approx(20.0)
    assert loss_v(v, z, "mean").item() == pytest.approx(20.0 / 4)  # 0/1 + 20 / (2 rows * 2 dims)
    v2 = T([[1.0, 1.0], [0.0, 1.0]])  # VᵀV − I = [[0, 1], [1, 1]] -> 3;  V Vᵀ = [[2, 1], [1, 1]]
    z2 = T([[1.0, 2.0]])  # Z V Vᵀ = (4, 3), residual (−3, −1) -> 10
    assert orthogonality_loss(v2, "sum").item() == pytest.approx(3.0)
    assert loss_v(v2, z2, "sum").item() == pytest.approx(13.0)
    assert loss_v(v2, z2, "mean").item() == pytest.approx(3.0 / 4 + 10.0 / 2)


def test_loss_w_hand_computed():
    v = T([[1.0], [1.0]])  # d = 2, n_f = 1
    w = T([[2.0], [-1.0]])
    z = T([[1.0, 2.0], [0.0, 0.0]])  # W Vᵀ = [[2, 2], [−1, −1]]: residual sq 1 + 0 + 1 + 1 = 3;  ‖W‖₁ = 3
    assert loss_w(w, z, v, "sum").item() == pytest.approx(6.0)
    assert loss_w(w, z, v, "mean").item() == pytest.approx(3.0 / 4 + 3.0 / 2)
    assert l1_loss(w, "sum").item() == pytest.approx(3.0)
    torch.testing.assert_close(calibrate(w, v), T([[2.0, 2.0], [-1.0, -1.0]]))


def test_losses_match_elementwise_reference_on_random_inputs():
    g = torch.Generator().manual_seed(1)
    zt, vt, wt = torch.randn(6, 5, generator=g), torch.randn(5, 3, generator=g), torch.randn(6, 3, generator=g)
    z, v, w = zt.tolist(), vt.tolist(), wt.tolist()  # plain-Python reference, element by element
    orth = sum((sum(v[i][a] * v[i][b] for i in range(5)) - float(a == b)) ** 2 for a in range(3) for b in range(3))
    zvv = [[sum(z[r][j] * v[j][a] * v[i][a] for j in range(5) for a in range(3)) for i in range(5)] for r in range(6)]
    rec_v = sum((z[r][i] - zvv[r][i]) ** 2 for r in range(6) for i in range(5))
    wv = [[sum(w[r][a] * v[i][a] for a in range(3)) for i in range(5)] for r in range(6)]
    rec_w = sum((z[r][i] - wv[r][i]) ** 2 for r in range(6) for i in range(5))
    l1 = sum(abs(w[r][a]) for r in range(6) for a in range(3))
    assert loss_v(vt, zt, "sum").item() == pytest.approx(orth + rec_v, rel=1e-5)
    assert loss_v(vt, zt, "mean").item() == pytest.approx(orth / 9 + rec_v / 30, rel=1e-5)
    assert loss_w(wt, zt, vt, "sum").item() == pytest.approx(rec_w + l1, rel=1e-5)
    assert loss_w(wt, zt, vt, "mean").item() == pytest.approx(rec_w / 30 + l1 / 18, rel=1e-5)
    assert reconstruction_loss(zt, zt, "sum").item() == 0.0


def test_sse_loss_hand_computed():
    sup = [T([[1.0, 0.0]]), T([[0.0, 1.0]])]  # prototype (0.5, 0.5)
    assert sse_loss(sup, [T([[1.0, 0.0]])]).item() == pytest.approx(0.5)
    assert sse_loss(sup, [T([[3.0, 0.0]])]).item() == pytest.approx(0.5)  # normalised first
    assert sse_loss(sup, [T([[3.0, 0.0]])], normalize=False).item() == pytest.approx(2.5 ** 2 + 0.5 ** 2)
    two = [T([[1.0, 0.0]]), T([[0.0, 2.0]])]
    assert sse_loss(sup, two, reduction="sum").item() == pytest.approx(1.0)
    assert sse_loss(sup, two, reduction="mean").item() == pytest.approx(0.5)  # mean over (image, view) pairs
    with pytest.raises(ValueError, match="reduction"):
        sse_loss(sup, two, reduction="max")


# ------------------------------------------------------------------------------------------ f_v, f_w, tasks


def test_factor_and_weight_net_shapes():
    fv, fw = FactorNet(5, 3, hidden=4), WeightNet(5, 3, hidden=4)
    s = torch.randn(6, 5)
    assert fv(s).shape == (5, 3)
    assert fw(torch.randn(7, 5)).shape == (7, 3)
    assert fw(torch.randn(2, 7, 5)).shape == (2, 7, 3)
    torch.testing.assert_close(fv(3.0 * s), fv(s))  # f_v reads S / ‖S‖_F: the factor directions need no scale
    with pytest.raises(ValueError, match=r"\(6, 5\)"):
        fv(torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\)"):
        fw(torch.randn(7, 4))


def test_n_f_defaults_to_d_and_can_be_set():
    _, net, method, _ = tiny_setup(n_f=0)
    assert method.n_f == net.backbone.feature_dim == 4
    assert method.f_v(torch.randn(5, 4, dtype=torch.float64)).shape == (4, 4)
    _, _, method, _ = tiny_setup(n_f=7)
    assert method.f_v(torch.randn(5, 4, dtype=torch.float64)).shape == (4, 7)
    assert method.f_w(torch.randn(3, 4, dtype=torch.float64)).shape == (3, 7)


def test_make_tasks_and_split_views():
    torch.testing.assert_close(make_tasks(12, 3), torch.arange(12).view(3, 4))
    with pytest.raises(ValueError, match=r"meta_args.n_tasks: 5 .* allowed: 1, 2, 3, 4, 6"):
        make_tasks(12, 5)
    with pytest.raises(ValueError, match="allowed: 1, 2, 3, 4, 6"):
        make_tasks(12, 12)  # one image per task
    views = [torch.full((2,), float(i)) for i in range(5)]
    sup, que = split_views(views, 3)
    assert [int(v[0]) for v in sup] == [0, 1, 2] and [int(v[0]) for v in que] == [3, 4]
    with pytest.raises(ValueError, match="n_support"):
        split_views(views, 5)


# ----------------------------------------------------------------------------------------- the meta-method


class TinyBackbone(nn.Module):
    """BatchNorm-free and smooth, so that the hand-unrolled reference is exact and finite differences are accurate."""

    def __init__(self, d_in=12, d=4):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 7), nn.Tanh(), nn.Linear(7, d))
        self.feature_dim = d
        self.spec = {"name": "tiny", "in_channels": 3}

    def forward(self, x):
        return self.net(x)


def tiny_setup(hypergrad="second_order", batch=8, hypergrad_args=None, **meta_args):
    torch.manual_seed(0)
    margs = {"n_tasks": 2, "n_f": 3, "fv_hidden": 5, "fw_hidden": 6, "inner_lr": 0.3, "tc_inner_lr": 0.2,
             "tc_lr": 0.1, "lambda_s": 0.5, **meta_args}
    cfg = TrainConfig(meta="tc2", hypergrad=hypergrad, hypergrad_args=hypergrad_args or {}, batch_size=batch,
                      progress=False, objective_args={"temperature": 0.5, "proj_hidden": 5, "proj_dim": 4},
                      meta_args=margs)
    objective = make_objective("simclr", **cfg.objective_args)
    head = nn.ModuleDict({"projector": nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4))})
    net = SSLNet(TinyBackbone(), head).double()
    method = TC2(objective, net, cfg)
    method.f_v.double()
    method.f_w.double()
    views = [torch.randn(batch, 3, 2, 2, dtype=torch.float64) for _ in range(method.n_views)]
    return cfg, net, method, views


def reference_step(net, method, views):
    """Eq. 1-7 written out from scratch: returns (ψ after stage 1, ∂/∂θ of stage 2) by plain autograd."""
    c = method.cfg
    ms, k_tasks, b = c.n_support, c.n_tasks, views[0].shape[0]
    n = b // k_tasks
    names = [k for k, _ in net.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    fv_names = [k for k, _ in method.f_v.named_parameters()]
    fw_names = [k for k, _ in method.f_w.named_parameters()]
    psi = [p.detach().clone().requires_grad_(True) for p in [*method.f_v.parameters(), *method.f_w.parameters()]]
    nv = len(fv_names)
    red = (lambda t: t.sum()) if c.reduction == "sum" else (lambda t: t.mean())
    use_v, use_w = c.variant not in ("no_lv", "no_lv_lw"), c.variant not in ("no_lw", "no_lv_lw")

    def feats(th, x):
        return functional_call(net, dict(zip(names, th)), (x,))["h"]

    def proj(th, hc):
        sub = {k[len("heads.projector."):]: t for k, t in zip(names, th) if k.startswith("heads.projector.")}
        return functional_call(net.heads["projector"], sub, (hc,))

    def factors(p, s):
        return functional_call(method.f_v, dict(zip(fv_names, p)), (s,))

    def weights(p, h):
        return functional_call(method.f_w, dict(zip(fw_names, p)), (h,))

    def tc(v, w, z_task, z_all):
        total = 0.0
        if use_v:
            eye = torch.eye(v.shape[1], dtype=v.dtype)
            total = total + red((v.T @ v - eye) ** 2) + red((z_all - z_all @ v @ v.T) ** 2)
        if use_w:
            total = total + c.lambda_s * (red((z_task - w @ v.T) ** 2) + red(w.abs()))
        return total

    def sse(sup, que):
        e = (lambda t: t / t.norm(dim=1, keepdim=True)) if c.sse_normalize else (lambda t: t)
        proto = sum(e(s) for s in sup) / len(sup)
        return red(torch.stack([((e(q) - proto) ** 2).sum(dim=1) for q in que]))

    def pairs(zs):
        return torch.stack([nt_xent(zs[a], zs[b_], 0.5) for a, b_ in combinations(range(len(zs)), 2)]).mean()

    def per_task(fn, *lists):
        return torch.stack([fn(*[[t[k * n:(k + 1) * n] for t in lst] for lst in lists]) for k in range(k_tasks)]).mean()

    with torch.no_grad():
        hs = [feats(theta, x) for x in views]
    z_all = torch.cat(hs)
    s = torch.cat([z_all.mean(dim=0, keepdim=True), torch.cov(z_all.T)])
    th_fixed = [t.detach() for t in theta]

    def support1(p):
        v = factors(p[:nv], s)
        ws = [weights(p[nv:], h) for h in hs[:ms]]
        ssl = per_task(pairs, [proj(th_fixed, w @ v.T) for w in ws])
        return ssl + tc(v, torch.cat(ws), torch.cat(hs[:ms]), z_all)

    def query1(p):
        v = factors(p[:nv], s)
        wq = [weights(p[nv:], h) for h in hs[ms:]]
        if c.query_loss == "sse":
            ws = [weights(p[nv:], h) for h in hs[:ms]]
            q = per_task(sse, [w @ v.T for w in ws], [w @ v.T for w in wq])
        else:
            q = per_task(pairs, [proj(th_fixed, w @ v.T) for w in wq])
        return q + tc(v, torch.cat(wq), torch.cat(hs[ms:]), z_all)

    if c.variant == "no_bilevel":
        g_psi = torch.autograd.grad(support1(psi) + query1(psi), psi)
    else:
        gi = torch.autograd.grad(support1(psi), psi, create_graph=True)
        g_psi = torch.autograd.grad(query1([p - c.tc_inner_lr * g for p, g in zip(psi, gi)]), psi)
    psi_new = [(p - c.tc_lr * g).detach() for p, g in zip(psi, g_psi)]

    v2 = factors(psi_new[:nv], s).detach()

    def hc(th, x):
        return weights(psi_new[nv:], feats(th, x)) @ v2.T

    grads = [torch.zeros_like(t) for t in theta]
    for k in range(k_tasks):
        xs = [x[k * n:(k + 1) * n] for x in views]

        def inner(th):
            return pairs([proj(th, hc(th, x)) for x in xs[:ms]])

        def outer(th):
            if c.query_loss == "sse":
                return sse([hc(th, x) for x in xs[:ms]], [hc(th, x) for x in xs[ms:]])
            return pairs([proj(th, hc(th, x)) for x in xs[ms:]])

        if c.variant == "no_bilevel":
            g = torch.autograd.grad(inner(theta) + outer(theta), theta)
        else:
            gi = torch.autograd.grad(inner(theta), theta, create_graph=True)
            g = torch.autograd.grad(outer([t - c.inner_lr * gg for t, gg in zip(theta, gi)]), theta)
        grads = [acc + gg / k_tasks for acc, gg in zip(grads, g)]
    return psi_new, grads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("query_loss,reduction,lr", [("sse", "mean", 0.1), ("ssl", "sum", 1e-3)])
def test_two_stage_step_equals_hand_unrolled_eq4_to_eq7(variant, query_loss, reduction, lr):
    # the paper's sums make ψ's gradient ~1e3 larger here: a 0.1 step would kill f_w's ReLUs (and the test)
    _, net, method, views = tiny_setup(variant=variant, query_loss=query_loss, reduction=reduction, tc_lr=lr,
                                       tc_inner_lr=2 * lr)
    psi_ref, theta_ref = reference_step(net, method, views)
    logs = method.compute_grads(net, views)
    for got, ref in zip(method.meta_parameters(), psi_ref):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-9, atol=1e-12)
    for p, ref in zip(net.parameters(), theta_ref):
        torch.testing.assert_close(p.grad, ref, rtol=1e-9, atol=1e-12)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert logs["psi_grad_norm"] > 0
    assert any(float(p.grad.abs().sum()) > 0 for p in net.backbone.parameters())


def test_hand_reference_depends_on_the_inner_step():
    # guard against a vacuous comparison: the bi-level meta-gradient differs from the one-stage gradient
    _, net, method, views = tiny_setup()
    psi_b, th_b = reference_step(net, method, views)
    _, net2, method2, views2 = tiny_setup(variant="no_bilevel")
    psi_j, th_j = reference_step(net2, method2, views2)
    assert max(float((a - b).abs().max()) for a, b in zip(th_b, th_j)) > 1e-3
    assert max(float((a - b).abs().max()) for a, b in zip(psi_b, psi_j)) > 1e-4


def test_aid_fd_matches_second_order_on_a_smooth_net():
    # holds only because the inner update of Eq. 4 is a true gradient (L_w not detached from f_v; module docstring)
    grads = {}
    for engine, args in (("second_order", {}), ("aid_fd", {"fd_r": 1e-5})):
        _, net, method, views = tiny_setup(hypergrad=engine, hypergrad_args=args)
        method.compute_grads(net, views)
        grads[engine] = ([p.detach().clone() for p in method.meta_parameters()],
                         [p.grad.clone() for p in net.parameters()])
    for a, b in zip(grads["aid_fd"][0] + grads["aid_fd"][1], grads["second_order"][0] + grads["second_order"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("engine", ["first_order", "aid_cg", "aid_neumann"])
def test_other_engines_run_and_give_finite_gradients(engine):
    _, net, method, views = tiny_setup(hypergrad=engine)
    before = [p.detach().clone() for p in method.meta_parameters()]
    logs = method.compute_grads(net, views)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, method.meta_parameters()))


def test_lv_gives_f_w_no_gradient_and_lw_reaches_both_networks():
    _, net, method, _ = tiny_setup(variant="no_lw")  # L_tc² = L_v only
    z = torch.randn(10, 4, dtype=torch.float64)
    total = method._tc2(method.f_v(batch_statistics(z)), method.f_w(z), z, z, None)
    assert all(g is None for g in torch.autograd.grad(total, list(method.f_w.parameters()), allow_unused=True))
    _, _, method2, _ = tiny_setup(variant="no_lv")  # L_tc² = λ_s L_w: Eq. 3 differentiated as one function
    total = method2._tc2(method2.f_v(batch_statistics(z)), method2.f_w(z), z, z, None)
    grads = torch.autograd.grad(total, method2.meta_parameters())
    n_fv = len(list(method2.f_v.parameters()))
    assert float(sum(g.abs().sum() for g in grads[:n_fv])) > 0 and float(sum(g.abs().sum() for g in grads[n_fv:])) > 0


def test_support_and_query_see_the_right_views_and_tasks_are_separate():
    _, net, method, views = tiny_setup()
    theta = list(net.parameters())
    ms = method.cfg.n_support
    sl = slice(0, 4)  # task 0 of 2

    def stage2(vs):
        sup, que, _ = method._stage2_losses(net, [x[sl] for x in vs[:ms]], [x[sl] for x in vs[ms:]],
                                            torch.eye(4, 3, dtype=torch.float64), None, None)
        return sup(theta, []).item(), que(theta, []).item()

    base = stage2(views)
    new_query = views[:ms] + [v + 1.0 for v in views[ms:]]
    assert stage2(new_query)[0] == base[0] and stage2(new_query)[1] != base[1]  # support loss ignores queries
    new_support = [views[0] + 1.0] + views[1:]
    assert stage2(new_support)[0] != base[0]
    other_task = [torch.cat([v[:4], v[4:] + 5.0]) for v in views]  # change only task 1's images
    assert stage2(other_task) == base


def test_determinism_same_seed_same_step():
    results = []
    for _ in range(2):
        _, net, method, views = tiny_setup()
        logs = method.compute_grads(net, views)
        results.append((logs, [p.detach().clone() for p in method.meta_parameters()],
                        [p.grad.clone() for p in net.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1] + results[0][2], results[1][1] + results[1][2]):
        assert torch.equal(a, b)


def test_non_finite_stage_one_leaves_f_v_f_w_untouched():
    _, net, method, views = tiny_setup()
    before = [p.detach().clone() for p in method.meta_parameters()]
    views[0][0, 0, 0, 0] = float("nan")
    logs = method.compute_grads(net, views)
    assert logs["loss"] != logs["loss"]  # NaN: the trainer stops before its optimizer step
    for a, b in zip(before, method.meta_parameters()):
        assert torch.equal(a, b.detach())


def test_data_parallel_f_v_f_w_update_uses_the_rank_averaged_gradient(monkeypatch):
    import bilevel_ssl.distributed as distributed

    _, net, method, views = tiny_setup()
    start = [p.detach().clone() for p in method.meta_parameters()]
    method.compute_grads(net, views)
    step_single = [a - p.detach() for a, p in zip(start, method.meta_parameters())]

    calls = []

    def fake_reduce(params, dist, op):  # stands in for the all-reduce: the mean over ranks is 1.5x ours
        calls.append(op)
        for p in params:
            p.grad = 1.5 * p.grad

    monkeypatch.setattr(distributed, "reduce_grads", fake_reduce)
    _, net2, method2, views2 = tiny_setup()
    method2.dist = object()
    method2.compute_grads(net2, views2)
    assert calls == ["mean"]
    for a, p, s in zip(start, method2.meta_parameters(), step_single):
        torch.testing.assert_close(a - p.detach(), 1.5 * s)
    assert all(p.grad is None for p in method2.meta_parameters())  # ψ never carries .grad for the trainer


def test_batchnorm_running_stats_advance_once_per_step():
    torch.manual_seed(0)
    cfg = TrainConfig(meta="tc2", hypergrad="aid_fd", batch_size=8, meta_args={"n_tasks": 2}, progress=False,
                      objective_args={"proj_hidden": 8, "proj_dim": 4})
    objective = make_objective("simclr", **cfg.objective_args)
    backbone = make_backbone("conv4", 3, width=4)
    net = SSLNet(backbone, objective.heads(backbone.feature_dim))
    method = TC2(objective, net, cfg)
    bn, head_bn = net.backbone.features[1], net.heads["projector"].net[1]
    before = bn.running_mean.clone()
    method.compute_grads(net, [torch.rand(8, 3, 28, 28) for _ in range(4)])
    assert int(bn.num_batches_tracked) == 1 == int(head_bn.num_batches_tracked)
    assert not torch.equal(bn.running_mean, before)


# ------------------------------------------------------------------------------------------- configuration

BAD_OPTIONS = [
    ({"n_tasks": 3}, "meta_args.n_tasks", "allowed: 1, 2, 4"),
    ({"n_tasks": 0}, "meta_args.n_tasks", "must be an integer >= 1"),
    ({"n_views": 1}, "meta_args.n_views", "must be an integer >= 2"),
    ({"n_support": 1}, "meta_args.n_support", "allowed for n_views=4: 2, 3"),
    ({"n_support": 4}, "meta_args.n_support", "allowed for n_views=4: 2, 3"),
    ({"n_views": 2}, "meta_args.n_support", "none (raise n_views)"),
    ({"query_loss": "ssl", "n_support": 3}, "meta_args.n_views", "allowed n_views for n_support=3: >= 5"),
    ({"n_f": -1}, "meta_args.n_f", "must be an integer >= 0"),
    ({"n_f": 2.5}, "meta_args.n_f", "must be an integer >= 0"),
    ({"lambda_s": -0.1}, "meta_args.lambda_s", "must be a finite number >= 0"),
    ({"lambda_s": float("inf")}, "meta_args.lambda_s", "finite number"),
    ({"variant": "no_tasks"}, "meta_args.variant", "allowed: full, no_lv, no_lw, no_lv_lw, no_bilevel"),
    ({"query_loss": "mse"}, "meta_args.query_loss", "allowed: sse, ssl"),
    ({"inner_lr": 0.0}, "meta_args.inner_lr", "must be a finite number > 0"),
    ({"inner_steps": 0}, "meta_args.inner_steps", "must be an integer >= 1"),
    ({"tc_inner_lr": -1.0}, "meta_args.tc_inner_lr", "must be a finite number > 0"),
    ({"tc_lr": "0.1"}, "meta_args.tc_lr", "finite number"),
    ({"fv_hidden": 0}, "meta_args.fv_hidden", "must be an integer >= 1"),
    ({"fw_hidden": True}, "meta_args.fw_hidden", "must be an integer >= 1"),
    ({"reduction": "max"}, "meta_args.reduction", "allowed: mean, sum"),
    ({"sse_normalize": 1}, "meta_args.sse_normalize", "true or false"),
    ({"n_task": 2}, "meta_args", "unknown tc2 option(s) ['n_task']; allowed: n_tasks, n_views"),
]


@pytest.mark.parametrize("meta_args,key,fragment", BAD_OPTIONS)
def test_every_option_error_names_its_key_and_allowed_values(meta_args, key, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig(meta="tc2", batch_size=8, meta_args=meta_args)
    assert str(err.value).startswith(key + ":")
    assert fragment in str(err.value)


@pytest.mark.parametrize("overrides,key,fragment", [
    ({"hypergrad": "momentum_proxy"}, "hypergrad", "allowed: second_order, first_order, aid_fd, aid_cg, aid_neumann"),
    ({"hypergrad_args": {"fd_r": 0.1}}, "hypergrad_args", "fd_r"),
    ({"objective": "mae", "backbone": "vit_tiny"}, "objective", "allowed: simclr"),
])
def test_engine_and_objective_errors(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{"meta": "tc2", "batch_size": 8, **overrides})
    assert str(err.value).startswith(key + ":")
    assert fragment in str(err.value)


def test_defaults_are_valid_and_documented_values():
    c = TC2Config()
    assert (c.n_tasks, c.lambda_s, c.n_f, c.variant) == (4, 0.1, 0, "full")  # App. IV, Table 10, Table 9
    assert TC2Config(n_f=0).factors(256) == 256 and TC2Config(n_f=64).factors(256) == 64
    TrainConfig(meta="tc2", batch_size=256)  # the defaults pass check_config


TWO_VIEW = [o for o in OBJECTIVES if objective_class(o).n_views == 2]
SMALL = {"simclr": {"proj_hidden": 8, "proj_dim": 4}, "moco_v2": {"proj_hidden": 8, "proj_dim": 4, "queue_size": 16},
         "byol": {"proj_hidden": 8, "proj_dim": 4, "pred_hidden": 8},
         "simsiam": {"proj_hidden": 8, "proj_dim": 4},
         "dino": {"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4},
         "barlow_twins": {"proj_hidden": 8, "proj_dim": 8}, "vicreg": {"proj_hidden": 8, "proj_dim": 8},
         "swav": {"proj_hidden": 8, "proj_dim": 4, "n_prototypes": 5}}
# losses ~10-25x SimCLR's need ~25x smaller steps (bilevel_ssl.experiments.RECIPES gives GeSSL the same 0.004)
RATES = {o: {"inner_lr": 0.004, "tc_inner_lr": 0.004, "tc_lr": 0.004} for o in ("barlow_twins", "vicreg")}


@pytest.mark.parametrize("name", TWO_VIEW)
def test_every_two_view_objective_runs_one_step(name):
    torch.manual_seed(0)
    cfg = TrainConfig(objective=name, meta="tc2", batch_size=8, meta_args={"n_tasks": 2, **RATES.get(name, {})},
                      progress=False, objective_args=SMALL[name])
    objective = make_objective(name, **cfg.objective_args)
    backbone = make_backbone("conv4", 3, width=4)
    net = SSLNet(backbone, objective.heads(backbone.feature_dim))
    method = TC2(objective, net, cfg)
    logs = method.compute_grads(net, [torch.rand(8, 3, 28, 28) for _ in range(4)])
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert any(float(p.grad.abs().sum()) > 0 for p in net.backbone.parameters())
    method.after_step(net, 0.5)  # teacher EMA and the objective's state (queue, centre) from the step's outputs


# -------------------------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("objective,args", [("simclr", {"proj_hidden": 16, "proj_dim": 8}),
                                            ("byol", {"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16})])
def test_training_through_the_trainer_gives_finite_losses(tiny, objective, args):
    cfg = TrainConfig(objective=objective, meta="tc2", batch_size=16, epochs=2, lr=0.05, progress=False,
                      objective_args=args, backbone_args={"width": 8}, meta_args={"n_tasks": 2})
    result = train(cfg, tiny)
    for rec in result.history:
        for key in ("loss", "inner_ssl", "tc_support", "tc_query", "l_v", "l_w", "psi_grad_norm"):
            assert torch.isfinite(torch.tensor(rec[key])), (key, rec)


def test_interrupted_run_resumes_exactly_with_f_v_and_f_w(tiny, tmp_path):
    cfg = TrainConfig(meta="tc2", batch_size=16, epochs=2, lr=0.05, progress=False, checkpoint_every=1,
                      objective_args={"proj_hidden": 16, "proj_dim": 8}, backbone_args={"width": 8},
                      meta_args={"n_tasks": 2})
    full = train(cfg, tiny, tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_after_first_epoch(epoch, record):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tiny, tmp_path / "part", callbacks=(stop_after_first_epoch,))
    resumed = train(cfg, tiny, tmp_path / "part")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=False)
    for part in ("f_v", "f_w"):
        assert a["meta"][part].keys() == b["meta"][part].keys()
        assert all(torch.equal(a["meta"][part][k], b["meta"][part][k]) for k in a["meta"][part])
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


# ------------------------------------------------------------------------------------------------ torchrun


def test_torchrun_two_ranks_keep_f_v_f_w_and_the_encoder_in_sync(tmp_path):
    """2 CPU processes (gloo): every rank updates f_v, f_w in place, so they stay equal only if the stage-1
    gradient is averaged over ranks (the trainer all-reduces only the optimizer's parameters)."""
    import json
    import os
    import subprocess
    import sys

    cfg = {"meta": "tc2", "batch_size": 16, "epochs": 1, "lr": 0.05, "progress": False, "backbone_args": {"width": 4},
           "objective_args": {"proj_hidden": 8, "proj_dim": 4}, "meta_args": {"n_tasks": 2}}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, json.dumps(cfg), str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for part in ("f_v", "f_w"):
        assert all(torch.equal(a["meta"][part][k], b["meta"][part][k]) for k in a["meta"][part])
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert any(not torch.equal(a["meta"]["f_w"][k], a["f_w_start"][k]) for k in a["f_w_start"])  # ψ was trained
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in a["history"])


def _torchrun_worker(cfg_json: str, out: str) -> None:
    """``python -m torch.distributed.run ... tests/test_tc2.py CONFIG_JSON OUT_DIR``: train on the tests' tiny set
    and save this rank's network, f_v / f_w (the meta-method, reached through a step monitor) and history."""
    import json
    import os
    from pathlib import Path

    from bilevel_ssl.data import load_dataset

    torch.set_num_threads(1)
    held = {}

    def grab(step, net, meta, views):
        if "meta" not in held:
            held["meta"], held["f_w_start"] = meta, {k: v.clone() for k, v in meta.f_w.state_dict().items()}
        return {}

    data = load_dataset("mnistm5k").subset(torch.arange(0, 5000, 52)[:96], "tiny")
    result = train(TrainConfig.from_dict(json.loads(cfg_json)), data, step_monitors=(grab,))
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"net": result.net.state_dict(), "meta": held["meta"].state_dict(), "f_w_start": held["f_w_start"],
                "history": result.history}, Path(out) / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import sys

    _torchrun_worker(sys.argv[1], sys.argv[2])
