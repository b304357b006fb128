"""Shared experiment helpers: recipes reach the config, summaries aggregate seeds, a grid trains each configuration
once, comparisons outside the claims are paired as the claims are."""

import numpy as np
import pytest
from scipy import stats

from bilevel_ssl.config import ConfigError
from bilevel_ssl.experiments import RECIPES, knn_monitor, make_config, summarize


def test_make_config_applies_recipe_and_inner_lr():
    base = make_config("barlow_twins", epochs=2)
    assert base.meta == "none" and base.meta_args == {} and base.hypergrad_args == {}
    assert base.objective_args == RECIPES["barlow_twins"]["objective_args"]
    gessl = make_config("barlow_twins", meta="gessl", meta_args={"m": 4}, epochs=2)
    assert gessl.meta_args == {"m": 4, "inner_lr": RECIPES["barlow_twins"]["inner_lr"]}
    own = make_config("barlow_twins", meta="gessl", meta_args={"inner_lr": 0.3}, epochs=2)
    assert own.meta_args["inner_lr"] == 0.3  # an explicit value wins over the recipe
    assert make_config("vicreg").lr == RECIPES["vicreg"]["lr"]


def test_make_config_validates():
    with pytest.raises(ConfigError, match="objective: unknown value 'simclrr'"):
        make_config("simclrr")
    with pytest.raises(ConfigError, match="lr: must be a finite number > 0"):
        make_config("simclr", lr=0.0)


def test_summarize_means_and_cis_per_group():
    rows = [{"m": "a", "seed": s, "acc": v} for s, v in enumerate([0.5, 0.6, 0.7])] + [{"m": "b", "seed": 0, "acc": 0.9}]
    table = summarize(rows, ["m"], ["acc"]).set_index("m")
    assert table.loc["a", "acc"] == pytest.approx(0.6) and table.loc["a", "seeds"] == 3
    assert table.loc["a", "acc_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    assert table.loc["b", "acc_ci95"] == 0.0


def test_knn_monitor_scores_a_backbone(mnistm):
    import torch

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
