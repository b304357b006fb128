"""Shared experiment helpers: recipes reach the config, summaries aggregate seeds, a grid trains each configuration
once, comparisons outside the claims are paired as the claims are; a table of runs is trained once per configuration
and read off its histories; engines' gradients are compared."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bilevel_ssl.config import ConfigError
from bilevel_ssl.experiments import (RECIPES, Data, recipes_with, augment_subset_config, check_values, compare_meta_gradients,
                                     config_key, conflict_stats, grad_norm_stats, gradient_agreement, history_stats,
                                     knn_monitor, make_config, meta_step_gradients,
                                     probe_loss_monitor, run_rows, selection_seed_list, summarize,
                                     train_and_evaluate)


def test_make_config_applies_recipe_and_inner_lr():
    base = make_config("barlow_twins", epochs=2)
    assert base.meta == "none" and base.meta_args == {} and base.hypergrad_args == {}
    assert base.objective_args == RECIPES["barlow_twins"]["objective_args"]
    gessl = make_config("barlow_twins", meta="gessl", meta_args={"m": 4}, epochs=2)
    assert gessl.meta_args == {"m": 4, "inner_lr": RECIPES["barlow_twins"]["inner_lr"]}
    own = make_config("barlow_twins", meta="gessl", meta_args={"inner_lr": 0.3}, epochs=2)
    assert own.meta_args["inner_lr"] == 0.3  # an explicit value wins over the recipe
    assert make_config("vicreg").lr == RECIPES["vicreg"]["lr"]
    assert make_config("vicreg", optimizer="adam", lr=1e-3).lr == 1e-3  # the recipe's lr is an SGD one
    # a single-level multi-task baseline has no inner step: the recipe's inner_lr is not passed (it would be refused)
    multi = make_config("barlow_twins", meta="multitask", meta_args={"n_tasks": 2, "combine": "pcgrad"})
    assert multi.meta_args == {"n_tasks": 2, "combine": "pcgrad"}
    assert make_config("vicreg", meta="tc2").meta_args == {"inner_lr": RECIPES["vicreg"]["inner_lr"]}


def test_make_config_validates():
    with pytest.raises(ConfigError, match="objective: unknown value 'simclrr'"):
        make_config("simclrr")
    with pytest.raises(ConfigError, match="lr: must be a finite number > 0"):
        make_config("simclr", lr=0.0)
    with pytest.raises(ConfigError, match="meta"):  # an unknown meta-method is the config's error, naming the key
        make_config("barlow_twins", meta="gesssl")


def test_summarize_means_and_cis_per_group():
    rows = [{"m": "a", "seed": s, "acc": v} for s, v in enumerate([0.5, 0.6, 0.7])] + [{"m": "b", "seed": 0, "acc": 0.9}]
    table = summarize(rows, ["m"], ["acc"]).set_index("m")
    assert table.loc["a", "acc"] == pytest.approx(0.6) and table.loc["a", "seeds"] == 3
    assert table.loc["a", "acc_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    assert table.loc["b", "acc_ci95"] == 0.0


def test_knn_monitor_scores_a_backbone(mnistm):
    from bilevel_ssl.data import make_splits
    from bilevel_ssl.meta import SSLNet
    from bilevel_ssl.models import make_backbone

    splits = make_splits(mnistm, novel_classes=5)
    torch.manual_seed(0)
    net = SSLNet(make_backbone("conv4", 3, width=8), torch.nn.ModuleDict({"projector": torch.nn.Identity()}))
    out = knn_monitor(splits, n_train=200, n_test=100)(1, net)
    assert set(out) == {"monitor_knn"} and 0.2 < out["monitor_knn"] <= 1.0


def test_run_grid_trains_each_configuration_once_and_keeps_diverged_rows():
    """Entries with equal configurations share one training run; a FloatingPointError becomes a diverged row with
    NaN scores (not a dropped row); rows keep the order and the key parts of the grid."""
    from types import SimpleNamespace

    from bilevel_ssl.experiments import config_key, run_grid

    ref = make_config("simclr", seed=0, epochs=1)
    configs = {("tc2", "full", 0): ref, ("n_tasks", "4", 0): make_config("simclr", seed=0, epochs=1),
               ("n_tasks", "2", 0): make_config("simclr", seed=0, epochs=2), ("bad", "x", 1): make_config("simclr", seed=1)}
    assert config_key(configs[("tc2", "full", 0)]) == config_key(configs[("n_tasks", "4", 0)])
    trained = []

    def train(cfg):
        trained.append(cfg.epochs if cfg.seed == 0 else -1)
        if cfg.seed == 1:
            raise FloatingPointError("non-finite gradient")
        return SimpleNamespace(history=[{"epoch": e + 1, "loss": 1.0 / (e + 1)} for e in range(cfg.epochs)])

    rows, hist = run_grid(configs, train, lambda run, cfg: {"acc": 0.5 + cfg.epochs / 10, "cached": False},
                          columns=["acc", "absent"])
    assert sorted(trained) == [-1, 1, 2]  # three distinct configurations, three runs
    assert [(r["group"], r["label"], r["seed"]) for r in rows] == list(configs)
    assert rows[0]["acc"] == rows[1]["acc"] == pytest.approx(0.6) and rows[2]["acc"] == pytest.approx(0.7)
    assert np.isnan(rows[0]["absent"]) and "cached" not in rows[0]
    assert [r["diverged"] for r in rows] == [0.0, 0.0, 0.0, 1.0] and np.isnan(rows[3]["acc"])
    assert set(hist) == set(list(configs)[:3]) and len(hist[("n_tasks", "2", 0)]) == 2
    with pytest.raises(ValueError, match="names"):
        run_grid(configs, train, lambda run, cfg: {}, names=("group", "label"))


def test_described_pairs_like_the_claims():
    """Mean paired differences over the seeds both runs have usable (diverged and one-sided seeds dropped and
    named); a pair with an absent run says so instead of raising."""
    import pandas as pd

    from bilevel_ssl.claims import from_wide
    from bilevel_ssl.experiments import described

    runs = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 4, "seed": [0, 1, 2, 0, 1, 2, 3],
                         "acc": [0.5, 0.7, 0.9, 0.4, 0.5, 0.1, 0.3], "knn": [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1],
                         "diverged": [0, 0, 0, 0, 0, 1, 0]})
    out = described(from_wide(runs, "run", ["acc", "knn"]), {"x": ("a", "b"), "y": ("a", "c")}, ["acc", "knn"])
    assert out["x"].startswith("described, not decided: a − b: acc +0.150, knn +0.100 (mean over 2 paired seeds")
    assert "seed 2: B diverged" in out["x"] and "seeds on one side only: 3" in out["x"]
    assert out["y"] == "not in the table: c"

# ---------------------------------------------------------------------------------------------- a table of runs

def test_check_values_names_the_parameter_and_the_bad_values():
    check_values("gain_metric", "knn_acc", ["knn_acc", "linear_acc"])
    check_values("seeds", [0, 1], range(3))
    with pytest.raises(ValueError, match=r"baselines: 'pcgradd', 'x' not allowed; allowed: pcgrad, gradvac"):
        check_values("baselines", ["pcgrad", "pcgradd", "x"], ("pcgrad", "gradvac"))
    with pytest.raises(ValueError, match=r"grid_seeds: 5 not allowed \(a subset of seeds\); allowed: 0, 1"):
        check_values("grid_seeds", [5], [0, 1], "a subset of seeds")
    with pytest.raises(ValueError, match="grid_base: 'byol' not allowed"):  # a string is one value, not its letters
        check_values("grid_base", "byol", ["simclr"])


def test_selection_seed_list_takes_the_first_seeds_and_names_the_key_otherwise():
    assert selection_seed_list(1, [3, 1, 2]) == [3]
    assert selection_seed_list(3, (3, 1, 2)) == [3, 1, 2]  # the order of seeds, not sorted
    for bad in (0, 4, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"^selection_seeds: .* not allowed; allowed: 1 to len\(seeds\) = 3$"):
            selection_seed_list(bad, [3, 1, 2])


def test_config_key_is_the_whole_configuration():
    a, b = make_config("simclr", seed=0), make_config("simclr", seed=0)
    assert a is not b and config_key(a) == config_key(b)
    assert config_key(a) != config_key(make_config("simclr", seed=1))
    assert config_key(a) != config_key(make_config("simclr", seed=0, meta="gessl", meta_args={"m": 8}))


HISTORY = [{"epoch": 1, "loss": 3.0, "time_s": 2.0, "threshold": 0.5, "bound": 0.2},
           {"epoch": 2, "loss": 2.0, "time_s": 4.0, "threshold": 0.7, "bound": 0.9},
           {"epoch": 3, "loss": 1.5, "time_s": 6.0, "threshold": 0.6, "bound": 0.4}]


def test_history_stats_reductions_and_missing_keys():
    out = history_stats(HISTORY, {"thr_mean": ("mean", "threshold"), "thr": ("last", "threshold"),
                                  "bound_max": ("max", "bound"), "g_grad_norm": ("mean", "g_grad_norm"),
                                  "xi": ("mean", "xi")}, missing={"g_grad_norm": 0.0})
    assert list(out)[:2] == ["train_s_per_epoch", "final_loss"]  # always there, first
    assert out["train_s_per_epoch"] == 4.0 and out["final_loss"] == 1.5
    assert out["thr_mean"] == pytest.approx(0.6) and out["thr"] == 0.6 and out["bound_max"] == 0.9
    assert out["g_grad_norm"] == 0.0 and math.isnan(out["xi"])  # an absent key: its `missing` value, else NaN
    with pytest.raises(ValueError, match="stats: unknown reduction 'median' of 'x'; allowed: mean, last, max"):
        history_stats(HISTORY, {"x": ("median", "loss")})


def test_grad_norm_stats_mean_variance_cv():
    h = [{"grad_norm": 1.0, "grad_norm_sq": 2.0}, {"grad_norm": 3.0, "grad_norm_sq": 10.0}]
    out = grad_norm_stats(h)
    assert out["grad_norm_mean"] == 2.0 and out["grad_norm_var"] == pytest.approx(6.0 - 4.0)
    assert out["grad_norm_cv"] == pytest.approx(math.sqrt(2.0) / 2.0)
    # rounding can make E|g|^2 - (E|g|)^2 slightly negative for a constant norm: clipped to 0, not a NaN std
    assert grad_norm_stats([{"grad_norm": 0.1, "grad_norm_sq": 0.1 ** 2 - 1e-18}])["grad_norm_var"] == 0.0
    with pytest.raises(ValueError, match="no grad_norm / grad_norm_sq records"):
        grad_norm_stats([{"loss": 1.0}])


def test_conflict_stats_summarise_the_measured_steps_of_a_history():
    history = [{"epoch": 1, "steps": [{"step": 1, "monitor_mean_cos": 0.5, "monitor_conflict_rate": 0.0},
                                      {"step": 2, "loss": 1.0},  # a step the monitor skipped (every > 1)
                                      {"step": 3, "monitor_mean_cos": -0.25, "monitor_conflict_rate": 1.0}]},
               {"epoch": 2, "steps": [{"step": 5, "monitor_mean_cos": 0.0, "monitor_conflict_rate": 0.0}]}]
    out = conflict_stats(history)
    assert out == {"mean_cos": pytest.approx(0.25 / 3), "conflict_steps": pytest.approx(1 / 3), "min_cos": -0.25}
    assert conflict_stats([{"steps": [{"step": 1, "x_mean_cos": 1.0, "x_conflict_rate": 0.0}]}], prefix="x_")[
        "mean_cos"] == 1.0
    with pytest.raises(ValueError, match="no monitor_mean_cos / monitor_conflict_rate records"):
        conflict_stats([{"epoch": 1, "loss": 2.0}])


class _Run:
    def __init__(self, cfg):
        self.backbone, self.cached, self.out_dir = cfg.seed, False, f"/cache/{cfg.seed}"
        self.history = [{"loss": 1.0 + cfg.seed, "time_s": 2.0, "probe": 10.0 * cfg.seed}]


def test_train_and_evaluate_trains_each_configuration_once_and_records_divergence(monkeypatch, capsys):
    import bilevel_ssl.cache
    import bilevel_ssl.experiments as ex

    trained, scored, monitors_seen = [], [], []

    def fake_train(cfg, data, *, monitors, step_monitors, tag):
        assert data == "images" and tag == "" and step_monitors == ()  # the pre-training images of Data
        trained.append(cfg.seed)
        monitors_seen.append(monitors)
        if cfg.seed == 2:
            raise FloatingPointError("non-finite gradient at step 3")
        return _Run(cfg)

    def fake_eval(backbone, splits, *, n_episodes, seed, device, shots):
        scored.append((backbone, seed, shots))
        return {"linear_acc": 0.5 + seed / 10}

    monkeypatch.setattr(bilevel_ssl.cache, "cached_train", fake_train)
    monkeypatch.setattr(ex, "evaluate_encoder", fake_eval)
    configs = {("a", 0): make_config("simclr", seed=0), ("b", 0): make_config("simclr", seed=0),  # the same run
               ("a", 1): make_config("simclr", seed=1), ("a", 2): make_config("simclr", seed=2)}
    records, histories = train_and_evaluate(configs, Data(None, "splits", "images"), shots=(),
                                            stats={"probe_last": ("last", "probe")},
                                            summary=lambda h: {"n_epochs": len(h)},
                                            monitors=lambda cfg: (f"monitor of seed {cfg.seed}",))
    assert trained == [0, 1, 2] and [s[1] for s in scored] == [0, 1] and scored[0][2] == ()
    assert monitors_seen[1] == ("monitor of seed 1",)  # a callable builds the monitors per run
    assert records[("a", 0)] is records[("b", 0)] and histories[("b", 0)] is histories[("a", 0)]
    assert records[("a", 1)] == {"linear_acc": 0.6, "diverged": 0.0, "train_s_per_epoch": 2.0, "final_loss": 2.0,
                                 "probe_last": 10.0, "n_epochs": 1, "cached": False, "folder": "/cache/1"}
    assert records[("a", 2)] == {"diverged": 1.0, "error": "non-finite gradient at step 3"}
    assert ("a", 2) not in histories and list(records) == list(configs)
    out = capsys.readouterr().out
    assert "a 2: DIVERGED - non-finite gradient at step 3" in out
    assert "a 1: linear_acc 0.600  (trained, 2.0 s/epoch)" in out


def test_run_rows_names_key_parts_and_fills_nan():
    records = {("variant", "joint", 0): {"linear_acc": 0.7, "diverged": 0.0, "folder": "x", "cached": True},
               ("variant", "joint", 1): {"diverged": 1.0, "error": "boom"}}
    rows = run_rows(records, ["group", "label", "seed"], ["linear_acc", "diverged"])
    assert rows[0] == {"group": "variant", "label": "joint", "seed": 0, "linear_acc": 0.7, "diverged": 0.0}
    assert math.isnan(rows[1]["linear_acc"]) and rows[1]["diverged"] == 1.0
    assert run_rows(records, ["group", "label", "seed"])[1] == {"group": "variant", "label": "joint", "seed": 1,
                                                                "diverged": 1.0}  # no error text, no folder
    assert run_rows({"base": {"x": 1.0}}, ["method"]) == [{"method": "base", "x": 1.0}]
    with pytest.raises(ValueError, match="names: \\['method'\\] do not name the 2 part"):
        run_rows({("base", 0): {}}, ["method"])


def test_probe_loss_monitor_is_the_eval_mode_loss_on_fixed_views(tiny):
    from bilevel_ssl.augment import make_views, preset
    from bilevel_ssl.objectives import make_objective
    from bilevel_ssl.trainer import build_net

    cfg = make_config("simclr", backbone_args={"width": 8}, batch_size=32)
    net, objective = build_net(cfg, tiny.channels, tiny.size)
    net.train()
    images = tiny.images[:16]
    monitor = probe_loss_monitor(cfg, images)
    with torch.no_grad():  # as the trainer runs monitors
        first, second = monitor(1, net), monitor(2, net)
    assert net.training and first == second  # mode restored; the same views every epoch
    x = torch.cat(make_views(images.float().div(255), 2, preset(cfg.augment), torch.Generator().manual_seed(0)))
    net.eval()
    with torch.no_grad():
        want = float(make_objective(cfg.objective, **cfg.objective_args).loss(objective.outputs(net, x, 2), None))
    assert first["probe_loss"] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="without a teacher network, got byol"):
        probe_loss_monitor(make_config("byol"), images)


def test_augment_subset_config_only_changes_the_augmentation():
    cfg = make_config("simclr", seed=3)
    sub = augment_subset_config(cfg, ["crop"])
    assert sub.augment_args and cfg.augment_args == {}
    assert {k: v for k, v in sub.to_dict().items() if k != "augment_args"} == {
        k: v for k, v in cfg.to_dict().items() if k != "augment_args"}
    assert config_key(sub) != config_key(cfg)  # the subset is part of the run's identity (and cache key)


# ------------------------------------------------------------------------------------- hypergradient check

def test_gradient_agreement():
    ref = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert gradient_agreement(ref.clone(), ref) == {"cos": pytest.approx(1.0), "rel_err": 0.0}
    twice = gradient_agreement(2 * ref, ref)  # same direction, twice as long: cosine blind, relative error not
    assert twice["cos"] == pytest.approx(1.0) and twice["rel_err"] == pytest.approx(1.0)
    assert gradient_agreement(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), ref)["cos"] == pytest.approx(0.0)


def test_compare_meta_gradients_of_gessl_engines(tiny):
    def cfg(engine, **args):
        margs = {"m": 4, "allow_untrained_meta": True} if engine == "first_order" else {"m": 4}
        return make_config("simclr", meta="gessl", meta_args=margs, hypergrad=engine, hypergrad_args=args,
                           backbone_args={"width": 8}, batch_size=16, seed=1)

    images = tiny.images[:16]
    ref = cfg("second_order")
    rows = compare_meta_gradients({"second_order": ref, "first_order": cfg("first_order")}, ref, images, view_seed=1)
    exact, first = rows
    assert exact["label"] == "second_order" and exact["theta_cos"] == pytest.approx(1.0)
    assert exact["theta_rel_err"] == 0.0 and exact["g_rel_err"] == 0.0  # deterministic: the same step twice
    assert exact["g_norm"] > 0 and first["g_norm"] == 0.0  # first order: g gets no gradient at all
    assert first["theta_rel_err"] > 0 and set(exact) == {"label", "theta_cos", "theta_rel_err", "g_cos", "g_rel_err",
                                                          "theta_norm", "g_norm", "seconds"}
    # another view seed is another batch, hence another gradient; dtype is the precision the step is computed in
    g = meta_step_gradients(ref, images, view_seed=1)
    assert not torch.equal(g["theta"], meta_step_gradients(ref, images, view_seed=2)["theta"])
    assert not torch.equal(g["theta"], meta_step_gradients(ref, images, view_seed=1, dtype=torch.float64)["theta"])
    assert g["theta"].dtype == torch.float64 and g["meta"].numel() > 0  # returned as float64 either way


def test_run_monitors_do_not_change_training_and_name_what_they_log(mnistm, tiny):
    """The GeSSL notebooks share runs through one monitor set (RunMonitors): a monitored run must train exactly the
    weights of an unmonitored one, and its history must hold what the tag names."""
    from bilevel_ssl.data import make_splits
    from bilevel_ssl.experiments import RunMonitors
    from bilevel_ssl.trainer import train

    data = Data(mnistm, make_splits(mnistm, novel_classes=5), tiny)
    mon = RunMonitors.of(data, probe_images=16)
    assert mon.tag == "knn-monitor+probe-loss16+grad-norm"
    cfg = make_config("simclr", meta="gessl", meta_args={"m": 2}, epochs=2, batch_size=32,
                      backbone_args={"width": 8})
    plain = train(cfg, data.pretrain)
    kw = mon(cfg)
    assert kw["tag"] == mon.tag and len(kw["monitors"]) == 2 and len(kw["step_monitors"]) == 1
    watched = train(cfg, data.pretrain, monitors=kw["monitors"], step_monitors=kw["step_monitors"])
    for (name, a), b in zip(plain.net.state_dict().items(), watched.net.state_dict().values()):
        assert torch.equal(a, b), name
    assert {"monitor_knn", "probe_loss", "grad_norm"} <= set(watched.history[-1])
    assert "probe_loss" not in plain.history[-1]
    # a teacher objective has no probe loss: the 5-NN monitor only, the same tag
    assert len(mon(make_config("byol"))["monitors"]) == 1
    with pytest.raises(ValueError, match="probe_images: must be >= 1, got 0"):
        RunMonitors.of(data, probe_images=0)


def test_validation_data_holds_out_part_of_the_training_images_only(mnistm):
    from bilevel_ssl.data import make_splits
    from bilevel_ssl.experiments import validation_data

    splits = make_splits(mnistm, novel_classes=5)
    full = validation_data(Data(mnistm, splits, splits.train), 0.2)
    fit, val = full.splits.train, full.splits.test
    assert len(fit) + len(val) == len(splits.train) and abs(len(val) - 0.2 * len(splits.train)) <= 5
    train_rows = {x.numpy().tobytes() for x in splits.train.images}
    fit_rows = {x.numpy().tobytes() for x in fit.images}
    val_rows = {x.numpy().tobytes() for x in val.images}
    assert not fit_rows & val_rows and (fit_rows | val_rows) <= train_rows  # disjoint, inside the train split
    assert sorted(set(val.labels.tolist())) == splits.base_classes  # stratified: every base class validated
    assert full.splits.novel is splits.novel and full.pretrain is fit  # novel classes untouched; no test image
    capped = validation_data(Data(mnistm, splits, splits.train.subset(torch.arange(500))), 0.2)
    assert len(capped.pretrain) == 400 and len(capped.splits.test) == len(val)
    with pytest.raises(ValueError, match="validation_fraction: must be in"):
        validation_data(full, 1.0)


def test_select_on_validation_picks_the_best_finite_score(monkeypatch, capsys, tiny):
    import types

    import bilevel_ssl.cache as cache
    import bilevel_ssl.protocol as protocol
    from bilevel_ssl.data import make_splits
    from bilevel_ssl.experiments import select_on_validation

    data = Data(tiny, make_splits(tiny, novel_classes=2), tiny)
    score = {0.01: 0.5, 0.1: 0.7, 1.0: float("inf"), 0.3: 0.7}  # inf: diverges

    def fake_train(cfg, images, **kw):
        if score[cfg.meta_args["inner_lr"]] == float("inf"):
            raise FloatingPointError("non-finite gradient")
        return types.SimpleNamespace(backbone=cfg.meta_args["inner_lr"], cached=False)

    monkeypatch.setattr(cache, "cached_train", fake_train)
    monkeypatch.setattr(protocol, "knn", lambda backbone, splits, device="cpu": score[backbone])
    cands = {a: make_config("simclr", meta="gessl", meta_args={"inner_lr": a}) for a in (0.01, 0.1, 1.0, 0.3)}
    sel = select_on_validation("gessl_args.inner_lr", cands, data)
    assert capsys.readouterr().out.splitlines() == [  # one line per candidate, in order
        "gessl_args.inner_lr = 0.01: validation 5-NN 0.500 (trained)",
        "gessl_args.inner_lr = 0.1: validation 5-NN 0.700 (trained)",
        "gessl_args.inner_lr = 1: DIVERGED - non-finite gradient",
        "gessl_args.inner_lr = 0.3: validation 5-NN 0.700 (trained)"]
    assert sel.chosen == 0.1 and math.isnan(sel.scores[2])  # 0.3 ties 0.1 and is listed later; 1.0 diverged
    assert "**not** the validation choice (0.1)" in sel.markdown(used=0.3) and "diverged" in sel.markdown()
    assert sel.frame()["chosen"].sum() == 1 and sel.as_dict()["chosen"] == 0.1
    with pytest.raises(ValueError, match="share one seed"):
        select_on_validation("x", {1: make_config("simclr", seed=0), 2: make_config("simclr", seed=1)}, data)
    with pytest.raises(FloatingPointError, match="every candidate diverged"):
        select_on_validation("gessl_args.inner_lr", {1.0: cands[1.0]}, data)
    capsys.readouterr()
    # several seeds per value: the mean decides (seed 0 alone would choose 0.01, the mean 0.1)
    per_seed = {(0.01, 0): 0.60, (0.01, 1): 0.50, (0.1, 0): 0.55, (0.1, 1): 0.65}
    monkeypatch.setattr(cache, "cached_train", lambda cfg, images, **kw: types.SimpleNamespace(
        backbone=(cfg.meta_args["inner_lr"], cfg.seed), cached=cfg.seed == 0))
    monkeypatch.setattr(protocol, "knn", lambda backbone, splits, device="cpu": per_seed[backbone])
    multi = {a: [make_config("simclr", meta="gessl", seed=s, meta_args={"inner_lr": a}) for s in (0, 1)]
             for a in (0.01, 0.1)}
    sel = select_on_validation("gessl_args.inner_lr", multi, data)
    assert capsys.readouterr().out.splitlines() == [
        "gessl_args.inner_lr = 0.01: validation 5-NN 0.550, mean of seed 0: 0.600, seed 1: 0.500 (1 trained, 1 cache)",
        "gessl_args.inner_lr = 0.1: validation 5-NN 0.600, mean of seed 0: 0.550, seed 1: 0.650 (1 trained, 1 cache)"]
    assert sel.chosen == 0.1 and sel.scores == pytest.approx((0.55, 0.6)) and sel.seeds == (0, 1) and sel.as_dict()["seeds"] == [0, 1]
    assert sel.seed_scores == ((0.60, 0.50), (0.55, 0.65))
    assert sel.as_dict()["seed_scores"] == [[0.60, 0.50], [0.55, 0.65]]
    assert ("the mean of 2 runs per value, seeds 0, 1 (in brackets: each seed's score, in that order): "
            "0.01: 0.550 (0.600 / 0.500), 0.1: 0.600 (0.550 / 0.650))") in sel.markdown()
    from bilevel_ssl.index import _selections  # the README / index line from metrics.json reads the same
    assert _selections({"inner_lr_selection": sel.as_dict(), "inner_lr_used": 0.1}) == sel.markdown(used=0.1)
    old = {k: v for k, v in sel.as_dict().items() if k != "seed_scores"}  # a record written before seed_scores
    assert _selections({"x_selection": old}) == sel.markdown().replace(
        " (in brackets: each seed's score, in that order)", "").replace(" (0.600 / 0.500)", "").replace(
        " (0.550 / 0.650)", "")
    with pytest.raises(ValueError, match=r"share one seed \(or one list of seeds\), got 0.01: \[0, 1\], 0.1: \[0\]"):
        select_on_validation("gessl_args.inner_lr", {0.01: multi[0.01], 0.1: multi[0.1][:1]}, data)
    with pytest.raises(ValueError, match="distinct seeds"):
        select_on_validation("gessl_args.inner_lr", {0.01: [multi[0.01][0]] * 2}, data)


def test_recipes_with_replaces_one_objective_option_and_keeps_the_rest():
    recipes = recipes_with({"simclr": {"temperature": 0.1}}, ["simclr", "byol"])
    cfg = make_config("simclr", recipes=recipes)
    assert cfg.objective_args["temperature"] == 0.1
    assert recipes["byol"] == RECIPES["byol"] and RECIPES["simclr"]["objective_args"]["temperature"] == 0.2
    assert make_config("simclr", recipes=recipes_with({}, ["simclr"])) == make_config("simclr")  # {}: same run


def test_recipes_with_names_a_bad_key():
    with pytest.raises(ValueError, match="objective_args: 'simclrr' not allowed.*allowed: simclr"):
        recipes_with({"simclrr": {"temperature": 0.1}}, ["simclr"])
    with pytest.raises(ValueError, match="objective_args: 'simclr' needs a dict"):
        recipes_with({"simclr": 0.1}, ["simclr"])
    with pytest.raises((ValueError, ConfigError), match="temperatur"):
        make_config("simclr", recipes=recipes_with({"simclr": {"temperatur": 0.1}}, ["simclr"]))
