"""Clustering objectives: SwAV.

SwAV (Caron et al. 2020) maps each view to a code - a soft assignment of the batch to K learnable prototypes,
computed with the Sinkhorn-Knopp algorithm under an equipartition constraint - and trains each view to predict
the *other* view's code from its own prototype scores ("swapped prediction").  The core formulas are the
module-level pure functions :func:`sinkhorn_knopp` and :func:`swav_loss`, so the bi-level methods can call them on
any scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models import MLPHead
from . import Objective, Outputs


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, n_iters: int = 3) -> Tensor:
    """SwAV's codes Q from prototype scores (Caron et al. 2020, Sec. 3.1, Eq. 3 and its Sinkhorn-Knopp solution).

    ``scores``: (B, K) = zᵀc (cosine similarities of the B samples to the K prototypes).  Returns (B, K) codes,
    computed without gradient (a detached tensor): ``Q ∝ exp(scores / ε)`` rescaled by alternately normalising the
    prototypes' totals to 1/K and the samples' totals to 1/B, ``n_iters`` times, then multiplied by B.  Each
    sample's row sums to 1 exactly (the last normalisation); each prototype's column sums to B/K (equipartition)
    only approximately after a few iterations, exactly in the limit.  The global maximum is subtracted before the
    exponential for numerical range; the normalisations make the result independent of that constant.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn_knopp: scores must be (B, K), got shape {tuple(scores.shape)}")
    if n_iters < 1:
        raise ValueError(f"sinkhorn_knopp: n_iters must be >= 1, got {n_iters}")
    s = scores.detach()
    b, k = s.shape
    q = torch.exp((s - s.max()) / epsilon).T  # (K, B)
    q = q / q.sum()
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True) / k  # every prototype gets total mass 1/K
        q = q / q.sum(dim=0, keepdim=True) / b  # every sample gets total mass 1/B
    return (q * b).T


def swapped_prediction(scores: Tensor, codes: Tensor, temperature: float = 0.1) -> Tensor:
    """``ℓ(z, q) = - Σ_k q_k log softmax(zᵀC / τ)_k`` averaged over the batch (Caron et al. 2020, Eq. 2)."""
    return -(codes * F.log_softmax(scores / temperature, dim=1)).sum(dim=1).mean()


def swav_loss(s1: Tensor, s2: Tensor, temperature: float = 0.1, epsilon: float = 0.05,
              sinkhorn_iters: int = 3) -> Tensor:
    """SwAV's swapped-prediction loss for two views (Caron et al. 2020, Eq. 1), from the prototype scores.

    ``s1``, ``s2``: (B, K) scores of the two views (normalised z against normalised prototypes).  Each view's code
    is computed from its own batch scores by :func:`sinkhorn_knopp` (no gradient), then predicted from the *other*
    view's scores: ``(ℓ(s2, q1) + ℓ(s1, q2)) / 2``.  Eq. 1 writes the sum of the two terms; the mean (over the
    ordered view pairs, as the multi-crop implementation averages) keeps the value on the scale of one
    cross-entropy - a constant factor 1/2 that only interacts with the learning rate.
    """
    if s1.shape != s2.shape or s1.dim() != 2:
        raise ValueError(f"swav_loss: s1 and s2 must be (B, K) of equal shape, "
                         f"got {tuple(s1.shape)} and {tuple(s2.shape)}")
    q1 = sinkhorn_knopp(s1, epsilon, sinkhorn_iters)
    q2 = sinkhorn_knopp(s2, epsilon, sinkhorn_iters)
    return 0.5 * (swapped_prediction(s2, q1, temperature) + swapped_prediction(s1, q2, temperature))


class Prototypes(nn.Linear):
    """SwAV's prototype matrix C: ``nn.Linear(dim, n_prototypes, bias=False)`` whose rows are used L2-normalised.

    The paper keeps the prototypes on the unit sphere by normalising them after every update (in the authors'
    code: in place, at the start of every iteration).  Here ``forward`` applies ``F.normalize(weight, dim=1)``
    itself, so the scores are always cosine similarities to unit prototypes - also when the parameters come from
    ``torch.func.functional_call`` (the bi-level methods' inner steps), where an in-place renormalisation of the
    module's tensor would be bypassed.  The rows are initialised with unit norm.  Gradient: for a row w with
    ‖w‖ = 1 the gradient w.r.t. w is the paper's gradient w.r.t. the unit prototype projected on the sphere's
    tangent plane, ``(I - wwᵀ) g``; one SGD step followed by normalisation therefore agrees with the paper's update to
    first order in the step size.  The stored rows are not renormalised (only their direction is ever used), so
    their norm may drift slowly (tangent steps grow it, weight decay shrinks it), which rescales the prototypes'
    effective step size by 1/‖w‖².
    """

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__(dim, n_prototypes, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


@dataclass
class SwAV(Objective):
    """SwAV (Caron et al. 2020): two views, projector MLP -> z, prototypes, Sinkhorn-Knopp codes, swapped prediction
    (:func:`swav_loss`).

    * Heads: ``projector`` = :class:`~bilevel_ssl.models.MLPHead` with ``layers=2`` (2048 hidden, 128 out, the
      paper's ResNet-50 head) and ``prototypes`` = :class:`Prototypes`.  :class:`bilevel_ssl.meta.SSLNet` applies
      the prototypes to the L2-normalised z and returns the scores as ``"s"``, which is all the loss reads.
    * τ = 0.1, ε = 0.05, 3 Sinkhorn iterations: the paper's defaults (implementation details).
    * ``n_prototypes``: 3000 for ImageNet in the paper; default 30 here (3 per class for the 10-class small data
      sets, the paper's ~3x the number of classes).  The equipartition constraint spreads each batch evenly over the
      prototypes: with batches of 32-256 images and 3000 prototypes every prototype would get a small fraction
      of one image per batch, so the codes would carry little signal; the paper reports SwAV robust to the
      prototype count over a wide range.
    * No queue: the paper adds a queue of past features to the Sinkhorn step when the batch is small compared with
      the number of prototypes (batch 256 vs K = 3000).  Here the default K = 30 is below the batch sizes used
      (32-256), so each batch can be equipartitioned on its own; this also leaves the objective without state (empty ``state_dict``).
    * Prototype normalisation: inside :class:`Prototypes.forward` (see there) rather than in ``update_state``,
      which only receives the detached outputs, never the network; ``update_state`` is therefore a no-op.
    * Not done: freezing the prototypes during the first epoch (the paper's optional stabilisation trick) and
      multi-crop (two views only, ``n_views = 2``).
    """

    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    n_prototypes: int = 30
    proj_hidden: int = 2048
    proj_dim: int = 128

    name: ClassVar[str] = "swav"
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ("temperature", "epsilon", "sinkhorn_iters", "n_prototypes",
                                           "proj_hidden", "proj_dim")

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({"projector": MLPHead(feature_dim, self.proj_hidden, self.proj_dim, layers=2),
                              "prototypes": Prototypes(self.proj_dim, self.n_prototypes)})

    def loss(self, student: Outputs, teacher: Outputs | None = None) -> Tensor:
        if "s" not in student[0]:
            raise KeyError("swav: outputs have no prototype scores 's'; the network needs the 'prototypes' head "
                           "from SwAV.heads()")
        return swav_loss(student[0]["s"], student[1]["s"], self.temperature, self.epsilon, self.sinkhorn_iters)
