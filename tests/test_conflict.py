"""Gradient-conflict diagnostics: cosine metrics on constructed gradients, per-task gradients against autograd of
each task loss written out by hand, and the step monitor's freedom from side effects."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bilevel_ssl.config import TrainConfig
from bilevel_ssl.conflict import (
    check_n_tasks,
    conflict_monitor,
    conflict_summary,
    cosine_matrix,
    encoder_task_gradients,
    epoch_means,
    pairwise_conflict,
    step_curve,
    task_slices,
)
from bilevel_ssl.meta import SSLNet, make_meta
from bilevel_ssl.objectives import make_objective
from bilevel_ssl.trainer import train

# ------------------------------------------------------------------------------------------------ constructed cases


def test_orthogonal_opposite_identical_and_zero_gradients():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    c = cosine_matrix([e1, e2])
    assert c[0, 1] == 0.0 and c[1, 0] == 0.0 and c[0, 0] == 1.0
    s = conflict_summary(c)
    assert s["mean_cos"] == 0.0 and s["conflict_rate"] == 0.0  # orthogonal is not a conflict (cos < 0 is)
    s = pairwise_conflict([e1, -2.5 * e1])
    assert s["mean_cos"] == pytest.approx(-1.0) and s["min_cos"] == pytest.approx(-1.0) and s["conflict_rate"] == 1.0
    s = pairwise_conflict([e2, 0.1 * e2])
    assert s["mean_cos"] == pytest.approx(1.0) and s["conflict_rate"] == 0.0
    c = cosine_matrix([e1, torch.zeros(3)])  # a zero gradient: cosine 0 with everything, no NaN
    assert torch.equal(c, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_hand_made_three_task_case():
    # g1 = (1, 0), g2 = (0, 1), g3 = (-1, -1): cos12 = 0, cos13 = cos23 = -1/sqrt(2)
    grads = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([-1.0, -1.0])]
    s = pairwise_conflict(grads)
    assert s["conflict_rate"] == pytest.approx(2 / 3)
    assert s["min_cos"] == pytest.approx(-1 / math.sqrt(2))
    assert s["max_cos"] == pytest.approx(0.0, abs=1e-12)
    assert s["mean_cos"] == pytest.approx((0 - 2 / math.sqrt(2)) / 3)
    # the same gradients as per-parameter lists (two "parameters" of sizes 1 and 1) and as a (K, P) tensor
    as_lists = [[g[:1], g[1:].view(1, 1)] for g in grads]
    assert pairwise_conflict(as_lists) == s
    assert pairwise_conflict(torch.stack(grads)) == s


def test_cosine_matrix_errors():
    with pytest.raises(ValueError, match="differ in size"):
        cosine_matrix([torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match="K >= 2"):
        conflict_summary(torch.ones(1, 1))


def test_task_split_is_contiguous_and_validated():
    assert task_slices(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match=r"^n_tasks: 3 does not divide the batch size 8; .*: 2, 4$"):
        check_n_tasks(8, 3)
    with pytest.raises(ValueError, match=r"^n_tasks: 8 leaves 1 image per task"):
        check_n_tasks(8, 8)
    with pytest.raises(ValueError, match=r"^n_tasks: must be >= 2"):
        check_n_tasks(8, 1)
    with pytest.raises(ValueError, match=r"^n_tasks: must be an integer"):
        check_n_tasks(8, 2.0)


# ------------------------------------------------------------------------------------------------ per-task gradients


class BNBackbone(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear on flattened 3x2x2 inputs."""

    def __init__(self, bn: bool = True, d=6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.BatchNorm1d(10) if bn else nn.Identity(),
                                 nn.Tanh(), nn.Linear(10, d))
        self.feature_dim = d

    def forward(self, x):
        return self.net(x)


def tiny_net(bn=True, seed=0):
    torch.manual_seed(seed)
    head = nn.ModuleDict({"projector": nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))})
    return SSLNet(BNBackbone(bn), head)


def ref_nt_xent(z1, z2, tau):
    """SimCLR's loss written out: for each of the 2n anchors, -log softmax over the 2n - 1 others at the positive."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        sims = torch.stack([z[a] @ z[b] / tau for b in range(2 * n) if b != a])
        total = total - (z[a] @ z[pos] / tau - torch.logsumexp(sims, 0))
    return total / (2 * n)


def backbone_grad(net, loss):
    ps = [p for n, p in net.named_parameters() if n.startswith("backbone.")]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, ps, retain_graph=True)])


def test_per_task_gradient_equals_autograd_of_the_task_loss_alone_without_batchnorm():
    net = tiny_net(bn=False)
    obj = make_objective("simclr", temperature=0.5, proj_hidden=5, proj_dim=4)
    torch.manual_seed(1)
    x1, x2 = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    G, losses = encoder_task_gradients(net, obj, [x1, x2], 4)
    assert G.shape == (4, sum(p.numel() for p in net.backbone.parameters()))
    for k in range(4):  # the task's two images alone, through the network: nothing of the other tasks enters
        sl = slice(2 * k, 2 * k + 2)
        loss = ref_nt_xent(net(x1[sl])["z"], net(x2[sl])["z"], 0.5)
        torch.testing.assert_close(losses[k], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(G[k], backbone_grad(net, loss), rtol=1e-4, atol=1e-6)


def test_per_task_gradient_with_batchnorm_uses_one_batch_and_leaves_the_buffers():
    net = tiny_net(bn=True)
    net.train()
    obj = make_objective("simclr", temperature=0.5, proj_hidden=5, proj_dim=4)
    torch.manual_seed(2)
    x1, x2 = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    G, _ = encoder_task_gradients(net, obj, [x1, x2], 2, which="backbone")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics and counters untouched
    ref = copy.deepcopy(net)  # reference: one forward of all 16 views (BatchNorm over the batch), loss on a slice
    z = ref(torch.cat([x1, x2]))["z"]
    z1, z2 = z[:8], z[8:]
    for k in range(2):
        sl = slice(4 * k, 4 * k + 4)
        loss = ref_nt_xent(z1[sl], z2[sl], 0.5)
        g = backbone_grad(ref, loss)
        torch.testing.assert_close(G[k], g, rtol=1e-4, atol=1e-6)
    # which="all" adds the projector's parameters after the backbone's
    G_all, _ = encoder_task_gradients(net, obj, [x1, x2], 2, which="all")
    assert G_all.shape[1] == sum(p.numel() for p in net.parameters())


def test_momentum_teacher_objective_needs_the_teacher():
    obj = make_objective("byol", proj_hidden=8, proj_dim=4, pred_hidden=8)
    torch.manual_seed(0)
    net = SSLNet(BNBackbone(), obj.heads(6))
    views = [torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)]
    with pytest.raises(ValueError, match="^teacher: objective byol uses a momentum teacher"):
        encoder_task_gradients(net, obj, views, 2)
    cfg = TrainConfig(objective="byol", batch_size=8, progress=False, objective_args=dict(
        proj_hidden=8, proj_dim=4, pred_hidden=8))
    meta = make_meta("none", obj, net, cfg)
    out = conflict_monitor(2)(1, net, meta, views)
    assert -1.0 <= out["monitor_mean_cos"] <= 1.0 and out["monitor_conflict_rate"] in (0.0, 1.0)


# ------------------------------------------------------------------------------------------------ the monitor


def test_monitor_changes_nothing_it_touches():
    net = tiny_net(bn=True)
    obj = make_objective("simclr", temperature=0.5, proj_hidden=5, proj_dim=4)
    cfg = TrainConfig(batch_size=8, progress=False)
    meta = make_meta("none", obj, net, cfg)
    torch.manual_seed(3)
    views = [torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)]
    meta.compute_grads(net, views)  # .grad holds the step's gradient, as when the trainer calls monitors
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    for mode in (True, False):
        net.train(mode)
        out = conflict_monitor(4)(1, net, meta, views)
        assert set(out) == {"monitor_mean_cos", "monitor_min_cos", "monitor_max_cos", "monitor_conflict_rate",
                            "monitor_task_loss"}
        assert all(m.training == mode for m in net.modules())
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert conflict_monitor(2, every=3)(2, net, meta, views) == {}  # steps 1, 4, 7, ... only


def test_monitor_with_three_views_uses_the_first_two():
    net = tiny_net(bn=True)
    obj = make_objective("simclr", temperature=0.5, proj_hidden=5, proj_dim=4)
    gessl = make_meta("gessl", obj, net, TrainConfig(meta="gessl", batch_size=8, progress=False,
                                                       meta_args={"m": 2}))
    plain = make_meta("none", obj, net, TrainConfig(batch_size=8, progress=False))
    torch.manual_seed(4)
    views = [torch.randn(8, 3, 2, 2) for _ in range(3)]
    mon = conflict_monitor(2)
    assert gessl.n_views == 3
    assert mon(1, net, gessl, views) == mon(1, net, plain, views[:2])


def test_monitor_validates_its_options():
    with pytest.raises(ValueError, match="^n_tasks: must be an integer >= 2"):
        conflict_monitor(1)
    with pytest.raises(ValueError, match="^every: must be an integer >= 1"):
        conflict_monitor(2, every=0)
    with pytest.raises(ValueError, match="^which: unknown value 'heads'; allowed: backbone, all"):
        conflict_monitor(2, which="heads")
    net = tiny_net()
    obj = make_objective("simclr", temperature=0.5, proj_hidden=5, proj_dim=4)
    meta = make_meta("none", obj, net, TrainConfig(batch_size=8, progress=False))
    with pytest.raises(ValueError, match="^n_tasks: 3 does not divide the batch size 8"):
        conflict_monitor(3)(1, net, meta, [torch.randn(8, 3, 2, 2)] * 2)


def small_cfg(**kw):
    base = dict(epochs=2, batch_size=32, backbone_args={"width": 8}, lr=0.05, progress=False,
                objective_args={"temperature": 0.5, "proj_hidden": 16, "proj_dim": 8})
    return TrainConfig(**{**base, **kw})


def test_training_with_the_monitor_equals_training_without_it_bit_for_bit(tiny):
    cfg = small_cfg()
    plain = train(cfg, tiny)
    watched = train(cfg, tiny, step_monitors=(conflict_monitor(4, every=2),))
    for (k, a), b in zip(plain.net.state_dict().items(), watched.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in watched.history]
    steps, cos = step_curve(watched.history, "monitor_mean_cos")
    assert steps == [1, 3, 5]  # 3 steps per epoch (96 images, batch 32), measured every 2nd step
    assert all(-1.0 <= c <= 1.0 for c in cos)
    means = epoch_means(watched.history, "monitor_mean_cos")
    assert means[0] == pytest.approx((cos[0] + cos[1]) / 2) and means[1] == pytest.approx(cos[2])


def test_monitor_measures_the_task_gradients_multitask_trains_with():
    # MultiTask with shared="backbone" logs the cosines of the encoder gradients of its own task losses; the monitor,
    # called first (it has no side effects), must see the same gradients at the same parameters and views
    net = tiny_net(bn=True)
    obj = make_objective("simclr", temperature=0.5, proj_hidden=5, proj_dim=4)
    cfg = TrainConfig(meta="multitask", batch_size=8, progress=False,
                      meta_args={"n_tasks": 4, "shared": "backbone"})
    meta = make_meta("multitask", obj, net, cfg)
    torch.manual_seed(6)
    views = [torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)]
    out = conflict_monitor(4)(1, net, meta, views)
    logs = meta.compute_grads(net, views)
    for key in ("mean_cos", "min_cos", "conflict_rate"):
        assert out[f"monitor_{key}"] == pytest.approx(logs[f"task_{key}"], abs=1e-6)
    assert out["monitor_task_loss"] == pytest.approx(logs["loss"], rel=1e-6)


def test_monitor_on_a_one_view_masked_objective_keeps_the_rng():
    from bilevel_ssl.models import make_backbone

    obj = make_objective("mae", decoder_dim=8, decoder_depth=1, decoder_heads=2)
    torch.manual_seed(0)
    backbone = make_backbone("vit_tiny", 3, image_size=8, patch_size=4, dim=16, depth=1, heads=2)
    net = SSLNet(backbone, obj.heads(backbone.feature_dim))
    meta = make_meta("none", obj, net, TrainConfig(objective="mae", backbone="vit_tiny", batch_size=8,
                                                   progress=False))
    views = [torch.randn(8, 3, 8, 8)]
    rng = torch.get_rng_state()
    out = conflict_monitor(2)(1, net, meta, views)
    assert torch.equal(torch.get_rng_state(), rng)  # MAE's masks came from a fork of the global RNG
    assert -1.0 <= out["monitor_mean_cos"] <= 1.0 and out["monitor_task_loss"] > 0
