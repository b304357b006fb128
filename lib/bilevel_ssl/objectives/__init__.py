"""Base self-supervised objectives: losses as pure functions of embeddings, plus the little state they need.

An objective is *not* a module.  It says how many views it needs (``n_views``), builds the trainable heads that sit
on the backbone (:meth:`Objective.heads`), and computes its loss from the outputs of the network
(:meth:`Objective.loss`) - tensors only, so the bi-level methods can evaluate it on any support/query views and
with functional parameters (``torch.func.functional_call``).

Outputs.  :class:`bilevel_ssl.meta.SSLNet` returns, per image, a dict with ``h`` (backbone features), ``z``
(projector output) and, when the objective has those heads, ``p`` (``predictor(z)``) and ``s`` (``prototypes``
applied to the L2-normalised ``z``).  ``loss(student, teacher)`` receives one such dict per view for the
trained network and, for momentum-teacher objectives (:meth:`Objective.teacher_momentum` not None), one per view
from the EMA teacher (computed without gradient); otherwise ``teacher`` is None.

State.  Objectives that keep state between steps (MoCo's queue, DINO's centre, SwAV's prototype normalisation)
update it in :meth:`Objective.update_state`, called without gradient after the optimizer step, and expose it
through ``state_dict`` / ``load_state_dict`` so that checkpoints resume exactly.

Families live in one file each: ``contrastive`` (SimCLR, MoCo v2), ``distillation`` (BYOL, SimSiam, DINO),
``redundancy`` (Barlow Twins, VICReg), ``clustering`` (SwAV), ``mae`` (MAE).
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch.nn as nn
from torch import Tensor

Outputs = list[dict[str, Tensor]]


class Objective:
    """Base class.  Subclasses are dataclasses of their hyper-parameters (defaults from their papers)."""

    name: ClassVar[str]
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ()  # fields that must be > 0 (checked on construction)

    def __post_init__(self) -> None:
        for key in self.positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"objective {self.name}: {key} must be > 0, got {getattr(self, key)!r}")

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        """Trainable heads on top of the backbone; must contain ``projector``."""
        raise NotImplementedError

    def loss(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        raise NotImplementedError

    def outputs(self, net: nn.Module, x: Tensor, n_views: int) -> Outputs:
        """Run ``net`` (student or teacher) on the concatenated views ``x`` and split per view.  Objectives whose
        forward is not the plain chain (MAE's masking) override this."""
        out = net(x)
        parts = {k: v.chunk(n_views) for k, v in out.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n_views)]

    def teacher_momentum(self, progress: float) -> float | None:
        """EMA coefficient of the teacher at training progress in [0, 1]; None = no teacher network."""
        return None

    def update_state(self, student: Outputs, teacher: Outputs | None) -> None:
        """After the optimizer step, without gradient: queues, centres, ..."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected state {sorted(state)}")


# name -> "module:Class"; resolved on use, so one family's import cost or error never touches the others.
_REGISTRY = {
    "simclr": "contrastive:SimCLR",
    "moco_v2": "contrastive:MoCoV2",
    "byol": "distillation:BYOL",
    "simsiam": "distillation:SimSiam",
    "dino": "distillation:DINO",
    "barlow_twins": "redundancy:BarlowTwins",
    "vicreg": "redundancy:VICReg",
    "swav": "clustering:SwAV",
    "mae": "mae:MAE",
}
OBJECTIVES = tuple(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    if name not in _REGISTRY:
        raise ValueError(f"objective: unknown name {name!r}; allowed: {', '.join(OBJECTIVES)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_objective(name: str, **kwargs) -> Objective:
    """Build an objective by name; unknown options are rejected with the allowed ones listed."""
    import dataclasses

    cls = objective_class(name)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"objective {name}: unknown option(s) {unknown}; allowed: {', '.join(allowed)}")
    return cls(**kwargs)


def __getattr__(attr: str):  # `from bilevel_ssl.objectives import nt_xent` etc. keep working
    if attr in ("nt_xent", "SimCLR"):
        return getattr(importlib.import_module(f"{__name__}.contrastive"), attr)
    raise AttributeError(attr)
