"""What the experiment notebooks share: data preparation, per-objective recipes, base/method configurations,
a per-epoch k-NN monitor, seed aggregation and the claim verdicts of ``shared/paper-claims.md``.

Keeping this here keeps the notebooks thin (parameters, calls, figures, reading) and makes every notebook build
the *same* configuration for the same base run - so :func:`bilevel_ssl.cache.cached_train` reuses it across
notebooks (e.g. the SimCLR seed-0 run of the universality notebook is the t-SNE notebook's SimCLR encoder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig
from .data import AUGMENT_PRESET, ImageSet, Splits, load_dataset, make_splits
from .evaluate import extract_features, knn_accuracy, mean_ci95

# Small-scale recipes on Conv-4 (the zoo notebook's sizes): objective options and the optimiser fields where
# one SGD recipe does not fit.  ``inner_lr``: GeSSL's α for that base - losses on another scale need another α
# (VICReg's and Barlow Twins' losses are ~25x SimCLR's, so the same α would be a 25x larger inner step).
RECIPES: dict[str, dict] = {
    "simclr": {"objective_args": {"temperature": 0.2}},
    "moco_v2": {"objective_args": {"queue_size": 256, "proj_hidden": 512}, "lr": 0.03},
    "byol": {"objective_args": {"proj_hidden": 512, "proj_dim": 128, "pred_hidden": 512}},
    "simsiam": {"objective_args": {"proj_hidden": 512, "proj_dim": 512}},
    "dino": {"objective_args": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128}},
    "barlow_twins": {"objective_args": {"proj_hidden": 1024, "proj_dim": 1024}, "inner_lr": 0.004},
    "vicreg": {"objective_args": {"proj_hidden": 1024, "proj_dim": 1024}, "lr": 0.03, "inner_lr": 0.004},
    "swav": {"objective_args": {"proj_hidden": 512}},
}


@dataclass
class Data:
    dataset: ImageSet
    splits: Splits
    pretrain: ImageSet  # the images pre-training sees (base-class train split, possibly capped)


def prepare(dataset: str = "mnistm5k", *, novel_classes: int = 5, test_fraction: float = 0.2, max_train: int = 0,
            data_root: str = "") -> Data:
    """Load ``dataset``, split it (class-disjoint novel classes, stratified base test split; split seed 0, shared
    by all seeds and notebooks) and cap the pre-training images at ``max_train`` (0 = all, a fixed random
    subset otherwise)."""
    ds = load_dataset(dataset, root=data_root or None)
    splits = make_splits(ds, novel_classes=novel_classes, test_fraction=test_fraction, seed=0)
    pretrain = splits.train
    if max_train and len(pretrain) > max_train:
        keep = torch.randperm(len(pretrain), generator=torch.Generator().manual_seed(0))[:max_train]
        pretrain = pretrain.subset(keep)
    return Data(ds, splits, pretrain)


def make_config(objective: str, *, meta: str = "none", dataset: str = "mnistm5k", seed: int = 0, epochs: int = 10,
                batch_size: int = 256, lr: float = 0.05, optimizer: str = "sgd", weight_decay: float = 1e-4,
                backbone: str = "conv4", backbone_args: dict | None = None, meta_args: dict | None = None,
                hypergrad: str = "second_order", hypergrad_args: dict | None = None, device: str = "cpu",
                recipes: dict | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of one run: the shared recipe, then the objective's entry of ``recipes``
    (default :data:`RECIPES`), then - for a bi-level ``meta`` - ``meta_args`` with the objective's ``inner_lr``
    unless ``meta_args`` sets one.  Validated on construction (bad values name the key)."""
    recipe = dict((RECIPES if recipes is None else recipes).get(objective, {}))
    inner_lr = recipe.pop("inner_lr", None)
    fields = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, **recipe}
    margs = {}
    if meta != "none":
        margs = dict(meta_args or {})
        if inner_lr is not None and "inner_lr" not in margs:
            margs["inner_lr"] = inner_lr
    return TrainConfig(objective=objective, meta=meta, meta_args=margs,
                       hypergrad=hypergrad if meta != "none" else "second_order",
                       hypergrad_args=dict(hypergrad_args or {}) if meta != "none" else {},
                       backbone=backbone,
                       backbone_args=dict({"width": 64} if backbone_args is None else backbone_args),
                       augment=AUGMENT_PRESET.get(dataset, "cifar"), epochs=epochs, batch_size=batch_size,
                       seed=seed, device=device, progress=True, **fields)


def knn_monitor(splits: Splits, *, n_train: int = 1000, n_test: int = 500, device: str = "cpu", k: int = 5):
    """A training monitor (``monitors=`` of :func:`~bilevel_ssl.trainer.train`): 5-NN accuracy of the backbone on
    fixed subsets of the base-class train/test splits after every epoch -> ``{"monitor_knn": acc}``."""
    g = torch.Generator().manual_seed(0)
    tr = splits.train.subset(torch.randperm(len(splits.train), generator=g)[:n_train])
    te = splits.test.subset(torch.randperm(len(splits.test), generator=g)[:n_test])

    def monitor(epoch: int, net) -> dict:
        f_tr = extract_features(net.backbone, tr, device=device)
        f_te = extract_features(net.backbone, te, device=device)
        return {"monitor_knn": knn_accuracy(f_tr, tr.labels, f_te, te.labels, k=k)}

    return monitor


def paired_difference(method, base) -> dict[str, float]:
    """Mean and 95% CI half-width (Student t over seeds) of the per-seed difference ``method − base``."""
    d = np.asarray(method, dtype=float) - np.asarray(base, dtype=float)
    mean, ci = mean_ci95(d)
    return {"diff": mean, "ci95": ci, "n": int(len(d))}


def verdict(diff: float, ci95: float, n: int, *, higher_is_better: bool = True) -> str:
    """``holds`` / ``does not hold`` / ``inconclusive`` for a claim "the method is better", from a paired
    difference (method − base) over ``n`` seeds: the 95% CI must exclude 0 to decide; with fewer than 2 seeds
    nothing is decided."""
    if n < 2 or not math.isfinite(diff) or not math.isfinite(ci95):
        return "inconclusive (fewer than 2 seeds)"
    signed = diff if higher_is_better else -diff
    if signed - ci95 > 0:
        return "holds"
    if signed + ci95 < 0:
        return "does not hold (the method is worse)"
    return "inconclusive (CI includes 0)"


def summarize(rows: list[dict], by: list[str], metrics: list[str]) -> "pandas.DataFrame":  # noqa: F821
    """Mean and 95% CI over seeds of ``metrics`` per group ``by``; columns ``<metric>`` and ``<metric>_ci95``."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    for key, group in df.groupby(by, sort=False):
        rec = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            mean, ci = mean_ci95(group[m].dropna()) if group[m].notna().any() else (float("nan"), float("nan"))
            rec[m], rec[f"{m}_ci95"] = mean, ci
        rec["seeds"] = int(len(group))
        out.append(rec)
    return pd.DataFrame(out)
