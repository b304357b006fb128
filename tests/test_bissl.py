"""BiSSL stage: the implicit upper-level gradient against closed forms and explicit Hessians, the two steps of
Algorithm 1 against independent autograd, clipping, batching (App. B.4), BatchNorm re-estimation (App. C.2),
determinism, errors, and a tiny end-to-end pipeline.

float64 wherever the check is about the maths (agreement up to rounding); tolerances are stated per test.
"""

import copy
import math
import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import warnings

from bilevel_ssl.bissl import (
    BatchStack,
    balanced_subset,
    CGResidualError,
    CGResidualWarning,
    cg_solve,
    BiSSLConfig,
    BiSSLStage,
    DownstreamHead,
    FinetuneConfig,
    PretextData,
    PretextModel,
    cg_diagnostics,
    clip_gradients,
    hessian_extremes,
    continue_pretext,
    equivalent_epochs,
    feature_normalizer,
    ig_matvec,
    implicit_gradient,
    learning_check_task,
    prepare_downstream,
    reestimate_bn,
    run_bissl,
    run_pipeline,
    upper_backbone_gradient,
    warmup_head,
)
from bilevel_ssl.config import TrainConfig
from bilevel_ssl.data import ImageSet
from bilevel_ssl.hypergrad import InnerHessian, conjugate_gradient
from bilevel_ssl.meta import SingleLevel
from bilevel_ssl.trainer import build_net

DT = torch.float64
SHAPES = [(3,), (2, 2)]  # 7 unknowns in two tensors


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def split(x, shapes=SHAPES):
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(x[i:i + n].reshape(s).clone())
        i += n
    return out


def spd(n, lo, hi, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    return q @ torch.diag(torch.linspace(lo, hi, n, dtype=DT)) @ q.T


# ---------------------------------------------------------------------------------------------------------------------
# the implicit gradient on a quadratic bilevel problem with a closed-form answer


def quadratic_problem(seed=0, lam=0.3):
    g = torch.Generator().manual_seed(seed)
    A = spd(7, 0.5, 4.0, g)                      # lower: ½θᵀAθ − bᵀθ + λ/2‖θ − θ_D‖²
    b = torch.randn(7, generator=g, dtype=DT)
    C = spd(7, 0.2, 3.0, g)                      # upper: L_D(θ) = ½θᵀCθ − dᵀθ
    d = torch.randn(7, generator=g, dtype=DT)
    theta_D = torch.randn(7, generator=g, dtype=DT)
    return A, b, C, d, theta_D, lam


def test_closed_form_reference_is_right():
    """θ_P*(θ_D) = (A + λI)⁻¹(b + λθ_D) is the lower minimiser and dθ_P*/dθ_D = (I + A/λ)⁻¹ (Eq. 6)."""
    A, b, C, d, theta_D, lam = quadratic_problem()
    sol = lambda td: torch.linalg.solve(A + lam * torch.eye(7, dtype=DT), b + lam * td)
    tp = sol(theta_D)
    torch.testing.assert_close(A @ tp - b + lam * (tp - theta_D), torch.zeros(7, dtype=DT), atol=1e-12, rtol=0)
    J = torch.autograd.functional.jacobian(sol, theta_D)
    torch.testing.assert_close(J, torch.linalg.inv(torch.eye(7, dtype=DT) + A / lam), atol=1e-12, rtol=0)


def test_upper_gradient_matches_closed_form_on_quadratic():
    """Pipeline code path (InnerHessian HVPs -> ig_matvec -> hypergrad CG -> + direct term) with λ_damp = 0 and
    enough iterations equals dF/dθ_D of F(θ_D) = L_D(θ_P*(θ_D)) + L_D(θ_D), differentiated by autograd through the
    exact linear solve (Eq. 4 and 7)."""
    A, b, C, d, theta_D, lam = quadratic_problem()
    L_D = lambda th: 0.5 * th @ C @ th - d @ th

    def F_upper(td):
        tp = torch.linalg.solve(A + lam * torch.eye(7, dtype=DT), b + lam * td)
        return L_D(tp) + L_D(td)

    exact = torch.autograd.functional.jacobian(F_upper, theta_D)
    tp = torch.linalg.solve(A + lam * torch.eye(7, dtype=DT), b + lam * theta_D)
    H = InnerHessian(lambda th, _: 0.5 * flat(th) @ A @ flat(th) - b @ flat(th), split(tp))
    v, direct = split(C @ tp - d), split(C @ theta_D - d)
    v_ig, res = implicit_gradient(H.hvp, v, lam=lam, damping=0.0, iters=7, layerwise=False, residual=True)
    g = upper_backbone_gradient(v_ig, direct, 1.0)
    torch.testing.assert_close(flat(g), exact, atol=1e-9, rtol=0)
    assert res < 1e-9


def test_damping_replaces_lambda_as_in_algorithm_2():
    """λ_damp > 0: the solve is (I + H/(λ + λ_damp))⁻¹ v (Alg. 2), not Eq. 7's (I + H/λ)⁻¹ v."""
    A, b, C, d, theta_D, lam = quadratic_problem(seed=1)
    v = torch.randn(7, generator=torch.Generator().manual_seed(5), dtype=DT)
    hvp = lambda vs: split(A @ flat(vs))
    x, _ = implicit_gradient(hvp, split(v), lam=lam, damping=10.0, iters=7, layerwise=False)
    want = torch.linalg.solve(torch.eye(7, dtype=DT) + A / (lam + 10.0), v)
    torch.testing.assert_close(flat(x), want, atol=1e-10, rtol=0)
    not_eq7 = torch.linalg.solve(torch.eye(7, dtype=DT) + A / lam, v)
    assert (flat(x) - not_eq7).norm() > 0.1 * want.norm()
    # the matvec itself
    torch.testing.assert_close(flat(ig_matvec(hvp, lam, 10.0)(split(v))), v + A @ v / (lam + 10.0), atol=1e-12, rtol=0)


def test_few_cg_iterations_are_approximate_and_the_residual_says_so():
    A, b, C, d, theta_D, lam = quadratic_problem(seed=2, lam=0.05)  # I + A/λ: condition number ~ 70
    v = split(torch.randn(7, generator=torch.Generator().manual_seed(3), dtype=DT))
    hvp = lambda vs: split(A @ flat(vs))
    _, r1 = implicit_gradient(hvp, v, lam=lam, damping=0.0, iters=1, layerwise=False, residual=True)
    _, r3 = implicit_gradient(hvp, v, lam=lam, damping=0.0, iters=3, layerwise=False, residual=True)
    _, r7 = implicit_gradient(hvp, v, lam=lam, damping=0.0, iters=7, layerwise=False, residual=True)
    assert r1 > r3 > r7 and r1 > 0.05 and r7 < 1e-8
    _, r_none = implicit_gradient(hvp, v, lam=lam, damping=0.0, iters=1, layerwise=False)
    assert math.isnan(r_none)  # not computed unless asked (it costs one more HVP)


def test_layerwise_cg_on_block_diagonal_problem():
    """Per-tensor step sizes make CG exact on each block: blocks of 3 and 4 unknowns are solved after 4 iterations,
    while one global step size needs all 7 (distinct eigenvalues)."""
    g = torch.Generator().manual_seed(4)
    B1, B2 = spd(3, 0.5, 5.0, g), spd(4, 1.0, 9.0, g)
    M = torch.block_diag(B1, B2)
    v = torch.randn(7, generator=g, dtype=DT)
    lam = 0.7
    hvp = lambda vs: [B1 @ vs[0], (B2 @ vs[1].reshape(-1)).reshape(2, 2)]
    want = torch.linalg.solve(torch.eye(7, dtype=DT) + M / lam, v)
    x_lw, r_lw = implicit_gradient(hvp, split(v), lam=lam, damping=0.0, iters=4, layerwise=True, residual=True)
    torch.testing.assert_close(flat(x_lw), want, atol=1e-10, rtol=0)
    x_gl, r_gl = implicit_gradient(hvp, split(v), lam=lam, damping=0.0, iters=4, layerwise=False, residual=True)
    assert (flat(x_gl) - want).norm() > 1e-6 and r_gl > 1e-6 > r_lw
    # on a coupled (not block-diagonal) operator the per-tensor steps are a heuristic, not a solver: it does not
    # reach the solution even with many iterations, which global CG reaches in 7
    A = spd(7, 0.5, 4.0, g)
    hvp_full = lambda vs: split(A @ flat(vs))
    want = torch.linalg.solve(torch.eye(7, dtype=DT) + A / lam, v)
    x_lw, _ = implicit_gradient(hvp_full, split(v), lam=lam, damping=0.0, iters=50, layerwise=True)
    x_gl, _ = implicit_gradient(hvp_full, split(v), lam=lam, damping=0.0, iters=7, layerwise=False)
    torch.testing.assert_close(flat(x_gl), want, atol=1e-9, rtol=0)
    assert (flat(x_lw) - want).norm() > 1e-3 * want.norm()


def test_hessian_extremes_of_an_indefinite_matrix():
    g = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=DT))
    M = q @ torch.diag(torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.0, 4.0, 9.0], dtype=DT)) @ q.T
    lo, hi = hessian_extremes(lambda vs: split(M @ flat(vs)), split(torch.zeros(7, dtype=DT)), iters=300)
    assert lo == pytest.approx(-3.0, abs=1e-6) and hi == pytest.approx(9.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# a tiny network: HVP vs explicit Hessian, the two steps of Algorithm 1


def tiny_pretext(seed=0, momentum=0.0, dtype=DT, objective="simclr"):
    args = {"temperature": 0.5, "proj_hidden": 4, "proj_dim": 3} if objective == "simclr" else \
        {"proj_hidden": 4, "proj_dim": 3, "pred_hidden": 4}
    cfg = TrainConfig(objective=objective, objective_args=args, backbone="conv4", backbone_args={"width": 2},
                      batch_size=8, lr=0.1, momentum=momentum, weight_decay=0.0, seed=seed, progress=False)
    net, obj = build_net(cfg, 3, 16)
    net.to(dtype)
    meta = SingleLevel(obj, net)
    return PretextModel(net, obj, meta.teacher, cfg)


def tiny_images(n=16, size=16, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                    torch.arange(n) % classes, "tiny")


def tiny_stage(cfg_kw=None, seed=0):
    pm = tiny_pretext(seed)
    down = tiny_images(16, seed=1)
    cfg = BiSSLConfig(**{"alternations": 2, "lower_steps": 1, "upper_steps": 1, "lower_warmup": 0,
                         "downstream_batch_size": 8, "warmup_epochs": 0, "progress": False, **(cfg_kw or {})})
    head = DownstreamHead(pm.net.backbone.feature_dim, 4).to(DT)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=torch.Generator().manual_seed(7),
                                             dtype=DT))
    return BiSSLStage(pm, head, tiny_images(16, seed=2), down, cfg), pm


def fixed_views(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 16, 16, generator=g, dtype=DT) for _ in range(2)]


def explicit_pretext_hessian(stage, views):
    """∇²_θ L_P by torch.autograd.functional.hessian of the loss as a function of the flat backbone vector."""
    net, obj = stage.net, stage.objective
    names = [f"backbone.{k}" for k, _ in net.backbone.named_parameters()]
    shapes = [p.shape for p in net.backbone.parameters()]
    heads = {k: p.detach() for k, p in net.named_parameters() if not k.startswith("backbone.")}
    x = torch.cat(views)

    def f(z):
        ts = split(z, shapes)
        tensors = {**heads, **{k: b.clone() for k, b in net.named_buffers()}, **dict(zip(names, ts))}
        out = functional_call(net, tensors, (x,))
        zs = out["z"].chunk(2)
        return obj.loss([{"z": zs[0]}, {"z": zs[1]}], None)

    theta0 = flat([p.detach() for p in net.backbone.parameters()])
    return torch.autograd.functional.hessian(f, theta0), theta0


def test_pretext_hvp_matches_explicit_hessian_and_leaves_bn_stats():
    stage, _ = tiny_stage()
    views = fixed_views()
    before = {k: b.clone() for k, b in stage.net.named_buffers()}
    H = stage.pretext_hessian(views)
    Hx, theta0 = explicit_pretext_hessian(stage, views)
    assert Hx.shape[0] == sum(p.numel() for p in stage.net.backbone.parameters()) > 100
    torch.testing.assert_close(Hx, Hx.T, atol=1e-9, rtol=0)
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        v = torch.randn(len(theta0), generator=g, dtype=DT)
        shapes = [p.shape for p in stage.net.backbone.parameters()]
        torch.testing.assert_close(flat(H.hvp(split(v, shapes))), Hx @ v, atol=1e-9, rtol=1e-9)
    for k, b in stage.net.named_buffers():  # HVP forwards ran on copies of the BatchNorm buffers
        assert torch.equal(b, before[k]), k


def test_upper_step_equals_exact_implicit_gradient_on_tiny_net():
    """One upper step with SGD lr 1 (no momentum, weight decay or clipping) moves θ_D by exactly
    −([I + H/(λ+λ_damp)]⁻¹ ∇_θ L_D(θ_P, ϕ_D) + γ ∇_θ L_D(θ_D, ϕ_D)) with H the explicit Hessian, and ϕ_D by
    −(∇_ϕ L_D(θ_P, ϕ_D) + γ ∇_ϕ L_D(θ_D, ϕ_D))."""
    gamma, lam, damp = 0.5, 1e-3, 50.0
    stage, _ = tiny_stage({"downstream_lr": 1.0, "downstream_momentum": 0.0, "downstream_weight_decay": 0.0,
                           "clip_norm": 0.0, "cg_iters": 80, "cg_layerwise": False, "cg_damping": damp, "lam": lam,
                           "direct_weight": gamma})
    # move θ_D away from θ_P so that the two terms differ
    with torch.no_grad():
        for p in stage.theta_D:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(11), dtype=DT))
    views = fixed_views()
    Hx, _ = explicit_pretext_hessian(stage, views)
    H = stage.pretext_hessian(views)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(12), dtype=DT)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    head, bbD, bbP = copy.deepcopy(stage.head), copy.deepcopy(stage.backbone_D), copy.deepcopy(stage.net.backbone)
    lp = F.cross_entropy(head(bbP(x)), y)
    ld = F.cross_entropy(head(bbD(x)), y)
    v = flat(torch.autograd.grad(lp, list(bbP.parameters()), retain_graph=True))
    direct = flat(torch.autograd.grad(ld, list(bbD.parameters()), retain_graph=True))
    g_phi = flat(torch.autograd.grad(lp + gamma * ld, list(head.parameters())))
    n = len(v)
    want_theta = torch.linalg.solve(torch.eye(n, dtype=DT) + Hx / (lam + damp), v) + gamma * direct
    theta_before = flat([p.detach().clone() for p in stage.theta_D])
    phi_before = flat([p.detach().clone() for p in stage.head.parameters()])
    logs = stage.upper_step(x, y, H, residual=True)
    torch.testing.assert_close(theta_before - flat(stage.theta_D), want_theta, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(phi_before - flat(list(stage.head.parameters())), g_phi, atol=1e-10, rtol=1e-9)
    assert logs["cg_residual"] < 1e-8
    assert logs["upper_loss"] == pytest.approx(float(lp.detach()), abs=1e-12)


def test_lower_step_adds_the_proximal_gradient():
    """g_θP = ∇_θ L_P + λ(θ_P − θ_D), g_ϕP = ∇_ϕ L_P (Algorithm 1), checked by one SGD step (lr 0.1, no momentum)."""
    lam = 0.7
    stage, _ = tiny_stage({"lam": lam, "clip_norm": 0.0, "lower_lr": 0.1, "lower_weight_decay": 0.0})
    with torch.no_grad():
        for p in stage.theta_D:
            p.add_(0.1)
    ref = copy.deepcopy(stage.net)
    views = fixed_views()
    out = stage.objective.outputs(ref, torch.cat(views), 2)
    loss = stage.objective.loss(out, None)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    names = [k for k, _ in ref.named_parameters()]
    theta_D = dict(zip([f"backbone.{k}" for k, _ in stage.backbone_D.named_parameters()], stage.theta_D))
    want = {k: p.detach() - 0.1 * (g + (lam * (p.detach() - theta_D[k].detach()) if k in theta_D else 0.0))
            for k, p, g in zip(names, ref.parameters(), grads)}
    logs = stage.lower_step(views)
    for k, p in stage.net.named_parameters():
        torch.testing.assert_close(p.detach(), want[k], atol=1e-12, rtol=0, msg=k)
    assert logs["lower_loss"] == pytest.approx(float(loss.detach()), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# clipping, batching, BatchNorm re-estimation


def test_clip_gradients():
    ps = [nn.Parameter(torch.zeros(2, dtype=DT)), nn.Parameter(torch.zeros(1, dtype=DT)),
          nn.Parameter(torch.zeros(1, dtype=DT))]
    ps[0].grad, ps[1].grad = torch.tensor([12.0, 9.0], dtype=DT), torch.tensor([20.0], dtype=DT)  # norm 25
    assert clip_gradients(ps, 10.0) == pytest.approx(25.0)
    torch.testing.assert_close(torch.cat([ps[0].grad, ps[1].grad]), torch.tensor([4.8, 3.6, 8.0], dtype=DT))
    ps[0].grad, ps[1].grad = torch.tensor([3.0, 0.0], dtype=DT), torch.tensor([4.0], dtype=DT)     # norm 5: kept
    assert clip_gradients(ps, 10.0) == pytest.approx(5.0)
    torch.testing.assert_close(ps[1].grad, torch.tensor([4.0], dtype=DT))
    ps[1].grad = torch.tensor([400.0], dtype=DT)
    assert clip_gradients(ps, 0.0) == pytest.approx(math.hypot(3, 400))                             # 0: no clip
    assert float(ps[1].grad) == 400.0


def test_upper_step_is_clipped():
    """With clip_norm c and plain SGD at lr 1, the upper parameters move by exactly c when the gradient is larger."""
    stage, _ = tiny_stage({"downstream_lr": 1.0, "downstream_momentum": 0.0, "downstream_weight_decay": 0.0,
                           "clip_norm": 1e-3})
    before = flat([p.detach().clone() for p in [*stage.theta_D, *stage.head.parameters()]])
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=DT)
    logs = stage.upper_step(x, torch.arange(8) % 4, stage.pretext_hessian(fixed_views()))
    after = flat([p.detach() for p in [*stage.theta_D, *stage.head.parameters()]])
    assert logs["upper_grad_norm"] > 1e-3
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-4)  # torch divides by norm + 1e-6


def test_batch_stack_follows_appendix_b4():
    g = torch.Generator().manual_seed(0)
    s = BatchStack(10, 3, g)                      # 3 full batches per permutation
    p1 = s.phase(2)
    assert s.reshuffles == 1 and len(p1) == 2 and all(len(b) == 3 for b in p1)
    assert len(torch.unique(torch.cat(p1))) == 6  # no image twice within a permutation
    p2 = s.phase(2)                               # 1 batch left < 2 needed: reshuffled before the phase
    assert s.reshuffles == 2 and len(torch.unique(torch.cat(p2))) == 6
    s.phase(1)                                    # 1 left >= 1: no reshuffle
    assert s.reshuffles == 2
    small = BatchStack(10, 3, torch.Generator().manual_seed(0))
    batches = small.phase(5)                      # the set holds only 3 batches: reshuffle when one is used up
    assert small.reshuffles == 2 and len(batches) == 5
    assert len(torch.unique(torch.cat(batches[:3]))) == 9
    with pytest.raises(ValueError, match="batch_size"):
        BatchStack(4, 5, g)


def test_reestimate_bn_gives_the_mean_of_batch_statistics():
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    bb[1].running_mean.fill_(5.0)
    images = tiny_images(12, size=8, seed=4).images
    before = copy.deepcopy(bb.state_dict())
    out = reestimate_bn(bb, images, batch_size=4, n_batches=3)   # 3 batches of 4 = one pass over the data
    conv = bb[0](images.float() / 255)
    torch.testing.assert_close(out[1].running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5, rtol=0)
    assert not out.training and int(out[1].num_batches_tracked) == 3 and out[1].momentum == bb[1].momentum
    for k, v in bb.state_dict().items():          # the original is untouched
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------------------------------------------------------------
# warm-up, determinism, baseline, errors, pipeline


def test_feature_normalizer_centres_and_uses_one_scale():
    f = torch.tensor([[0.0, 0.0, 5.0], [2.0, 4.0, 5.00001]])
    mean, scale = feature_normalizer(f)
    torch.testing.assert_close(mean, torch.tensor([1.0, 2.0, 5.000005]))
    # centred: [[-1, -2, -5e-6], [1, 2, 5e-6]] -> mean of squares = (1 + 4 + 1 + 4) / 6 (+ ~0)
    assert float(scale) == pytest.approx(math.sqrt(10 / 6), rel=1e-6)
    head = DownstreamHead(3, 2, mean, scale)
    z = (f - mean) / scale
    torch.testing.assert_close(head(f), head.linear(z))
    assert float(z[:, 2].abs().max()) < 1e-4   # a nearly dead feature stays nearly dead (no per-feature division)


def test_warmup_head_leaves_backbone_and_learns():
    pm = tiny_pretext(dtype=torch.float32)
    down = tiny_images(32, seed=5, classes=2)
    before = copy.deepcopy(pm.backbone.state_dict())
    cfg = BiSSLConfig(warmup_epochs=15, downstream_batch_size=16, downstream_lr=0.1, progress=False)
    head, hist = warmup_head(pm.backbone, down, cfg)
    head2, hist2 = warmup_head(pm.backbone, down, cfg)
    assert len(hist) == 15 and hist[-1]["loss"] < hist[0]["loss"]
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist2]
    assert torch.equal(head.linear.weight, head2.linear.weight)
    for k, v in pm.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert head.standardize and head.linear.out_features == 2


def tiny_run(seed=0, **kw):
    pm = tiny_pretext(dtype=torch.float32)
    cfg = BiSSLConfig(**{"alternations": 2, "lower_steps": 2, "upper_steps": 2, "lower_warmup": 0,
                         "downstream_batch_size": 8, "hvp_batch_size": 8, "warmup_epochs": 1, "seed": seed,
                         "progress": False, **kw})
    return pm, cfg, run_bissl(pm, tiny_images(16, seed=1), tiny_images(24, seed=2), cfg)


def test_bissl_is_deterministic_and_does_not_touch_its_input():
    pm, cfg, a = tiny_run()
    before = copy.deepcopy(pm.net.state_dict())
    _, _, b = tiny_run()
    assert a.history and [{k: v for k, v in r.items() if k != "time_s"} for r in a.history] == \
        [{k: v for k, v in r.items() if k != "time_s"} for r in b.history]
    for (k, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(p, q), k
    _, _, c = tiny_run(seed=1)
    assert c.history[0]["lower_loss"] != a.history[0]["lower_loss"]
    for k, v in pm.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    rec = a.history[-1]
    for key in ("lower_loss", "upper_loss", "cg_residual", "distance", "hvp_loss", "ig_norm", "upper_acc"):
        assert math.isfinite(rec[key]), key
    assert rec["distance"] > 0 and [r["alternation"] for r in a.history] == [1, 2]


def test_baseline_sees_the_same_pretext_steps():
    """continue_pretext runs the lower level of the same seed without coupling: same batches and views; its first
    step is the coupled stage's first step exactly (θ_P = θ_D there, so the proximal gradient is 0)."""
    pm = tiny_pretext(dtype=torch.float32)
    cfg = BiSSLConfig(alternations=2, lower_steps=1, upper_steps=1, lower_warmup=0, downstream_batch_size=8,
                      hvp_batch_size=8, warmup_epochs=0, progress=False, lam=5.0)
    head = DownstreamHead(pm.backbone.feature_dim, 4)
    coupled = BiSSLStage(pm, head, tiny_images(24, seed=2), tiny_images(16, seed=1), cfg)
    alone = BiSSLStage(pm, None, tiny_images(24, seed=2), None, cfg, couple=False)
    b1, b2 = coupled.stack_lower.phase(1)[0], alone.stack_lower.phase(1)[0]
    assert torch.equal(b1, b2)
    coupled.lower_step(coupled.views(b1, coupled.gen_lower))
    alone.lower_step(alone.views(b2, alone.gen_lower))
    for p, q in zip(coupled.net.parameters(), alone.net.parameters()):
        assert torch.equal(p, q)
    base = continue_pretext(pm, tiny_images(24, seed=2), cfg)
    assert base.backbone_D is None and len(base.history) == 2 and math.isnan(base.history[0]["distance"])
    assert equivalent_epochs(cfg, pm.cfg, 24) == pytest.approx(2 * 1 * 8 / 24)


@pytest.mark.parametrize("kwargs, needle", [
    ({"lam": 0.0}, "bissl.lam: must be a finite number > 0, got 0.0"),
    ({"lam": "1e-3"}, "bissl.lam: must be a finite number > 0, got str '1e-3'.*1.0e-3"),
    ({"cg_iters": -1}, "bissl.cg_iters"),
    ({"cg_layerwise": 1}, "bissl.cg_layerwise: must be true or false, got int 1"),
    ({"alternations": 0}, "bissl.alternations"),
    ({"lower_warmup": 10, "alternations": 5}, "bissl.lower_warmup: must be < alternations"),
    ({"upper_schedule": "linear"}, "bissl.upper_schedule: .*allowed: cosine, constant"),
    ({"device": "tpu"}, "bissl.device: .*allowed: cpu, cuda, auto"),
    ({"downstream_augment": "nope"}, "bissl.downstream_augment: .*allowed"),
    ({"teacher_momentum": 1.5}, "bissl.teacher_momentum"),
    ({"clip_norm": float("nan")}, "bissl.clip_norm: must be a finite number >= 0"),
    ({"hvp_batch_size": 1}, "bissl.hvp_batch_size: must be an integer >= 2 or None"),
    ({"downstream_momentum": 1.0}, r"bissl.downstream_momentum: must be a number in \[0, 1\), got 1.0"),
    ({"cg_on_residual": "ignore"}, "bissl.cg_on_residual: unknown value 'ignore'; allowed: warn, stop, global"),
    ({"cg_max_residual": 0.0}, "bissl.cg_max_residual: must be a finite number > 0"),
    ({"cg_max_residual": "0.5"}, "bissl.cg_max_residual: must be a finite number > 0, got str"),
])
def test_config_errors_name_the_key(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        BiSSLConfig(**kwargs)


def test_more_errors_name_the_key():
    with pytest.raises(ValueError, match=r"bissl: unknown key\(s\) \['lambda'\]; allowed: alternations"):
        BiSSLConfig.from_dict({"lambda": 1.0})
    with pytest.raises(ValueError, match="finetune.lr"):
        FinetuneConfig(lr=-0.1)
    with pytest.raises(ValueError, match="finetune.augment"):
        FinetuneConfig(augment="nope")
    with pytest.raises(ValueError, match=r"finetune: unknown key\(s\) \['lr_backbone'\]"):
        FinetuneConfig.from_dict({"lr_backbone": 0.1})
    pm = tiny_pretext(dtype=torch.float32)
    with pytest.raises(ValueError, match="bissl.lower_batch_size .*larger than the 4 pretext images"):
        BiSSLConfig().check_against(pm.cfg, 4)
    with pytest.raises(ValueError, match="bissl.hvp_batch_size: 64 is larger"):
        BiSSLConfig(hvp_batch_size=64).check_against(pm.cfg, 32)
    with pytest.raises(ValueError, match="bissl.downstream_batch_size: 256 is larger than the 16"):
        BiSSLConfig().check_against(pm.cfg, 32, 16)
    mae = TrainConfig(objective="mae", backbone="vit_tiny", augment="mnistm", progress=False)
    with pytest.raises(ValueError, match="bissl: pretext objective 'mae' is not supported.*allowed: simclr"):
        BiSSLConfig().check_against(mae, 1000)
    with pytest.raises(ValueError, match="downstream_tasks: unknown task 'svhn'; allowed: digits, heldout"):
        prepare_downstream("svhn", PretextData("x", tiny_images(), None))
    with pytest.raises(ValueError, match="downstream_tasks: 'heldout' needs"):
        prepare_downstream("heldout", PretextData("x", tiny_images(), None))
    # validated before anything is computed: the warm-up never starts
    with pytest.raises(ValueError, match="bissl.downstream_batch_size"):
        run_bissl(pm, tiny_images(16), tiny_images(24), BiSSLConfig(lower_batch_size=8, progress=False))


def test_byol_teacher_stays_fixed_during_hvps_and_follows_the_ema():
    pm = tiny_pretext(objective="byol", dtype=torch.float32)
    cfg = BiSSLConfig(alternations=1, lower_steps=1, upper_steps=1, lower_warmup=0, downstream_batch_size=8,
                      hvp_batch_size=8, warmup_epochs=0, progress=False, teacher_momentum=0.5)
    stage = BiSSLStage(pm, DownstreamHead(pm.backbone.feature_dim, 4), tiny_images(24, seed=2),
                       tiny_images(16, seed=1), cfg)
    t0 = copy.deepcopy(stage.teacher.net.state_dict())
    views = [v.float() for v in fixed_views()]
    H = stage.pretext_hessian(views)
    H.hvp([torch.ones_like(p) for p in stage.theta_P])
    for k, v in stage.teacher.net.state_dict().items():
        assert torch.equal(v, t0[k]), k
    s0 = {k: p.detach().clone() for k, p in stage.net.named_parameters()}
    stage.lower_step(views)
    s1 = dict(stage.net.named_parameters())
    for k, p in stage.teacher.net.named_parameters():   # θ_t ← 0.5 θ_t + 0.5 θ_s (after the step)
        torch.testing.assert_close(p, 0.5 * t0[k] + 0.5 * s1[k].detach(), atol=1e-6, rtol=0)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)


def test_cg_diagnostics_report_spectrum_and_residuals():
    pm = tiny_pretext(dtype=torch.float32)
    cfg = BiSSLConfig(alternations=1, lower_steps=1, upper_steps=1, lower_warmup=0, downstream_batch_size=8,
                      hvp_batch_size=8, warmup_epochs=1, progress=False)
    out = cg_diagnostics(pm, tiny_images(16, seed=1), tiny_images(24, seed=2), cfg, iters=(1, 3, 30),
                         dampings=(1e4,), power_iters=30)
    assert out["lowest"] <= out["highest"] and out["pd_threshold"] == pytest.approx(-(1e-3 + 10.0))
    res = {(r["layerwise"], r["iters"]): r["residual"] for r in out["rows"]}
    assert len(out["rows"]) == 6
    # far from indefinite at λ_damp = 1e4: global CG converges, and one step already beats v_IG = 0
    assert res[(False, 30)] < 1e-4 < res[(False, 1)] < 1.0
    assert all(r["cos"] > 0.99 for r in out["rows"])


def test_prepare_downstream_digits_in_pretext_format():
    pretext = PretextData("mnistm5k", ImageSet(torch.zeros(4, 3, 28, 28, dtype=torch.uint8), torch.zeros(4), "p"),
                          None)
    d = prepare_downstream("digits", pretext, test_fraction=0.5)
    assert d.train.images.shape[1:] == (3, 28, 28) and len(d.train) + len(d.test) == 1797
    assert torch.equal(d.train.images[:, 0], d.train.images[:, 2])   # gray replicated
    assert d.n_classes == 10 and sorted(torch.unique(d.test.labels).tolist()) == list(range(10))
    assert abs(len(d.train) - len(d.test)) <= 1


def test_learning_check_task_is_the_uncapped_heldout_split_else_the_first_task():
    """Notebook 30's learning check scores the pretext dataset's held-out labelled images (all of them, split like
    the heldout task) - not the digits task, where an untrained Conv-4 is at 5-NN 0.93 - and falls back to the first
    task, saying so, where the pretext set has no labelled held-out part."""
    held = ImageSet(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0)), torch.arange(40) % 4 + 3, "h")
    pdata = PretextData("mnistm5k", tiny_images(8), held)
    capped = balanced_subset(prepare_downstream("heldout", pdata).train, 8)
    tasks = {"digits": "first task", "heldout": type("T", (), {"train": capped})()}
    task, line = learning_check_task(pdata, tasks, test_fraction=0.5)
    assert len(task.train) + len(task.test) == 40 and len(task.train) == 20   # uncapped, half for test
    assert sorted(torch.unique(task.test.labels).tolist()) == [0, 1, 2, 3]      # relabelled as the heldout task
    assert "heldout" in task.name and "20 train / 20 test" in line
    task, line = learning_check_task(PretextData("stl10", tiny_images(8), None), tasks)
    assert task == "first task" and "downstream task digits" in line and "no labelled held-out" in line
    with pytest.raises(ValueError, match="downstream_tasks"):
        learning_check_task(PretextData("stl10", tiny_images(8), None), {})


def test_smoke_pipeline_on_tiny_data(tiny, tmp_path):
    """Fig. 1 end to end on 96 MNIST-M images and 120 digits: pretext (cached in tmp_path), warm-up, BiSSL, both
    fine-tunings; every number finite."""
    from bilevel_ssl.experiments import make_config

    pcfg = make_config("simclr", epochs=1, batch_size=32, backbone_args={"width": 8},
                       recipes={"simclr": {"objective_args": {"temperature": 0.2, "proj_hidden": 32,
                                                               "proj_dim": 16}}})
    pcfg.progress = False
    d = prepare_downstream("digits", PretextData("mnistm5k", tiny, None))
    train, test = d.train.subset(torch.arange(60)), d.test.subset(torch.arange(60))
    cfg = BiSSLConfig(alternations=2, lower_steps=2, upper_steps=1, lower_warmup=0, hvp_batch_size=16,
                      downstream_batch_size=32, warmup_epochs=1, progress=False)
    out = run_pipeline(pcfg, cfg, FinetuneConfig(epochs=1, batch_size=32), tiny, train, test, cache_root=tmp_path)
    for arm in ("bissl", "only_ft"):
        assert 0.0 <= out[arm]["top1"] <= 1.0 and math.isfinite(out[arm]["train_loss"]), arm
    hist = out["result"].history
    assert len(hist) == 2 and all(math.isfinite(v) for r in hist for v in r.values())
    assert len(out["result"].warmup_history) == 1


@pytest.mark.skipif("augment_args" not in TrainConfig.keys(), reason="TrainConfig has no augment_args")
def test_lower_level_uses_the_pretext_runs_augmentation():
    pm = tiny_pretext(dtype=torch.float32)
    pm.cfg = TrainConfig(**{**pm.cfg.to_dict(), "augment_args": {"flip_p": 1.0, "crop_scale": [0.5, 0.6]}})
    stage = BiSSLStage(pm, None, tiny_images(24, seed=2), None, BiSSLConfig(progress=False, lower_batch_size=8),
                       couple=False)
    assert stage.aug.flip_p == 1.0 and stage.aug.crop_scale == (0.5, 0.6)


def test_cuda_requested_without_gpu_names_the_bissl_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="bissl.device: 'cuda' was asked for .* allowed here: cpu, auto"):
        BiSSLConfig(device="cuda").resolved_device()
    assert BiSSLConfig(device="auto").resolved_device() == "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# issue #24: the CG residual of every upper step is measured, logged and acted on (cg_max_residual, cg_on_residual)


def test_cg_solve_is_hypergrads_cg_and_its_own_residual_is_exact_only_for_global_cg():
    """:func:`cg_solve` (BiSSL's CG, which also returns CG's recursive residual) gives the x of
    hypergrad.conjugate_gradient bit for bit; its residual is b − A x (up to rounding) for global CG, not for
    layer-wise CG on a coupled operator - which is why the layer-wise residual costs one more HVP."""
    g = torch.Generator().manual_seed(21)
    A = spd(7, 0.5, 4.0, g)
    b = split(torch.randn(7, generator=g, dtype=DT))
    mv = lambda vs: split(A @ flat(vs))
    for layerwise in (True, False):
        for iters in (1, 3, 6):
            x, r = cg_solve(mv, b, iters, layerwise)
            want = conjugate_gradient(mv, b, iters=iters, damping=0.0, layerwise=layerwise)
            assert all(torch.equal(a, w) for a, w in zip(x, want)), (layerwise, iters)
            true_r = flat(b) - A @ flat(x)
            if not layerwise:
                torch.testing.assert_close(flat(r), true_r, atol=1e-12, rtol=0)
            elif iters > 1:
                assert (flat(r) - true_r).norm() > 1e-6 * true_r.norm()


def _upper_step_on_dense_hessian(cfg_kw):
    """One upper step of a float64 tiny stage with SGD lr 1 and γ = 0 (no momentum, weight decay or clipping), so that
    θ_D moves by exactly −v_IG; with the explicit Hessian Hx and v = ∇_θ L_D(θ_P, ϕ_D)."""
    stage, _ = tiny_stage({"downstream_lr": 1.0, "downstream_momentum": 0.0, "downstream_weight_decay": 0.0,
                           "clip_norm": 0.0, "direct_weight": 0.0, **cfg_kw})
    views = fixed_views()
    Hx, _ = explicit_pretext_hessian(stage, views)
    H = stage.pretext_hessian(views)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(12), dtype=DT)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    bbP, head = copy.deepcopy(stage.net.backbone), copy.deepcopy(stage.head)
    v = flat(torch.autograd.grad(F.cross_entropy(head(bbP(x)), y), list(bbP.parameters())))
    before = flat([p.detach().clone() for p in stage.theta_D])
    logs = stage.upper_step(x, y, H, residual=True)
    v_ig = before - flat([p.detach() for p in stage.theta_D])
    A = torch.eye(len(v), dtype=DT) + Hx / (stage.cfg.lam + stage.cfg.cg_damping)
    return stage, logs, v, v_ig, A


@pytest.mark.parametrize("layerwise, damping, iters", [(True, 10.0, 3), (False, 10.0, 3), (False, 1000.0, 5)])
def test_logged_cg_residual_is_the_true_residual(layerwise, damping, iters):
    """The residual logged for an upper step (``cg_log`` and the step's ``cg_residual``) is ‖v − A v_IG‖/‖v‖ of the
    v_IG the step used, A = I + H/(λ + λ_damp) from the dense Hessian: layer-wise by one more HVP, global from CG's
    own recurrence (no HVP).  At λ_damp = 10 this tiny net's A is indefinite (Hessian eigenvalues down to −280)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CGResidualWarning)
        stage, logs, v, v_ig, A = _upper_step_on_dense_hessian({"cg_layerwise": layerwise, "cg_damping": damping,
                                                                "cg_iters": iters})
    true = float((v - A @ v_ig).norm() / v.norm())
    assert logs["cg_residual"] == pytest.approx(true, rel=1e-9, abs=1e-12)
    assert stage.cg_log == [{"alternation": 1, "upper_step": 1, "cg_residual": logs["cg_residual"],
                             "cg_residual_layerwise": logs["cg_residual"] if layerwise else pytest.approx(math.nan,
                                                                                                          nan_ok=True),
                             "cg_solver": "layerwise" if layerwise else "global"}]


def test_global_fallback_reaches_the_global_cg_answer():
    """``cg_on_residual: global``: on a well-conditioned SPD operator (λ_damp = 1000: A's spectrum in [0.72, 1.47])
    layer-wise CG stalls at a residual ~1e-3 (12 iterations; no better after 400), above ``cg_max_residual``, so the
    step re-solves with global CG, whose v_IG is the exact solution and the same as a ``cg_layerwise: false`` run's."""
    kw = {"cg_damping": 1000.0, "cg_iters": 12, "cg_max_residual": 1e-6}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CGResidualWarning)  # the fallback solved it: nothing to warn about
        stage, logs, v, v_ig, A = _upper_step_on_dense_hessian({**kw, "cg_on_residual": "global"})
    rec = stage.cg_log[-1]
    assert rec["cg_solver"] == "global_fallback" and rec["cg_residual_layerwise"] > 1e-4
    assert rec["cg_residual"] == logs["cg_residual"] < 1e-9
    exact = torch.linalg.solve(A, v)
    assert float((v_ig - exact).norm() / exact.norm()) < 1e-8
    _, _, _, v_ig_global, _ = _upper_step_on_dense_hessian({**kw, "cg_layerwise": False})
    torch.testing.assert_close(v_ig, v_ig_global, atol=1e-14, rtol=0)


def test_stop_raises_before_the_optimizer_step():
    stage, _ = tiny_stage({"cg_iters": 1, "cg_on_residual": "stop"})
    theta_D = [p.detach().clone() for p in stage.theta_D]
    head = [p.detach().clone() for p in stage.head.parameters()]
    H = stage.pretext_hessian(fixed_views())
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(12), dtype=DT)
    with pytest.raises(CGResidualError, match=r"relative residual .* > bissl\.cg_max_residual = 0\.5.*"
                                              r"bissl\.cg_on_residual: stop.*bissl\.cg_layerwise: false"):
        stage.upper_step(x, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), H, residual=True)
    assert all(torch.equal(a, p) for a, p in zip(theta_D, stage.theta_D))
    assert all(torch.equal(a, p) for a, p in zip(head, stage.head.parameters()))
    assert stage.upper_steps_done == 0 and stage.cg_log[0]["cg_residual"] > 0.5


def test_bad_residual_warns_once_per_run_and_every_upper_step_is_logged():
    """Default ``cg_on_residual: warn``: a run whose residuals are above the threshold warns exactly once, naming
    BiSSL's CG, the residual and the keys that fix it; ``cg_log`` has one record per upper step, and the history's
    ``cg_residual`` is that of each alternation's last upper step."""
    with pytest.warns(CGResidualWarning) as caught:
        _, _, res = tiny_run(cg_max_residual=1e-12)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CGResidualWarning)]
    assert len(msgs) == 1, msgs
    for needle in ("BiSSL's CG (layer-wise, bissl.cg_iters = 5, bissl.cg_damping = 10)", "relative residual",
                   "bissl.cg_max_residual = 1e-12", "bissl.cg_layerwise: false", "more bissl.cg_iters",
                   "larger bissl.cg_damping", "BiSSLResult.cg_log"):
        assert needle in msgs[0], needle
    assert [(r["alternation"], r["upper_step"]) for r in res.cg_log] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert all(r["cg_residual"] > 1e-12 and r["cg_solver"] == "layerwise" for r in res.cg_log)
    assert [h["cg_residual"] for h in res.history] == [res.cg_log[1]["cg_residual"], res.cg_log[3]["cg_residual"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CGResidualWarning)
        tiny_run(cg_max_residual=1e12)  # below the threshold: silent


# ---------------------------------------------------------------------------------- notebook 30's library helpers

def test_balanced_indices_take_the_same_number_per_class():
    from bilevel_ssl.bissl import balanced_indices

    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = balanced_indices(y, 30, seed=3)
    assert list(np.bincount(y[idx])) == [10, 10, 10] and list(idx) == sorted(set(idx))
    assert list(idx) == list(balanced_indices(y, 30, seed=3)) and list(idx) != list(balanced_indices(y, 30, seed=4))
    assert list(balanced_indices(y, 0)) == list(range(100)) and list(balanced_indices(y, 100)) == list(range(100))
    assert list(np.bincount(y[balanced_indices(y, 2)])) == [1, 1, 1]  # at least one per class
    ds = tiny_images(40, classes=4)
    sub = balanced_subset(ds, 8)
    assert len(sub) == 8 and list(torch.bincount(sub.labels)) == [2, 2, 2, 2] and balanced_subset(ds, 0) is ds


def test_only_ft_model_continues_or_retrains_longer(monkeypatch):
    """continue: the uncoupled lower steps (continue_pretext); retrain: the pretext config with the equivalent
    extra epochs, rounded, at least one, through pretrain."""
    from bilevel_ssl.bissl import only_ft_model
    from bilevel_ssl.bissl import pipeline as P

    pm = tiny_pretext(dtype=torch.float32)
    images = tiny_images(24, seed=2)
    cfg = BiSSLConfig(alternations=2, lower_steps=2, upper_steps=1, lower_warmup=0, downstream_batch_size=8,
                      warmup_epochs=0, progress=False)
    a, b = only_ft_model("continue", pm, images, cfg), continue_pretext(pm, images, cfg)
    assert [r["lower_loss"] for r in a.history] == [r["lower_loss"] for r in b.history] and a.backbone_D is None
    seen = []
    monkeypatch.setattr(P, "pretrain", lambda c, imgs: seen.append(c) or "model")
    assert only_ft_model("retrain", pm, images, cfg) == "model"
    extra = equivalent_epochs(cfg, pm.cfg, len(images))  # 2 * 2 * 8 / 24 = 1.33
    assert seen[0].epochs == pm.cfg.epochs + max(1, round(extra)) and seen[0].seed == pm.cfg.seed
    with pytest.raises(ValueError, match="baseline: unknown 'longer'"):
        only_ft_model("longer", pm, images, cfg)


def test_run_pipeline_fine_tunes_a_given_baseline_model(monkeypatch):
    """With baseline_model given, the only-FT arm fine-tunes its backbone and no extra pretext steps run."""
    from types import SimpleNamespace

    from bilevel_ssl.bissl import pipeline as P

    pm = tiny_pretext(dtype=torch.float32)
    given = SimpleNamespace(backbone="given backbone")
    calls = []
    monkeypatch.setattr(P, "run_bissl", lambda *a, **k: SimpleNamespace(backbone="theta_P"))
    monkeypatch.setattr(P, "continue_pretext", lambda *a, **k: calls.append("continue"))
    scores = {"theta_P": 0.7, "given backbone": 0.6}
    monkeypatch.setattr(P, "finetune_backbone", lambda bb, *a, **k: {"top1": scores[bb]})
    cfg = BiSSLConfig(alternations=1, lower_steps=1, upper_steps=1, lower_warmup=0, downstream_batch_size=8,
                      progress=False)
    out = run_pipeline(pm.cfg, cfg, FinetuneConfig(epochs=1, batch_size=8), tiny_images(24, seed=2),
                       tiny_images(16, seed=1), tiny_images(16, seed=3), pretext=pm, baseline_model=given)
    assert out["bissl"]["top1"] == 0.7 and out["only_ft"]["top1"] == 0.6 and out["baseline_result"] is given
    assert calls == [] and out["bissl_s"] >= 0.0


def test_pipeline_row_and_compare_arms(monkeypatch):
    """pipeline_row: each arm's scores under its own name, the last and mean stage numbers; compare_arms: one row per
    task with the pretext run's epochs and the seed, the baseline model shared by every task."""
    from types import SimpleNamespace

    from bilevel_ssl.bissl import Downstream, compare_arms, pipeline_row
    from bilevel_ssl.bissl import pipeline as P

    result = SimpleNamespace(history=[{"distance": 0.5, "cg_residual": 0.2, "ig_cos": 0.9},
                                      {"distance": 0.8, "cg_residual": 0.4, "ig_cos": 0.5}],
                             warmup_history=[{"acc": 0.3}, {"acc": 0.6}])
    out = {"result": result, "bissl": {"top1": 0.7, "top5": 0.9}, "only_ft": {"top1": 0.6, "top5": 0.95},
           "bissl_s": 2.0}
    row = pipeline_row(out)
    assert (row["bissl_top1"], row["only_ft_top1"], row["bissl_top5"], row["only_ft_top5"]) == (0.7, 0.6, 0.9, 0.95)
    assert row["final_distance"] == 0.8 and row["final_cg_residual"] == 0.4 and row["warmup_acc"] == 0.6
    assert row["mean_cg_residual"] == pytest.approx(0.3) and row["mean_ig_cos"] == pytest.approx(0.7)
    assert math.isnan(pipeline_row({**out, "only_ft": None})["only_ft_top1"])
    seen = []
    monkeypatch.setattr(P, "run_pipeline", lambda pcfg, cfg, ft, imgs, train, test, **kw: seen.append(
        (train, kw["baseline_model"])) or out)
    pm = tiny_pretext(dtype=torch.float32)
    tasks = {"a": Downstream("a", "train a", "test a"), "b": Downstream("b", "train b", "test b")}
    rows, results = compare_arms(pm.cfg, pm, BiSSLConfig(seed=4), FinetuneConfig(), "images", tasks, "baseline")
    assert [(r["task"], r["epochs"], r["seed"]) for r in rows] == [("a", pm.cfg.epochs, 4), ("b", pm.cfg.epochs, 4)]
    assert seen == [("train a", "baseline"), ("train b", "baseline")] and results == {"a": result, "b": result}
    assert rows[0]["bissl_top1"] == 0.7


def test_feature_scores_reestimate_batchnorm_first():
    """The scores use the backbone with BatchNorm statistics re-estimated on the task's training images (not its
    stored ones), and leave the backbone itself unchanged."""
    from bilevel_ssl.bissl import Downstream, feature_scores
    from bilevel_ssl.evaluate import extract_features, reestimate_bn

    pm = tiny_pretext(dtype=torch.float32)
    task = Downstream("t", tiny_images(32, seed=1), tiny_images(24, seed=2))
    before = copy.deepcopy(pm.backbone.state_dict())
    f_te, sc = feature_scores(pm.backbone, task, bn_batches=2, seed=0)
    for k, v in pm.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    expected = extract_features(reestimate_bn(pm.backbone, task.train, n_batches=2, seed=0), task.test)
    assert np.allclose(f_te, expected) and not np.allclose(f_te, extract_features(pm.backbone, task.test))
    assert f_te.shape == (24, pm.backbone.feature_dim) and -1.0 <= sc["silhouette"] <= 1.0 and 0.0 <= sc["knn"] <= 1.0


def test_cg_summary_reads_the_stage_settings():
    from bilevel_ssl.bissl import cg_summary

    rows = [{"damping": d, "layerwise": lw, "iters": n, "residual": r}
            for d, lw, n, r in [(10.0, True, 1, 0.9), (10.0, True, 5, 0.3), (10.0, False, 5, 0.01),
                                (100.0, True, 5, 0.05)]]
    diag = {"lowest": -2.0, "highest": 50.0, "pd_threshold": -11.0, "power_iters": 5, "rows": rows}
    text = cg_summary(diag, BiSSLConfig(lam=1.0, cg_damping=10.0))
    assert "not shown indefinite" in text and "λ + λ_damp = 11" in text
    assert text.endswith("layer-wise CG with that damping: residual 0.9 after 1 iteration, residual 0.3 after 5 "
                         "iterations")
    assert "is indefinite" in cg_summary({**diag, "lowest": -12.0}, BiSSLConfig(lam=1.0, cg_damping=10.0))
    assert cg_summary(diag, BiSSLConfig(cg_layerwise=False, cg_damping=10.0)).endswith("global CG with that "
                                                                                       "damping: residual 0.01 after 5 iterations")


def test_select_on_validation_scores_the_bissl_arm_on_held_out_training_images_only(monkeypatch):
    """λ_damp chosen on validation (issue #25): each candidate runs the BiSSL arm once on the fit part of the task's
    training split and is scored on the rest of it - never on the test split, no baseline arm; the best finite
    top-1 wins (first on a tie, a diverged run never); bad input fails before any run."""
    from bilevel_ssl.bissl import Downstream, select_on_validation
    from bilevel_ssl.bissl import pipeline as P

    pm = tiny_pretext(dtype=torch.float32)
    train, test = tiny_images(40, seed=1), tiny_images(20, seed=3)
    task = Downstream("toy", train, test)
    cfg = BiSSLConfig(alternations=1, lower_steps=1, upper_steps=1, lower_warmup=0, downstream_batch_size=8,
                      seed=3, progress=False)
    ft = FinetuneConfig(epochs=1, batch_size=8)
    top1 = {1.0: 0.4, 10.0: 0.6, 100.0: 0.6, 1000.0: math.inf}  # inf: the run diverges
    calls = []

    def fake_pipeline(pcfg, c, f, imgs, fit, val, **kw):
        calls.append((c.cg_damping, fit, val, kw["baseline"], c.seed))
        if math.isinf(top1[c.cg_damping]):
            raise FloatingPointError("non-finite gradient")
        return {"bissl": {"top1": top1[c.cg_damping]}}

    monkeypatch.setattr(P, "run_pipeline", fake_pipeline)
    sel = select_on_validation("cg_damping", [1.0, 10.0, 100.0, 1000.0], pm.cfg, pm, cfg, ft, tiny_images(24, seed=2),
                               task, fraction=0.25)
    assert sel.chosen == 10.0 and sel.option == "bissl_args.cg_damping" and math.isnan(sel.scores[3])
    assert [c[0] for c in calls] == [1.0, 10.0, 100.0, 1000.0] and all(c[3] is False and c[4] == 3 for c in calls)
    fit, val = calls[0][1], calls[0][2]
    assert (len(fit), len(val)) == (30, 10) and (sel.fit_images, sel.validation_images) == (30, 10)
    rows = lambda s: {x.numpy().tobytes() for x in s.images}  # noqa: E731
    assert not rows(fit) & rows(val) and rows(fit) | rows(val) == rows(train) and not rows(val) & rows(test)
    assert set(val.labels.tolist()) == {0, 1, 2, 3}  # stratified: every class validated
    text = sel.markdown(used=10.0)
    assert "BiSSL + fine-tuning top-1 on a validation split of the toy task" in text and "diverged" in text
    calls.clear()
    with pytest.raises(ValueError, match="bissl_args.cg_dampin: not a BiSSLConfig option; allowed: .*cg_damping"):
        select_on_validation("cg_dampin", [1.0], pm.cfg, pm, cfg, ft, tiny_images(24, seed=2), task)
    with pytest.raises(ValueError, match="cg_damping"):  # a negative damping is refused by BiSSLConfig itself
        select_on_validation("cg_damping", [10.0, -1.0], pm.cfg, pm, cfg, ft, tiny_images(24, seed=2), task)
    with pytest.raises(ValueError, match="downstream_batch_size"):  # 8 > the fit part's 6 images
        select_on_validation("cg_damping", [10.0], pm.cfg, pm, cfg, ft, tiny_images(24, seed=2),
                             Downstream("toy", tiny_images(12, seed=1), test), fraction=0.5)
    with pytest.raises(FloatingPointError, match="every candidate diverged"):
        select_on_validation("cg_damping", [1000.0], pm.cfg, pm, cfg, ft, tiny_images(24, seed=2), task)
    assert [c[0] for c in calls] == [1000.0]  # nothing ran for the refused inputs


def test_select_on_validation_over_several_seeds_scores_the_mean(monkeypatch):
    """One configuration per seed (three lists): every value runs once per seed, with that seed's pretext model and
    configuration, and scores the mean top-1; the per-seed scores are kept; mismatched lists or repeated seeds fail
    before any run.  Seed 0 alone would choose 1.0 here, the mean chooses 10.0."""
    from bilevel_ssl.bissl import Downstream, select_on_validation
    from bilevel_ssl.bissl import pipeline as P

    pm = tiny_pretext(dtype=torch.float32)
    task = Downstream("toy", tiny_images(40, seed=1), tiny_images(20, seed=3))
    cfgs = [BiSSLConfig(alternations=1, lower_steps=1, upper_steps=1, lower_warmup=0, downstream_batch_size=8,
                        seed=s, progress=False) for s in (0, 1, 2)]
    pms = [pm, copy.copy(pm), copy.copy(pm)]
    ft = FinetuneConfig(epochs=1, batch_size=8)
    top1 = {(1.0, 0): 0.7, (1.0, 1): 0.4, (1.0, 2): 0.4, (10.0, 0): 0.6, (10.0, 1): 0.6, (10.0, 2): 0.5}
    calls = []

    def fake_pipeline(pcfg, c, f, imgs, fit, val, **kw):
        calls.append((c.cg_damping, c.seed, kw["pretext"]))
        return {"bissl": {"top1": top1[(c.cg_damping, c.seed)]}}

    monkeypatch.setattr(P, "run_pipeline", fake_pipeline)
    sel = select_on_validation("cg_damping", [1.0, 10.0], [pm.cfg] * 3, pms, cfgs, ft, tiny_images(24, seed=2), task,
                               fraction=0.25)
    assert sel.chosen == 10.0 and sel.seeds == (0, 1, 2)
    assert sel.scores == pytest.approx((0.5, 17 / 30)) and sel.seed_scores == ((0.7, 0.4, 0.4), (0.6, 0.6, 0.5))
    assert [(d, s) for d, s, _ in calls] == [(1.0, 0), (1.0, 1), (1.0, 2), (10.0, 0), (10.0, 1), (10.0, 2)]
    assert all(p is pms[s] for _, s, p in calls)  # each seed's own pretext model
    assert "(0.700 / 0.400 / 0.400)" in sel.markdown() and "seeds 0, 1, 2" in sel.markdown()
    calls.clear()
    with pytest.raises(ValueError, match="three lists of one entry per seed"):
        select_on_validation("cg_damping", [1.0], [pm.cfg] * 2, pms, cfgs, ft, tiny_images(24, seed=2), task)
    with pytest.raises(ValueError, match="three lists"):
        select_on_validation("cg_damping", [1.0], pm.cfg, pms, cfgs, ft, tiny_images(24, seed=2), task)
    with pytest.raises(ValueError, match=r"distinct cfg.seed, got \[0, 0\]"):
        select_on_validation("cg_damping", [1.0], [pm.cfg] * 2, pms[:2], [cfgs[0]] * 2, ft, tiny_images(24, seed=2),
                             task)
    assert calls == []
