"""The stages of Fig. 1 end to end: pretext pre-training (:func:`pretrain`, :func:`load_pretext`), head warm-up and
BiSSL (:func:`run_bissl`), the "only FT" baseline's extra pretext compute (:func:`continue_pretext`,
:func:`equivalent_epochs`, :func:`only_ft_model`), fine-tuning (:func:`finetune_backbone`), all of it for one task
(:func:`run_pipeline`; its numbers :func:`pipeline_row`; several tasks :func:`compare_arms`), a hyper-parameter
chosen on a validation split of the downstream training images (:func:`validation_split`,
:func:`select_on_validation`), the check of the CG
solve (:func:`cg_diagnostics`, :func:`cg_summary`) and the feature scores of Fig. 3 (:func:`feature_scores`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import TrainConfig
from ..data import ImageSet
from ..meta import SingleLevel
from ..options import fail
from ..trainer import CHECKPOINT
from .config import BiSSLConfig, FinetuneConfig
from .data import Downstream
from .implicit import hessian_extremes, implicit_gradient, norm
from .stage import BiSSLResult, BiSSLStage, PretextModel
from .warmup import DownstreamHead, warmup_head


def load_pretext(run, cfg: TrainConfig) -> PretextModel:
    """A :class:`PretextModel` from a finished (cached) run: its network, and the teacher / objective state from the
    run's checkpoint when the run has a folder (``run.out_dir``); without one, a fresh teacher copy of the net."""
    net = copy.deepcopy(run.net)
    from ..objectives import make_objective

    objective = make_objective(cfg.objective, **cfg.objective_args)
    meta = SingleLevel(objective, net)
    out = getattr(run, "out_dir", None)
    if out is not None and (Path(out) / CHECKPOINT).exists():
        ckpt = torch.load(Path(out) / CHECKPOINT, map_location="cpu", weights_only=False)
        meta.load_state_dict(ckpt["meta"])
    return PretextModel(net, meta.objective, meta.teacher, cfg)


def pretrain(cfg: TrainConfig, images: ImageSet, **kwargs) -> PretextModel:
    """Stage 1 of Fig. 1: pretext pre-training through the encoder cache (:func:`bilevel_ssl.cache.cached_train`;
    ``kwargs`` go to it), returned as a :class:`PretextModel`."""
    from ..cache import cached_train

    return load_pretext(cached_train(cfg, images, **kwargs), cfg)


def run_bissl(pretext: PretextModel, downstream: ImageSet, pretext_images: ImageSet | Tensor, cfg: BiSSLConfig, *,
              head: DownstreamHead | None = None) -> BiSSLResult:
    """Stages 2-3 of Fig. 1: the head warm-up on the frozen θ (unless ``head`` is given), then Algorithm 1.
    ``pretext`` is not modified.  Returns θ_P (``.backbone``), the lower and upper models and the histories."""
    if not isinstance(cfg, BiSSLConfig):
        raise TypeError(f"cfg: expected BiSSLConfig, got {type(cfg).__name__}")
    images = pretext_images.images if isinstance(pretext_images, ImageSet) else pretext_images
    cfg.check_against(pretext.cfg, len(images), len(downstream))  # before the warm-up computes anything
    warm_hist: list[dict] = []
    if head is None:
        head, warm_hist = warmup_head(pretext.backbone, downstream, cfg)
    result = BiSSLStage(pretext, head, images, downstream, cfg).run()
    result.warmup_history = warm_hist
    return result


def cg_diagnostics(pretext: PretextModel, downstream: ImageSet, pretext_images: ImageSet | Tensor, cfg: BiSSLConfig,
                   *, head: DownstreamHead | None = None, iters: Sequence[int] = (1, 2, 5, 10),
                   dampings: Sequence[float] | None = None, power_iters: int = 20) -> dict:
    """How well do N_c CG iterations approximate the implicit gradient here?  At the start of BiSSL (θ_P = θ_D = θ,
    ϕ_D warmed up unless ``head`` is given), on the first alternation's HVP batch and first downstream batch:

    * ``lowest`` / ``highest``: the ends of the spectrum of ∇²_θ L_P (:func:`hessian_extremes`); the operator
      I + H/(λ + λ_damp) is positive definite - CG's premise - only if lowest > −(λ + λ_damp);
    * ``rows``: for every λ_damp in ``dampings`` (default: ``cfg.cg_damping``), layer-wise and global CG, and every
      N_c in ``iters``: the relative true residual ‖v − A v_IG‖/‖v‖ (0 = solved, 1 = no better than v_IG = 0) and
      cos(v, v_IG), with v = ∇_θ L_D(θ, ϕ_D).
    """
    images = pretext_images.images if isinstance(pretext_images, ImageSet) else pretext_images
    cfg.check_against(pretext.cfg, len(images), len(downstream))
    if head is None:
        head, _ = warmup_head(pretext.backbone, downstream, cfg)
    stage = BiSSLStage(pretext, head, images, downstream, cfg)
    idx = torch.randperm(len(stage.images), generator=stage.gen_hvp)[:stage.hvp_batch]
    H = stage.pretext_hessian(stage.views(idx, stage.gen_hvp))
    x, y = stage.downstream_batch(stage.stack_upper.phase(1)[0])
    theta = [p.detach().requires_grad_(True) for p in stage.theta_P]
    loss = F.cross_entropy(stage.head(stage._lower_features(x, theta)), y)
    v = [g.detach() for g in torch.autograd.grad(loss, theta)]
    lo, hi = hessian_extremes(H.hvp, v, iters=power_iters, seed=cfg.seed)
    rows = []
    vn = norm(v)
    for damping in (dampings if dampings is not None else [cfg.cg_damping]):
        for layerwise in (True, False):
            for n in iters:
                xs, res = implicit_gradient(H.hvp, v, lam=cfg.lam, damping=damping, iters=int(n),
                                            layerwise=layerwise, residual=True)
                xn = norm(xs)
                cos = float(sum((a.double() * b.double()).sum() for a, b in zip(v, xs))) / (vn * xn) if vn * xn else 0.0
                rows.append({"damping": float(damping), "layerwise": layerwise, "iters": int(n), "residual": res,
                             "cos": cos, "ig_norm_ratio": xn / vn if vn else float("nan")})
    return {"lowest": lo, "highest": hi, "pd_threshold": -(cfg.lam + cfg.cg_damping), "hvp_loss": H.loss,
            "v_norm": vn, "power_iters": power_iters, "rows": rows}


def cg_summary(diag: dict, cfg: BiSSLConfig) -> str:
    """One line on a :func:`cg_diagnostics` result for the stage's own settings ``cfg``: the ends of the Hessian's
    spectrum found, whether the CG operator I + H/(λ + λ_damp) is thereby shown indefinite (CG's premise broken),
    and the residual after each number of iterations with ``cfg``'s damping and layer-wise choice."""
    lo, hi, threshold = diag["lowest"], diag["highest"], diag["pd_threshold"]
    pd_text = ("indefinite" if lo < threshold else f"not shown indefinite (no curvature below {threshold:.3g} found "
               f"in {diag.get('power_iters', '?')} power iterations per end)")
    own = [r for r in diag["rows"] if r["layerwise"] == cfg.cg_layerwise and r["damping"] == cfg.cg_damping]
    cg = "layer-wise" if cfg.cg_layerwise else "global"
    return (f"pretext Hessian spectrum reaches at least [{lo:.3g}, {hi:.3g}] at the start of BiSSL (Rayleigh "
            f"quotients: the true ends lie outside); I + H/(λ + λ_damp) with λ + λ_damp = {cfg.lam + cfg.cg_damping:g} "
            f"is {pd_text}; {cg} CG with that damping: " + (", ".join(
                f"residual {r['residual']:.2g} after {r['iters']} iteration{'s' * (r['iters'] != 1)}" for r in own)
                or "not checked"))


def continue_pretext(pretext: PretextModel, pretext_images: ImageSet | Tensor, cfg: BiSSLConfig) -> BiSSLResult:
    """The "only FT" baseline's extra pretext compute: the T·N_L lower steps of :func:`run_bissl` from the same θ,
    ϕ_P with the same optimiser, schedule, batches and views, without the proximal term and without the upper
    level (Algorithm 1 with the upper level removed).  ``pretext`` is not modified."""
    images = pretext_images.images if isinstance(pretext_images, ImageSet) else pretext_images
    return BiSSLStage(pretext, None, images, None, cfg, couple=False).run()


def equivalent_epochs(cfg: BiSSLConfig, pretext_cfg: TrainConfig, n_pretext: int) -> float:
    """Pretext epochs that the lower level's T·N_L steps amount to (T·N_L·batch / images): the extra epochs a
    "longer pretext run" baseline gets (§4.3.2, Fig. 2: "baselines pre-trained for 100 additional epochs")."""
    return cfg.alternations * cfg.lower_steps * cfg.lower_settings(pretext_cfg)["batch_size"] / n_pretext


def only_ft_model(kind: str, pretext: PretextModel, pretext_images: ImageSet | Tensor,
                  cfg: BiSSLConfig) -> BiSSLResult | PretextModel:
    """The "only FT" arm's model (``.backbone``), given the same extra pretext compute as BiSSL's lower level:
    ``continue`` - :func:`continue_pretext` (the T·N_L lower steps without coupling); ``retrain`` - the pretext run
    of ``pretext.cfg`` longer by :func:`equivalent_epochs` (rounded, at least 1), through the encoder cache
    (:func:`pretrain`; the paper's Fig. 2 protocol).  Neither depends on the downstream task."""
    if kind == "continue":
        return continue_pretext(pretext, pretext_images, cfg)
    if kind == "retrain":
        extra = max(1, round(equivalent_epochs(cfg, pretext.cfg, len(pretext_images))))
        return pretrain(dataclasses.replace(pretext.cfg, epochs=pretext.cfg.epochs + extra), pretext_images)
    raise ValueError(f"baseline: unknown {kind!r}; allowed: continue, retrain")


def finetune_backbone(backbone: nn.Module, train: ImageSet, test: ImageSet, ft: FinetuneConfig, *, seed: int = 0,
                      device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Stage 4 of Fig. 1: fine-tune a copy of ``backbone`` with a new linear head on all of ``train`` and score it on
    ``test`` (:func:`bilevel_ssl.semisup.finetune` with ``fraction`` 1).  Returns ``top1``, ``top5`` (nan under 6
    classes), ``train_loss``, ``n_labels``."""
    from ..semisup import finetune

    if not isinstance(ft, FinetuneConfig):
        raise TypeError(f"ft: expected FinetuneConfig, got {type(ft).__name__}")
    lr_head = ft.lr if ft.lr_head is None else ft.lr_head
    return finetune(backbone, train, test, fraction=1.0, lr_head=lr_head, lr_backbone=ft.lr, epochs=ft.epochs,
                    batch_size=ft.batch_size, weight_decay=ft.weight_decay, augment=ft.augment or None,
                    standardize=ft.standardize, seed=seed, device=device, progress=progress)


def run_pipeline(pretext_cfg: TrainConfig, cfg: BiSSLConfig, ft: FinetuneConfig, pretext_images: ImageSet,
                 train: ImageSet, test: ImageSet, *, baseline: bool = True, pretext: PretextModel | None = None,
                 baseline_model: BiSSLResult | PretextModel | None = None,
                 cache_root: str | Path | None = None) -> dict:
    """The whole of Fig. 1 for one downstream task: pretext pre-training (cached; or ``pretext`` as given), head
    warm-up, BiSSL, fine-tuning from θ_P; with ``baseline`` also the "only FT" arm (``baseline_model`` when given,
    e.g. one :func:`only_ft_model` shared by several tasks, else :func:`continue_pretext`; then the same
    fine-tuning).  Everything is validated before the first computation.  Returns ``{"bissl": scores,
    "only_ft": scores or None, "result": BiSSLResult, "baseline_result": the baseline's model or None,
    "bissl_s": seconds of the warm-up and BiSSL stage}``; the fine-tuning seed is ``cfg.seed``."""
    if not isinstance(pretext_cfg, TrainConfig):
        raise TypeError(f"pretext_cfg: expected TrainConfig, got {type(pretext_cfg).__name__}")
    cfg.check_against(pretext_cfg, len(pretext_images), len(train))
    if ft.batch_size > len(train):
        raise fail("finetune", "batch_size", f"{ft.batch_size} is larger than the {len(train)} downstream "
                                               f"training images; allowed: 1..{len(train)}")
    if pretext is None:
        pretext = pretrain(pretext_cfg, pretext_images, root=cache_root)
    device = cfg.resolved_device()
    t0 = time.perf_counter()
    result = run_bissl(pretext, train, pretext_images, cfg)
    bissl_s = time.perf_counter() - t0
    out = {"bissl": finetune_backbone(result.backbone, train, test, ft, seed=cfg.seed, device=device),
           "result": result, "only_ft": None, "baseline_result": None, "bissl_s": bissl_s}
    if baseline:
        base = baseline_model if baseline_model is not None else continue_pretext(pretext, pretext_images, cfg)
        out["baseline_result"] = base
        out["only_ft"] = finetune_backbone(base.backbone, train, test, ft, seed=cfg.seed, device=device)
    return out


def pipeline_row(out: dict) -> dict:
    """The numbers of one :func:`run_pipeline` for a results table: each arm's ``<arm>_top1`` / ``<arm>_top5``
    (``bissl``, ``only_ft``; NaN without the baseline), ``bissl_s``, the last alternation's ‖θ_P − θ_D‖
    (``final_distance``) and CG residual (``final_cg_residual``), the mean over alternations of the CG residual and
    of cos(v, v_IG) (``mean_cg_residual``, ``mean_ig_cos``) and the head warm-up's last accuracy (``warmup_acc``)."""
    res = out["result"]
    h = res.history
    row = {"bissl_s": out["bissl_s"], "final_distance": h[-1]["distance"], "final_cg_residual": h[-1]["cg_residual"],
           "mean_cg_residual": float(np.mean([r["cg_residual"] for r in h])),
           "mean_ig_cos": float(np.mean([r["ig_cos"] for r in h])),
           "warmup_acc": res.warmup_history[-1]["acc"] if res.warmup_history else math.nan}
    for arm in ("bissl", "only_ft"):
        scores = out[arm] or {}
        row[f"{arm}_top1"], row[f"{arm}_top5"] = scores.get("top1", math.nan), scores.get("top5", math.nan)
    return row


def compare_arms(pretext_cfg: TrainConfig, pretext: PretextModel, cfg: BiSSLConfig, ft: FinetuneConfig,
                 pretext_images: ImageSet, tasks: dict, baseline_model: BiSSLResult | PretextModel) -> tuple[list, dict]:
    """Table 1 for one pretext model: :func:`run_pipeline` on every task of ``tasks = {name: Downstream}``, the
    "only FT" arm's ``baseline_model`` (:func:`only_ft_model`) shared by all of them.  Returns ``(rows,
    {name: BiSSLResult})``, a row per task: ``task``, ``epochs`` (of the pretext run), ``seed`` (``cfg.seed``) and
    :func:`pipeline_row`; prints one line per task."""
    rows, results = [], {}
    for name, task in tasks.items():
        out = run_pipeline(pretext_cfg, cfg, ft, pretext_images, task.train, task.test, pretext=pretext,
                           baseline_model=baseline_model)
        row = {"task": name, "epochs": pretext_cfg.epochs, "seed": cfg.seed, **pipeline_row(out)}
        rows.append(row)
        results[name] = out["result"]
        print(f"{name:>8} {row['epochs']:>3} ep seed {cfg.seed}: BiSSL+FT top-1 {row['bissl_top1']:.3f}  only FT "
              f"{row['only_ft_top1']:.3f}  (BiSSL {row['bissl_s']:.0f} s, CG residual {row['mean_cg_residual']:.2g}, "
              f"cos(v, v_IG) {row['mean_ig_cos']:.2f}, |θ_P − θ_D| {row['final_distance']:.3g})")
    return rows, results


def validation_split(task: Downstream, fraction: float = 0.2) -> tuple[ImageSet, ImageSet]:
    """``(fit, validation)``: the task's *training* images cut stratified (seed 0), ``fraction`` of them held out
    for validation; the test split is not touched (:func:`select_on_validation`)."""
    from ..data import stratified_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction: must be in (0, 1), got {fraction}")
    fit_idx, val_idx = stratified_split(task.train.labels, fraction, 0)
    return (task.train.subset(torch.as_tensor(fit_idx), f"{task.name}/fit"),
            task.train.subset(torch.as_tensor(val_idx), f"{task.name}/validation"))


def check_fit(cfg: BiSSLConfig, pretext_cfg: TrainConfig, n_pretext: int, ft: FinetuneConfig, fit: ImageSet,
              task: str) -> None:
    """The batch sizes of ``cfg`` and ``ft`` against the fit part of a :func:`validation_split` - callable before
    any compute; raise naming the key."""
    cfg.check_against(pretext_cfg, n_pretext, len(fit))
    if ft.batch_size > len(fit):
        raise fail("finetune", "batch_size", f"{ft.batch_size} is larger than the {len(fit)} images of the fit "
                                               f"part of {task}'s training split; allowed: 1..{len(fit)}")


def select_on_validation(option: str, values: Sequence, pretext_cfg, pretext, cfg, ft: FinetuneConfig,
                         pretext_images: ImageSet, task: Downstream, *, fraction: float = 0.2):
    """Choose one :class:`BiSSLConfig` option - BiSSL's λ_damp (``cg_damping``, Alg. 2), the free hyper-parameter
    that decides the comparison of Table 1 (issue #25) - on a validation split of the downstream task's *training*
    images, never its test split: ``task.train`` is cut stratified (seed 0) into a fit part (the head warm-up, BiSSL's
    upper level and the fine-tuning see only it) and a validation part (``fraction``), and each value in ``values``
    runs the whole BiSSL + fine-tuning arm of :func:`run_pipeline` (given ``pretext``) and is scored by top-1 on the
    validation part; the baseline arm does not depend on the option and is not run.

    One seed: ``pretext_cfg``, ``pretext`` and ``cfg`` single objects (seed ``cfg.seed``).  Several seeds: three
    lists of equal length, one entry per seed (distinct ``cfg.seed``); a value's score is the mean of its top-1 over
    them, as :func:`bilevel_ssl.experiments.select_on_validation` scores GeSSL's α, TC²'s step and MCR's λ1 - one
    seed on 90 validation images (one image = 0.011) chose λ_damp 10 on one run of notebook 30 and 1 on the next.
    The highest score wins, the first listed on a tie; a run whose gradients become non-finite makes its value
    score NaN, never chosen (:meth:`bilevel_ssl.experiments.Selection.best`).  Every candidate configuration is
    built and checked against the data before the first computation.  Returns the
    :class:`~bilevel_ssl.experiments.Selection` (option ``bissl_args.<option>``, metric ``top1``)."""
    from ..experiments import Selection

    key = f"bissl_args.{option}"
    fields = [f.name for f in dataclasses.fields(BiSSLConfig) if f.name not in ("seed", "device", "progress")]
    if option not in fields:
        raise ValueError(f"{key}: not a BiSSLConfig option; allowed: {', '.join(fields)}")
    if not values:
        raise ValueError(f"{key}: no candidate value to choose from")
    lists = [isinstance(x, (list, tuple)) for x in (pretext_cfg, pretext, cfg)]
    if any(lists):
        if not all(lists) or not len(pretext_cfg) == len(pretext) == len(cfg) >= 1:
            raise ValueError(f"{key}: pretext_cfg, pretext and cfg must be three lists of one entry per seed, of "
                             f"equal length (or three single objects)")
        runs = list(zip(pretext_cfg, pretext, cfg))
    else:
        runs = [(pretext_cfg, pretext, cfg)]
    seeds = [c.seed for _, _, c in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{key}: each seed's run needs a distinct cfg.seed, got {seeds}")
    fit, val = validation_split(task, fraction)
    by_value = {v: [BiSSLConfig.from_dict({**dataclasses.asdict(c), option: v}) for _, _, c in runs]
                for v in values}  # validates each value
    for (pcfg, _, _), cands in zip(runs, zip(*by_value.values())):
        for c in cands:
            check_fit(c, pcfg, len(pretext_images), ft, fit, task.name)
    each_seed = {}  # value -> its per-seed top-1 (absent: it diverged)

    def score(v):
        top1 = [run_pipeline(pcfg, c, ft, pretext_images, fit, val, baseline=False, pretext=pm)["bissl"]["top1"]
                for (pcfg, pm, _), c in zip(runs, by_value[v])]
        each_seed[v] = tuple(float(t) for t in top1)
        return Selection.seed_mean("validation top-1", seeds, top1)

    scores = Selection.score_each(key, tuple(values), score)
    many = len(seeds) > 1
    return Selection.best(key, tuple(values), scores, fit_images=len(fit), validation_images=len(val),
                          seed=seeds[0], metric="top1",
                          scored_by=f"BiSSL + fine-tuning top-1 on a validation split of the {task.name} task's "
                                    f"training images",
                          seeds=tuple(seeds) if many else (),
                          seed_scores=tuple(each_seed.get(v, ()) for v in values) if many else ())


def feature_scores(backbone: nn.Module, task: Downstream, *, bn_batches: int = 100, seed: int = 0,
                   device: str | torch.device = "cpu") -> tuple[np.ndarray, dict]:
    """Fig. 3 / App. C.2: how well a backbone's features separate the task's classes before fine-tuning.  Its
    BatchNorm statistics are first re-estimated on the task's training images (``bn_batches`` batches,
    :func:`~bilevel_ssl.evaluate.reestimate_bn`: none of the pretext backbones has seen downstream data), then
    the test features are scored: ``silhouette`` (cosine, true labels; higher = sharper classes) and ``knn``
    (5-NN accuracy, train -> test).  Returns ``(test features, scores)``; ``backbone`` is not modified."""
    from sklearn.metrics import silhouette_score

    from ..evaluate import extract_features, knn_accuracy, reestimate_bn

    bb = reestimate_bn(backbone, task.train, n_batches=bn_batches, seed=seed, device=device)
    f_tr, f_te = extract_features(bb, task.train, device=device), extract_features(bb, task.test, device=device)
    y_te = task.test.labels.numpy()
    return f_te, {"silhouette": float(silhouette_score(f_te, y_te, metric="cosine")),
                  "knn": knn_accuracy(f_tr, task.train.labels, f_te, y_te, k=5)}
