"""What the experiment notebooks share: data preparation, per-objective recipes, base/method configurations,
per-epoch monitors (k-NN, probe loss), training and scoring a table of runs (:func:`train_and_evaluate`, with the
per-run numbers of :func:`history_stats`, :func:`grad_norm_stats` and :func:`conflict_stats`, rows by
:func:`run_rows`), seed aggregation, a grid of runs trained once per distinct configuration (:func:`run_grid`),
comparisons outside the claims described, not decided (:func:`described`), the augmentation subsets of MCR's Table 4 (:func:`subset_config`,
:func:`subset_args`, :func:`augment_subset_config`: expressed as ``TrainConfig.augment_args`` over the dataset preset;
rotation: ``rotate90_p``) and the check of a meta-method's gradients against a reference engine
(:func:`compare_meta_gradients`).

Keeping this here keeps the notebooks thin (parameters, calls, figures, reading) and makes every notebook build
the *same* configuration for the same base run - so :func:`bilevel_ssl.cache.cached_train` reuses it across
notebooks (e.g. the SimCLR seed-0 run of the universality notebook is the t-SNE notebook's SimCLR encoder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .augment import AugmentConfig, make_views, preset
from .config import TrainConfig
from .data import AUGMENT_PRESET, ImageSet, Splits, load_dataset, make_splits, stratified_split
from .evaluate import evaluate_encoder, extract_features, knn_accuracy, mean_ci95

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


def recipes_with(objective_args: Mapping[str, Mapping], objectives: Iterable[str]) -> dict[str, dict]:
    """:data:`RECIPES` with the base objectives' options replaced where ``objective_args`` says so - the
    notebooks' ``objective_args`` parameter, e.g. ``{"simclr": {"temperature": 0.1}}`` (keyed by objective, since a
    notebook may train several).  ``objectives``: the objectives the notebook trains; a key outside them is an error
    naming it (a typo would otherwise change nothing, silently).  The option names and values themselves are
    validated when the run's :class:`TrainConfig` is built, before anything trains."""
    objectives = list(objectives)
    check_values("objective_args", list(objective_args), objectives, "keys are the objectives this notebook trains")
    out = {k: dict(v) for k, v in RECIPES.items()}
    for obj, opts in objective_args.items():
        if not isinstance(opts, Mapping):
            raise ValueError(f"objective_args: {obj!r} needs a dict of options, got {opts!r}")
        entry = out.setdefault(obj, {})
        entry["objective_args"] = {**entry.get("objective_args", {}), **opts}
    return out


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


def validation_data(data: Data, fraction: float = 0.2) -> Data:
    """A validation split inside the *training* classes' training images, for choosing a hyper-parameter without
    touching the test split or the novel classes (issue #25): ``data.splits.train`` is cut stratified (seed 0) into a
    fit part - pre-training images and 5-NN memory, ``splits.train`` - and a validation part - the 5-NN queries,
    ``splits.test``.  A capped pre-training set (``max_train``) stays capped in proportion: a fixed random subset of
    the fit part of ``(1 - fraction)`` times its size."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction: must be in (0, 1), got {fraction}")
    train = data.splits.train
    fit, val = stratified_split(train.labels, fraction, 0)
    splits = Splits(train.subset(torch.as_tensor(fit), f"{train.name}/fit"),
                    train.subset(torch.as_tensor(val), f"{train.name}/validation"),
                    data.splits.novel, data.splits.base_classes, data.splits.novel_classes)
    pretrain = splits.train
    if len(data.pretrain) < len(train):  # capped: keep the same share of the fit part
        keep = max(1, round(len(data.pretrain) * (1.0 - fraction)))
        pretrain = pretrain.subset(torch.randperm(len(pretrain), generator=torch.Generator().manual_seed(0))[:keep])
    return Data(data.dataset, splits, pretrain)


@dataclass(frozen=True)
class Selection:
    """A hyper-parameter chosen on the validation split (:func:`select_on_validation`): the candidates, their
    validation score (NaN: the run diverged), the winner."""

    option: str  # what was chosen, e.g. "gessl_args.inner_lr"
    values: tuple
    scores: tuple  # validation 5-NN accuracy per value
    chosen: object
    fit_images: int
    validation_images: int
    seed: int  # the (first) training seed of every candidate
    metric: str = "knn_acc"
    scored_by: str = "5-NN on a validation split of the training classes"  # how a candidate was scored
    seeds: tuple = ()  # when each candidate trained once per seed: all of them (its score is the mean over them)
    seed_scores: tuple = ()  # with seeds: per value, its score at each seed in that order (empty: it diverged)

    @staticmethod
    def score_each(option: str, values, score: Callable[[object], tuple[float, str]]) -> list[float]:
        """``score(value) -> (score, what to print after it)`` for each of ``values`` in order, one printed line
        per value; a run whose gradients become non-finite (``FloatingPointError``) scores NaN and its line says
        DIVERGED with the error."""
        scores = []
        for value in values:
            try:
                sc, line = score(value)
            except FloatingPointError as err:
                print(f"{option} = {value:g}: DIVERGED - {err}")
                sc = float("nan")
            else:
                print(f"{option} = {value:g}: {line}")
            scores.append(float(sc))
        return scores

    @staticmethod
    def seed_mean(what: str, seeds, scores) -> tuple[float, str]:
        """A candidate's score over its seeds - their mean - and the line that prints it: ``"validation 5-NN
        0.550"`` for one seed, ``"validation 5-NN 0.550, mean of seed 0: 0.600, seed 1: 0.500"`` for several
        (``what`` = "validation 5-NN")."""
        mean = sum(scores) / len(scores)
        if len(scores) == 1:
            return mean, f"{what} {mean:.3f}"
        return mean, f"{what} {mean:.3f}, mean of " + ", ".join(f"seed {s}: {a:.3f}" for s, a in zip(seeds, scores))

    @classmethod
    def best(cls, option: str, values, scores, **fields) -> "Selection":
        """The selection of the highest finite score among ``values`` (the first listed on a tie; NaN - a
        diverged run - is never chosen); ``FloatingPointError`` when no score is finite."""
        scores = tuple(float(s) for s in scores)
        finite = [i for i, sc in enumerate(scores) if math.isfinite(sc)]
        if not finite:
            raise FloatingPointError(f"{option}: every candidate diverged ({list(values)})")
        best = max(finite, key=lambda i: (scores[i], -i))
        return cls(option, tuple(values), scores, tuple(values)[best], **fields)

    def frame(self):
        import pandas as pd

        return pd.DataFrame({self.option: list(self.values), f"validation {self.metric}": list(self.scores),
                             "chosen": [v == self.chosen for v in self.values]}).set_index(self.option)

    def markdown(self, used=None) -> str:
        """One paragraph: the candidates and scores, the choice and - given the value the runs use - whether the
        runs use the choice."""
        each = dict(zip(self.values, self.seed_scores))

        def cand(v, s):
            if not math.isfinite(s):
                return f"{v:g}: diverged"
            return f"{v:g}: {s:.3f}" + (f" ({' / '.join(f'{a:.3f}' for a in each[v])})" if each.get(v) else "")

        cands = ", ".join(cand(v, s) for v, s in zip(self.values, self.scores))
        runs = (f"the mean of {len(self.seeds)} runs per value, seeds {', '.join(map(str, self.seeds))}"
                + (" (in brackets: each seed's score, in that order)" if self.seed_scores else "")
                if len(self.seeds) > 1 else f"one run per value, seed {self.seed}")
        text = (f"**{self.option} chosen on validation**: {self.chosen:g} ({self.scored_by} - "
                f"{self.validation_images} images held out of the {self.fit_images + self.validation_images}"
                f" training images, never the test split; {runs}: {cands})")
        if used is not None:
            text += (f". The runs of this profile use {used:g}: " + ("the validation choice" if used == self.chosen
                     else f"**not** the validation choice ({self.chosen:g}); set it in the params to follow the "
                          f"protocol"))
        return text + "."

    def as_dict(self) -> dict:
        return {"option": self.option, "values": list(self.values), "scores": list(self.scores),
                "chosen": self.chosen, "metric": self.metric, "scored_by": self.scored_by,
                "fit_images": self.fit_images,
                "validation_images": self.validation_images, "seed": self.seed, "seeds": list(self.seeds),
                "seed_scores": [list(x) for x in self.seed_scores]}


def select_on_validation(option: str, candidates: Mapping, data: Data, *, fraction: float = 0.2,
                         run_monitors: Callable[[TrainConfig], dict] | None = None) -> Selection:
    """Choose among ``candidates = {value: TrainConfig}`` (all with the same seed), or ``{value: [TrainConfig, ...]}``
    (one configuration per seed, the same seeds for every value), on :func:`validation_data`: each configuration is
    pre-trained on the fit part (cached like every run) and scored by 5-NN of its validation images against the fit
    images; a value's score is the mean over its seeds; the highest score wins, the first listed on a tie.  A run
    whose gradients become non-finite scores NaN (its value too) and is never chosen.  Float32 scores can differ in
    the last digits between CPUs, so two candidates within noise of each other may swap on another machine; the
    selection prints every score (and keeps each seed's in ``Selection.seed_scores``, which its Markdown shows).
    One seed is the cheapest; several are worth it when the candidates are close:
    notebook 11's α at seed 0 alone preferred 0.001 by 0.009, the mean of seeds 0-2 0.01 by 0.026."""
    from .cache import cached_train
    from .protocol import knn

    if not candidates:
        raise ValueError(f"{option}: no candidate value to choose from")
    runs = {v: (tuple(c) if isinstance(c, (list, tuple)) else (c,)) for v, c in candidates.items()}
    seed_sets = {tuple(cfg.seed for cfg in cfgs) for cfgs in runs.values()}
    if len(seed_sets) != 1:
        raise ValueError(f"{option}: the candidates must share one seed (or one list of seeds), got "
                         f"{', '.join(f'{v:g}: {[c.seed for c in cfgs]}' for v, cfgs in runs.items())}")
    seeds = seed_sets.pop()
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{option}: each candidate needs distinct seeds, got {list(seeds)}")
    val = validation_data(data, fraction)
    each_seed = {}  # value -> its per-seed scores (absent: it diverged)

    def score(value):
        accs, cached = [], 0
        for cfg in runs[value]:
            run = cached_train(cfg, val.pretrain, **(run_monitors(cfg) if run_monitors else {}))
            accs.append(knn(run.backbone, val.splits, device=cfg.resolved_device()))
            cached += bool(run.cached)
        each_seed[value] = tuple(float(a) for a in accs)
        mean, line = Selection.seed_mean("validation 5-NN", seeds, accs)
        if len(accs) == 1:
            return mean, f"{line} ({'cache' if cached else 'trained'})"
        return mean, f"{line} ({len(accs) - cached} trained, {cached} cache)"

    scores = Selection.score_each(option, tuple(candidates), score)
    return Selection.best(option, tuple(candidates), scores, fit_images=len(val.splits.train),
                          validation_images=len(val.splits.test), seed=seeds[0],
                          seeds=seeds if len(seeds) > 1 else (),
                          seed_scores=tuple(each_seed.get(v, ()) for v in candidates) if len(seeds) > 1 else ())


def check_values(key: str, values, allowed: Iterable, why: str = "") -> None:
    """Raise ``ValueError`` naming the notebook parameter ``key`` when any of ``values`` (one value, or a list) is not
    among ``allowed`` - before anything trains, so that a typo in a params file costs seconds, not a run."""
    allowed = list(allowed)
    bad = [v for v in (values if isinstance(values, (list, tuple, set)) else [values]) if v not in allowed]
    if bad:
        raise ValueError(f"{key}: {', '.join(map(repr, bad))} not allowed" + (f" ({why})" if why else "")
                         + f"; allowed: {', '.join(map(str, allowed))}")


def selection_seed_list(selection_seeds: int, seeds: Sequence[int]) -> list[int]:
    """The seeds each candidate of a validation selection trains on: the first ``selection_seeds`` of ``seeds``
    (:func:`select_on_validation` scores their mean; one seed was too noisy in notebooks 11 and 40).  Raises
    ``ValueError`` naming the notebook parameter ``selection_seeds`` and the allowed range unless it is an integer
    from 1 to ``len(seeds)`` - checked before anything trains."""
    seeds = list(seeds)
    if isinstance(selection_seeds, bool) or not isinstance(selection_seeds, int) \
            or not 1 <= selection_seeds <= len(seeds):
        raise ValueError(f"selection_seeds: {selection_seeds!r} not allowed; allowed: 1 to len(seeds) = {len(seeds)}")
    return seeds[:selection_seeds]


def make_config(objective: str, *, meta: str = "none", dataset: str = "mnistm5k", seed: int = 0, epochs: int = 10,
                batch_size: int = 256, lr: float = 0.05, optimizer: str = "sgd", weight_decay: float = 1e-4,
                backbone: str = "conv4", backbone_args: dict | None = None, meta_args: dict | None = None,
                hypergrad: str = "second_order", hypergrad_args: dict | None = None, device: str = "cpu",
                recipes: dict | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of one run: the shared recipe, then the objective's entry of ``recipes``
    (default :data:`RECIPES`; its ``lr`` only with ``optimizer="sgd"``, being an SGD learning rate), then - for a
    ``meta`` other than ``none`` - ``meta_args``, with the objective's
    ``inner_lr`` unless ``meta_args`` sets one if the method takes an inner step (a bi-level method: GeSSL, TC²,
    MCR; not the single-level multi-task baselines, which have no inner step size).  Validated on construction
    (bad values name the key)."""
    recipe = dict((RECIPES if recipes is None else recipes).get(objective, {}))
    inner_lr = recipe.pop("inner_lr", None)
    if optimizer != "sgd":  # a recipe's lr is an SGD learning rate (0.03 for VICReg): Adam's scale is another
        recipe.pop("lr", None)
    fields = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, **recipe}
    margs = {}
    if meta != "none":
        margs = dict(meta_args or {})
        if inner_lr is not None and "inner_lr" not in margs and _takes_inner_step(meta):
            margs["inner_lr"] = inner_lr
    return TrainConfig(objective=objective, meta=meta, meta_args=margs,
                       hypergrad=hypergrad if meta != "none" else "second_order",
                       hypergrad_args=dict(hypergrad_args or {}) if meta != "none" else {},
                       backbone=backbone,
                       backbone_args=dict({"width": 64} if backbone_args is None else backbone_args),
                       augment=AUGMENT_PRESET.get(dataset, "cifar"), epochs=epochs, batch_size=batch_size,
                       seed=seed, device=device, progress=True, **fields)


def _takes_inner_step(meta: str) -> bool:
    """Whether meta-method ``meta`` is bi-level (has an inner step, hence an ``inner_lr`` option)."""
    from .bilevel import BiLevelMethod
    from .meta import meta_class

    try:
        return issubclass(meta_class(meta), BiLevelMethod)
    except ValueError:  # an unknown name: TrainConfig reports it, naming the key
        return False


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


def probe_loss_monitor(cfg: TrainConfig, images: torch.Tensor):
    """A training monitor: the base objective's loss on fixed views of ``images`` (uint8, e.g. the first 64
    pre-training images; views drawn once from a generator seeded 0 with ``cfg``'s augmentation), in eval mode
    (BatchNorm running statistics), after every epoch -> ``{"probe_loss": loss}``.

    Why: a meta-method's training loss is often on another scale than its base's (GeSSL logs a per-task query loss
    on B/m pairs), so the two curves cannot be compared; this one is the same function of the weights for every
    method.  An objective with a momentum teacher is refused (its loss would read the teacher, not the network)."""
    from .objectives import make_objective

    objective = make_objective(cfg.objective, **cfg.objective_args)
    if objective.teacher_momentum(0.0) is not None:
        raise ValueError(f"objective: the probe loss needs an objective without a teacher network, got {cfg.objective}")
    x = torch.cat(make_views(images.float().div(255), objective.n_views, preset(cfg.augment),
                             torch.Generator().manual_seed(0)))

    def monitor(epoch: int, net) -> dict:
        was_training = net.training
        net.eval()
        loss = objective.loss(objective.outputs(net, x.to(next(net.parameters()).device), objective.n_views), None)
        net.train(was_training)
        return {"probe_loss": float(loss)}

    return monitor


GESSL_PROBE_IMAGES = 256  # images of the probe-loss monitor of the GeSSL notebooks' shared runs


@dataclass(frozen=True)
class RunMonitors:
    """The monitors every GeSSL notebook (10-14) trains with, as the keyword arguments of
    :func:`bilevel_ssl.cache.cached_train` for one run (``RunMonitors(...)(cfg)``): the 5-NN of
    :func:`knn_monitor` after every epoch, the base loss on fixed views of the first ``probe_images`` pre-training
    images (:func:`probe_loss_monitor`; none for an objective with a teacher network) after every epoch, and the
    gradient norm of every step (:func:`bilevel_ssl.trainer.grad_norm_monitor`).

    Why one set: a monitor's numbers live in the cached history, so the cache key names the monitors (``tag``) and
    two notebooks share a run only if they monitor it alike.  With one set, the base and +GeSSL runs of notebook 10
    are the centre of notebook 11, the runs of notebook 12 and the second-order runs of notebooks 13 and 14: the
    default reproduction trains each of them once.  Monitors read the network in eval mode and draw views from their
    own generators, so a run's weights do not depend on them (``tests/test_experiments.py`` checks it)."""

    splits: Splits
    images: torch.Tensor  # the probe-loss images (uint8)
    device: str = "cpu"

    @classmethod
    def of(cls, data: "Data", *, device: str = "cpu", probe_images: int = GESSL_PROBE_IMAGES) -> "RunMonitors":
        if probe_images < 1:
            raise ValueError(f"probe_images: must be >= 1, got {probe_images}")
        return cls(data.splits, data.pretrain.images[:probe_images], device)

    @property
    def tag(self) -> str:
        return f"knn-monitor+probe-loss{len(self.images)}+grad-norm"

    def epoch_monitors(self, cfg: TrainConfig) -> tuple:
        from .objectives import make_objective

        knn = knn_monitor(self.splits, device=self.device)
        if make_objective(cfg.objective, **cfg.objective_args).teacher_momentum(0.0) is not None:
            return (knn,)  # BYOL-like: its loss reads the teacher, so no probe loss
        return knn, probe_loss_monitor(cfg, self.images)

    def __call__(self, cfg: TrainConfig) -> dict:
        from .trainer import grad_norm_monitor

        return {"monitors": self.epoch_monitors(cfg), "step_monitors": (grad_norm_monitor,), "tag": self.tag}


# --------------------------------------------------------------------------------------------------------------------
# a table of runs: train (or load) each distinct configuration once, score it, read its history

def config_key(cfg: TrainConfig) -> str:
    """The identity of a run: its configuration as canonical JSON.  Two table rows with equal keys are one run (e.g.
    notebook 13's bi-level row is also its ``second_order`` engine row)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


RUN_STATS = {"train_s_per_epoch": ("mean", "time_s"), "final_loss": ("last", "loss")}
_REDUCTIONS = {"mean": lambda v: float(np.mean(v)), "last": lambda v: float(v[-1]), "max": lambda v: float(np.max(v))}


def history_stats(history: list[dict], stats: Mapping[str, tuple[str, str]] | None = None, *,
                  missing: Mapping[str, float] | None = None) -> dict[str, float]:
    """Numbers of one run read off its trainer history (one record per epoch).

    ``stats = {name: (reduction, key)}``: the ``mean`` over epochs, the ``last`` epoch's value or the ``max`` of
    history key ``key``, reported as ``name``; always preceded by :data:`RUN_STATS` (mean seconds per epoch, final
    training loss).  A key that no epoch logged gives ``missing.get(name, nan)``: e.g. ``{"g_grad_norm": 0.0}`` -
    a run without GeSSL's threshold network g gives g no gradient - while NaN keeps "not measured" apart from 0."""
    missing = dict(missing or {})
    out = {}
    for name, (reduction, key) in {**RUN_STATS, **(stats or {})}.items():
        if reduction not in _REDUCTIONS:
            raise ValueError(f"stats: unknown reduction {reduction!r} of {name!r}; allowed: {', '.join(_REDUCTIONS)}")
        values = [r[key] for r in history if key in r]
        out[name] = _REDUCTIONS[reduction](values) if values else float(missing.get(name, math.nan))
    return out


def grad_norm_stats(history: list[dict]) -> dict[str, float]:
    """Mean, variance and coefficient of variation over all steps of a run of the update-gradient norm, from the
    per-epoch means of ‖∇‖ and ‖∇‖² that :func:`bilevel_ssl.trainer.grad_norm_monitor` logs (every epoch has the same
    number of steps, so the mean of the epoch means is the mean over steps): ``var = E‖∇‖² − (E‖∇‖)²`` (clipped at 0
    against rounding), ``cv = √var / mean``.  A history without the monitor's numbers is an error, not a NaN: a
    cache entry trained without the monitor must be retrained."""
    if not history or "grad_norm" not in history[0] or "grad_norm_sq" not in history[0]:
        raise ValueError("history: no grad_norm / grad_norm_sq records; train with step_monitors=(grad_norm_monitor,) "
                         "(a cached entry without them must be removed and trained again)")
    mean = float(np.mean([r["grad_norm"] for r in history]))
    var = max(float(np.mean([r["grad_norm_sq"] for r in history])) - mean ** 2, 0.0)
    return {"grad_norm_mean": mean, "grad_norm_var": var, "grad_norm_cv": var ** 0.5 / mean}


def conflict_stats(history: list[dict], prefix: str = "monitor_") -> dict[str, float]:
    """Three numbers of a run's per-step gradient-conflict curve (the records of
    :func:`bilevel_ssl.conflict.conflict_monitor`, keys ``prefix``...): ``mean_cos`` - the task-gradient cosine
    averaged over the measured steps; ``conflict_steps`` - the mean of the per-step ``conflict_rate`` (for two tasks:
    the fraction of steps whose task gradients conflict); ``min_cos`` - the most negative cosine.  A history without
    the monitor's numbers is an error (the run was trained, or cached, without it).

    Here rather than in :mod:`bilevel_ssl.conflict`: the multi-task baselines declare that module as training code
    (``code_modules``), so an edit there changes their encoder-cache key."""
    from .conflict import step_curve

    _, cos = step_curve(history, prefix + "mean_cos")
    _, rate = step_curve(history, prefix + "conflict_rate")
    if not cos or not rate:
        raise ValueError(f"history: no {prefix}mean_cos / {prefix}conflict_rate records; train with "
                         f"step_monitors=(conflict_monitor(...),) and a cache tag naming it")
    return {"mean_cos": float(np.mean(cos)), "conflict_steps": float(np.mean(rate)), "min_cos": float(np.min(cos))}


def train_and_evaluate(configs: Mapping, data: Data, *, n_episodes: int = 300, shots: tuple[int, ...] = (1, 5),
                       stats: Mapping[str, tuple[str, str]] | None = None, missing: Mapping[str, float] | None = None,
                       summary: Callable[[list[dict]], dict] | None = None,
                       monitors: tuple | Callable[[TrainConfig], tuple] = (), step_monitors: tuple = (), tag: str = "",
                       run_monitors: Callable[[TrainConfig], dict] | None = None,
                       show: Sequence[str] = ("linear_acc", "knn_acc", "fewshot_5w5s_acc")) -> tuple[dict, dict]:
    """Pre-train every distinct configuration of ``configs = {key: TrainConfig}`` once on ``data.pretrain`` - or
    load it from the encoder cache (:func:`bilevel_ssl.cache.cached_train` with ``monitors``, ``step_monitors`` and
    ``tag``; ``monitors`` may be a function of the run's config, for a monitor built per run; ``run_monitors``, e.g.
    a :class:`RunMonitors`, gives all three per run instead) - and score its
    frozen backbone with the standard protocol (:func:`bilevel_ssl.evaluate.evaluate_encoder`, seed = the run's
    seed; few-shot with ``shots``, none for ``()``).

    Why one function: every claim notebook trains a table of runs the same way, and the same configuration must
    give the same record in every notebook (the cache makes it the same run).

    Returns ``(records, histories)``, both keyed like ``configs`` (rows with the same configuration, by
    :func:`config_key`, share one record and history).  A record holds the scores, ``diverged`` = 0.0, the numbers of
    :func:`history_stats` (``stats``, ``missing``) and of ``summary(history)`` (e.g. :func:`grad_norm_stats`,
    :func:`conflict_stats`), ``cached`` (loaded, not trained) and ``folder`` (the cache
    entry).  A run whose gradients become non-finite (the trainer raises ``FloatingPointError``) is recorded, not
    raised - ``{"diverged": 1.0, "error": message}``, no history - since a diverged seed is a result the claims
    report (dropped and listed), not a crash.  One line per run is printed (``show``: the scores on it)."""
    from .cache import cached_train

    first: dict[str, object] = {}  # config key -> the first table key with that configuration
    records, histories = {}, {}
    for key, cfg in configs.items():
        ck = config_key(cfg)
        if ck in first:
            records[key] = records[first[ck]]
            if first[ck] in histories:
                histories[key] = histories[first[ck]]
            continue
        first[ck] = key
        name = " ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        try:
            kw = run_monitors(cfg) if run_monitors is not None else dict(
                monitors=monitors(cfg) if callable(monitors) else monitors, step_monitors=step_monitors, tag=tag)
            run = cached_train(cfg, data.pretrain, **kw)
        except FloatingPointError as err:
            records[key] = {"diverged": 1.0, "error": str(err)}
            print(f"{name}: DIVERGED - {err}")
            continue
        scores = evaluate_encoder(run.backbone, data.splits, n_episodes=n_episodes, seed=cfg.seed,
                                  device=cfg.resolved_device(), shots=shots)
        rec = {**scores, "diverged": 0.0, **history_stats(run.history, stats, missing=missing),
               **(summary(run.history) if summary else {}), "cached": run.cached, "folder": str(run.out_dir)}
        records[key], histories[key] = rec, run.history
        print(f"{name}: " + "  ".join(f"{m} {rec[m]:.3f}" for m in show if m in rec)
              + f"  ({'cache' if run.cached else 'trained'}, {rec['train_s_per_epoch']:.1f} s/epoch)")
    return records, histories


def run_rows(records: Mapping, names: Sequence[str], columns: Sequence[str] | None = None) -> list[dict]:
    """One row per run of ``records`` (:func:`train_and_evaluate`'s): the parts of its key under ``names`` (a
    string key fills one name), then ``columns`` of its record - NaN where the record has none, as for a diverged
    run's accuracies, so that the seed is dropped by the claims and the means, not lost - or, with ``columns`` None,
    every entry of the record except ``folder`` and ``error``."""
    rows = []
    for key, rec in records.items():
        parts = key if isinstance(key, tuple) else (key,)
        if len(parts) != len(names):
            raise ValueError(f"names: {list(names)} do not name the {len(parts)} part(s) of the run key {key!r}")
        values = ({c: rec.get(c, math.nan) for c in columns} if columns is not None
                  else {c: v for c, v in rec.items() if c not in ("folder", "error")})
        rows.append({**dict(zip(names, parts)), **values})
    return rows



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


def augment_subset_config(cfg: TrainConfig, ops: Sequence[str]) -> TrainConfig:
    """``cfg`` with the augmentation subset ``ops`` of Table 4 on top of its preset (``augment_args`` from
    :func:`subset_args`, merged over any the config already has): the subset is part of the configuration, hence of
    the cache key, and the run trains like any other (:func:`train_and_evaluate`)."""
    return dataclasses.replace(cfg, augment_args={**cfg.augment_args, **subset_args(ops, cfg.augmentation())})


# --------------------------------------------------------------------------------------------------------------------
# do two engines compute the same hypergradient? (notebook 13)

def meta_step_gradients(cfg: TrainConfig, images: torch.Tensor, *, view_seed: int = 0, state: dict | None = None,
                        dtype: torch.dtype = torch.float32) -> dict:
    """The gradients one step of ``cfg``'s meta-method writes into ``.grad`` (``compute_grads``) on one batch.

    The batch: ``images`` (uint8, e.g. the first batch of the pre-training images) with the views the method needs
    drawn by ``cfg``'s augmentation from a generator seeded ``view_seed`` - the same views for every configuration.
    The network is built as training builds it (:func:`bilevel_ssl.trainer.build_net` seeds torch with ``cfg.seed``:
    every configuration of a seed starts from the same network and meta-network); ``state = {"net": ..., "meta":
    ...}`` (e.g. a trainer checkpoint's, without its engine state) is loaded on top.  Network and meta-network are
    cast to ``dtype`` (float64 separates an engine's approximation error from float32 rounding).  Returns
    ``theta`` (every network parameter) and ``meta`` (the method's own parameters: GeSSL's g) as flat float64 CPU
    vectors, and the ``seconds`` the step took."""
    from .meta import make_meta
    from .trainer import build_net

    net, objective = build_net(cfg, images.shape[1], images.shape[-1])
    method = make_meta(cfg.meta, objective, net, cfg)
    if state is not None:
        net.load_state_dict(state["net"])
        method.load_state_dict(state["meta"])
    views = make_views(images.float().div(255), method.n_views, cfg.augmentation(),
                       torch.Generator().manual_seed(view_seed))
    dev = cfg.resolved_device()
    net.to(dev, dtype)
    for module in method._own.values():  # the meta-networks (GeSSL's g), registered by BiLevelMethod.own
        module.to(dev, dtype)
    t0 = time.perf_counter()
    method.compute_grads(net, [v.to(dev, dtype) for v in views])
    seconds = time.perf_counter() - t0
    flat = lambda ps: torch.cat([p.grad.flatten() for p in ps]).double().cpu()  # noqa: E731
    return {"theta": flat(net.parameters()), "meta": flat(method.meta_parameters()), "seconds": seconds}


def gradient_agreement(estimate: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and relative error ‖ĥ − h‖ / ‖h‖ of a gradient estimate ĥ against a reference h: the
    cosine says whether a step goes the same way, the relative error also whether it is as long."""
    cos = torch.nn.functional.cosine_similarity(estimate, reference, dim=0)
    return {"cos": float(cos), "rel_err": float((estimate - reference).norm() / reference.norm())}


def compare_meta_gradients(configs: Mapping[str, TrainConfig], reference: TrainConfig, images: torch.Tensor, *,
                           view_seed: int = 0, state: dict | None = None, dtype: torch.dtype = torch.float32,
                           meta: str = "g") -> list[dict]:
    """One row per ``{label: TrainConfig}``: how its step's θ- and meta-gradients (:func:`meta_step_gradients` on
    ``images`` at ``state`` in ``dtype``) agree with those of ``reference`` on the same batch, state and dtype:
    ``theta_cos``, ``theta_rel_err``, ``<meta>_cos``, ``<meta>_rel_err`` (:func:`gradient_agreement`), both norms
    and the step's seconds.  The configurations should share the seed, the network and the meta-method and differ
    in the engine (or its options): notebook 13 compares every engine with the exact ``second_order``."""
    kw = dict(view_seed=view_seed, state=state, dtype=dtype)
    ref = meta_step_gradients(reference, images, **kw)
    rows = []
    for label, cfg in configs.items():
        est = meta_step_gradients(cfg, images, **kw)
        a_t, a_m = gradient_agreement(est["theta"], ref["theta"]), gradient_agreement(est["meta"], ref["meta"])
        rows.append({"label": label, "theta_cos": a_t["cos"], "theta_rel_err": a_t["rel_err"],
                     f"{meta}_cos": a_m["cos"], f"{meta}_rel_err": a_m["rel_err"],
                     "theta_norm": float(est["theta"].norm()), f"{meta}_norm": float(est["meta"].norm()),
                     "seconds": est["seconds"]})
    return rows
