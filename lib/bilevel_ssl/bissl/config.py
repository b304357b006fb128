"""BiSSL's configuration: :class:`BiSSLConfig` (head warm-up + Algorithm 1) and :class:`FinetuneConfig` (stage 4 of
Fig. 1), both validated on construction, before any compute: a bad value raises ``ValueError("bissl.<key>: ...")``
(``finetune.<key>``) naming the allowed values.  Also what the configuration's names mean for the other modules of
the package: the random streams derived from ``seed`` (:func:`stream_seeds`) and the crop + flip of an augmentation
preset (:func:`crop_flip`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..augment import PRESETS, AugmentConfig, preset
from ..config import DEVICES, SCHEDULES, TrainConfig, resolve_device
from ..options import Options, fail, option

# Objectives whose outputs are a deterministic function of the views (MAE draws random masks inside ``outputs``,
# so repeated HVP evaluations on "one batch" would see different masks).
OBJECTIVES_OK = ("simclr", "moco_v2", "byol", "simsiam", "dino", "barlow_twins", "vicreg", "swav")
# What an upper step does when its CG residual is above ``cg_max_residual`` (BiSSLConfig).
CG_ON_RESIDUAL = ("warn", "stop", "global")


# '' (none) or an augmentation preset, whose crop + flip is used (crop_flip)
AUGMENTS = ("",) + tuple(sorted(PRESETS))


@dataclass
class BiSSLConfig(Options):
    """Everything the BiSSL stage (head warm-up + Algorithm 1) needs, validated on construction: a bad value raises
    ``ValueError("bissl.<key>: ...")`` naming the allowed values, before any compute.

    Paper / reference defaults (§4.2.2, App. B.3, ``shared/reference-facts.md``):

    * ``alternations`` T = 500, ``lower_steps`` N_L = 20, ``upper_steps`` N_U = 8, ``lam`` λ = 1e-3 (§4.2.2).
      With SGD the proximal term pulls θ_P towards θ_D by a fraction lr·λ per lower step, lr·λ·T·N_L over the stage:
      at a scaled-down T·N_L the paper's λ leaves the lower level uncoupled (= the baseline), so small-scale runs
      need a larger λ (``params/default/30_bissl.yaml``).
    * ``cg_iters`` N_c = 5, ``cg_damping`` λ_damp = 10 (App. B.3, Alg. 2), ``cg_layerwise`` = True (the reference's
      default: one α, β per parameter tensor, §3.3 "layer-wise implementation of the CG method").
    * ``cg_max_residual`` = 0.5 and ``cg_on_residual`` = ``"warn"`` (ours): every upper step measures the relative
      residual ρ = ‖v − A v_IG‖/‖v‖ of its solve (logged per step in :attr:`BiSSLResult.cg_log`; ρ = 1 is no better
      than v_IG = 0) and, when ρ > ``cg_max_residual`` (or is not finite), ``warn`` issues one
      :class:`~bilevel_ssl.bissl.implicit.CGResidualWarning` per run naming the residual and the fixes, ``stop``
      raises :class:`~bilevel_ssl.bissl.implicit.CGResidualError` before the optimizer step, ``global`` re-solves
      that step with global CG (same ``cg_iters``; N_c more HVPs, only on the steps that need it) and warns once if
      that is still above the threshold (with ``cg_layerwise: false`` it is ``warn``).  Why the defaults keep the
      reference's layer-wise CG (reference-facts, "BiSSL": layer-wise is the authors' default) and only warn: they
      reproduce the authors' algorithm, but layer-wise CG is exact only for a block-diagonal Hessian and need not
      converge otherwise, and at λ_damp = 10 the operator I + H/(λ + λ_damp) can be indefinite, where no CG is
      guaranteed anything - then the implicit gradient is not what Eq. 7 asks for, and the user must be told.
      Measured (issue #24): layer-wise relative error 4e-3 after 5 and 3e-2 after 400 iterations on a
      positive-definite operator that global CG solves to 1e-15; a small network's lowest Hessian eigenvalue −1404
      at the start, −78 after 30 lower steps, residuals 1.6-22.  On the tests' float64 Conv-4 (width 2,
      ``tests/test_bissl.py``): Hessian eigenvalues in [−280, 462], so A is indefinite at λ_damp = 10 (5 layer-wise
      iterations: residual 294); at λ_damp = 1000 (A's spectrum in [0.72, 1.46]) layer-wise CG stalls at residual
      1.25e-3 (5 to 400 iterations) where global CG reaches 8e-13 in 12.  The default threshold 0.5 flags a solve
      that leaves more than half of ‖v‖ unexplained (v_IG = 0 leaves all of it).  Cost: the true residual of
      layer-wise CG needs one more HVP per upper step (its recursive residual is not b − A x): +1/N_c of the CG
      solve, measured +19% of an upper step (``python -m bilevel_ssl.bench``'s ``check_over_upper``, 64 images,
      N_c = 5); global CG's own residual is free.
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
    * ``head_standardize`` (ours, default True: :func:`~bilevel_ssl.evaluate.feature_normalizer`) and
      ``downstream_augment`` ("" = none, else the crop + flip of an augmentation preset, as the paper's fine-tuning
      augmentation, §4.2.1): see the package docstring.
    """

    alternations: int = option(500, lo=1)
    lower_steps: int = option(20, lo=1)
    upper_steps: int = option(8, lo=1)
    lam: float = option(1e-3, lo=0, lo_open=True)
    cg_iters: int = option(5, lo=0)
    cg_damping: float = option(10.0, lo=0)
    cg_layerwise: bool = option(True)
    cg_max_residual: float = option(0.5, lo=0, lo_open=True)
    cg_on_residual: str = option("warn", choices=CG_ON_RESIDUAL)
    direct_weight: float = option(1.0, lo=0)
    clip_norm: float = option(10.0, lo=0, help="0 disables")
    hvp_batch_size: int | None = option(None, lo=2, help="None: the lower batch size")
    lower_lr: float | None = option(None, lo=0, lo_open=True, help="None: the pretext run's")
    lower_weight_decay: float | None = option(None, lo=0, help="None: the pretext run's")
    lower_batch_size: int | None = option(None, lo=2, help="None: the pretext run's")
    lower_warmup: int = option(10, lo=0)
    teacher_momentum: float = option(0.9995, lo=0, hi=1)
    downstream_lr: float = option(0.05, lo=0, lo_open=True)
    downstream_momentum: float = option(0.9, lo=0, hi=1, hi_open=True)
    downstream_weight_decay: float = option(5e-4, lo=0)
    downstream_batch_size: int = option(256, lo=2)
    upper_schedule: str = option("cosine", choices=SCHEDULES)
    warmup_epochs: int = option(20, lo=0)
    head_standardize: bool = option(True)
    downstream_augment: str = option("", choices=AUGMENTS)
    seed: int = option(0, lo=0)
    device: str = option("cpu", choices=DEVICES)
    progress: bool = option(True)

    where = "bissl"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lower_warmup and self.lower_warmup >= self.alternations:
            raise fail("bissl", "lower_warmup", f"must be < alternations ({self.alternations}) or 0, got "
                                                 f"{self.lower_warmup!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved_device(self) -> str:
        """``cpu`` / ``cuda`` as given, ``auto`` -> cuda when available; ``cuda`` without CUDA raises
        ``bissl.device: ...`` (:func:`bilevel_ssl.config.resolve_device`)."""
        return resolve_device(self.device, "bissl.device")

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
            raise fail("bissl", key, f"{lower['batch_size']} is larger than the {n_pretext} pretext images; allowed: "
                                      f"2..{n_pretext}")
        if self.hvp_batch_size is not None and self.hvp_batch_size > n_pretext:
            raise fail("bissl", "hvp_batch_size", f"{self.hvp_batch_size} is larger than the {n_pretext} pretext "
                                                   f"images; allowed: 2..{n_pretext} or None")
        if n_downstream is not None and self.downstream_batch_size > n_downstream:
            raise fail("bissl", "downstream_batch_size", f"{self.downstream_batch_size} is larger than the "
                                                          f"{n_downstream} downstream training images; allowed: "
                                                          f"2..{n_downstream}")


@dataclass
class FinetuneConfig(Options):
    """The final supervised fine-tuning (§4.2.1 "Fine-Tuning on the Downstream Task"): a new linear layer on the
    backbone, cross-entropy, SGD momentum 0.9, cosine schedule, through :func:`bilevel_ssl.semisup.finetune` with all
    labels (``fraction`` 1).  Paper: 400 epochs, batch 256, one lr and wd per dataset and method from a 100-point
    search (Tables 3 and 5); here one setting for both arms of a comparison (no search).  ``lr_head`` ``None`` = ``lr``
    (the paper's single lr).  ``augment``: "" = none, else the preset's crop + flip (§4.2.1).  ``standardize``: the
    per-dimension feature standardisation of :mod:`bilevel_ssl.semisup`; default off, the paper's raw linear head
    (on, fine-tuning a BiSSL θ_P diverged: see :func:`~bilevel_ssl.evaluate.feature_normalizer`).  The paper keeps the epoch with the best
    validation accuracy; here the last epoch is scored (no validation split)."""

    epochs: int = option(400, lo=1)
    lr: float = option(0.05, lo=0)
    lr_head: float | None = option(None, lo=0, lo_open=True, help="None: lr")
    weight_decay: float = option(5e-4, lo=0)
    batch_size: int = option(256, lo=1)
    augment: str = option("", choices=AUGMENTS)
    standardize: bool = option(False)

    where = "finetune"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr == 0 and self.lr_head is None:
            raise fail("finetune", "lr", "0 freezes the backbone and leaves the head without a learning rate; "
                                         "set lr_head too, or lr > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



def crop_flip(name: str) -> AugmentConfig | None:
    """The crop + flip of preset ``name`` (colour, grayscale and blur off); None for ''."""
    return dataclasses.replace(preset(name), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0) if name else None


def stream_seeds(seed: int, n: int) -> list[int]:
    """n independent 63-bit seeds derived from ``seed`` (numpy SeedSequence): one per random stream."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64) % (2 ** 63)]
