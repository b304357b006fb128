"""Semi-supervised fine-tuning evaluation (the Barlow Twins protocol, at notebook scale).

Protocol (Zbontar et al. 2021, "Barlow Twins", Sec. 4 / App.; followed by the GeSSL and TC² papers):

* **Labels**: a class-balanced subset of the training split holding ``fraction`` of its labels (1% and 10% in the
  papers), drawn by :func:`balanced_label_subset` - per class ``round(fraction * n_class)`` images (rounded half
  up), **at least one per class**, seeded.  The rest of the training split is not used.  Scores are measured on
  the held-out test split (``Splits.test``), which is disjoint from the training split.
* **Model**: a *copy* of the pre-trained backbone plus a new ``nn.Linear`` classifier (weights ``N(0, 0.01)``,
  bias 0, as in Barlow Twins' ``evaluate.py``), trained together with cross-entropy by SGD (momentum 0.9) with two
  parameter groups: ``lr_head`` for the classifier and ``lr_backbone`` for the backbone, a cosine schedule to 0
  (per step; Barlow Twins steps it per epoch, which is the same shape), ``weight_decay`` on both groups.  The
  encoder passed in is never modified (parameters and BatchNorm buffers).
* **Feature standardisation** (``standardize=True``, our addition): the classifier reads the backbone features
  through a *fixed* per-dimension ``(f - mean) / std`` measured once on the labelled images with the pre-trained
  backbone (the StandardScaler of :func:`bilevel_ssl.evaluate.linear_probe`; not trained, so the classifier is
  still linear in the features).  It makes ``lr_head`` independent of each encoder's feature scale, which spans
  orders of magnitude here (mean feature norm on mnistm5k: random conv4 0.37, SimCLR 18, Barlow Twins 271) and,
  by centring, removes the large shared-mean direction of post-ReLU features that makes SGD on raw features
  diverge at high head learning rates.  ``standardize=False`` is the papers' raw-feature head.
* ``lr_backbone == 0`` is Barlow Twins' ``--weights freeze``: the backbone is kept in **eval mode** (BatchNorm
  running statistics, no buffer updates) without gradients, so only the classifier trains - a linear probe
  trained by SGD on the same labels, the reference that fine-tuning should beat.
* **Augmentation** (optional, ``augment=<preset name>``): the *light* augmentation of the papers' fine-tuning
  (random resized crop + horizontal flip): the preset's crop and flip parameters only, colour jitter, grayscale
  and blur off.  An :class:`~bilevel_ssl.augment.AugmentConfig` is used as given.  ``None``: no augmentation.
* **Scores**: top-1 and top-5 accuracy of the fine-tuned network in eval mode.  Top-5 is ``nan`` with fewer than
  6 classes, where it is trivially 1.
* :func:`semi_supervised` repeats this for each fraction and seed (each seed draws its own label subset, head
  initialisation, batch order and augmentations) and reports mean and 95% CI over seeds
  (:func:`bilevel_ssl.evaluate.mean_ci95`).
* **Determinism**: every random draw (subset, head init, shuffling, augmentation) comes from ``seed``
  (numpy ``default_rng`` for the subset, one CPU ``torch.Generator`` for the rest); the same seed gives the same
  numbers on CPU.  Batches are split into near-equal chunks of at most ``batch_size`` (no size-1 tail batch that
  train-mode BatchNorm cannot normalise).

Learning rates (``lrs`` of :func:`semi_supervised`, ``(head, backbone)``): :data:`PAPER_LRS` are the papers'
values (0.05 / 1e-4 at 1%, 1.0 / 0.01 at 10%), available as ``lrs="paper"``.  :data:`DEFAULT_LRS` keep them at
1% but use a head learning rate of **0.1 instead of 1.0 at 10%**: measured on mnistm5k (5 base classes, 10% =
200 labels, 50 epochs, batch 256, chance 0.20), the paper's 1.0 diverges at our scale:

================  =====================  =====================  =================
conv4 encoder     raw, 1.0 / 0.01        std., 1.0 / 0.01       std., 0.1 / 0.01
================  =====================  =====================  =================
SimCLR            0.25, 0.22 (loss 1.5)  0.77, 0.82             0.81, 0.83
VICReg            0.23 (loss 1.5)        0.79                   0.76
Barlow Twins      0.22                   0.20 (loss 3.5e8)      0.33
random init       0.23                   0.46                   0.57
================  =====================  =====================  =================

(top-1 per seed; SimCLR: the quickstart encoder, 40 epochs, the others: the zoo's seed-0 encoders, 15 epochs;
frozen backbone, std., 0.1 / 0: SimCLR 0.78, 0.81, VICReg 0.72, Barlow Twins 0.32, random 0.59).
Head 0.3 also diverged for Barlow Twins (loss 7e4); 0.03 was no better than 0.1.  Limits: the MAE ViT encoder
diverges (nan) with standardised features at every backbone learning rate tried (>= 1e-4) and learns nothing
(0.21) on raw features - give it its own ``lrs`` (or ``standardize=False``); the learning rates are
hyper-parameters of the encoder family, not universal constants.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import PRESETS, AugmentConfig, augment as augment_batch, preset
from .data import ImageSet, Splits, to_channels
from .evaluate import mean_ci95

__all__ = ["PAPER_LRS", "DEFAULT_LRS", "balanced_label_subset", "finetune", "semi_supervised", "result_key"]

# (lr_head, lr_backbone) per label fraction, as in the papers (Barlow Twins protocol).
PAPER_LRS: dict[float, tuple[float, float]] = {0.01: (0.05, 1e-4), 0.1: (1.0, 0.01)}

# Defaults used here: the paper's at 1%, head 0.1 instead of 1.0 at 10% (1.0 diverges at our scale; the
# measurements are in the module docstring).
DEFAULT_LRS: dict[float, tuple[float, float]] = {0.01: (0.05, 1e-4), 0.1: (0.1, 0.01)}


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_fraction(fraction, key: str = "fraction") -> float:
    if not _is_number(fraction) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"{key}: must be a number in (0, 1] (the fraction of training labels kept), "
                         f"got {fraction!r}")
    return float(fraction)


def balanced_label_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset holding ``fraction`` of the labels: sorted int64 numpy array.

    Per class ``round(fraction * n_class)`` images (rounded half up), **at least 1 label per class** (so a tiny
    fraction of a small set still sees every class), drawn without replacement by ``np.random.default_rng(seed)``
    class by class in sorted class order.  ``fraction`` must be in (0, 1]; 1 keeps everything.
    """
    fraction = _check_fraction(fraction)
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels: must be a non-empty 1-D array, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = min(len(idx), max(1, int(math.floor(fraction * len(idx) + 0.5))))
        chosen.append(rng.choice(idx, k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _light(aug: str | AugmentConfig | None) -> AugmentConfig | None:
    """``None``, an AugmentConfig as given, or a preset's crop + flip only (colour, grayscale, blur off)."""
    if aug is None or isinstance(aug, AugmentConfig):
        return aug
    if not isinstance(aug, str) or aug not in PRESETS:
        raise ValueError(f"augment: unknown preset {aug!r}; allowed: None, an AugmentConfig or one of "
                         f"{', '.join(sorted(PRESETS))}")
    return replace(preset(aug), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _check_common(*, epochs, batch_size, weight_decay, augment) -> AugmentConfig | None:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs: must be an int >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    if not _is_number(weight_decay) or not weight_decay >= 0:
        raise ValueError(f"weight_decay: must be a number >= 0, got {weight_decay!r}")
    return _light(augment)


def _check_lrs(lr_head, lr_backbone, key: str = "") -> None:
    if not _is_number(lr_head) or not (math.isfinite(lr_head) and lr_head > 0):
        raise ValueError(f"{key or 'lr_head'}: the head learning rate must be a finite number > 0, got {lr_head!r}")
    if not _is_number(lr_backbone) or not (math.isfinite(lr_backbone) and lr_backbone >= 0):
        raise ValueError(f"{key or 'lr_backbone'}: the backbone learning rate must be a finite number >= 0 "
                         f"(0 = frozen backbone), got {lr_backbone!r}")


def _in_channels(encoder: nn.Module, data: ImageSet) -> int:
    return encoder.spec["in_channels"] if hasattr(encoder, "spec") else data.channels


def _batches(n: int, batch_size: int, perm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``perm`` in ceil(n / batch_size) near-equal chunks (none of size 1 unless n == 1)."""
    return torch.tensor_split(perm, max(1, math.ceil(n / batch_size)))


class _Standardize(nn.Module):
    """Fixed per-dimension ``(f - mean) / std`` (buffers, not trained): the StandardScaler of
    :func:`bilevel_ssl.evaluate.linear_probe`.  Dimensions with ~zero spread keep scale 1, as in scikit-learn."""

    def __init__(self, feats: torch.Tensor):
        super().__init__()
        mean, std = feats.mean(0), feats.std(0, unbiased=False) if len(feats) > 1 else torch.ones(feats.shape[1])
        std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return (f - self.mean) / self.std


@torch.no_grad()
def _features(backbone: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([backbone(images[i:i + batch_size].to(device).float().div_(255)).float()
                      for i in range(0, len(images), batch_size)])


def finetune(encoder: nn.Module, train: ImageSet, test: ImageSet, *, fraction: float, lr_head: float,
             lr_backbone: float, epochs: int = 50, batch_size: int = 256, weight_decay: float = 0.0,
             augment: str | AugmentConfig | None = None, standardize: bool = True, seed: int = 0,
             device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Fine-tune a copy of ``encoder`` plus a linear classifier on ``fraction`` of ``train``'s labels (balanced,
    :func:`balanced_label_subset` with ``seed``) and score it on ``test``.  See the module docstring for the
    protocol; ``lr_backbone = 0`` freezes the backbone (eval mode, no gradients); ``standardize``: the fixed
    feature standardisation in front of the linear classifier (module docstring); ``augment``: a preset name
    (its crop + flip only), an AugmentConfig (as given) or None.

    Returns ``{"top1", "top5", "n_labels", "fraction", "train_loss"}``: test accuracies (``top5`` is ``nan`` with
    fewer than 6 classes), the number of labelled images used, the fraction asked for and the mean training loss
    of the last epoch (``nan`` if training diverged; a warning is issued and training stops then).
    The encoder passed in is left bit-identical.
    """
    fraction = _check_fraction(fraction)
    _check_lrs(lr_head, lr_backbone)
    aug_cfg = _check_common(epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, augment=augment)
    classes = np.unique(train.labels.numpy())
    unknown = sorted(set(np.unique(test.labels.numpy()).tolist()) - set(classes.tolist()))
    if unknown:
        raise ValueError(f"test: labels {unknown} are not classes of the training set ({classes.tolist()})")

    from tqdm import tqdm

    device = torch.device(device)
    want = _in_channels(encoder, train)
    idx = balanced_label_subset(train.labels.numpy(), fraction, seed)
    x_tr = to_channels(train.images[torch.from_numpy(idx)], want)
    y_tr = torch.from_numpy(np.searchsorted(classes, train.labels.numpy()[idx]))
    x_te = to_channels(test.images, want)
    y_te = torch.from_numpy(np.searchsorted(classes, test.labels.numpy()))
    n_classes = len(classes)

    g = torch.Generator().manual_seed(int(seed))
    backbone = copy.deepcopy(encoder).to(device)
    frozen = lr_backbone == 0
    if frozen:
        backbone.requires_grad_(False)
    if standardize:
        # Scaler from the pre-trained backbone's features of the labelled images (no augmentation), in the mode
        # the backbone trains in: train-mode BatchNorm (batch statistics) can differ widely from the running
        # statistics (an untrained backbone's are the identity).  Buffers are restored afterwards.
        saved = {k: v.clone() for k, v in backbone.state_dict().items()}
        feats0 = _features(backbone.train(not frozen), x_tr, device)
        backbone.load_state_dict(saved)
        feature_dim = feats0.shape[1]
    else:
        feature_dim = getattr(backbone, "feature_dim", None) or _features(backbone.eval(), x_tr[:1], device).shape[1]
    linear = nn.Linear(feature_dim, n_classes)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01, generator=g)
        linear.bias.zero_()
    head = (nn.Sequential(_Standardize(feats0.cpu()), linear) if standardize else linear).to(device)

    groups = [{"params": list(head.parameters()), "lr": lr_head}]
    if not frozen:
        groups.append({"params": [p for p in backbone.parameters() if p.requires_grad], "lr": lr_backbone})
    opt = torch.optim.SGD(groups, lr=lr_head, momentum=0.9, weight_decay=weight_decay)
    base_lrs = [grp["lr"] for grp in opt.param_groups]
    n = len(y_tr)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total, step = epochs * steps_per_epoch, 0

    backbone.train(not frozen)
    head.train()
    # A frozen backbone without augmentation gives the same features every epoch: compute them once.
    cached = _features(backbone, x_tr, device) if frozen and aug_cfg is None else None
    train_loss = float("nan")
    bar = tqdm(range(epochs), desc=f"finetune {fraction:g}", disable=not progress, unit="epoch", leave=False)
    for _ in bar:
        perm = torch.randperm(n, generator=g)
        losses = []
        for b in _batches(n, batch_size, perm):
            for grp, lr in zip(opt.param_groups, base_lrs):
                grp["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
            if cached is not None:
                feats = cached[b.to(device)]
            else:
                x = x_tr[b].to(device).float().div_(255)
                if aug_cfg is not None:
                    x = augment_batch(x, aug_cfg, g)
                with torch.set_grad_enabled(not frozen):
                    feats = backbone(x)
            loss = F.cross_entropy(head(feats), y_tr[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item() * len(b))
        train_loss = sum(losses) / n
        bar.set_postfix(loss=f"{train_loss:.3f}")
        if not math.isfinite(train_loss):
            warnings.warn(f"finetune: training loss is {train_loss} (lr_head={lr_head}, lr_backbone={lr_backbone}, "
                          f"fraction={fraction}); training diverged, stopping early", RuntimeWarning, stacklevel=2)
            break

    backbone.eval()
    head.eval()
    correct1 = correct5 = 0
    with torch.no_grad():
        for i in range(0, len(y_te), 512):
            logits = head(backbone(x_te[i:i + 512].to(device).float().div_(255))).float().cpu()
            y = y_te[i:i + 512]
            correct1 += int((logits.argmax(1) == y).sum())
            if n_classes >= 6:
                correct5 += int((logits.topk(5, dim=1).indices == y[:, None]).any(1).sum())
    n_te = len(y_te)
    return {"top1": correct1 / n_te, "top5": correct5 / n_te if n_classes >= 6 else float("nan"),
            "n_labels": int(n), "fraction": fraction, "train_loss": float(train_loss)}


def result_key(fraction: float) -> str:
    """``semisup_{pct}pct``: 0.01 -> ``semisup_1pct``, 0.1 -> ``semisup_10pct``, 0.005 -> ``semisup_0.5pct``."""
    pct = fraction * 100
    return f"semisup_{int(round(pct))}pct" if abs(pct - round(pct)) < 1e-9 else f"semisup_{pct:g}pct"


def _resolve_lrs(lrs, fractions: Sequence[float]) -> dict[float, tuple[float, float]]:
    if lrs is None or lrs == "paper":
        table, what = (DEFAULT_LRS, "default") if lrs is None else (PAPER_LRS, "paper")
    elif isinstance(lrs, Mapping):
        table, what = lrs, "given"
    else:
        raise ValueError(f"lrs: must be None (defaults), 'paper' or a dict {{fraction: (lr_head, lr_backbone)}}, "
                         f"got {lrs!r}")
    out = {}
    for f in fractions:
        match = [k for k in table if _is_number(k) and math.isclose(float(k), f, rel_tol=1e-9)]
        if not match:
            raise ValueError(f"lrs: no {what} (lr_head, lr_backbone) for fraction {f:g}; "
                             f"{what} fractions: {sorted(k for k in table)}; pass lrs={{{f:g}: (head, backbone)}}")
        pair = table[match[0]]
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"lrs: entry for fraction {f:g} must be a pair (lr_head, lr_backbone), got {pair!r}")
        _check_lrs(pair[0], pair[1], key=f"lrs[{f:g}]")
        out[f] = (float(pair[0]), float(pair[1]))
    return out


def semi_supervised(encoder: nn.Module, splits: Splits, *, fractions: Sequence[float] = (0.01, 0.1),
                    seeds: Sequence[int] = (0,), lrs: str | Mapping[float, tuple[float, float]] | None = None,
                    epochs: int = 50, batch_size: int = 256, weight_decay: float = 0.0,
                    augment: str | AugmentConfig | None = None, standardize: bool = True,
                    device: str | torch.device = "cpu", progress: bool = False) -> dict[str, float]:
    """Semi-supervised fine-tuning of ``encoder`` on ``splits.train`` -> ``splits.test`` for each label fraction,
    repeated over ``seeds`` (each seed: its own label subset, head init, order and augmentations).

    ``lrs``: ``None`` -> :data:`DEFAULT_LRS`, ``"paper"`` -> :data:`PAPER_LRS`, or a dict ``{fraction: (lr_head,
    lr_backbone)}`` covering every fraction.  The other arguments are those of :func:`finetune`.  All arguments
    are validated before any training.

    Returns, for each fraction (key prefix :func:`result_key`, e.g. ``semisup_1pct``): ``_top1``, ``_top1_ci95``,
    ``_top5``, ``_top5_ci95`` (mean and 95% CI half-width over seeds; top-5 ``nan`` under 6 classes) and
    ``_n_labels`` (labelled images used per run).
    """
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or len(fractions) == 0:
        raise ValueError(f"fractions: must be a non-empty sequence of numbers in (0, 1], got {fractions!r}")
    fracs = [_check_fraction(f, key="fractions") for f in fractions]
    if len({result_key(f) for f in fracs}) != len(fracs):
        raise ValueError(f"fractions: must be distinct, got {list(fractions)}")
    if (isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) == 0
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds)):
        raise ValueError(f"seeds: must be a non-empty sequence of ints, got {seeds!r}")
    table = _resolve_lrs(lrs, fracs)
    _check_common(epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, augment=augment)
    if not isinstance(splits, Splits):
        raise ValueError(f"splits: must be a bilevel_ssl.data.Splits, got {type(splits).__name__}")

    from tqdm import tqdm

    runs = [(f, s) for f in fracs for s in seeds]
    per: dict[float, list[dict]] = {f: [] for f in fracs}
    for f, s in tqdm(runs, desc="semi-supervised", disable=not progress, unit="run"):
        lr_head, lr_backbone = table[f]
        per[f].append(finetune(encoder, splits.train, splits.test, fraction=f, lr_head=lr_head,
                               lr_backbone=lr_backbone, epochs=epochs, batch_size=batch_size,
                               weight_decay=weight_decay, augment=augment, standardize=standardize, seed=int(s),
                               device=device,
                               progress=progress))
    out: dict[str, float] = {}
    for f in fracs:
        key = result_key(f)
        for metric in ("top1", "top5"):
            out[f"{key}_{metric}"], out[f"{key}_{metric}_ci95"] = mean_ci95([r[metric] for r in per[f]])
        out[f"{key}_n_labels"] = per[f][0]["n_labels"]
    return out
