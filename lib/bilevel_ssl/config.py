"""Run configuration, validated before any compute.

:class:`TrainConfig` holds everything the trainer needs.  :meth:`TrainConfig.from_dict` rejects unknown keys,
wrong types (with a hint for YAML 1.1's ``1e-3``-is-a-string pitfall), out-of-range numbers and unknown names,
each error naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .augment import PRESETS, with_overrides
from .hypergrad import ENGINES
from .meta import META_METHODS, meta_class
from .models import BACKBONE_OPTIONS, BACKBONES
from .objectives import OBJECTIVES, make_objective

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
DEVICES = ("cpu", "cuda", "auto")
HYPERGRAD_ENGINES = tuple(ENGINES)
# engines that differentiate only once (no double backward, no finite differences): safe under bf16 autocast
AMP_SAFE_ENGINES = ("first_order", "momentum_proxy")


class ConfigError(ValueError):
    """A bad parameter: the message names the key and what is allowed."""


@dataclass
class TrainConfig:
    # what is trained
    objective: str = "simclr"
    meta: str = "none"              # none (plain SSL) or a bi-level method: gessl
    meta_args: dict = field(default_factory=dict)  # the meta-method's options, e.g. {"m": 8, "mu": 0.7}
    hypergrad: str = "second_order"  # hypergradient engine of the bi-level methods (bilevel_ssl.hypergrad)
    hypergrad_args: dict = field(default_factory=dict)  # engine options, e.g. {"fd_r": 0.01}
    backbone: str = "conv4"
    objective_args: dict = field(default_factory=dict)  # the objective's own options, e.g. {"temperature": 0.2}
    backbone_args: dict = field(default_factory=dict)  # e.g. {"width": 64} (conv4), {"patch_size": 4} (vit_tiny)
    augment: str = "mnistm"         # augmentation preset (bilevel_ssl.augment.PRESETS)
    augment_args: dict = field(default_factory=dict)  # preset fields replaced, e.g. {"rotate90_p": 0.75, "flip_p": 0}
    # optimisation
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0
    # run
    seed: int = 0
    device: str = "cpu"
    amp: bool = False               # CUDA mixed precision (bf16 autocast) for single-level / first-order steps
    sync_bn: bool = False           # under torchrun: BatchNorm over the global batch (single-level only)
    checkpoint_every: int = 0       # epochs between checkpoints; 0 = only when the run ends
    progress: bool = True

    # ---------------------------------------------------------------- validation
    _CHOICES = {"objective": tuple(OBJECTIVES), "meta": META_METHODS, "hypergrad": HYPERGRAD_ENGINES,
                "backbone": BACKBONES,
                "augment": tuple(PRESETS), "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "device": DEVICES}
    RUN_CONTROL = ("progress", "checkpoint_every")  # how a run is shown and saved, not what it computes
    _POSITIVE = ("epochs", "batch_size", "lr")
    _NON_NEGATIVE = ("momentum", "weight_decay", "warmup_epochs", "checkpoint_every", "seed")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for key, allowed in self._CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: unknown value {getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        for key in self._POSITIVE:
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)!r}")
        for key in self._NON_NEGATIVE:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)!r}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ConfigError(f"warmup_epochs: must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size: contrastive objectives need >= 2 samples per batch, got {self.batch_size}")
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

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown}; allowed: {', '.join(cls.keys())}")
        return cls(**d)

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


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}


def _check_type(key: str, value: Any, annotation: Any) -> None:
    expected = _TYPES[annotation if isinstance(annotation, str) else annotation.__name__]
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        hint = ""
        if expected is float and isinstance(value, str):
            hint = " (YAML 1.1 reads 1e-3 as a string: write 1.0e-3)"
        raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}{hint}")
