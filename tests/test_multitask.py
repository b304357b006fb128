"""The multi-task baselines: gradient surgery on hand-computed cases, the "sum" step against autograd of the mean
task loss, config errors, and training through the trainer."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.meta import SSLNet, make_meta
from bilevel_ssl.multitask import graddrop, gradvac, pcgrad
from bilevel_ssl.objectives import make_objective
from bilevel_ssl.trainer import train

t = lambda *v: torch.tensor(v, dtype=torch.float64)

# ------------------------------------------------------------------------------------------------ PCGrad


def test_pcgrad_two_conflicting_2d_gradients_hand_computed():
    g1, g2 = t(1.0, 0.0), t(-1.0, 1.0)  # g1 . g2 = -1 < 0
    p1, p2 = pcgrad([g1, g2])
    # g1 - (g1.g2 / |g2|^2) g2 = (1, 0) + 0.5 (-1, 1);   g2 - (g2.g1 / |g1|^2) g1 = (-1, 1) + (1, 0)
    torch.testing.assert_close(p1, t(0.5, 0.5))
    torch.testing.assert_close(p2, t(0.0, 1.0))
    assert float(p1 @ g2) == pytest.approx(0.0) and float(p2 @ g1) == pytest.approx(0.0)
    assert torch.equal(g1, t(1.0, 0.0))  # inputs untouched


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    grads = [t(1.0, 0.0), t(1.0, 1.0), t(0.0, 2.0)]  # all pairwise dot products >= 0
    for a, b in zip(pcgrad(grads), grads):
        assert torch.equal(a, b)


def test_pcgrad_three_tasks_random_order_from_torch_rng():
    # g1 conflicts with both g2 and g3; the projections do not commute, so the order matters
    grads = [t(1.0, 0.0), t(-1.0, 2.0), t(-1.0, -0.5)]
    results = set()
    for seed in range(12):
        torch.manual_seed(seed)
        a = pcgrad(grads)
        torch.manual_seed(seed)
        b = pcgrad(grads)
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same order, same result
        results.add(tuple(round(v, 9) for v in a[0].tolist()))
    # order (2, 3): (1,0) -> (0.8, 0.4) (dot with g3 = -1 < 0) -> (0.8,0.4) - (-1/1.25)(-1,-0.5) = (0, 0)
    # order (3, 2): (1,0) -> (0.2, -0.4) (dot with g2 = -1 < 0) -> (0.2,-0.4) - (-1/5)(-1, 2) = (0, 0)
    # both orders end at 0 here; check the intermediate differs with a case where they do not coincide:
    assert results == {(0.0, 0.0)}
    grads = [t(1.0, 0.0), t(-1.0, 1.0), t(-1.0, -3.0)]
    firsts = set()
    for seed in range(20):
        torch.manual_seed(seed)
        firsts.add(tuple(round(v, 9) for v in pcgrad(grads)[0].tolist()))
    # (2, 3): (1,0) -> (0.5, 0.5); dot with g3 = -2 < 0 -> (0.5,0.5) + 0.2(-1,-3) = (0.3, -0.1)
    # (3, 2): (1,0) -> (0.9, -0.3); dot with g2 = -1.2 < 0 -> (0.9,-0.3) + 0.6(-1, 1) = (0.3, 0.3)
    assert firsts == {(0.3, -0.1), (0.3, 0.3)}


# ------------------------------------------------------------------------------------------------ GradVac


def test_gradvac_with_zero_targets_is_pcgrad_for_two_tasks():
    grads = [t(1.0, 0.0), t(-1.0, 1.0)]
    targets = torch.zeros(2, 2, dtype=torch.float64)
    out, new = gradvac(grads, targets, beta=0.1)
    for a, b in zip(out, pcgrad(grads)):
        torch.testing.assert_close(a, b)
    phi = -1 / math.sqrt(2)  # cos(g1, g2), measured before the update
    torch.testing.assert_close(new, t(0.0, 0.1 * phi, 0.1 * phi, 0.0).view(2, 2))
    assert torch.equal(targets, torch.zeros(2, 2, dtype=torch.float64))


def test_gradvac_raises_the_cosine_to_a_positive_target_and_keeps_higher_ones():
    g1, g2 = t(1.0, 0.0), t(0.0, 2.0)  # cos 0
    targets = t(0.0, 0.5, 0.5, 0.0).view(2, 2)
    (a1, a2), new = gradvac([g1, g2], targets, beta=0.25)
    # ||g1|| (0.5 * 1 - 0 * sqrt(0.75)) / (||g2|| sqrt(0.75)) = 0.5 / (2 * 0.8660) -> g1' = (1, 1/sqrt(3))
    torch.testing.assert_close(a1, t(1.0, 1.0 / math.sqrt(3)))
    assert float(F.cosine_similarity(a1, g2, dim=0)) == pytest.approx(0.5)
    assert float(F.cosine_similarity(a2, g1, dim=0)) == pytest.approx(0.5)
    torch.testing.assert_close(new, t(0.0, 0.375, 0.375, 0.0).view(2, 2))  # 0.75 * 0.5 + 0.25 * 0
    (b1, b2), _ = gradvac([g1, t(1.0, 1.0)], t(0.0, 0.5, 0.5, 0.0).view(2, 2), beta=0.25)  # cos 0.707 > 0.5
    assert torch.equal(b1, g1) and torch.equal(b2, t(1.0, 1.0))


# ------------------------------------------------------------------------------------------------ GradDrop


def test_graddrop_hand_case():
    g1, g2 = t(1.0, -2.0, 3.0), t(1.0, 2.0, -1.0)
    # P = 0.5 (1 + sum / sum|.|) = (1, 0.5, 0.75)
    out = graddrop([g1, g2], u=t(0.3, 0.3, 0.9))  # keep +, keep +, keep -
    torch.testing.assert_close(out[0], t(1.0, 0.0, 0.0))
    torch.testing.assert_close(out[1], t(1.0, 2.0, -1.0))
    out = graddrop([g1, g2], u=t(0.9, 0.6, 0.1))  # keep + (P = 1), keep -, keep +
    torch.testing.assert_close(out[0], t(1.0, -2.0, 3.0))
    torch.testing.assert_close(out[1], t(1.0, 0.0, 0.0))
    out = graddrop([g1, g2], leak=0.25, u=t(0.9, 0.6, 0.1))  # 0.25 g + 0.75 M g
    torch.testing.assert_close(out[1], 0.25 * g2 + 0.75 * t(1.0, 0.0, 0.0))
    for a, b in zip(graddrop([g1, g2], leak=1.0), [g1, g2]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ the meta-method


class TinyBackbone(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, d))
        self.feature_dim = d

    def forward(self, x):
        return self.net(x)


def setup(combine="sum", n_tasks=2, shared="all", batch=8, **kw):
    cfg = TrainConfig(meta="multitask", batch_size=batch, progress=False,
                      objective_args={"temperature": 0.5, "proj_hidden": 5, "proj_dim": 4},
                      meta_args={"n_tasks": n_tasks, "combine": combine, "shared": shared, **kw})
    obj = make_objective("simclr", **cfg.objective_args)
    torch.manual_seed(0)
    net = SSLNet(TinyBackbone(), nn.ModuleDict({"projector": nn.Sequential(nn.Linear(6, 5), nn.Tanh(),
                                                                            nn.Linear(5, 4))}))
    meta = make_meta("multitask", obj, net, cfg)
    torch.manual_seed(1)
    views = [torch.randn(batch, 3, 2, 2), torch.randn(batch, 3, 2, 2)]
    return net, meta, views


def ref_nt_xent(z1, z2, tau=0.5):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / tau
    sim = sim - torch.diag(torch.full((2 * n,), float("inf")))
    pos = torch.cat([torch.diagonal(sim, n), torch.diagonal(sim, -n)])
    return (torch.logsumexp(sim, 1) - pos).mean()


def ref_task_losses(net, views, n_tasks):
    """One forward of all views (BatchNorm over the batch, as plain training), nt_xent per contiguous slice."""
    b = views[0].shape[0]
    z = net(torch.cat(views))["z"]
    n = b // n_tasks
    return [ref_nt_xent(z[k * n:(k + 1) * n], z[b + k * n:b + (k + 1) * n]) for k in range(n_tasks)]


def test_sum_equals_the_gradient_of_the_mean_task_loss():
    net, meta, views = setup("sum", n_tasks=4)
    ref = copy.deepcopy(net)
    losses = ref_task_losses(ref, views, 4)
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(ref.parameters()))
    logs = meta.compute_grads(net, views)
    assert logs["loss"] == pytest.approx(float(torch.stack(losses).mean().detach()), rel=1e-6)
    for (name, p), g in zip(net.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    # BatchNorm statistics advanced once, as in plain training
    torch.testing.assert_close(net.backbone.net[2].running_mean, ref.backbone.net[2].running_mean)
    assert int(net.backbone.net[2].num_batches_tracked) == 1


def raw_task_grads(net, views, n_tasks):
    ref = copy.deepcopy(net)
    losses = ref_task_losses(ref, views, n_tasks)
    ps = list(ref.parameters())
    return [torch.cat([g.flatten() for g in torch.autograd.grad(l, ps, retain_graph=True)]) for l in losses]


def test_pcgrad_step_removes_the_conflict_for_two_tasks():
    # find a batch whose two task gradients conflict, then check the PCGrad direction against the hand projection
    for seed in range(50):
        net, meta, views = setup("pcgrad")
        torch.manual_seed(seed)
        views = [torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)]
        g1, g2 = raw_task_grads(net, views, 2)
        if float(g1 @ g2) < 0:
            break
    else:
        pytest.fail("no conflicting batch found")
    logs = meta.compute_grads(net, views)
    d = torch.cat([p.grad.flatten() for p in net.parameters()])
    dot = g1 @ g2
    expected = 0.5 * ((g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1))
    torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-6)
    assert float(d @ g1) >= -1e-6 and float(d @ g2) >= -1e-6  # conflicts with neither task
    assert logs["task_conflict_rate"] == 1.0 and logs["task_projected"] == 1.0
    cos = float(F.cosine_similarity(g1, g2, dim=0))
    assert logs["task_mean_cos"] == pytest.approx(cos, abs=1e-5)


def test_pcgrad_without_conflict_is_sum_and_backbone_only_surgery():
    for seed in range(50):
        net, meta, views = setup("pcgrad", shared="backbone")
        torch.manual_seed(seed)
        views = [torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)]
        nb = sum(p.numel() for p in net.backbone.parameters())
        g1, g2 = raw_task_grads(net, views, 2)
        if float(g1[:nb] @ g2[:nb]) > 0:
            break
    meta.compute_grads(net, views)
    d = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(d, 0.5 * (g1 + g2), rtol=1e-4, atol=1e-6)


def test_graddrop_and_gradvac_steps_run_and_keep_state():
    net, meta, views = setup("graddrop")
    torch.manual_seed(5)
    meta.compute_grads(net, views)
    g1, g2 = raw_task_grads(net, views, 2)
    d = torch.cat([p.grad.flatten() for p in net.parameters()])
    # every coordinate is the mean of a sign-consistent subset: 0.5*g1, 0.5*g2, 0.5*(g1+g2) or 0
    cands = torch.stack([0.5 * g1, 0.5 * g2, 0.5 * (g1 + g2), torch.zeros_like(g1)])
    assert bool(((cands - d).abs().min(0).values < 1e-5).all())
    net, meta, views = setup("gradvac", gradvac_beta=0.5)
    logs = meta.compute_grads(net, views)
    cos = logs["task_mean_cos"]
    assert float(meta.gradvac_targets[0, 1]) == pytest.approx(0.5 * cos, abs=1e-5)
    state = meta.state_dict()
    other = setup("gradvac", gradvac_beta=0.5)[1]
    other.load_state_dict(state)
    assert torch.equal(other.gradvac_targets, meta.gradvac_targets)


@pytest.mark.parametrize("meta_args, message", [
    ({"n_tasks": 3}, r"^meta_args\.n_tasks / batch_size: 3 does not divide the batch size 32; .*: 2, 4, 8, 16$"),
    ({"n_tasks": 32}, r"^meta_args\.n_tasks / batch_size: 32 leaves 1 image per task"),
    ({"n_tasks": 1}, r"^meta_args\.n_tasks / batch_size: must be >= 2"),
    ({"n_tasks": "2"}, r"^meta_args\.n_tasks: must be an integer, got str '2'$"),
    ({"combine": "mgda"}, r"^meta_args\.combine: unknown value 'mgda'; allowed: sum, pcgrad, gradvac, graddrop$"),
    ({"shared": "heads"}, r"^meta_args\.shared: unknown value 'heads'; allowed: all, backbone$"),
    ({"gradvac_beta": 1.5}, r"^meta_args\.gradvac_beta: must be a number in \[0, 1\]"),
    ({"graddrop_leak": -0.1}, r"^meta_args\.graddrop_leak: must be a number in \[0, 1\]"),
    ({"m": 4}, r"^meta_args: unknown multitask option\(s\) \['m'\]; allowed: n_tasks, combine"),
])
def test_config_errors_name_the_key(meta_args, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(meta="multitask", batch_size=32, meta_args=meta_args)


def test_hypergrad_args_rejected():
    with pytest.raises(ConfigError, match="^hypergrad_args: meta 'multitask' is single-level"):
        TrainConfig(meta="multitask", batch_size=32, hypergrad_args={"fd_r": 0.1})


def small_cfg(**kw):
    base = dict(meta="multitask", epochs=2, batch_size=32, backbone_args={"width": 8}, lr=0.05, progress=False,
                objective_args={"temperature": 0.5, "proj_hidden": 16, "proj_dim": 8})
    return TrainConfig(**{**base, **kw})


def test_training_through_the_trainer_and_exact_resume(tiny, tmp_path):
    cfg = small_cfg(meta_args={"n_tasks": 4, "combine": "gradvac"}, checkpoint_every=1)
    full = train(cfg, tiny, tmp_path / "full")
    assert [r["epoch"] for r in full.history] == [1, 2]
    for r in full.history:
        assert math.isfinite(r["loss"]) and 0.0 <= r["task_conflict_rate"] <= 1.0
        assert -1.0 <= r["task_min_cos"] <= r["task_mean_cos"] <= 1.0
    # an interrupted run (killed after epoch 1, resumed) ends where the uninterrupted one ends: GradVac's targets
    # are in the checkpoint
    def kill_after_one(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tiny, tmp_path / "part", callbacks=(kill_after_one,))
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["meta"]["gradvac_targets"].abs().sum() > 0
    resumed = train(cfg, tiny, tmp_path / "part")
    for (k, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k


class Interrupt(Exception):
    pass


def test_pcgrad_and_byol_train(tiny):
    res = train(small_cfg(meta_args={"combine": "pcgrad"}, epochs=1), tiny)
    assert "task_projected" in res.history[0]
    res = train(small_cfg(objective="byol", meta_args={"n_tasks": 2}, epochs=1,
                          objective_args={"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16}), tiny)
    assert math.isfinite(res.history[0]["loss"])


def test_multitask_under_torchrun_keeps_the_ranks_in_sync(tmp_path):
    # 2 CPU processes (gloo): each rank splits its 16-image shard into 2 tasks, PCGrad, MoCo's queue from the
    # gathered keys; the averaged directions and the shared queue keep both ranks' weights identical
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("train_worker.py")
    cfg = dict(objective="moco_v2", meta="multitask", meta_args={"n_tasks": 2, "combine": "pcgrad"}, epochs=1,
               batch_size=32, backbone_args={"width": 8}, lr=0.03, progress=False,
               objective_args={"proj_hidden": 16, "proj_dim": 8, "queue_size": 100})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), json.dumps(cfg), str(tmp_path), "1"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"result_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert all(math.isfinite(r["loss"]) for r in a["history"])
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    # 3 steps x (2 views x 16 images) x 2 ranks keys, gathered (one rank's alone would leave the pointer at 96)
    assert int(ck["meta"]["objective"]["queue_ptr"]) == (3 * 2 * 32) % 100
