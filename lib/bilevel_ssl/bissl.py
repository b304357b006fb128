"""BiSSL: a bilevel *training stage* between self-supervised pre-training and downstream fine-tuning.

BiSSL (Zakarias, Hansen & Tan, ICML 2025; paper in ``shared/papers/bissl-bilevel-pretext-downstream.md``) replaces
the hand-over "pretext backbone θ -> fine-tuning" of the conventional pipeline by a bilevel problem (Eq. 2-3)

    min_{θ_D, ϕ_D}  L_D(θ_P*(θ_D), ϕ_D) + L_D(θ_D, ϕ_D)
    s.t.            θ_P*(θ_D) ∈ argmin_{θ_P} min_{ϕ_P} L_P(θ_P, ϕ_P) + λ·½‖θ_D − θ_P‖²,

and the pipeline of Fig. 1 (right), which this module implements stage by stage:

1. **Pretext pre-training** -> θ, ϕ_P: the library's trainer (:func:`pretrain` = :func:`bilevel_ssl.cache.cached_train`
   plus the checkpoint's teacher / objective state).
2. **Downstream head warm-up** -> ϕ_D: a linear head fitted on the frozen θ (:func:`warmup_head`, §4.2.2).
3. **BiSSL** (Algorithm 1): T alternations of N_L lower steps (pretext loss + λ/2‖θ_P − θ_D‖², §3.4) and N_U upper
   steps whose backbone gradient is the CG approximation of [I + ∇²L_P/λ]⁻¹ ∇_θ L_D(θ_P, ϕ_D) (Eq. 7; with
   Alg. 2's damping, λ → λ + λ_damp) plus the direct term ∇_θ L_D(θ_D, ϕ_D): :class:`BiSSLStage`,
   :func:`run_bissl`; :func:`cg_diagnostics` checks how well the CG solves that system.
4. **Fine-tuning** from θ_P (Algorithm 1 returns θ_P): :func:`finetune_backbone` (:func:`bilevel_ssl.semisup.finetune`
   with all labels).

The baseline "only FT" of Table 1 / Fig. 2 is the same pre-trained backbone given the *same extra pretext compute*
(the T·N_L lower steps, same optimiser, schedule, batches and views, without the proximal term and without the upper
level; :func:`continue_pretext`), then fine-tuned identically.  ``equivalent_epochs`` gives the pretext epochs the
stage amounts to, for the paper's other reading (a longer pretext run, Fig. 2).

Defaults (:class:`BiSSLConfig`) are the paper's (§4.2.2, App. B.3) and the authors' released code's where the paper is
silent (``shared/reference-facts.md``, "BiSSL"): T = 500, N_L = 20, N_U = 8, λ = 1e-3, N_c = 5 CG iterations,
λ_damp = 10, layer-wise CG, clipping at norm 10 at both levels, downstream SGD lr 0.05, momentum 0.9, wd 5e-4,
batch 256, head warm-up 20 epochs at a constant lr, lower-level warm-up over 10·N_L steps then cosine.

Choices where the paper is silent or ambiguous (each documented where it is made, and tested in
``tests/test_bissl.py``):

* **CG operator** (Alg. 2): ``A v = v + ∇²L_P v / (λ + λ_damp)`` - Algorithm 2 and the reference code, which with
  λ = 1e-3 and λ_damp = 10 is effectively I + H/10.001, not Eq. 7's I + H/λ (the two coincide for λ_damp = 0).
  ``cg_damping`` is this λ_damp, *not* the Tikhonov term of :func:`bilevel_ssl.hypergrad.conjugate_gradient`, which
  is called with damping 0 on the matvec built here (:func:`ig_matvec`).
* **Layer-wise CG** (``cg_layerwise``, the reference's default): one α, β per parameter tensor.  It is exact CG on
  a block-diagonal operator, a heuristic otherwise: on a coupled operator it need not converge at all
  (``tests/test_bissl.py`` shows both); the relative residual is logged per alternation.
* **HVPs** over the lower model's *backbone* parameters only, by double backward (reference code), with the pretext
  heads (and a BYOL target) held fixed; one pretext batch per alternation serves every HVP of that upper phase
  (θ_P does not move during the upper phase, so one gradient graph is built per alternation).
* **γ** (``direct_weight``) weights the second term of Eq. 2, so it scales ∇_θ L_D(θ_D, ϕ_D) in the θ_D gradient and
  that term's share of the ϕ_D gradient; the reference used 0.01 in its 2024 version and 1 later (default 1).
* **Clipping**: the total gradient norm of each level's parameters (θ_P ∪ ϕ_P; θ_D ∪ ϕ_D) is clipped to 10 after the
  proximal / implicit terms are added (reference: both levels).
* **Batches** (App. B.4): separate "stacks" of shuffled batches per level, reshuffled only when fewer batches remain
  than the next phase needs, or, for sets too small for a phase, whenever fewer images than a batch remain
  (:class:`BatchStack`).
* **BatchNorm**: both backbones run in train mode (batch statistics).  The L_D(θ_P, ·) forward and every HVP forward
  use *copies* of the buffers, so the lower model's running statistics only see pretext batches of lower steps.
* **Head warm-up** runs the frozen backbone in train mode (the statistics the upper level will use), on a copy, so
  no running statistic changes.  ``head_standardize`` (default on, ours, for SGD at small scale) puts a *fixed*
  centring and one global scale (:func:`feature_normalizer`, measured once on the downstream training images with
  θ) in front of the linear layer: the head is still linear in the features.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from .augment import PRESETS, AugmentConfig, augment as augment_batch, make_views, preset
from .config import TrainConfig
from .data import DATASETS, ImageSet, load_dataset, stratified_split, to_channels
from .hypergrad import InnerHessian, conjugate_gradient
from .meta import FunctionalNet, SingleLevel, SSLNet
from .trainer import CHECKPOINT, lr_factor

__all__ = [
    "BiSSLConfig",
    "FinetuneConfig",
    "BatchStack",
    "DownstreamHead",
    "PretextModel",
    "Downstream",
    "BiSSLResult",
    "BiSSLStage",
    "DOWNSTREAM_TASKS",
    "ig_matvec",
    "implicit_gradient",
    "upper_backbone_gradient",
    "clip_gradients",
    "hessian_extremes",
    "feature_normalizer",
    "pretrain",
    "load_pretext",
    "warmup_head",
    "run_bissl",
    "cg_diagnostics",
    "continue_pretext",
    "finetune_backbone",
    "run_pipeline",
    "equivalent_epochs",
    "reestimate_bn",
    "prepare_pretext",
    "prepare_downstream",
    "PretextData",
    "OBJECTIVES_OK",
]

# Objectives whose outputs are a deterministic function of the views (MAE draws random masks inside ``outputs``,
# so repeated HVP evaluations on "one batch" would see different masks).
OBJECTIVES_OK = ("simclr", "moco_v2", "byol", "simsiam", "dino", "barlow_twins", "vicreg", "swav")
SCHEDULES = ("cosine", "constant")
DEVICES = ("cpu", "cuda", "auto")
DOWNSTREAM_TASKS = ("digits", "heldout", "cifar10", "cifar100", "stl10")


# --------------------------------------------------------------------------------------------------------------------
# configuration


def _fail(prefix: str, key: str, msg: str) -> ValueError:
    return ValueError(f"{prefix}.{key}: {msg}")


def _check_preset(prefix: str, key: str, value: str) -> None:
    """An augmentation preset name, or '' for none."""
    if value and value not in PRESETS:
        raise _fail(prefix, key, f"unknown preset {value!r}; allowed: '' (none) or {', '.join(sorted(PRESETS))}")


def _check_fields(obj, prefix: str, spec: dict) -> None:
    """spec: key -> (kind, lo, lo_open) with kind in int/float/bool/str/optint/optfloat; lo None = no bound."""
    for key, (kind, lo, lo_open) in spec.items():
        value = getattr(obj, key)
        optional = kind.startswith("opt")
        base = kind[3:] if optional else kind
        if optional and value is None:
            continue
        allowed = " or None" if optional else ""
        if base == "bool":
            if not isinstance(value, bool):
                raise _fail(prefix, key, f"must be True or False, got {value!r}")
            continue
        if base == "str":
            if not isinstance(value, str):
                raise _fail(prefix, key, f"must be a string{allowed}, got {value!r}")
            continue
        if base == "int":
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise _fail(prefix, key, f"must be an integer{allowed}, got {type(value).__name__} {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                hint = " (YAML 1.1 reads 1e-3 as a string: write 1.0e-3)" if isinstance(value, str) else ""
                raise _fail(prefix, key, f"must be a number{allowed}, got {type(value).__name__} {value!r}{hint}")
            if not math.isfinite(value):
                raise _fail(prefix, key, f"must be finite, got {value!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise _fail(prefix, key, f"must be {'>' if lo_open else '>='} {lo}{allowed}, got {value!r}")


def _from_dict(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ValueError(f"{prefix}: expected a dict of options, got {type(d).__name__}")
    keys = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ValueError(f"{prefix}: unknown key(s) {unknown}; allowed: {', '.join(keys)}")
    return cls(**d)


@dataclass
class BiSSLConfig:
    """Everything the BiSSL stage (head warm-up + Algorithm 1) needs, validated on construction: a bad value raises
    ``ValueError("bissl.<key>: ...")`` naming the allowed values, before any compute.

    Paper / reference defaults (§4.2.2, App. B.3, ``shared/reference-facts.md``):

    * ``alternations`` T = 500, ``lower_steps`` N_L = 20, ``upper_steps`` N_U = 8, ``lam`` λ = 1e-3 (§4.2.2).
      With SGD the proximal term pulls θ_P towards θ_D by a fraction lr·λ per lower step, lr·λ·T·N_L over the stage:
      at a scaled-down T·N_L the paper's λ leaves the lower level uncoupled (= the baseline), so small-scale runs
      need a larger λ (``params/default/30_bissl.yaml``).
    * ``cg_iters`` N_c = 5, ``cg_damping`` λ_damp = 10 (App. B.3, Alg. 2), ``cg_layerwise`` = True (the reference's
      default: one α, β per parameter tensor, §3.3 "layer-wise implementation of the CG method").
    * ``direct_weight`` γ = 1 (reference, later versions), ``clip_norm`` = 10 at both levels (§4.2.2; 0 disables).
    * ``hvp_batch_size``: images of the one pretext batch per alternation on which the HVPs are taken; ``None`` = the
      lower batch size (reference).  A smaller batch is a CPU-cost deviation (an HVP costs ~5 lower steps here).
    * Lower level = the pretext setup (§4.2.2 "primarily follows the setup described for pretext pre-training"):
      ``lower_lr`` / ``lower_weight_decay`` / ``lower_batch_size`` ``None`` = the pretext run's; the pretext run's
      optimizer and momentum; linear warm-up over ``lower_warmup``·N_L steps (paper: 10·N_L), then cosine decay to 0
      at T·N_L.  (The paper uses LARS; the library's trainer has SGD/Adam/AdamW, and the lower level continues with
      the optimizer its backbone was pre-trained with.)
    * ``teacher_momentum`` = 0.9995: the constant EMA of a momentum teacher (BYOL, §4.2.1); unused by SimCLR.
    * Upper level and head warm-up = the downstream setup: SGD with ``downstream_lr`` 0.05, ``downstream_momentum``
      0.9, ``downstream_weight_decay`` 5e-4, ``downstream_batch_size`` 256 (reference; the paper's Table 4 lists
      0.005-0.05 and 5e-5-6e-3 per dataset; §4.2.2: "the weight decays and base learning rates [of the upper level]
      are set to match those of the downstream head warm-up").  Upper schedule ``upper_schedule`` = cosine over the
      T·N_U upper steps (the fine-tuning setup's schedule; the paper does not state it for the upper level).
      ``warmup_epochs`` = 20 at a constant lr (§4.2.2).
    * ``head_standardize`` (ours, default True: :func:`feature_normalizer`) and ``downstream_augment`` ("" = none, else the crop + flip of an
      augmentation preset, as the paper's fine-tuning augmentation, §4.2.1): see the module docstring.
    """

    alternations: int = 500
    lower_steps: int = 20
    upper_steps: int = 8
    lam: float = 1e-3
    cg_iters: int = 5
    cg_damping: float = 10.0
    cg_layerwise: bool = True
    direct_weight: float = 1.0
    clip_norm: float = 10.0
    hvp_batch_size: int | None = None
    lower_lr: float | None = None
    lower_weight_decay: float | None = None
    lower_batch_size: int | None = None
    lower_warmup: int = 10
    teacher_momentum: float = 0.9995
    downstream_lr: float = 0.05
    downstream_momentum: float = 0.9
    downstream_weight_decay: float = 5e-4
    downstream_batch_size: int = 256
    upper_schedule: str = "cosine"
    warmup_epochs: int = 20
    head_standardize: bool = True
    downstream_augment: str = ""
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    _SPEC = {
        "alternations": ("int", 1, False), "lower_steps": ("int", 1, False), "upper_steps": ("int", 1, False),
        "lam": ("float", 0.0, True), "cg_iters": ("int", 0, False), "cg_damping": ("float", 0.0, False),
        "cg_layerwise": ("bool", None, False), "direct_weight": ("float", 0.0, False),
        "clip_norm": ("float", 0.0, False), "hvp_batch_size": ("optint", 2, False),
        "lower_lr": ("optfloat", 0.0, True), "lower_weight_decay": ("optfloat", 0.0, False),
        "lower_batch_size": ("optint", 2, False), "lower_warmup": ("int", 0, False),
        "teacher_momentum": ("float", 0.0, False), "downstream_lr": ("float", 0.0, True),
        "downstream_momentum": ("float", 0.0, False), "downstream_weight_decay": ("float", 0.0, False),
        "downstream_batch_size": ("int", 2, False), "upper_schedule": ("str", None, False),
        "warmup_epochs": ("int", 0, False), "head_standardize": ("bool", None, False),
        "downstream_augment": ("str", None, False), "seed": ("int", 0, False), "device": ("str", None, False),
        "progress": ("bool", None, False),
    }

    def __post_init__(self) -> None:
        _check_fields(self, "bissl", self._SPEC)
        if self.teacher_momentum > 1.0:
            raise _fail("bissl", "teacher_momentum", f"must be in [0, 1], got {self.teacher_momentum!r}")
        if self.downstream_momentum >= 1.0:
            raise _fail("bissl", "downstream_momentum", f"must be in [0, 1), got {self.downstream_momentum!r}")
        if self.lower_warmup and self.lower_warmup >= self.alternations:
            raise _fail("bissl", "lower_warmup", f"must be < alternations ({self.alternations}) or 0, got "
                                                  f"{self.lower_warmup!r}")
        if self.upper_schedule not in SCHEDULES:
            raise _fail("bissl", "upper_schedule", f"unknown value {self.upper_schedule!r}; allowed: "
                                                    f"{', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise _fail("bissl", "device", f"unknown value {self.device!r}; allowed: {', '.join(DEVICES)}")
        _check_preset("bissl", "downstream_augment", self.downstream_augment)

    @classmethod
    def from_dict(cls, d: dict) -> "BiSSLConfig":
        """From a params dict; unknown keys raise ``bissl: unknown key(s) ...; allowed: ...``."""
        return _from_dict(cls, d, "bissl")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise _fail("bissl", "device", "'cuda' was asked for but torch.cuda.is_available() is False; "
                                            "allowed here: cpu, auto")
        return self.device

    # ------------------------------------------------------------------ what depends on the pretext run and data
    def lower_settings(self, pretext_cfg: TrainConfig) -> dict:
        """The lower level's optimiser settings: the pretext run's, overridden by the ``lower_*`` keys given."""
        return {"optimizer": pretext_cfg.optimizer, "momentum": pretext_cfg.momentum,
                "lr": pretext_cfg.lr if self.lower_lr is None else self.lower_lr,
                "weight_decay": pretext_cfg.weight_decay if self.lower_weight_decay is None else self.lower_weight_decay,
                "batch_size": pretext_cfg.batch_size if self.lower_batch_size is None else self.lower_batch_size}

    def check_against(self, pretext_cfg: TrainConfig, n_pretext: int, n_downstream: int | None = None) -> None:
        """Checks that need the pretext configuration and the data sizes; raise ``bissl.<key>: ...``."""
        if pretext_cfg.objective not in OBJECTIVES_OK:
            raise ValueError(f"bissl: pretext objective {pretext_cfg.objective!r} is not supported (its outputs draw "
                             f"random masks, so the HVPs of one batch would not see one loss); allowed: "
                             f"{', '.join(OBJECTIVES_OK)}")
        if pretext_cfg.meta != "none":
            raise ValueError(f"bissl: the pretext run must be plain SSL (meta 'none'), got meta {pretext_cfg.meta!r}")
        lower = self.lower_settings(pretext_cfg)
        key = "lower_batch_size" if self.lower_batch_size is not None else "lower_batch_size (the pretext batch_size)"
        if lower["batch_size"] > n_pretext:
            raise _fail("bissl", key, f"{lower['batch_size']} is larger than the {n_pretext} pretext images; allowed: "
                                      f"2..{n_pretext}")
        if self.hvp_batch_size is not None and self.hvp_batch_size > n_pretext:
            raise _fail("bissl", "hvp_batch_size", f"{self.hvp_batch_size} is larger than the {n_pretext} pretext "
                                                   f"images; allowed: 2..{n_pretext} or None")
        if n_downstream is not None and self.downstream_batch_size > n_downstream:
            raise _fail("bissl", "downstream_batch_size", f"{self.downstream_batch_size} is larger than the "
                                                          f"{n_downstream} downstream training images; allowed: "
                                                          f"2..{n_downstream}")


@dataclass
class FinetuneConfig:
    """The final supervised fine-tuning (§4.2.1 "Fine-Tuning on the Downstream Task"): a new linear layer on the
    backbone, cross-entropy, SGD momentum 0.9, cosine schedule, through :func:`bilevel_ssl.semisup.finetune` with all
    labels (``fraction`` 1).  Paper: 400 epochs, batch 256, one lr and wd per dataset and method from a 100-point
    search (Tables 3 and 5); here one setting for both arms of a comparison (no search).  ``lr_head`` ``None`` = ``lr``
    (the paper's single lr).  ``augment``: "" = none, else the preset's crop + flip (§4.2.1).  ``standardize``: the
    per-dimension feature standardisation of :mod:`bilevel_ssl.semisup`; default off, the paper's raw linear head
    (on, fine-tuning a BiSSL θ_P diverged: see :func:`feature_normalizer`).  The paper keeps the epoch with the best
    validation accuracy; here the last epoch is scored (no validation split)."""

    epochs: int = 400
    lr: float = 0.05
    lr_head: float | None = None
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: str = ""
    standardize: bool = False

    _SPEC = {"epochs": ("int", 1, False), "lr": ("float", 0.0, False), "lr_head": ("optfloat", 0.0, True),
             "weight_decay": ("float", 0.0, False), "batch_size": ("int", 1, False), "augment": ("str", None, False),
             "standardize": ("bool", None, False)}

    def __post_init__(self) -> None:
        _check_fields(self, "finetune", self._SPEC)
        if self.lr == 0 and self.lr_head is None:
            raise _fail("finetune", "lr", "0 freezes the backbone and leaves the head without a learning rate; "
                                          "set lr_head too, or lr > 0")
        _check_preset("finetune", "augment", self.augment)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        return _from_dict(cls, d, "finetune")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# the upper-level gradient (Eq. 7, Alg. 2)

Tensors = Sequence[Tensor]


def ig_matvec(hvp_fn, lam: float, damping: float):
    """The CG operator of Algorithm 2: ``v -> v + ∇²L_P·v / (λ + λ_damp)``.

    With λ_damp = 0 this is Eq. 6-7's I + H/λ exactly; the paper's and the reference code's λ_damp = 10 make it
    I + H/(λ + 10) (reference-facts, BiSSL: "effectively I + H/10.001").  ``hvp_fn`` maps a list of tensors to
    ∇²L_P times it (:meth:`bilevel_ssl.hypergrad.InnerHessian.hvp`)."""
    scale = 1.0 / (float(lam) + float(damping))
    return lambda v: [vi + scale * hi for vi, hi in zip(v, hvp_fn(v))]


def _norm(ts: Tensors) -> float:
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in ts)))


def implicit_gradient(hvp_fn, v: Tensors, *, lam: float, damping: float, iters: int, layerwise: bool,
                      residual: bool = False) -> tuple[list[Tensor], float]:
    """v_IG ≈ [I + ∇²L_P/(λ + λ_damp)]⁻¹ v by ``iters`` conjugate-gradient iterations from 0 (Algorithm 1's CG step,
    App. B.3), through :func:`bilevel_ssl.hypergrad.conjugate_gradient` on :func:`ig_matvec` (its own damping 0).

    ``layerwise``: one step size α, β per tensor (reference default).  Returns ``(v_IG, rel_residual)`` where
    ``rel_residual = ‖v − A v_IG‖ / ‖v‖`` of the *true* residual (one more HVP) when ``residual`` is set, else nan.
    """
    A = ig_matvec(hvp_fn, lam, damping)
    v = [t.detach() for t in v]
    x = conjugate_gradient(A, v, iters=iters, damping=0.0, layerwise=layerwise)
    res = float("nan")
    if residual:
        bn = _norm(v)
        res = _norm([b - a for b, a in zip(v, A(x))]) / bn if bn > 0 else 0.0
    return x, res


def upper_backbone_gradient(v_ig: Tensors, direct: Tensors, direct_weight: float = 1.0) -> list[Tensor]:
    """g_θD = v_IG + γ·∇_θ L_D(θ_D, ϕ_D) (Algorithm 1; Eq. 7 for γ = 1)."""
    return [a + direct_weight * b for a, b in zip(v_ig, direct)]


def hessian_extremes(hvp_fn, like: Tensors, *, iters: int = 20, seed: int = 0) -> tuple[float, float]:
    """Estimates of the two ends of the spectrum of a symmetric operator (``hvp_fn``) by power iteration: first the
    eigenvalue of largest magnitude μ₁, then, on the shifted operator H − μ₁I, the eigenvalue farthest from μ₁ (the
    other end).  Returns ``(lowest, highest)``.  Used to see whether the CG operator I + H/(λ + λ_damp) is positive
    definite (needs lowest > −(λ + λ_damp)); ``iters`` HVPs per end.  The values are Rayleigh quotients of the last
    iterates, so the true spectrum is at least as wide: a ``lowest`` below −(λ + λ_damp) proves the operator
    indefinite, one above it does not prove it definite (the low end converges slowly when the top eigenvalue is
    large)."""
    g = torch.Generator().manual_seed(seed)

    def power(shift: float) -> float:
        v = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in like]
        mu = 0.0
        for _ in range(iters):
            n = _norm(v)
            v = [x / n for x in v]
            hv = [h - shift * x for h, x in zip(hvp_fn(v), v)]
            mu = float(sum((a.double() * b.double()).sum() for a, b in zip(v, hv)))
            v = hv
        return mu + shift

    first = power(0.0)
    second = power(first)
    return (min(first, second), max(first, second))


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Scale the ``.grad`` of ``params`` so that their joint norm is at most ``max_norm`` (0: no clipping); returns
    the norm before clipping (§4.2.2: "gradient normalization is employed on gradients exceeding ℓ2-norms of 10")."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return _norm([p.grad for p in grads])


# --------------------------------------------------------------------------------------------------------------------
# building blocks


class BatchStack:
    """App. B.4: batches are drawn from a shuffled "stack" that is reshuffled only when fewer batches remain than
    the next phase needs (``phase(k)``); if the set holds fewer than k full batches, it is reshuffled whenever
    fewer images than one batch remain.  Full batches only (train-mode BatchNorm, contrastive negatives).
    Deterministic given the generator."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size: {batch_size} must be in 1..{n} (the number of images)")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm: Tensor | None = None
        self.pos = 0
        self.reshuffles = 0

    def _reshuffle(self) -> None:
        self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        self.reshuffles += 1

    @property
    def remaining(self) -> int:
        """Full batches left in the current permutation."""
        return 0 if self.perm is None else (self.n - self.pos) // self.batch_size

    def phase(self, k: int) -> list[Tensor]:
        if self.remaining < k and self.n // self.batch_size >= k:
            self._reshuffle()
        out = []
        for _ in range(k):
            if self.remaining < 1:
                self._reshuffle()
            out.append(self.perm[self.pos:self.pos + self.batch_size])
            self.pos += self.batch_size
        return out


class DownstreamHead(nn.Module):
    """ϕ_D: a linear classifier on the backbone features, optionally behind a *fixed* normalisation
    ``(f − mean) / scale`` (buffers, not trained) with a per-feature ``mean`` and **one** ``scale`` for all features
    (:func:`feature_normalizer`).  The composition is still a linear function of the features (reparametrised),
    i.e. the paper's linear head (§4.2.1)."""

    def __init__(self, feature_dim: int, n_classes: int, mean: Tensor | None = None, scale: float | Tensor = 1.0):
        super().__init__()
        self.standardize = mean is not None
        self.register_buffer("mean", torch.zeros(feature_dim) if mean is None else mean.detach().clone())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())
        self.linear = nn.Linear(feature_dim, n_classes)

    def forward(self, f: Tensor) -> Tensor:
        if self.standardize:
            f = (f - self.mean) / self.scale
        return self.linear(f)


def feature_normalizer(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and one scale, the root mean square of the centred features (mean over dimensions of the
    per-dimension variance): features then have unit average variance, whatever the encoder's feature scale.

    Why one scale and not a per-dimension std (the StandardScaler of :mod:`bilevel_ssl.semisup`): a backbone with
    nearly dead feature dimensions has tiny per-dimension stds, and dividing by them amplifies those dimensions by
    orders of magnitude as soon as the backbone moves - measured on a BiSSL θ_P (mnistm5k SimCLR, digits): fine-
    tuning behind a per-dimension standardisation diverged (training loss 1e14, top-1 0.29), with raw features it
    reached 0.97.  A single scale keeps the features' relative geometry."""
    mean = feats.mean(0)
    scale = ((feats - mean) ** 2).mean().sqrt().clamp_min(1e-12)
    return mean, scale


@dataclass
class PretextModel:
    """θ and ϕ_P after pretext pre-training: the network (backbone + heads), its objective (with its state: queue,
    centre), the EMA teacher for momentum objectives (``None`` otherwise) and the run's configuration."""

    net: SSLNet
    objective: object
    teacher: object | None
    cfg: TrainConfig

    def copy(self) -> "PretextModel":
        return PretextModel(copy.deepcopy(self.net), copy.deepcopy(self.objective), copy.deepcopy(self.teacher),
                            self.cfg)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone


def load_pretext(run, cfg: TrainConfig) -> PretextModel:
    """A :class:`PretextModel` from a finished (cached) run: its network, and the teacher / objective state from the
    run's checkpoint when the run has a folder (``run.out_dir``); without one, a fresh teacher copy of the net."""
    net = copy.deepcopy(run.net)
    from .objectives import make_objective

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
    from .cache import cached_train

    return load_pretext(cached_train(cfg, images, **kwargs), cfg)


def _light(name: str) -> AugmentConfig | None:
    """The crop + flip of preset ``name`` (colour, grayscale and blur off); None for ''."""
    return dataclasses.replace(preset(name), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0) if name else None


def _seeds(seed: int, n: int) -> list[int]:
    """n independent 63-bit seeds derived from ``seed`` (numpy SeedSequence): one per random stream."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64) % (2 ** 63)]


def _batch_features(backbone: nn.Module, images: Tensor, idx_batches, device) -> Tensor:
    with torch.no_grad():
        return torch.cat([backbone(images[b].to(device).float().div_(255)) for b in idx_batches])


def warmup_head(backbone: nn.Module, train: ImageSet, cfg: BiSSLConfig, *, n_classes: int | None = None
                ) -> tuple[DownstreamHead, list[dict]]:
    """Stage 2 of Fig. 1 (§4.2.2 "Downstream Head Warm-up"): fit ϕ_D, a linear head, on the *frozen* backbone with
    cross-entropy, SGD (``downstream_lr``, ``downstream_momentum``, ``downstream_weight_decay``), a constant learning
    rate, ``warmup_epochs`` epochs of near-equal batches of at most ``downstream_batch_size`` images.

    The backbone runs in train mode (batch statistics, as the upper level will see it) on a copy, so its running
    statistics are unchanged.  Head init: weights N(0, 0.01), bias 0 (as :mod:`bilevel_ssl.semisup`), from a
    generator seeded by ``cfg.seed``.  Returns the head and one record per epoch (``loss``, ``acc`` on the batches).
    """
    device = torch.device(cfg.resolved_device())
    bb = copy.deepcopy(backbone).to(device).train()
    bb.requires_grad_(False)
    want = backbone.spec["in_channels"] if hasattr(backbone, "spec") else train.channels
    images = to_channels(train.images, want)
    labels = train.labels.to(device)
    if n_classes is None:
        n_classes = int(train.labels.max()) + 1
    g = torch.Generator().manual_seed(_seeds(cfg.seed, 4)[3])
    n = len(train)
    chunks = max(1, math.ceil(n / cfg.downstream_batch_size))
    mean, scale = None, 1.0
    if cfg.head_standardize:
        mean, scale = feature_normalizer(_batch_features(bb, images, torch.tensor_split(torch.arange(n), chunks),
                                                         device))
    feature_dim = getattr(backbone, "feature_dim", None) or _batch_features(bb, images, [torch.arange(2)], device).shape[1]
    head = DownstreamHead(feature_dim, n_classes, mean, scale)
    with torch.no_grad():
        head.linear.weight.normal_(0.0, 0.01, generator=g)
        head.linear.bias.zero_()
    head.to(device)
    aug = _light(cfg.downstream_augment)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.downstream_lr, momentum=cfg.downstream_momentum,
                          weight_decay=cfg.downstream_weight_decay)
    history = []
    for epoch in range(cfg.warmup_epochs):
        perm = torch.randperm(n, generator=g)
        tot = correct = 0.0
        for b in torch.tensor_split(perm, chunks):
            x = images[b].to(device).float().div_(255)
            if aug is not None:
                x = augment_batch(x, aug, g)
            with torch.no_grad():
                f = bb(x)
            logits = head(f)
            y = labels[b.to(device)]
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(b)
            correct += float((logits.argmax(1) == y).sum())
        history.append({"epoch": epoch + 1, "loss": tot / n, "acc": correct / n})
    return head, history


# --------------------------------------------------------------------------------------------------------------------
# the stage


@dataclass
class BiSSLResult:
    """What the stage returns.  ``backbone`` is θ_P (what Algorithm 1 returns and fine-tuning starts from);
    ``net`` the lower model (θ_P, ϕ_P); ``backbone_D`` / ``head`` the upper model (θ_D, ϕ_D) (``None`` for
    :func:`continue_pretext`); ``history`` one record per alternation (see :meth:`BiSSLStage.alternation`)."""

    net: SSLNet
    backbone_D: nn.Module | None
    head: DownstreamHead | None
    history: list[dict] = field(default_factory=list)
    warmup_history: list[dict] = field(default_factory=list)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone


class BiSSLStage:
    """Algorithm 1 on one pretext set and one downstream training set.

    ``pretext`` (θ, ϕ_P; copied, never modified) initialises the lower model and θ_D = θ; ``head`` (ϕ_D from
    :func:`warmup_head`; copied) the upper head.  ``couple=False`` drops the proximal term and the upper level: the
    lower model then does exactly the pretext steps of the coupled stage (same batches, views, optimiser and
    schedule: separate random streams per level), the "equal extra pretext compute" baseline.

    Random streams (from ``cfg.seed``): lower batches and views, upper batches and augmentation, the HVP batch.
    Same seed -> same numbers on CPU.
    """

    def __init__(self, pretext: PretextModel, head: DownstreamHead | None, pretext_images: ImageSet | Tensor,
                 downstream: ImageSet | None, cfg: BiSSLConfig, *, couple: bool = True):
        if not isinstance(cfg, BiSSLConfig):
            raise TypeError(f"cfg: expected BiSSLConfig, got {type(cfg).__name__}")
        images = pretext_images.images if isinstance(pretext_images, ImageSet) else pretext_images
        if couple and (head is None or downstream is None):
            raise ValueError("head / downstream: the coupled stage needs the warmed-up head and the downstream set")
        cfg.check_against(pretext.cfg, len(images), len(downstream) if couple else None)
        self.cfg, self.couple = cfg, couple
        self.device = torch.device(cfg.resolved_device())
        p = pretext.copy()
        self.net, self.objective, self.teacher = p.net.to(self.device).train(), p.objective, p.teacher
        if self.teacher is not None:
            self.teacher.net.to(self.device).train()
        # the pretext run's augmentation: its preset with its ``augment_args`` where the config has them
        self.aug = (pretext.cfg.augmentation() if hasattr(pretext.cfg, "augmentation")
                    else preset(pretext.cfg.augment))
        low = cfg.lower_settings(pretext.cfg)
        self.lower_batch = low["batch_size"]
        self.hvp_batch = cfg.hvp_batch_size or low["batch_size"]
        self.images = images.to(self.device)
        s_low, s_up, s_hvp, _ = _seeds(cfg.seed, 4)
        self.gen_lower = torch.Generator().manual_seed(s_low)
        self.gen_upper = torch.Generator().manual_seed(s_up)
        self.gen_hvp = torch.Generator().manual_seed(s_hvp)
        self.stack_lower = BatchStack(len(images), self.lower_batch, self.gen_lower)
        self.theta_P = list(self.net.backbone.parameters())
        self._bb_names = [n for n, _ in self.net.backbone.named_parameters()]
        params = list(self.net.parameters())
        if low["optimizer"] == "sgd":
            self.opt_P = torch.optim.SGD(params, lr=low["lr"], momentum=low["momentum"],
                                         weight_decay=low["weight_decay"])
        elif low["optimizer"] == "adam":
            self.opt_P = torch.optim.Adam(params, lr=low["lr"], weight_decay=low["weight_decay"])
        else:
            self.opt_P = torch.optim.AdamW(params, lr=low["lr"], weight_decay=low["weight_decay"])
        total_low = cfg.alternations * cfg.lower_steps
        warm = cfg.lower_warmup * cfg.lower_steps
        self.sched_P = torch.optim.lr_scheduler.LambdaLR(self.opt_P, lambda s: lr_factor(s, total_low, warm, "cosine"))
        self.backbone_D = self.head = None
        if couple:
            self.backbone_D = copy.deepcopy(self.net.backbone).train()
            self.theta_D = list(self.backbone_D.parameters())
            self.head = copy.deepcopy(head).to(self.device).train()
            want = pretext.net.backbone.spec["in_channels"] if hasattr(pretext.net.backbone, "spec") else images.shape[1]
            self.d_images = to_channels(downstream.images, want).to(self.device)
            self.d_labels = downstream.labels.to(self.device)
            self.stack_upper = BatchStack(len(downstream), cfg.downstream_batch_size, self.gen_upper)
            self.d_aug = _light(cfg.downstream_augment)
            self.opt_D = torch.optim.SGD([*self.theta_D, *self.head.parameters()], lr=cfg.downstream_lr,
                                         momentum=cfg.downstream_momentum, weight_decay=cfg.downstream_weight_decay)
            total_up = cfg.alternations * cfg.upper_steps
            self.sched_D = torch.optim.lr_scheduler.LambdaLR(
                self.opt_D, lambda s: lr_factor(s, total_up, 0, cfg.upper_schedule))
        self.history: list[dict] = []
        self.t = 0

    # ------------------------------------------------------------------------------------------------ pieces
    def _teacher_outputs(self, x: Tensor, n_views: int):
        return None if self.teacher is None else self.objective.outputs(self.teacher, x, n_views)

    def views(self, idx: Tensor, generator: torch.Generator) -> list[Tensor]:
        x = self.images[idx.to(self.device)].float().div_(255)
        return make_views(x, self.objective.n_views, self.aug, generator)

    def distance(self) -> float:
        """‖θ_P − θ_D‖ over the backbone parameters (nan without an upper model)."""
        if not self.couple:
            return float("nan")
        return _norm([a.detach() - b.detach() for a, b in zip(self.theta_P, self.theta_D)])

    def lower_step(self, views: list[Tensor]) -> dict:
        """One lower step of Algorithm 1: g_ϕP = ∇_ϕ L_P, g_θP = ∇_θ L_P + λ(θ_P − θ_D) (the gradient of the reference's
        L_P + ½λ‖θ_P − sg(θ_D)‖²), joint norm clipped, opt_P step, schedule step; then the EMA teacher (constant
        ``teacher_momentum``) and the objective's state (queue, centre) as after a pretext step."""
        x, n = torch.cat(views), len(views)
        student = self.objective.outputs(self.net, x, n)
        teacher = self._teacher_outputs(x, n)
        loss = self.objective.loss(student, teacher)
        total = loss
        if self.couple:
            reg = sum(((a - b.detach()) ** 2).sum() for a, b in zip(self.theta_P, self.theta_D))
            total = loss + 0.5 * self.cfg.lam * reg
        self.opt_P.zero_grad(set_to_none=True)
        total.backward()
        gnorm = clip_gradients(list(self.net.parameters()), self.cfg.clip_norm)
        self.opt_P.step()
        self.sched_P.step()
        with torch.no_grad():
            if self.teacher is not None:
                self.teacher.update(self.net, self.cfg.teacher_momentum)
            det = lambda outs: None if outs is None else [{k: v.detach() for k, v in o.items()} for o in outs]
            self.objective.update_state(det(student), det(teacher))
        return {"lower_loss": float(loss.detach()), "lower_grad_norm": gnorm}

    def pretext_hessian(self, views: list[Tensor]) -> InnerHessian:
        """∇²_θ L_P(θ_P, ϕ_P) on one batch of views, as an :class:`~bilevel_ssl.hypergrad.InnerHessian` over the
        lower *backbone* parameters: double backward through ``functional_call`` (reference: ``grad(loss, params,
        create_graph=True)`` then ``grad(Σ g·v, params)``), pretext heads detached (held fixed), BatchNorm in train
        mode on *copies* of the buffers (the HVPs do not move the running statistics), teacher outputs computed
        once, without gradient (the target is not updated during HVPs)."""
        x, n = torch.cat(views), len(views)
        teacher = None
        if self.teacher is not None:  # on copies of its buffers too: nothing of the target changes
            with torch.no_grad():
                t_net = FunctionalNet(self.teacher.net, {k: b.clone() for k, b in self.teacher.net.named_buffers()})
                teacher = self.objective.outputs(t_net, x, n)
        fixed = {k: v.detach() for k, v in self.net.named_parameters() if not k.startswith("backbone.")}
        buffers = {k: b for k, b in self.net.named_buffers()}
        names = [f"backbone.{k}" for k in self._bb_names]

        def loss_fn(theta, _phi):
            tensors = {**fixed, **{k: b.clone() for k, b in buffers.items()}, **dict(zip(names, theta))}
            return self.objective.loss(self.objective.outputs(FunctionalNet(self.net, tensors), x, n), teacher)

        return InnerHessian(loss_fn, self.theta_P)

    def _lower_features(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        tensors = {**{k: b.clone() for k, b in self.net.backbone.named_buffers()}, **dict(zip(self._bb_names, theta))}
        return functional_call(self.net.backbone, tensors, (x,))

    def upper_step(self, x: Tensor, y: Tensor, H: InnerHessian, *, residual: bool = False) -> dict:
        """One upper step of Algorithm 1 on the downstream batch (x, y):

        * v = ∇_θ L_D(θ_P, ϕ_D) (lower backbone, buffers copied), direct = ∇_θ L_D(θ_D, ϕ_D),
          g_ϕD = ∇_ϕ [L_D(θ_P, ϕ_D) + γ L_D(θ_D, ϕ_D)] - one backward of L_D(θ_P) + γ L_D(θ_D);
        * v_IG ≈ [I + H/(λ + λ_damp)]⁻¹ v (:func:`implicit_gradient`, N_c CG iterations, HVPs of ``H``);
        * g_θD = v_IG + γ·direct (:func:`upper_backbone_gradient`); joint norm of (g_θD, g_ϕD) clipped; opt_D step.
        """
        cfg = self.cfg
        theta = [p.detach().requires_grad_(True) for p in self.theta_P]
        logits_p = self.head(self._lower_features(x, theta))
        loss_p = F.cross_entropy(logits_p, y)
        logits_d = self.head(self.backbone_D(x))
        loss_d = F.cross_entropy(logits_d, y)
        head_params = list(self.head.parameters())
        g_p = torch.autograd.grad(loss_p, [*theta, *head_params], allow_unused=True)
        g_d = torch.autograd.grad(loss_d, [*self.theta_D, *head_params], allow_unused=True)
        zeros = lambda gs, ps: [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]
        g_p, g_d = zeros(g_p, [*theta, *head_params]), zeros(g_d, [*self.theta_D, *head_params])
        k = len(theta)
        v, direct = g_p[:k], g_d[:k]
        g_phi = [a + cfg.direct_weight * b for a, b in zip(g_p[k:], g_d[k:])]
        v_ig, res = implicit_gradient(H.hvp, v, lam=cfg.lam, damping=cfg.cg_damping, iters=cfg.cg_iters,
                                      layerwise=cfg.cg_layerwise, residual=residual)
        g_theta = upper_backbone_gradient(v_ig, direct, cfg.direct_weight)
        for p, g in zip([*self.theta_D, *head_params], [*g_theta, *g_phi]):
            p.grad = g.detach().clone()
        gnorm = clip_gradients([*self.theta_D, *head_params], cfg.clip_norm)
        self.opt_D.step()
        self.sched_D.step()
        self.opt_D.zero_grad(set_to_none=True)
        acc = float((logits_p.detach().argmax(1) == y).float().mean())  # at θ_P, before this step
        vn, ign = _norm(v), _norm(v_ig)
        cos = float(sum((a.double() * b.double()).sum() for a, b in zip(v, v_ig))) / (vn * ign) if vn * ign > 0 else 0.0
        return {"upper_loss": float(loss_p.detach()), "upper_loss_direct": float(loss_d.detach()),
                "upper_grad_norm": gnorm, "v_norm": vn, "ig_norm": ign, "ig_cos": cos, "direct_norm": _norm(direct),
                "cg_residual": res, "upper_acc": acc}

    def downstream_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.to(self.device)
        x = self.d_images[idx].float().div_(255)
        if self.d_aug is not None:
            x = augment_batch(x, self.d_aug, self.gen_upper)
        return x, self.d_labels[idx]

    def alternation(self) -> dict:
        """One t of Algorithm 1: N_L lower steps, then (coupled) one HVP batch and N_U upper steps.  Returns the
        history record: ``alternation``, ``lower_loss`` (mean pretext loss of the N_L steps), ``lower_grad_norm``
        (mean, before clipping), ``hvp_loss`` (L_P on the HVP batch), ``upper_loss`` (mean L_D(θ_P, ϕ_D)),
        ``upper_loss_direct`` (mean L_D(θ_D, ϕ_D)), ``upper_acc`` (batch accuracy at θ_P), ``upper_grad_norm``
        (before clipping), ``v_norm`` ‖∇_θ L_D(θ_P, ϕ_D)‖, ``ig_norm`` ‖v_IG‖, ``ig_cos`` cos(v, v_IG) (1 when the
        implicit gradient only rescales v; ≤ 0 when CG turned it around), ``direct_norm`` (all means over the N_U
        steps), ``cg_residual`` (relative true residual ‖v − A v_IG‖/‖v‖ of the last upper step), ``distance``
        ‖θ_P − θ_D‖ at the end, ``lr_lower``, ``lr_upper``, ``time_s``."""
        t0 = time.perf_counter()
        cfg = self.cfg
        lows = [self.lower_step(self.views(idx, self.gen_lower)) for idx in self.stack_lower.phase(cfg.lower_steps)]
        rec = {"alternation": self.t + 1, **_mean(lows)}
        rec["lr_lower"] = self.opt_P.param_groups[0]["lr"]
        if self.couple:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            idx = torch.randperm(len(self.images), generator=self.gen_hvp)[:self.hvp_batch]
            views = self.views(idx, self.gen_hvp)
            with sdpa_kernel(SDPBackend.MATH):  # double backward through attention needs the math kernel (ViT)
                H = self.pretext_hessian(views)
                batches = self.stack_upper.phase(cfg.upper_steps)
                ups = [self.upper_step(*self.downstream_batch(b), H, residual=(i == len(batches) - 1))
                       for i, b in enumerate(batches)]
            rec["hvp_loss"] = H.loss
            del H
            rec.update(_mean(ups))
            rec["cg_residual"] = ups[-1]["cg_residual"]
            rec["lr_upper"] = self.opt_D.param_groups[0]["lr"]
        rec["distance"] = self.distance()
        rec["time_s"] = time.perf_counter() - t0
        self.t += 1
        return rec

    def run(self) -> BiSSLResult:
        """All T alternations with a tqdm bar; non-finite numbers stop the run with FloatingPointError."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(range(self.t, cfg.alternations), desc="BiSSL" if self.couple else "extra pretext",
                   disable=not cfg.progress, unit="alt", leave=False)
        for _ in bar:
            rec = self.alternation()
            skip = set() if self.couple else {"distance"}
            bad = [k for k, v in rec.items() if isinstance(v, float) and k not in skip and not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"BiSSL alternation {rec['alternation']}: non-finite {bad}: "
                                         f"{ {k: rec[k] for k in bad} }")
            self.history.append(rec)
            post = {"L_P": f"{rec['lower_loss']:.3f}"}
            if self.couple:
                post.update(L_D=f"{rec['upper_loss']:.3f}", res=f"{rec['cg_residual']:.2g}",
                            dist=f"{rec['distance']:.3g}")
            bar.set_postfix(post)
        bar.close()
        return BiSSLResult(self.net, self.backbone_D, self.head, self.history)


def _mean(records: list[dict]) -> dict:
    keys = records[0].keys() if records else []
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


# --------------------------------------------------------------------------------------------------------------------
# stages of Fig. 1


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
    vn = _norm(v)
    for damping in (dampings if dampings is not None else [cfg.cg_damping]):
        for layerwise in (True, False):
            for n in iters:
                xs, res = implicit_gradient(H.hvp, v, lam=cfg.lam, damping=damping, iters=int(n),
                                            layerwise=layerwise, residual=True)
                xn = _norm(xs)
                cos = float(sum((a.double() * b.double()).sum() for a, b in zip(v, xs))) / (vn * xn) if vn * xn else 0.0
                rows.append({"damping": float(damping), "layerwise": layerwise, "iters": int(n), "residual": res,
                             "cos": cos, "ig_norm_ratio": xn / vn if vn else float("nan")})
    return {"lowest": lo, "highest": hi, "pd_threshold": -(cfg.lam + cfg.cg_damping), "hvp_loss": H.loss,
            "v_norm": vn, "rows": rows}


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


def finetune_backbone(backbone: nn.Module, train: ImageSet, test: ImageSet, ft: FinetuneConfig, *, seed: int = 0,
                      device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Stage 4 of Fig. 1: fine-tune a copy of ``backbone`` with a new linear head on all of ``train`` and score it on
    ``test`` (:func:`bilevel_ssl.semisup.finetune` with ``fraction`` 1).  Returns ``top1``, ``top5`` (nan under 6
    classes), ``train_loss``, ``n_labels``."""
    from .semisup import finetune

    if not isinstance(ft, FinetuneConfig):
        raise TypeError(f"ft: expected FinetuneConfig, got {type(ft).__name__}")
    lr_head = ft.lr if ft.lr_head is None else ft.lr_head
    return finetune(backbone, train, test, fraction=1.0, lr_head=lr_head, lr_backbone=ft.lr, epochs=ft.epochs,
                    batch_size=ft.batch_size, weight_decay=ft.weight_decay, augment=ft.augment or None,
                    standardize=ft.standardize, seed=seed, device=device, progress=progress)


def run_pipeline(pretext_cfg: TrainConfig, cfg: BiSSLConfig, ft: FinetuneConfig, pretext_images: ImageSet,
                 train: ImageSet, test: ImageSet, *, baseline: bool = True, pretext: PretextModel | None = None,
                 cache_root: str | Path | None = None) -> dict:
    """The whole of Fig. 1 for one downstream task: pretext pre-training (cached; or ``pretext`` as given), head
    warm-up, BiSSL, fine-tuning from θ_P; with ``baseline`` also the "only FT" arm (:func:`continue_pretext`, then
    the same fine-tuning).  Everything is validated before the first computation.  Returns ``{"bissl": scores,
    "only_ft": scores or None, "result": BiSSLResult, "baseline_result": BiSSLResult or None}``; the
    fine-tuning seed is ``cfg.seed``."""
    if not isinstance(pretext_cfg, TrainConfig):
        raise TypeError(f"pretext_cfg: expected TrainConfig, got {type(pretext_cfg).__name__}")
    cfg.check_against(pretext_cfg, len(pretext_images), len(train))
    if ft.batch_size > len(train):
        raise _fail("finetune", "batch_size", f"{ft.batch_size} is larger than the {len(train)} downstream "
                                               f"training images; allowed: 1..{len(train)}")
    if pretext is None:
        pretext = pretrain(pretext_cfg, pretext_images, root=cache_root)
    device = cfg.resolved_device()
    result = run_bissl(pretext, train, pretext_images, cfg)
    out = {"bissl": finetune_backbone(result.backbone, train, test, ft, seed=cfg.seed, device=device),
           "result": result, "only_ft": None, "baseline_result": None}
    if baseline:
        base = continue_pretext(pretext, pretext_images, cfg)
        out["baseline_result"] = base
        out["only_ft"] = finetune_backbone(base.backbone, train, test, ft, seed=cfg.seed, device=device)
    return out


# --------------------------------------------------------------------------------------------------------------------
# App. C.2: BatchNorm statistics on downstream data


@torch.no_grad()
def reestimate_bn(backbone: nn.Module, data: ImageSet | Tensor, *, batch_size: int = 256, n_batches: int = 100,
                  seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A copy of ``backbone`` whose BatchNorm running statistics are re-estimated on ``data`` (App. C.2: the
    downstream training set in batches of 256, about 100 batches forward-passed), returned in eval mode.

    The statistics are reset and accumulated as a *cumulative* average over the ``n_batches`` batches (BatchNorm
    momentum None), i.e. the mean of the per-batch statistics; batches are successive full batches of shuffled
    permutations (a new permutation when one is used up; all images in one batch if there are fewer than
    ``batch_size``).  Learned parameters are not touched; ``backbone`` itself is not modified."""
    images = data.images if isinstance(data, ImageSet) else data
    if n_batches < 1 or batch_size < 2:
        raise ValueError(f"n_batches / batch_size: must be >= 1 / >= 2, got {n_batches} / {batch_size}")
    bb = copy.deepcopy(backbone).to(device)
    want = backbone.spec["in_channels"] if hasattr(backbone, "spec") else images.shape[1]
    if images.dtype == torch.uint8:
        images = to_channels(images, want)
    bns = [m for m in bb.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    bb.train()
    bs = min(batch_size, len(images))
    stack = BatchStack(len(images), bs, torch.Generator().manual_seed(seed))
    for idx in stack.phase(n_batches):
        x = images[idx].to(device)
        bb(x.float().div_(255) if x.dtype == torch.uint8 else x.float())
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return bb.eval()


# --------------------------------------------------------------------------------------------------------------------
# data: pretext images and downstream tasks


@dataclass
class Downstream:
    """A labelled downstream task in the pretext image format: ``train`` / ``test`` ImageSets with labels 0..C-1."""

    name: str
    train: ImageSet
    test: ImageSet

    @property
    def n_classes(self) -> int:
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1


@dataclass
class PretextData:
    """``pretext``: the images pre-training and the lower level see (labels never read); ``heldout``: labelled
    images of the same dataset that pre-training never sees (``None`` where the pretext split has no labels)."""

    name: str
    pretext: ImageSet
    heldout: ImageSet | None


def prepare_pretext(dataset: str = "mnistm5k", *, data_root: str = "", heldout_fraction: float = 0.2,
                    max_train: int = 0) -> PretextData:
    """The pretext set: a stratified ``1 − heldout_fraction`` of ``dataset`` (split seed 0; labels unused), capped
    at ``max_train`` images (0 = all; a fixed random subset), and the held-out rest with labels.  ``stl10`` uses its
    ``unlabeled`` split (the paper's Fig. 2 pretext set) and has no held-out part."""
    if dataset not in DATASETS or dataset == "imagefolder":
        allowed = [d for d in DATASETS if d != "imagefolder"]
        raise ValueError(f"pretext_dataset: unknown {dataset!r}; allowed: {', '.join(allowed)}")
    if dataset == "stl10":
        ds = load_dataset("stl10", root=data_root or None, split="unlabeled")
        heldout = None
        pretext = ds
    else:
        from .experiments import prepare

        data = prepare(dataset, novel_classes=0, test_fraction=heldout_fraction, max_train=max_train,
                       data_root=data_root)
        return PretextData(dataset, data.pretrain, data.splits.test)
    if max_train and len(pretext) > max_train:
        keep = torch.randperm(len(pretext), generator=torch.Generator().manual_seed(0))[:max_train]
        pretext = pretext.subset(keep)
    return PretextData(dataset, pretext, heldout)


def _format(ds: ImageSet, channels: int, size: int) -> ImageSet:
    """Resize to ``size`` and replicate / mix channels to ``channels`` (the pretext image format)."""
    images = ds.images
    if images.shape[-1] != size or images.shape[-2] != size:
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images = x.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(to_channels(images, channels), ds.labels, ds.name, ds.classes)


def _stratified(ds: ImageSet, test_fraction: float, name: str) -> Downstream:
    tr, te = stratified_split(ds.labels, test_fraction, seed=0)
    classes = torch.unique(ds.labels)
    remap = lambda s: ImageSet(s.images, torch.searchsorted(classes, s.labels), s.name, s.classes)
    return Downstream(name, remap(ds.subset(tr, f"{name}/train")), remap(ds.subset(te, f"{name}/test")))


def prepare_downstream(task: str, pretext: PretextData, *, test_fraction: float = 0.5, data_root: str = "") -> Downstream:
    """A downstream task in the pretext set's image format (size and channels):

    * ``digits`` - scikit-learn's 8x8 digits (1797, resized to the pretext size, gray replicated to RGB), a
      stratified ``test_fraction`` test split (seed 0);
    * ``heldout`` - the labelled images of the pretext dataset that pre-training never sees
      (:func:`prepare_pretext`), split the same way;
    * ``cifar10`` / ``cifar100`` / ``stl10`` - the dataset's own train / test splits (online; the paper's Table 1
      datasets, resized to the pretext size: 96 px in the paper).
    """
    if task not in DOWNSTREAM_TASKS:
        raise ValueError(f"downstream_tasks: unknown task {task!r}; allowed: {', '.join(DOWNSTREAM_TASKS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"downstream_test_fraction: must be in (0, 1), got {test_fraction!r}")
    c, size = pretext.pretext.channels, pretext.pretext.size
    if task == "digits":
        return _stratified(_format(load_dataset("digits"), c, size), test_fraction, "digits")
    if task == "heldout":
        if pretext.heldout is None:
            raise ValueError(f"downstream_tasks: 'heldout' needs labelled held-out images of the pretext dataset; "
                             f"{pretext.name} has none here (allowed: digits, cifar10, cifar100, stl10)")
        return _stratified(_format(pretext.heldout, c, size), test_fraction, f"{pretext.name}-heldout")
    root = data_root or None
    train = load_dataset(task, root=root, split="train", image_size=size)
    test = load_dataset(task, root=root, split="test", image_size=size)
    return Downstream(task, _format(train, c, size), _format(test, c, size))
