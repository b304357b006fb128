import pytest
import torch

from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.models import load_encoder
from bilevel_ssl.trainer import CHECKPOINT, ENCODER, lr_factor, train


def cfg(**kw):
    base = dict(epochs=3, batch_size=32, backbone_args={"width": 16}, lr=0.05, progress=False,
                objective_args={"proj_hidden": 32, "proj_dim": 16})
    return TrainConfig(**{**base, **kw})


def weights(result):
    return torch.cat([p.detach().flatten() for p in result.net.state_dict().values() if p.is_floating_point()])


def test_same_seed_same_numbers_other_seed_other_numbers(tiny):
    a, b, c = train(cfg(seed=1), tiny), train(cfg(seed=1), tiny), train(cfg(seed=2), tiny)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert torch.equal(weights(a), weights(b))
    assert not torch.equal(weights(a), weights(c))


def test_history_records_each_epoch_and_schedule(tiny):
    res = train(cfg(epochs=4, warmup_epochs=1), tiny)
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["time_s"] > 0 for r in res.history)
    lrs = [r["lr"] for r in res.history]
    assert lrs[1] > lrs[2] > lrs[3] == 0.0  # cosine to zero after warm-up


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_training_lowers_the_loss(tiny):
    res = train(cfg(epochs=8, lr=0.1), tiny)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05


class Interrupt(Exception):
    pass


def test_resume_after_interruption_ends_where_uninterrupted_run_ends(tiny, tmp_path):
    full = train(cfg(epochs=4, checkpoint_every=1), tiny, tmp_path / "full")

    def kill_after_two(epoch, record):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg(epochs=4, checkpoint_every=1), tiny, tmp_path / "resumed", callbacks=(kill_after_two,))
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["epoch"] == 2
    resumed = train(cfg(epochs=4, checkpoint_every=1), tiny, tmp_path / "resumed")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert torch.equal(weights(resumed), weights(full))
    # the saved encoder is the trained backbone
    enc = load_encoder(tmp_path / "resumed" / ENCODER)
    x = torch.rand(4, 3, 28, 28)
    torch.testing.assert_close(enc(x), full.backbone.eval()(x))


def test_resume_refuses_other_parameters(tiny, tmp_path):
    train(cfg(epochs=1), tiny, tmp_path)
    with pytest.raises(ConfigError, match=r"resume: .*differing keys: \['lr'\]"):
        train(cfg(epochs=1, lr=0.2), tiny, tmp_path)


def test_non_finite_loss_stops_with_step_named_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    from bilevel_ssl.objectives import SimCLR

    calls = {"n": 0}
    real = SimCLR.loss

    def loss_nan_on_fifth_call(self, student, teacher=None):
        calls["n"] += 1
        out = real(self, student, teacher)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(SimCLR, "loss", loss_nan_on_fifth_call)
    with pytest.raises(FloatingPointError, match=r"epoch 2 step 2: loss = nan; last good checkpoint: .*checkpoint.pt"):
        train(cfg(epochs=3, checkpoint_every=1), tiny, tmp_path)  # 96 images / 32 = 3 steps per epoch
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["epoch"] == 1


def test_step_monitors_see_the_update_gradient_and_do_not_change_training(tiny):
    from bilevel_ssl.trainer import grad_norm_monitor

    seen = []

    def manual(step, net, meta, views):  # reads .grad before the optimizer step; consumes the global RNG on purpose
        sq = sum(float((p.grad.double() ** 2).sum()) for p in net.parameters() if p.grad is not None)
        seen.append(step)
        return {"manual_sq": sq + 0.0 * float(torch.rand(()))}

    plain = train(cfg(epochs=2), tiny)
    res = train(cfg(epochs=2), tiny, step_monitors=(grad_norm_monitor, manual))
    assert [r["loss"] for r in res.history] == [r["loss"] for r in plain.history]
    assert torch.equal(weights(res), weights(plain))
    steps_per_epoch = len(tiny) // 32
    assert seen == list(range(1, 2 * steps_per_epoch + 1))
    for rec in res.history:
        assert [s["step"] for s in rec["steps"]] == seen[(rec["epoch"] - 1) * steps_per_epoch:rec["epoch"] * steps_per_epoch]
        for s in rec["steps"]:
            assert s["grad_norm"] > 0 and s["grad_norm_sq"] == pytest.approx(s["manual_sq"], rel=1e-12)
            assert s["grad_norm"] ** 2 == pytest.approx(s["grad_norm_sq"], rel=1e-9)
        # the epoch record holds the mean over its steps, like the meta-method's logs
        assert rec["grad_norm"] == pytest.approx(sum(s["grad_norm"] for s in rec["steps"]) / steps_per_epoch)
    assert "steps" not in plain.history[0]


def test_non_finite_gradient_with_finite_loss_stops_naming_the_parameters(tiny, tmp_path, monkeypatch):
    from bilevel_ssl.objectives import SimCLR

    real = SimCLR.loss
    calls = {"n": 0}

    def loss_with_nan_gradient(self, student, teacher=None):
        calls["n"] += 1
        out = real(self, student, teacher)
        if calls["n"] == 4:  # + sqrt(|0 * z|): value 0, gradient inf * 0 = nan into z's whole graph
            out = out + (0.0 * student[0]["z"].sum()).abs().sqrt()
        return out

    monkeypatch.setattr(SimCLR, "loss", loss_with_nan_gradient)
    with pytest.raises(FloatingPointError, match=r"epoch 2 step 1: non-finite gradient of backbone\.\S+, .* and \d+ "
                                                 r"more; last good checkpoint: .*checkpoint.pt"):
        train(cfg(epochs=3, checkpoint_every=1), tiny, tmp_path)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["epoch"] == 1


def test_augment_args_change_the_views_and_are_validated_before_compute(tiny):
    a = train(cfg(epochs=1), tiny)
    b = train(cfg(epochs=1, augment_args={"rotate90_p": 0.75}), tiny)
    assert [r["loss"] for r in a.history] != [r["loss"] for r in b.history]
    assert cfg(augment_args={"rotate90_p": 0.75}).augmentation().rotate90_p == 0.75
    with pytest.raises(ConfigError, match=r"augment_args: unknown field\(s\) \['rotation'\]"):
        cfg(augment_args={"rotation": 0.5})


def test_optimizer_and_schedule_builders():
    """The public builders the trainer, BiSSL and the benchmark share: by name with the given settings, and the
    schedule multiplies the initial lr by lr_factor after each step."""
    from bilevel_ssl.trainer import build_optimizer, build_schedule, make_optimizer

    p = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(cfg(optimizer="sgd", lr=0.2, momentum=0.8, weight_decay=1e-3), p)
    assert type(sgd) is torch.optim.SGD
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {"lr": 0.2, "momentum": 0.8,
                                                                                "weight_decay": 1e-3}
    assert type(make_optimizer("adam", p, lr=0.1, momentum=0.5)) is torch.optim.Adam
    adamw = make_optimizer("adamw", p, lr=0.1, weight_decay=0.05)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="optimizer: unknown 'lars'; allowed: sgd, adam, adamw"):
        make_optimizer("lars", p, lr=0.1)
    sched = build_schedule(sgd, 10, 2, "cosine")
    for step in range(1, 12):
        sgd.step()
        sched.step()
        assert sgd.param_groups[0]["lr"] == pytest.approx(0.2 * lr_factor(step, 10, 2, "cosine"), abs=1e-15)
