"""Run configuration, validated before any compute.

:class:`TrainConfig` holds everything the trainer needs.  :meth:`TrainConfig.from_dict` rejects unknown keys,
wrong types (with a hint for YAML 1.1's ``1e-3``-is-a-string pitfall), out-of-range numbers and unknown names,
each error naming the key and the allowed values (the fields' specs, :mod:`bilevel_ssl.options`), then the checks
across keys and of the nested options (``meta_args``, ``hypergrad_args``, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .augment import PRESETS, with_overrides
from .hypergrad import ENGINES
from .meta import META_METHODS, meta_class
from .models import BACKBONE_OPTIONS, BACKBONES
from .objectives import OBJECTIVES, make_objective
from .options import ConfigError, Options, option

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
DEVICES = ("cpu", "cuda", "auto")
HYPERGRAD_ENGINES = tuple(ENGINES)
# engines that differentiate only once (no double backward, no finite differences): safe under bf16 autocast
AMP_SAFE_ENGINES = ("first_order", "momentum_proxy")


@dataclass
class TrainConfig(Options):
    # what is trained
    objective: str = option("simclr", choices=tuple(OBJECTIVES))
    meta: str = option("none", choices=META_METHODS)  # none (plain SSL) or a bi-level method: gessl
    meta_args: dict = option(factory=dict)  # the meta-method's options, e.g. {"m": 8, "mu": 0.7}
    hypergrad: str = option("second_order", choices=HYPERGRAD_ENGINES)  # engine of the bi-level methods
    hypergrad_args: dict = option(factory=dict)  # engine options, e.g. {"fd_r": 0.01}
    backbone: str = option("conv4", choices=BACKBONES)
    objective_args: dict = option(factory=dict)  # the objective's own options, e.g. {"temperature": 0.2}
    backbone_args: dict = option(factory=dict)  # e.g. {"width": 64} (conv4), {"patch_size": 4} (vit_tiny)
    augment: str = option("mnistm", choices=tuple(PRESETS))  # augmentation preset (bilevel_ssl.augment.PRESETS)
    augment_args: dict = option(factory=dict)  # preset fields replaced, e.g. {"rotate90_p": 0.75, "flip_p": 0}
    # optimisation
    epochs: int = option(10, lo=1)
    batch_size: int = option(256, lo=2, help="an SSL loss compares the samples of a batch")
    optimizer: str = option("sgd", choices=OPTIMIZERS)
    lr: float = option(0.3, lo=0, lo_open=True)
    momentum: float = option(0.9, lo=0)
    weight_decay: float = option(1e-4, lo=0)
    schedule: str = option("cosine", choices=SCHEDULES)
    warmup_epochs: int = option(0, lo=0)
    # run
    seed: int = option(0, lo=0)
    device: str = option("cpu", choices=DEVICES)
    amp: bool = option(False)            # CUDA mixed precision (bf16 autocast) for single-level / first-order steps
    sync_bn: bool = option(False)        # under torchrun: BatchNorm over the global batch (single-level only)
    checkpoint_every: int = option(0, lo=0)  # epochs between checkpoints; 0 = only when the run ends
    progress: bool = option(True)

    RUN_CONTROL = ("progress", "checkpoint_every")  # how a run is shown and saved, not what it computes

    def __post_init__(self) -> None:
        super().__post_init__()  # types, choices and ranges of every field (bilevel_ssl.options)
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ConfigError(f"warmup_epochs: must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        try:
            objective = make_objective(self.objective, **self.objective_args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"objective_args: {err}") from err
        try:
            with_overrides(PRESETS[self.augment], self.augment_args)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        unknown = sorted(set(self.backbone_args) - set(BACKBONE_OPTIONS[self.backbone]))
        if unknown:
            raise ConfigError(f"backbone_args: unknown option(s) {unknown} for {self.backbone}; "
                              f"allowed: {', '.join(BACKBONE_OPTIONS[self.backbone])}")
        if self.amp and self.device == "cpu":
            raise ConfigError("amp: mixed precision is for device cuda (bf16 autocast); allowed with device cpu: false")
        if self.sync_bn and self.meta != "none":
            raise ConfigError(f"sync_bn: only for meta 'none' (bi-level methods normalise each rank's tasks "
                              f"locally); got meta {self.meta!r}")
        if self.amp and self.meta != "none" and self.hypergrad not in AMP_SAFE_ENGINES:
            raise ConfigError(f"amp: mixed precision is not numerically safe for hypergradient engine "
                              f"{self.hypergrad!r} (second derivatives / finite differences in bf16); allowed with "
                              f"amp: {', '.join(AMP_SAFE_ENGINES)}, or meta 'none'")
        try:
            meta_class(self.meta).check_config(self)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        needs = getattr(objective, "requires_backbone", None)
        if needs and self.backbone not in needs:
            raise ConfigError(f"backbone: objective {self.objective} needs one of {', '.join(needs)}, "
                              f"got {self.backbone!r}")

    def augmentation(self):
        """The :class:`~bilevel_ssl.augment.AugmentConfig` of this run: preset ``augment`` with ``augment_args``."""
        return with_overrides(PRESETS[self.augment], self.augment_args)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_device(self) -> str:
        import torch

        if self.amp and not torch.cuda.is_available():
            raise ConfigError(f"amp: mixed precision is for device cuda (bf16 autocast), and device {self.device!r} "
                              f"resolves to cpu here; allowed on cpu: false")
        return resolve_device(self.device)


def resolve_device(device: str, key: str = "device") -> str:
    """``cpu`` / ``cuda`` as given, ``auto`` -> cuda when available, else cpu; ``cuda`` without CUDA raises
    ``ConfigError("<key>: ...")`` (``key`` names the option in the message, e.g. ``bissl.device``)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' was asked for but torch.cuda.is_available() is False; allowed here: cpu, auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
