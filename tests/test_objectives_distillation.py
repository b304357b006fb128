"""MoCo v2, BYOL, SimSiam, DINO: each loss against a plain-loop reference, the properties that matter (symmetry,
stop-gradient, collapse values), state updates and checkpoints, and end-to-end training through the trainer."""

import dataclasses
import math
import shutil

import pytest
import torch
import torch.nn as nn

from bilevel_ssl.config import TrainConfig
from bilevel_ssl.meta import SingleLevel, SSLNet
from bilevel_ssl.objectives import make_objective
from bilevel_ssl.objectives.contrastive import MoCoV2, moco_infonce
from bilevel_ssl.objectives.distillation import (BYOL, DINO, DINOHead, SimSiam, byol_loss, cosine_momentum,
                                                 dino_loss, negative_cosine, simsiam_loss)
from bilevel_ssl.trainer import CHECKPOINT, train


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def outs(**views):
    """outs(z=[z1, z2], p=[p1, p2]) -> [{"z": z1, "p": p1}, {"z": z2, "p": p2}]"""
    n = len(next(iter(views.values())))
    return [{k: v[i] for k, v in views.items()} for i in range(n)]


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


# ------------------------------------------------------------------------------------------------ MoCo v2
def reference_infonce(q, k, queue, tau):
    """He et al. (2020) Eq. 1, one query at a time."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(cos(q[i], k[i]) / tau)
        neg = sum(math.exp(cos(q[i], queue[j]) / tau) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_moco_infonce_matches_reference(tau):
    q, k, queue = randn(5, 4, seed=1), randn(5, 4, seed=2), randn(7, 4, seed=3)
    assert moco_infonce(q, k, queue, tau).item() == pytest.approx(reference_infonce(q, k, queue, tau), rel=1e-5)


def test_moco_loss_is_the_symmetrised_infonce_and_symmetric_in_the_views():
    obj = MoCoV2(queue_size=6, proj_dim=4)
    q1, q2, k1, k2 = (randn(5, 4, seed=s) for s in range(4))
    expected = 0.5 * (reference_infonce(q1, k2, obj.queue, 0.2) + reference_infonce(q2, k1, obj.queue, 0.2))
    assert obj.loss(outs(z=[q1, q2]), outs(z=[k1, k2])).item() == pytest.approx(expected, rel=1e-5)
    swapped = obj.loss(outs(z=[q2, q1]), outs(z=[k2, k1])).item()
    assert swapped == pytest.approx(expected, rel=1e-6)


def test_moco_gradient_flows_to_queries_only():
    q = randn(5, 4, seed=1).requires_grad_()
    k = randn(5, 4, seed=2).requires_grad_()
    queue = randn(7, 4, seed=3).requires_grad_()
    moco_infonce(q, k, queue).backward()
    assert k.grad is None and queue.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_moco_collapse_gives_chance_level():
    same = torch.ones(4, 3)
    assert moco_infonce(same, same, torch.ones(9, 3), 0.2).item() == pytest.approx(math.log(10), rel=1e-6)


def test_moco_queue_is_fifo_with_pointer_and_wraps_around():
    obj = MoCoV2(queue_size=5, proj_dim=3)
    init = obj.queue.clone()
    torch.testing.assert_close(init.norm(dim=1), torch.ones(5))  # starts as random unit vectors
    torch.testing.assert_close(MoCoV2(queue_size=5, proj_dim=3).queue, init)  # ... the same ones every time
    unit = lambda x: x / x.norm(dim=1, keepdim=True)

    a1, a2 = randn(1, 3, seed=1), randn(1, 3, seed=2)  # a batch of 1 image, 2 views -> 2 keys
    obj.update_state(outs(z=[a1 * 0, a2 * 0]), outs(z=[a1, a2]))
    assert int(obj.queue_ptr) == 2
    torch.testing.assert_close(obj.queue[:2], unit(torch.cat([a1, a2])))
    torch.testing.assert_close(obj.queue[2:], init[2:])

    b = randn(4, 3, seed=3)  # 2 images x 2 views -> slots 2, 3, 4, then 0
    obj.update_state(None, outs(z=[b[:2], b[2:]]))
    assert int(obj.queue_ptr) == 1
    torch.testing.assert_close(obj.queue[2:], unit(b[:3]))
    torch.testing.assert_close(obj.queue[0], unit(b[3:])[0])
    torch.testing.assert_close(obj.queue[1], unit(a2)[0])  # the oldest key not yet overwritten

    c = randn(8, 3, seed=4)  # more keys than slots: the last queue_size are kept
    obj.enqueue(c)
    torch.testing.assert_close(obj.queue, unit(c[-5:]))
    assert int(obj.queue_ptr) == 0


def test_moco_loss_uses_the_queue_before_this_steps_keys():
    obj = MoCoV2(queue_size=4, proj_dim=3)
    q, k = randn(2, 3, seed=1), randn(2, 3, seed=2)
    before = obj.loss(outs(z=[q, q]), outs(z=[k, k])).item()
    assert before == pytest.approx(reference_infonce(q, k, obj.queue, 0.2), rel=1e-5)
    obj.update_state(None, outs(z=[k, k]))
    assert obj.loss(outs(z=[q, q]), outs(z=[k, k])).item() != pytest.approx(before, rel=1e-3)


def test_moco_state_dict_round_trip_and_errors():
    obj = MoCoV2(queue_size=6, proj_dim=3)
    obj.update_state(None, outs(z=[randn(2, 3, seed=1), randn(2, 3, seed=2)]))
    state = obj.state_dict()
    obj.update_state(None, outs(z=[randn(2, 3, seed=3), randn(2, 3, seed=4)]))  # the saved copy must not change
    other = MoCoV2(queue_size=6, proj_dim=3)
    other.load_state_dict(state)
    assert int(other.queue_ptr) == 4
    assert not torch.equal(other.queue, obj.queue)
    torch.testing.assert_close(other.queue, state["queue"])
    with pytest.raises(ValueError, match="does not fit"):
        MoCoV2(queue_size=5, proj_dim=3).load_state_dict(state)
    with pytest.raises(ValueError, match="expected state keys"):
        other.load_state_dict({"queue": state["queue"]})


def test_moco_heads_momentum_and_defaults():
    obj = make_objective("moco_v2")
    defaults = (obj.temperature, obj.momentum, obj.queue_size, obj.proj_hidden, obj.proj_dim)
    assert defaults == (0.2, 0.99, 4096, 2048, 128)
    assert obj.queue.shape == (4096, 128)
    assert obj.teacher_momentum(0.0) == obj.teacher_momentum(0.7) == 0.99
    head = MoCoV2(proj_hidden=8, proj_dim=4).heads(6)["projector"]
    assert head(torch.randn(3, 6)).shape == (3, 4)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())  # MoCo v2's MLP head has no BN
    with pytest.raises(ValueError, match="momentum"):
        MoCoV2(momentum=1.5)
    with pytest.raises(ValueError, match="queue_size must be > 0"):
        MoCoV2(queue_size=0)
    with pytest.raises(ValueError, match="needs the momentum teacher"):
        obj.loss(outs(z=[torch.ones(2, 128)] * 2), None)


# ------------------------------------------------------------------------------------------------ BYOL
def reference_byol(p, z):
    """Grill et al. (2020) Eq. 2: squared distance of the L2-normalised vectors, per sample."""
    total = 0.0
    for i in range(p.shape[0]):
        pn, zn = math.sqrt(dot(p[i], p[i])), math.sqrt(dot(z[i], z[i]))
        total += sum((float(a) / pn - float(b) / zn) ** 2 for a, b in zip(p[i], z[i]))
    return total / p.shape[0]


def test_byol_loss_matches_reference_and_objective_sums_both_directions():
    p1, p2, t1, t2 = (randn(6, 5, seed=s) for s in range(4))
    assert byol_loss(p1, t2).item() == pytest.approx(reference_byol(p1, t2), rel=1e-5)
    obj = BYOL()
    value = obj.loss(outs(z=[p1, p2], p=[p1, p2]), outs(z=[t1, t2])).item()
    assert value == pytest.approx(reference_byol(p1, t2) + reference_byol(p2, t1), rel=1e-5)
    swapped = obj.loss(outs(z=[p2, p1], p=[p2, p1]), outs(z=[t2, t1])).item()
    assert swapped == pytest.approx(value, rel=1e-6)


def test_byol_target_gets_no_gradient_and_collapse_is_zero():
    p, z = randn(4, 3, seed=1).requires_grad_(), randn(4, 3, seed=2).requires_grad_()
    byol_loss(p, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0
    assert byol_loss(torch.ones(4, 3), torch.ones(4, 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(torch.ones(4, 3), -torch.ones(4, 3)).item() == pytest.approx(4.0, rel=1e-6)  # the maximum


def test_byol_momentum_schedule_and_heads():
    obj = make_objective("byol")
    assert (obj.proj_hidden, obj.proj_dim, obj.pred_hidden, obj.base_momentum) == (4096, 256, 4096, 0.996)
    assert obj.teacher_momentum(0.0) == pytest.approx(0.996)
    assert obj.teacher_momentum(0.5) == pytest.approx(0.998)
    assert obj.teacher_momentum(1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 0.25) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    small = BYOL(proj_hidden=8, proj_dim=4, pred_hidden=6)
    net = SSLNet(nn.Flatten(), small.heads(5))
    out = net(torch.randn(3, 5))
    assert out["z"].shape == out["p"].shape == (3, 4)
    assert SingleLevel(small, net).teacher is not None
    with pytest.raises(ValueError, match="base_momentum"):
        BYOL(base_momentum=-0.1)


# ------------------------------------------------------------------------------------------------ SimSiam
def reference_simsiam(p1, p2, z1, z2):
    """Chen & He (2021) Eq. 4 with D = negative cosine, one sample at a time."""
    d12 = sum(-cos(p1[i], z2[i]) for i in range(p1.shape[0])) / p1.shape[0]
    d21 = sum(-cos(p2[i], z1[i]) for i in range(p1.shape[0])) / p1.shape[0]
    return 0.5 * d12 + 0.5 * d21


def test_simsiam_loss_matches_reference_and_is_symmetric():
    p1, p2, z1, z2 = (randn(6, 5, seed=s) for s in range(4))
    expected = reference_simsiam(p1, p2, z1, z2)
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, rel=1e-5)
    assert simsiam_loss(p2, p1, z2, z1).item() == pytest.approx(expected, rel=1e-6)
    obj = SimSiam()
    assert obj.loss(outs(z=[z1, z2], p=[p1, p2]), None).item() == pytest.approx(expected, rel=1e-5)
    assert obj.teacher_momentum(0.3) is None


def test_simsiam_stop_gradient():
    """The gradient reaches z only through the predictor p = h(z), never through the target branch."""
    z1, z2 = randn(6, 4, seed=1).requires_grad_(), randn(6, 4, seed=2).requires_grad_()
    pred = nn.Linear(4, 4)
    simsiam_loss(pred(z1), pred(z2), z1, z2).backward()
    g1, g2 = z1.grad.clone(), z2.grad.clone()

    # same gradient as the loss written with explicit detach on the targets
    a1, a2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    cosd = lambda p, z: -torch.nn.functional.cosine_similarity(p, z, dim=1).mean()
    (0.5 * cosd(pred(a1), a2.detach()) + 0.5 * cosd(pred(a2), a1.detach())).backward()
    torch.testing.assert_close(g1, a1.grad)
    torch.testing.assert_close(g2, a2.grad)

    # ... and not the gradient without the stop-gradient (so the test above can fail)
    b1, b2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    (0.5 * cosd(pred(b1), b2) + 0.5 * cosd(pred(b2), b1)).backward()
    assert not torch.allclose(g1, b1.grad, atol=1e-4)

    # target passed as its own leaf: no gradient at all
    p, z = randn(3, 4, seed=3).requires_grad_(), randn(3, 4, seed=4).requires_grad_()
    negative_cosine(p, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0


def test_simsiam_collapse_reaches_the_minimum_and_heads_follow_the_paper():
    same = torch.ones(4, 3)
    assert simsiam_loss(same, same, same, same).item() == pytest.approx(-1.0, rel=1e-6)
    obj = make_objective("simsiam")
    assert (obj.proj_hidden, obj.proj_dim, obj.predictor_hidden) == (2048, 2048, 512)
    assert SimSiam(proj_dim=64).predictor_hidden == 16 and SimSiam(proj_dim=64, pred_hidden=7).predictor_hidden == 7
    heads = SimSiam(proj_hidden=8, proj_dim=12).heads(5)
    proj, pred = heads["projector"], heads["predictor"]
    assert sum(isinstance(m, nn.Linear) for m in proj.modules()) == 3
    assert isinstance(proj.net[-1], nn.BatchNorm1d)  # BN on the projector's output
    assert [m.out_features for m in pred.modules() if isinstance(m, nn.Linear)] == [3, 12]  # bottleneck 12 / 4
    with pytest.raises(ValueError, match="pred_hidden"):
        SimSiam(pred_hidden=0)


# ------------------------------------------------------------------------------------------------ DINO
def reference_dino(students, teachers, center, tau_s, tau_t):
    """Caron et al. (2021) Eq. 3 with centring, one sample and one class at a time; pairs of different views."""
    total, pairs = 0.0, 0
    n, k = students[0].shape
    for a, t in enumerate(teachers):
        for b, s in enumerate(students):
            if a == b:
                continue
            ce = 0.0
            for i in range(n):
                et = [math.exp((float(t[i, j]) - float(center[0, j])) / tau_t) for j in range(k)]
                es = [math.exp(float(s[i, j]) / tau_s) for j in range(k)]
                ce += -sum(et[j] / sum(et) * math.log(es[j] / sum(es)) for j in range(k))
            total += ce / n
            pairs += 1
    return total / pairs


def test_dino_loss_matches_reference_and_is_symmetric():
    s1, s2, t1, t2 = (randn(5, 6, seed=s) for s in range(4))
    center = 0.3 * randn(1, 6, seed=9)
    expected = reference_dino([s1, s2], [t1, t2], center, 0.1, 0.04)
    assert dino_loss([s1, s2], [t1, t2], center, 0.1, 0.04).item() == pytest.approx(expected, rel=1e-5)
    assert dino_loss([s2, s1], [t2, t1], center, 0.1, 0.04).item() == pytest.approx(expected, rel=1e-6)
    three = [randn(5, 6, seed=s) for s in range(10, 16)]  # more views: all 6 ordered pairs of different views
    assert dino_loss(three[:3], three[3:], center, 0.2, 0.5).item() == pytest.approx(
        reference_dino(three[:3], three[3:], center, 0.2, 0.5), rel=1e-5)


def test_dino_teacher_gets_no_gradient_and_uniform_outputs_give_log_k():
    s, t = randn(4, 6, seed=1).requires_grad_(), randn(4, 6, seed=2).requires_grad_()
    c = torch.zeros(1, 6, requires_grad=True)
    dino_loss([s, s], [t, t], c).backward()
    assert t.grad is None and c.grad is None and s.grad.abs().sum() > 0
    zeros = torch.zeros(4, 8)
    assert dino_loss([zeros, zeros], [zeros, zeros], torch.zeros(1, 8)).item() == pytest.approx(math.log(8), rel=1e-6)
    # centring: a teacher that outputs the same logits for every image (collapse) gives a uniform target
    const = torch.randn(1, 8).expand(4, 8)
    assert dino_loss([zeros, zeros], [const, const], const[:1]).item() == pytest.approx(math.log(8), rel=1e-6)


def test_dino_centre_is_an_ema_of_the_teacher_outputs():
    obj = DINO(out_dim=3)
    t1, t2 = randn(4, 3, seed=1), randn(4, 3, seed=2)
    obj.update_state(outs(z=[t1 * 0, t2 * 0]), outs(z=[t1, t2]))
    mean = torch.cat([t1, t2]).mean(dim=0, keepdim=True)
    torch.testing.assert_close(obj.center, 0.1 * mean)
    u1, u2 = randn(4, 3, seed=3), randn(4, 3, seed=4)
    obj.update_state(None, outs(z=[u1, u2]))
    torch.testing.assert_close(obj.center, 0.9 * 0.1 * mean + 0.1 * torch.cat([u1, u2]).mean(dim=0, keepdim=True))
    # the loss reads the centre
    s = outs(z=[randn(4, 3, seed=5), randn(4, 3, seed=6)])
    assert obj.loss(s, outs(z=[t1, t2])).item() == pytest.approx(
        reference_dino([s[0]["z"], s[1]["z"]], [t1, t2], obj.center, 0.1, 0.04), rel=1e-5)


def test_dino_teacher_temperature_follows_progress_given_to_teacher_momentum():
    obj = DINO(out_dim=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_fraction=0.5)
    assert obj.teacher_temperature(0.0) == pytest.approx(0.04)
    assert obj.teacher_temperature(0.25) == pytest.approx(0.055)
    assert obj.teacher_temperature(0.5) == obj.teacher_temperature(0.9) == pytest.approx(0.07)
    assert obj.teacher_momentum(0.0) == pytest.approx(0.996) and obj.teacher_momentum(1.0) == pytest.approx(1.0)
    s, t = outs(z=[randn(3, 4, seed=1), randn(3, 4, seed=2)]), outs(z=[randn(3, 4, seed=3), randn(3, 4, seed=4)])
    zs, zt = [o["z"] for o in s], [o["z"] for o in t]
    assert obj.teacher_momentum(0.25) == pytest.approx(cosine_momentum(0.996, 0.25))
    assert obj.loss(s, t).item() == pytest.approx(reference_dino(zs, zt, obj.center, 0.1, 0.055), rel=1e-5)
    # the trainer's path: SingleLevel.after_step hands the progress to teacher_momentum
    net = SSLNet(nn.Flatten(), DINO(out_dim=4, hidden_dim=8, bottleneck_dim=3).heads(5))
    meta = SingleLevel(obj, net)
    meta.after_step(net, 0.4)
    assert obj._progress == pytest.approx(0.4)
    assert obj.loss(s, t).item() == pytest.approx(reference_dino(zs, zt, obj.center, 0.1, 0.064), rel=1e-5)
    assert make_objective("dino").teacher_temperature(0.0) == 0.04  # default: 0.04 -> 0.04, no warm-up effect


def test_dino_state_dict_round_trip():
    obj = DINO(out_dim=3)
    obj.teacher_momentum(0.3)
    obj.update_state(None, outs(z=[randn(2, 3, seed=1), randn(2, 3, seed=2)]))
    state = obj.state_dict()
    obj.update_state(None, outs(z=[randn(2, 3, seed=3), randn(2, 3, seed=4)]))
    other = DINO(out_dim=3)
    other.load_state_dict(state)
    torch.testing.assert_close(other.center, state["center"])
    assert not torch.equal(other.center, obj.center)
    assert other._progress == 0.3
    with pytest.raises(ValueError, match="does not fit"):
        DINO(out_dim=4).load_state_dict(state)


def test_dino_head_and_defaults():
    obj = make_objective("dino")
    assert (obj.out_dim, obj.hidden_dim, obj.bottleneck_dim, obj.student_temp, obj.teacher_temp,
            obj.center_momentum, obj.base_momentum) == (4096, 2048, 256, 0.1, 0.04, 0.9, 0.996)
    head = DINOHead(5, out_dim=7, hidden_dim=8, bottleneck_dim=3)
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [8, 8, 3]
    with torch.no_grad():
        head.last_v.mul_(torch.arange(1.0, 8.0)[:, None])  # the row norms of v do not matter (weight norm, g = 1)
    torch.testing.assert_close(head.last_weight.norm(dim=1), torch.ones(7))
    x = torch.randn(4, 5)
    y = head(x)
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=1)
    torch.testing.assert_close(y, bottleneck @ (head.last_v / head.last_v.norm(dim=1, keepdim=True)).T)
    assert y.shape == (4, 7) and y.abs().max() <= 1 + 1e-6  # cosines
    assert set(obj.heads(5)) == {"projector"}
    with pytest.raises(ValueError, match="warmup_fraction"):
        DINO(warmup_fraction=2.0)


# ------------------------------------------------------------------------------------------------ end to end
def config(name, **kw):
    small = {"moco_v2": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 64},
             "byol": {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
             "simsiam": {"proj_hidden": 32, "proj_dim": 16},
             "dino": {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "teacher_temp": 0.07,
                      "warmup_fraction": 0.9}}
    base = dict(objective=name, epochs=2, batch_size=32, lr=0.05, progress=False, objective_args=small[name])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base.update({"width": 16} if "width" in names else {"backbone_args": {"width": 16}})
    return TrainConfig(**{**base, **kw})


def flat(state: dict, skip: str = "predictor") -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in state.items() if v.is_floating_point() and skip not in k])


def test_simsiam_trains_end_to_end(tiny):
    res = train(config("simsiam"), tiny)
    assert len(res.history) == 2 and all(-1.0 <= r["loss"] <= 1.0 for r in res.history)


@pytest.mark.parametrize("name", ["byol", "moco_v2", "dino"])
def test_teacher_trains_end_to_end_as_an_ema(tiny, tmp_path, name):
    teachers = []
    keep = lambda epoch, rec: teachers.append(torch.load(tmp_path / CHECKPOINT, weights_only=False)["meta"]["teacher"])
    res = train(config(name, checkpoint_every=1), tiny, tmp_path, callbacks=(keep,))
    assert all(math.isfinite(r["loss"]) for r in res.history)
    student = res.net.state_dict()
    assert set(teachers[-1]) == {k for k in student if "predictor" not in k}
    t1, t2, s = flat(teachers[0]), flat(teachers[1]), flat({k: student[k] for k in teachers[1]})
    assert not torch.allclose(t1, t2)  # the teacher moved during the second epoch
    assert not torch.allclose(t2, s)   # ... but is not the student (EMA, not a copy)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["moco_v2", "dino"])
def test_stateful_objective_resumes_exactly(tiny, tmp_path, name, monkeypatch):
    full = train(config(name, checkpoint_every=1), tiny, tmp_path / "full")

    def stop(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(name, checkpoint_every=1), tiny, tmp_path / "resumed", callbacks=(stop,))
    shutil.copytree(tmp_path / "resumed", tmp_path / "lost")
    resumed = train(config(name, checkpoint_every=1), tiny, tmp_path / "resumed")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    saved = [torch.load(p / CHECKPOINT, weights_only=False)["meta"]["objective"] for p in
             (tmp_path / "full", tmp_path / "resumed")]
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key

    # the objective's state is what makes it exact: dropping it on resume changes the second epoch
    cls = type(make_objective(name))
    monkeypatch.setattr(cls, "load_state_dict", lambda self, state: None)
    lost = train(config(name, checkpoint_every=1), tiny, tmp_path / "lost")
    assert lost.history[0]["loss"] == full.history[0]["loss"]  # epoch 1 comes from the checkpoint
    assert lost.history[1]["loss"] != full.history[1]["loss"]
