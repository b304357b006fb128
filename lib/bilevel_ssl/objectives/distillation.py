"""Self-distillation objectives: BYOL, SimSiam, DINO.

All three predict, from one view, a target computed from another view by a branch that receives no gradient:
an EMA teacher (BYOL, DINO) or the same network under stop-gradient (SimSiam).  The core formulas are the pure
functions :func:`byol_loss`, :func:`simsiam_loss` (:func:`negative_cosine`) and :func:`dino_loss`; each detaches
its target argument itself, so a bi-level method calling them on any tensors keeps the stop-gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models import MLPHead
from . import Objective, Outputs


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's EMA schedule (Grill et al. 2020, Sec. 3.2): ``τ = 1 − (1 − τ_base)(cos(π·k/K) + 1)/2`` with
    ``progress = k/K`` in [0, 1]; goes from ``base`` at 0 to 1 at the end.  DINO uses the same (Caron et al. 2021,
    Sec. 3.1 "Teacher network")."""
    progress = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _check_unit(name: str, key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"objective {name}: {key} must be in [0, 1], got {value!r}")


def _need_teacher(name: str, teacher: Outputs | None) -> Outputs:
    if teacher is None:
        raise ValueError(f"{name}: needs the momentum teacher's outputs, got teacher=None")
    return teacher


# ---------------------------------------------------------------------------------------------------------- BYOL
def byol_loss(p: Tensor, z_target: Tensor) -> Tensor:
    """BYOL's regression loss (Grill et al. 2020, Eq. 2): ``‖p̄ − z̄‖² = 2 − 2·cos(p, z)`` with p̄, z̄ the
    L2-normalised online prediction and target projection, averaged over the batch.  ``z_target`` is detached
    (the target network gets no gradient, sg(ξ) in the paper)."""
    if p.shape != z_target.shape or p.dim() != 2:
        raise ValueError(f"byol_loss: p and z_target must be (N, d) of equal shape, got {tuple(p.shape)} and "
                         f"{tuple(z_target.shape)}")
    return (2.0 - 2.0 * F.cosine_similarity(p, z_target.detach(), dim=1)).mean()


@dataclass
class BYOL(Objective):
    """BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

    Online network = backbone -> projector -> predictor; target = EMA teacher (backbone -> projector, no
    predictor).  Defaults from the paper, Sec. 3.2 "Implementation details": projector and predictor are both
    ``Linear(4096) -> BN -> ReLU -> Linear(256)`` (:class:`~bilevel_ssl.models.MLPHead`, ``layers=2``); EMA
    ``τ_base = 0.996`` with the cosine increase to 1 (:func:`cosine_momentum`).  Smaller heads (``proj_hidden``,
    ``pred_hidden``, ``proj_dim``) are options for small backbones.

    Loss: ``L + L̃ = byol_loss(p1, z2') + byol_loss(p2, z1')`` - the paper's symmetrised loss is the *sum* of the
    two directions (Sec. 3.1, ``L^BYOL = L + L̃``), kept here, so it lies in [0, 8].  The trivial minimum (all
    embeddings equal, loss 0) is avoided by the predictor and the slow target, not by the loss.
    """

    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    base_momentum: float = 0.996

    name: ClassVar[str] = "byol"
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ("proj_hidden", "proj_dim", "pred_hidden")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit(self.name, "base_momentum", self.base_momentum)

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({
            "projector": MLPHead(feature_dim, self.proj_hidden, self.proj_dim, layers=2),
            "predictor": MLPHead(self.proj_dim, self.pred_hidden, self.proj_dim, layers=2),
        })

    def teacher_momentum(self, progress: float) -> float:
        return cosine_momentum(self.base_momentum, progress)

    def loss(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        teacher = _need_teacher(self.name, teacher)
        return byol_loss(student[0]["p"], teacher[1]["z"]) + byol_loss(student[1]["p"], teacher[0]["z"])


# ------------------------------------------------------------------------------------------------------- SimSiam
def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's ``D(p, stopgrad(z)) = −cos(p, z)`` averaged over the batch (Chen & He 2021, Eq. 1 and 3); ``z`` is
    detached here - the stop-gradient is what keeps SimSiam from collapsing (their Sec. 4.1)."""
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"negative_cosine: p and z must be (N, d) of equal shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """``L = ½ D(p1, stopgrad(z2)) + ½ D(p2, stopgrad(z1))`` (Chen & He 2021, Eq. 4); minimum −1."""
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


@dataclass
class SimSiam(Objective):
    """SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning"): no teacher, no negatives;
    the symmetric negative cosine between one view's prediction and the other view's projection under
    stop-gradient (:func:`simsiam_loss`).

    Defaults from the paper, Sec. 3 "Baseline settings": projector = 3-layer MLP, hidden and output 2048, BN on
    every layer including the output, no ReLU on the output (``MLPHead(layers=3, last_bn=True)``); predictor =
    ``Linear(2048, 512) -> BN -> ReLU -> Linear(512, 2048)``, a bottleneck of 1/4 of the projection dimension.
    ``pred_hidden = None`` keeps that ratio for any ``proj_dim`` (``proj_dim // 4``); an int sets it.
    """

    proj_hidden: int = 2048
    proj_dim: int = 2048
    pred_hidden: int | None = None

    name: ClassVar[str] = "simsiam"
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ("proj_hidden", "proj_dim")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pred_hidden is not None and not self.pred_hidden > 0:
            raise ValueError(f"objective {self.name}: pred_hidden must be > 0 or None, got {self.pred_hidden!r}")

    @property
    def predictor_hidden(self) -> int:
        """The predictor's hidden width: ``pred_hidden``, or the paper's ratio 512/2048 of ``proj_dim``."""
        return self.pred_hidden if self.pred_hidden is not None else max(1, self.proj_dim // 4)

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({
            "projector": MLPHead(feature_dim, self.proj_hidden, self.proj_dim, layers=3, last_bn=True),
            "predictor": MLPHead(self.proj_dim, self.predictor_hidden, self.proj_dim, layers=2),
        })

    def loss(self, student: Outputs, teacher: Outputs | None = None) -> Tensor:
        return simsiam_loss(student[0]["p"], student[1]["p"], student[0]["z"], student[1]["z"])


# ---------------------------------------------------------------------------------------------------------- DINO
class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Sec. 3.1 "Network architecture"): a 3-layer MLP (hidden
    ``hidden_dim``, output ``bottleneck_dim``), L2 normalisation, then a weight-normalised linear layer without
    bias to ``out_dim`` (K) logits.

    The MLP uses GELU and no BatchNorm (the DINO head's default; the paper notes the head has no BN), weights
    from a truncated normal with std 0.02 and zero biases.  Weight normalisation ``w_k = g_k·v_k/‖v_k‖`` with the
    gain fixed to g = 1 (DINO's default ``norm_last_layer``), i.e. each output is the cosine between the
    normalised bottleneck feature and a learnt direction ``v_k``.  DINO's freezing of this last layer during the
    first epoch is not done.
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"DINOHead layers: must be >= 1, got {layers}")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden_dim), nn.GELU()]
            d = hidden_dim
        mods.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))  # nn.Linear's default; only the direction matters
        self.out_dim = out_dim

    @property
    def last_weight(self) -> Tensor:
        """The effective last-layer weight, rows of unit norm."""
        return F.normalize(self.last_v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=1), self.last_weight)


def dino_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor, student_temp: float = 0.1,
              teacher_temp: float = 0.04) -> Tensor:
    """DINO's loss (Caron et al. 2021, Eq. 3 with the centring of Sec. 3.1): for every pair of *different* views
    (teacher view a, student view b), the cross-entropy ``−Σ_k P_t(a)_k · log P_s(b)_k`` with
    ``P_t = softmax((t − C)/τ_t)`` (detached: the teacher gets no gradient) and ``P_s = softmax(s/τ_s)``, averaged
    over the batch and over the pairs."""
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(f"dino_loss: need >= 2 views and as many teacher as student outputs, got {len(student)} "
                         f"and {len(teacher)}")
    center = center.detach().to(teacher[0].device, teacher[0].dtype)
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=1) for s in student]
    total, pairs = 0.0, 0
    for a, q in enumerate(targets):
        for b, log_p in enumerate(log_probs):
            if a == b:
                continue
            total = total + (-(q * log_p).sum(dim=1)).mean()
            pairs += 1
    return total / pairs


@dataclass
class DINO(Objective):
    """DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

    Student and EMA teacher share the :class:`DINOHead` projector; the student's softmax at ``student_temp``
    matches the teacher's centred, sharpened softmax at the teacher temperature (:func:`dino_loss`).

    Defaults from the paper (Sec. 3.1 and the implementation details): head hidden 2048, bottleneck 256;
    ``student_temp = 0.1``; teacher temperature 0.04 (``teacher_temp``), with a linear warm-up from
    ``warmup_teacher_temp`` over the first ``warmup_fraction`` of training - the paper warms 0.04 -> 0.07 over the
    first 30 epochs when 0.07 is used; both are 0.04 here (the reference settings' default), so the warm-up is a
    no-op unless set, and ``warmup_fraction = 0.1`` is 30 of 300 epochs; centre momentum ``center_momentum = 0.9``;
    teacher EMA from ``base_momentum = 0.996`` to 1 with the cosine schedule (:func:`cosine_momentum`).

    Deviations (small scale): ``out_dim`` K = 4096 instead of 65536 - the datasets here have 5k-60k images, far
    fewer than 65536 pseudo-classes, and a 65536 x 256 last layer (16.8M weights) would dwarf a conv4 backbone and
    dominate the compute; any K is allowed.  Only the 2 global views (no multi-crop): local crops of 28 px images
    would be a few pixels wide.

    Progress.  The trainer passes training progress only to :meth:`teacher_momentum` (after each step), so that
    call records it (``self._progress``; also :meth:`set_progress`); the loss of the next step uses
    ``teacher_temperature(self._progress)``.  The progress and the centre are state (:meth:`state_dict`), so a
    resumed run continues exactly.  The centre ``C ← m·C + (1 − m)·mean(teacher logits of all views)`` is updated
    in :meth:`update_state` (Sec. 3.1, Eq. 4), starting from 0.
    """

    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_fraction: float = 0.1
    center_momentum: float = 0.9
    base_momentum: float = 0.996

    name: ClassVar[str] = "dino"
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ("out_dim", "hidden_dim", "bottleneck_dim", "student_temp",
                                           "teacher_temp", "warmup_teacher_temp")

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("warmup_fraction", "center_momentum", "base_momentum"):
            _check_unit(self.name, key, getattr(self, key))
        self.center = torch.zeros(1, self.out_dim)
        self._progress = 0.0

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({"projector": DINOHead(feature_dim, self.out_dim, self.hidden_dim, self.bottleneck_dim)})

    def set_progress(self, progress: float) -> None:
        """Record the training progress in [0, 1] that sets the teacher temperature of the next losses."""
        self._progress = min(max(float(progress), 0.0), 1.0)

    def teacher_temperature(self, progress: float) -> float:
        """Linear warm-up ``warmup_teacher_temp -> teacher_temp`` over ``warmup_fraction``, then constant."""
        if self.warmup_fraction > 0 and progress < self.warmup_fraction:
            frac = progress / self.warmup_fraction
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * frac
        return self.teacher_temp

    def teacher_momentum(self, progress: float) -> float:
        self.set_progress(progress)
        return cosine_momentum(self.base_momentum, progress)

    def loss(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        teacher = _need_teacher(self.name, teacher)
        return dino_loss([o["z"] for o in student], [o["z"] for o in teacher], self.center, self.student_temp,
                         self.teacher_temperature(self._progress))

    @torch.no_grad()
    def update_state(self, student: Outputs, teacher: Outputs | None) -> None:
        teacher = _need_teacher(self.name, teacher)
        batch_center = torch.cat([o["z"].detach() for o in teacher]).mean(dim=0, keepdim=True)
        center = self.center.to(batch_center.device, batch_center.dtype)
        self.center = center * self.center_momentum + batch_center * (1.0 - self.center_momentum)

    def state_dict(self) -> dict[str, Tensor]:
        return {"center": self.center.clone(), "progress": torch.tensor(self._progress, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"center", "progress"}:
            raise ValueError(f"{self.name}: expected state keys ['center', 'progress'], got {sorted(state)}")
        if tuple(state["center"].shape) != tuple(self.center.shape):
            raise ValueError(f"{self.name}: centre of shape {tuple(state['center'].shape)} does not fit "
                             f"out_dim={self.out_dim}")
        self.center = state["center"].detach().clone()
        self._progress = float(state["progress"])
