import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from bilevel_ssl.data import ImageSet, Splits, stratified_split
from bilevel_ssl.evaluate import extract_features, linear_probe
from bilevel_ssl.models import make_backbone
from bilevel_ssl.semisup import (DEFAULT_LRS, PAPER_LRS, balanced_label_subset, finetune, result_key,
                                 semi_supervised)


# ------------------------------------------------------------------------------------------------ toy data
def onehot_set(n_per: int, classes: int = 4, seed: int = 0, name: str = "toy") -> ImageSet:
    """1x4x4 images: pixel ``c`` (of the first ``classes``) is lit for class ``c``, the rest is noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per)
    x = rng.integers(0, 256, size=(len(y), 16))
    x[:, :classes] = 0
    x[np.arange(len(y)), y] = 255
    return ImageSet(torch.from_numpy(x.astype(np.uint8)).view(-1, 1, 4, 4), torch.from_numpy(y), name)


class BlindEncoder(nn.Module):
    """Linear + BatchNorm features whose weights on the class pixels start at 0: frozen, the features carry no
    label information; fine-tuned, the gradient reaches those weights."""

    def __init__(self, classes: int = 4, dim: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(16, dim)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(dim, 16, generator=g) * 0.25)
            self.lin.weight[:, :classes] = 0
            self.lin.bias.zero_()
        self.bn = nn.BatchNorm1d(dim)
        self.feature_dim = dim
        self.spec = {"name": "blind", "in_channels": 1}

    def forward(self, x):
        return self.bn(self.lin(x.flatten(1)))


def rgb_set(n_per: int, classes: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_per * classes, 3, 8, 8), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(classes).repeat_interleave(n_per), "rgb")


# ----------------------------------------------------------------------------------------- label subsets
def test_subset_per_class_counts_at_least_one_sorted():
    y = np.repeat([0, 1, 2, 3], [100, 50, 7, 1])
    idx = balanced_label_subset(y, 0.1, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, no repeats
    counts = np.bincount(y[idx], minlength=4)
    assert counts.tolist() == [10, 5, 1, 1]  # 0.7 -> 1 (rounded), 0.1 -> 1 (at least one per class)
    assert len(balanced_label_subset(y, 0.25, 0)) == 25 + 13 + 2 + 1  # 12.5 and 1.75 round half up
    assert len(balanced_label_subset(y, 1.0, 0)) == len(y)
    small = balanced_label_subset(np.repeat(np.arange(10), 20), 0.01, seed=3)  # 1% of 20 -> 1 per class
    assert sorted(np.repeat(np.arange(10), 20)[small].tolist()) == list(range(10))


def test_subset_seeded_and_disjoint_from_test_split():
    y = np.repeat(np.arange(5), 40)
    tr, te = stratified_split(y, 0.25, seed=0)
    a = tr[balanced_label_subset(y[tr], 0.2, seed=1)]
    assert np.array_equal(a, tr[balanced_label_subset(y[tr], 0.2, seed=1)])
    assert not np.array_equal(a, tr[balanced_label_subset(y[tr], 0.2, seed=2)])
    assert np.bincount(y[a]).tolist() == [6] * 5  # 0.2 * 30 per class
    assert not set(a.tolist()) & set(te.tolist())
    assert set(a.tolist()) <= set(tr.tolist())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_subset_bad_fraction(bad):
    with pytest.raises(ValueError, match=r"fraction.*\(0, 1\]"):
        balanced_label_subset(np.arange(10) % 2, bad, seed=0)


# ------------------------------------------------------------------------------------------- fine-tuning
def test_finetune_beats_frozen_probe_on_blind_encoder():
    train, test = onehot_set(50, seed=0), onehot_set(50, seed=1)
    enc = BlindEncoder()
    kw = dict(fraction=0.5, lr_head=0.1, epochs=30, batch_size=50, seed=0)
    tuned = finetune(enc, train, test, lr_backbone=0.1, **kw)
    frozen = finetune(enc, train, test, lr_backbone=0.0, **kw)
    probe = linear_probe(extract_features(enc, train), train.labels, extract_features(enc, test), test.labels)
    assert tuned["top1"] > 0.9, tuned
    assert frozen["top1"] < 0.4 and probe["top1"] < 0.4, (frozen, probe)  # chance is 0.25
    assert tuned["n_labels"] == 100 and tuned["fraction"] == 0.5
    assert math.isnan(tuned["top5"])  # 4 classes: top-5 is meaningless


def test_finetune_leaves_encoder_untouched_and_is_deterministic():
    train, test = rgb_set(6, classes=7, seed=0), rgb_set(3, classes=7, seed=1)  # RGB data, gray encoder
    torch.manual_seed(0)
    enc = make_backbone("conv4", 1, width=4)
    enc.train()
    before = copy.deepcopy(enc.state_dict())
    kw = dict(fraction=0.5, lr_head=0.5, lr_backbone=0.05, epochs=3, batch_size=8, augment="mnist")
    r1 = finetune(enc, train, test, seed=0, **kw)
    r2 = finetune(enc, train, test, seed=0, **kw)
    r3 = finetune(enc, train, test, seed=1, **kw)
    after = enc.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm buffers
    assert enc.training
    assert r1 == r2
    assert r1["n_labels"] == 7 * 3 and 0 <= r1["top1"] <= r1["top5"] <= 1  # 7 classes: top-5 is defined
    assert r3 != r1  # another seed: another subset and head


def test_finetune_bad_arguments_name_the_key():
    train = onehot_set(4)
    enc = BlindEncoder()
    cases = {"lr_head": dict(lr_head=0.0), "lr_backbone": dict(lr_backbone=-1.0), "epochs": dict(epochs=0),
             "batch_size": dict(batch_size=0), "weight_decay": dict(weight_decay=-1.0),
             "augment": dict(augment="nope"), "fraction": dict(fraction=2.0)}
    for key, bad in cases.items():
        kw = dict(fraction=0.5, lr_head=0.1, lr_backbone=0.0, epochs=1) | bad
        with pytest.raises(ValueError, match=key):
            finetune(enc, train, train, **kw)
    with pytest.raises(ValueError, match="test"):
        finetune(enc, train, onehot_set(2, classes=5), fraction=0.5, lr_head=0.1, lr_backbone=0.0, epochs=1)


# -------------------------------------------------------------------------------------- semi_supervised
def test_semi_supervised_keys_and_ci():
    train, test = onehot_set(20, seed=0), onehot_set(10, seed=1)
    splits = Splits(train, test, None, [0, 1, 2, 3], [])
    r = semi_supervised(BlindEncoder(), splits, fractions=(0.25, 0.5), seeds=(0, 1),
                        lrs={0.25: (0.1, 0.1), 0.5: (0.1, 0.0)}, epochs=2, batch_size=16)
    for p in ("semisup_25pct", "semisup_50pct"):
        assert {f"{p}_top1", f"{p}_top1_ci95", f"{p}_top5", f"{p}_top5_ci95", f"{p}_n_labels"} <= set(r)
        assert 0 <= r[f"{p}_top1"] <= 1 and r[f"{p}_top1_ci95"] >= 0
    assert r["semisup_25pct_n_labels"] == 20 and r["semisup_50pct_n_labels"] == 40
    assert result_key(0.01) == "semisup_1pct" and result_key(0.1) == "semisup_10pct"
    assert result_key(0.005) == "semisup_0.5pct"
    assert set(PAPER_LRS) == set(DEFAULT_LRS) == {0.01, 0.1} and PAPER_LRS[0.1] == (1.0, 0.01)
    assert DEFAULT_LRS[0.1] == (0.1, 0.01) and DEFAULT_LRS[0.01] == PAPER_LRS[0.01]


class Exploding(BlindEncoder):
    def forward(self, x):
        raise RuntimeError("compute started before the arguments were checked")


@pytest.mark.parametrize("key, bad", [
    ("fractions", dict(fractions=())), ("fractions", dict(fractions=(0.1, 0.0))),
    ("fractions", dict(fractions=0.1)), ("seeds", dict(seeds=())), ("seeds", dict(seeds=(0, 1.5))),
    ("lrs", dict(lrs="fast")), ("lrs", dict(fractions=(0.05,))), ("lrs", dict(lrs={0.01: (0.1, 0.0)})),
    ("lrs", dict(lrs={0.01: (0.1, 0.0), 0.1: (0.0, 0.0)})), ("lrs", dict(lrs={0.01: 0.1, 0.1: (0.1, 0.0)})),
    ("epochs", dict(epochs=0)), ("augment", dict(augment="nope")), ("batch_size", dict(batch_size=1.5)),
])
def test_semi_supervised_validates_before_compute(key, bad):
    splits = Splits(onehot_set(4), onehot_set(2), None, [0, 1, 2, 3], [])
    with pytest.raises(ValueError, match=key):
        semi_supervised(Exploding(), splits, **bad)
