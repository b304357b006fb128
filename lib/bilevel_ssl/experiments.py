"""What the experiment notebooks share: data preparation, per-objective recipes, base/method configurations,
a per-epoch k-NN monitor, seed aggregation, a grid of runs trained once per distinct configuration
(:func:`run_grid`), comparisons outside the claims described, not decided (:func:`described`), and the augmentation
subsets of MCR's Table 4 (:func:`subset_config`, :func:`subset_args`, :func:`train_augment_subset`: expressed as
``TrainConfig.augment_args`` over the dataset preset; rotation: ``rotate90_p``).

Keeping this here keeps the notebooks thin (parameters, calls, figures, reading) and makes every notebook build
the *same* configuration for the same base run - so :func:`bilevel_ssl.cache.cached_train` reuses it across
notebooks (e.g. the SimCLR seed-0 run of the universality notebook is the t-SNE notebook's SimCLR encoder).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .augment import AugmentConfig
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


def config_key(cfg: TrainConfig) -> str:
    """A configuration's identity: its fields as sorted JSON (grid entries with equal keys are one training run)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


def run_grid(configs: dict, train: Callable, score: Callable, *, names: Sequence[str] = ("group", "label", "seed"),
             columns: Sequence[str] = ()) -> tuple[list[dict], dict]:
    """Train every distinct configuration of ``configs = {key: TrainConfig}`` once and score it: entries with equal
    configurations (:func:`config_key`; e.g. a sweep point equal to the reference run) share one run.

    ``train(cfg)`` returns a finished run with a ``history`` (e.g. :func:`bilevel_ssl.cache.cached_train`),
    ``score(run, cfg)`` a dict of numbers.  A run that raises ``FloatingPointError`` (non-finite gradients) is
    recorded as diverged, not dropped.  Returns ``(rows, histories)``: one row per entry, in the order of
    ``configs``, with the parts of its key named by ``names`` (a tuple key; a single ``names`` entry for any
    other), the score's ``columns`` (NaN where the run diverged or the score has no such value) and ``diverged``
    (0 or 1); ``histories = {key: history}`` for the entries whose run finished."""
    done: dict[str, tuple] = {}
    for cfg in configs.values():
        k = config_key(cfg)
        if k in done:
            continue
        try:
            run = train(cfg)
        except FloatingPointError as err:
            print(f"{cfg.objective}/{cfg.meta} {json.dumps(cfg.meta_args, sort_keys=True)} seed {cfg.seed}: "
                  f"DIVERGED - {err}")
            done[k] = (True, None, {})
            continue
        done[k] = (False, run.history, score(run, cfg))
    rows, histories = [], {}
    for key, cfg in configs.items():
        diverged, history, scores = done[config_key(cfg)]
        parts = key if isinstance(key, tuple) else (key,)
        if len(parts) != len(names):
            raise ValueError(f"names: {len(names)} names {tuple(names)} for the key {key!r} of {len(parts)} parts")
        rows.append({**dict(zip(names, parts)), **{c: float(scores.get(c, math.nan)) for c in columns},
                     "diverged": float(diverged)})
        if not diverged:
            histories[key] = history
    return rows, histories


def described(long, pairs: dict, metrics: Sequence[str]) -> dict[str, str]:
    """Comparisons that no claim of :mod:`bilevel_ssl.claims` declares (a check of the implementation, a paper
    statement without a margin), described and not decided: ``{name: line}`` for ``pairs = {name: (A, B)}``, each
    line the mean paired difference A − B of every metric, paired as the claims are (the seeds both runs have
    usable: diverged and non-finite seeds dropped, and listed) on the long table of
    :func:`bilevel_ssl.claims.from_wide`.  A pair with a run absent from the table says so."""
    from . import claims

    present = set(long["run"])
    out = {}
    for name, (a, b) in pairs.items():
        missing = [r for r in (a, b) if r not in present]
        if missing:
            out[name] = "not in the table: " + ", ".join(missing)
            continue
        claim = claims.Claim(name, name, "", "", tuple(claims.Comparison(a, b, m) for m in metrics))
        res = claims.decide(claim, long).results
        ns = sorted({r.n for r in res})
        seeds = f"{ns[0]} paired seed{'s' * (ns[0] != 1)}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} paired seeds"
        diffs = ", ".join(f"{r.comparison.metric} {r.mean:+.3f}" if math.isfinite(r.mean)
                          else f"{r.comparison.metric} -" for r in res)
        notes = "; ".join(dict.fromkeys(r.note for r in res if r.note))
        out[name] = f"described, not decided: {a} − {b}: {diffs} (mean over {seeds}{'; ' + notes if notes else ''})"
    return out


# --------------------------------------------------------------------------------------------------------------------
# augmentation subsets (MCR's Table 4)

AUGMENT_OPS = ("flip", "rotate", "crop", "grey", "jitter")  # Table 4's columns, in its order
TABLE4_SUBSETS: dict[int, tuple[str, ...]] = {  # Table 4's rows: ID -> the augmentations used
    1: ("flip", "rotate"),
    2: ("crop",),
    3: ("grey",),
    4: ("jitter",),
    5: ("flip", "crop"),
    6: ("rotate", "jitter"),
    7: ("flip", "crop", "grey"),
    8: AUGMENT_OPS,
}
_DEFAULT_ON = AugmentConfig()  # SimCLR CIFAR-10 values for an op the dataset preset switches off


def _check_ops(ops: Iterable[str]) -> tuple[str, ...]:
    if isinstance(ops, str):
        ops = (ops,)
    ops = tuple(ops)
    bad = sorted(set(ops) - set(AUGMENT_OPS))
    if bad or not ops:
        raise ValueError(f"ops: unknown or empty augmentation subset {list(ops)}; allowed: non-empty subsets of "
                         f"{', '.join(AUGMENT_OPS)}")
    return tuple(o for o in AUGMENT_OPS if o in ops)


def subset_config(ops: Iterable[str], base: AugmentConfig) -> AugmentConfig:
    """``base`` (a dataset preset) restricted to the augmentations ``ops`` of Table 4.

    An op in ``ops`` keeps the preset's parameters; where the preset switches it off (``mnistm`` has no flips) it is
    switched on with the SimCLR CIFAR-10 value (flip p = 0.5, grey p = 0.2, jitter p = 0.8, crop scale (0.08, 1)) -
    the row asks for that augmentation.  An op not in ``ops`` is off: p = 0, or a full-image crop
    (scale = ratio = 1, an exact identity resampling).  Gaussian blur, not a column of Table 4, is off.  "rotate"
    (not specified further by the paper): a random right angle, 0/90/180/270 degrees with probability 1/4 each -
    the four rotations of Xiao et al. 2020, whom the paper cites on rotation invariance - i.e.
    ``rotate90_p`` = 0.75 (:mod:`bilevel_ssl.augment` draws 90/180/270 uniformly when it rotates); exact, no
    interpolation."""
    ops = _check_ops(ops)
    d = _DEFAULT_ON
    crop = "crop" in ops
    crop_on = base.crop_scale != (1.0, 1.0)
    return dataclasses.replace(
        base,
        crop_scale=(base.crop_scale if crop_on else d.crop_scale) if crop else (1.0, 1.0),
        crop_ratio=(base.crop_ratio if crop_on else d.crop_ratio) if crop else (1.0, 1.0),
        flip_p=(base.flip_p or d.flip_p) if "flip" in ops else 0.0,
        jitter_p=(base.jitter_p or d.jitter_p) if "jitter" in ops else 0.0,
        grayscale_p=(base.grayscale_p or d.grayscale_p) if "grey" in ops else 0.0,
        blur_p=0.0, rotate90_p=0.75 if "rotate" in ops else 0.0)


def subset_args(ops: Iterable[str], base: AugmentConfig) -> dict:
    """The ``TrainConfig.augment_args`` that turn preset ``base`` into the Table 4 subset ``ops``
    (:func:`subset_config`): the fields that differ, tuples as lists (YAML/JSON-friendly)."""
    target = subset_config(ops, base)
    out = {}
    for f in dataclasses.fields(AugmentConfig):
        v = getattr(target, f.name)
        if v != getattr(base, f.name):
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def subset_tag(ops: Iterable[str]) -> str:
    """A readable name of an augmentation subset, e.g. ``augment-subset:flip+crop``."""
    return "augment-subset:" + "+".join(_check_ops(ops))


def train_augment_subset(cfg, data, ops: Sequence[str], *, tag: str = "", monitors: tuple = ()):
    """:func:`bilevel_ssl.cache.cached_train` of ``cfg`` with the augmentation subset ``ops`` of Table 4 on top of
    its preset (``augment_args`` from :func:`subset_args`, merged over any the config already has); the subset is
    part of the configuration, hence of the cache key."""
    from .cache import cached_train

    args = {**cfg.augment_args, **subset_args(ops, cfg.augmentation())}
    return cached_train(dataclasses.replace(cfg, augment_args=args), data, tag=tag, monitors=monitors)
