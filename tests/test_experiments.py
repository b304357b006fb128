"""Shared experiment helpers: recipes reach the config, verdicts follow the paired CI, summaries aggregate seeds."""

import numpy as np
import pytest
from scipy import stats

from bilevel_ssl.config import ConfigError
from bilevel_ssl.experiments import RECIPES, knn_monitor, make_config, paired_difference, summarize, verdict


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


def test_paired_difference_matches_student_t():
    a, b = np.array([0.7, 0.72, 0.69, 0.75]), np.array([0.68, 0.7, 0.7, 0.71])
    d = a - b
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2.0
    out = paired_difference(a, b)
    assert out["diff"] == pytest.approx(d.mean()) and out["ci95"] == pytest.approx(half) and out["n"] == 4


@pytest.mark.parametrize("diff,ci,n,expected", [
    (0.05, 0.01, 5, "holds"),
    (-0.05, 0.01, 5, "does not hold (the method is worse)"),
    (0.005, 0.01, 5, "inconclusive (CI includes 0)"),
    (0.05, 0.0, 1, "inconclusive (fewer than 2 seeds)"),
])
def test_verdict(diff, ci, n, expected):
    assert verdict(diff, ci, n) == expected


def test_verdict_lower_is_better():
    assert verdict(-0.05, 0.01, 3, higher_is_better=False) == "holds"


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
