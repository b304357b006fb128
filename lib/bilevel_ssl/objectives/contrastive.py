"""Contrastive objectives: SimCLR (and MoCo v2, below)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models import MLPHead
from . import Objective, Outputs


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's normalized temperature-scaled cross entropy (Chen et al. 2020, Eq. 1), averaged over all 2N anchors.

    For anchor i with positive j(i) (the other view of the same image) and the 2N-2 other samples as negatives:
    ``l_i = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ)`` with cosine similarity s.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: z1 and z2 must be (N, d) of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


@dataclass
class SimCLR(Objective):
    """SimCLR (Chen et al. 2020): two views, 2-layer MLP projector, NT-Xent.  τ = 0.5 is the SimCLR CIFAR-10
    default; the notebooks use 0.2 at small scale."""

    temperature: float = 0.5
    proj_hidden: int = 512
    proj_dim: int = 128

    name: ClassVar[str] = "simclr"
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ("temperature", "proj_hidden", "proj_dim")

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({"projector": MLPHead(feature_dim, self.proj_hidden, self.proj_dim, layers=2)})

    def loss(self, student: Outputs, teacher: Outputs | None = None) -> Tensor:
        return nt_xent(student[0]["z"], student[1]["z"], self.temperature)


def moco_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo's InfoNCE (He et al. 2020, Eq. 1), averaged over the N queries.

    Query ``q_i`` (student), its positive key ``k_i`` (teacher, same image, other view) and the K queued keys as
    negatives: ``l_i = -log exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_j exp(q_i·queue_j/τ))`` on L2-normalised
    vectors.
    Keys and queue are constants (``detach``): only the query carries gradient, whatever the caller passes.
    """
    if q.shape != k.shape or q.dim() != 2 or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"moco_infonce: q, k must be (N, d) of equal shape and queue (K, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(queue.shape)}")
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    queue = F.normalize(queue.detach().to(q.device, q.dtype), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@dataclass
class MoCoV2(Objective):
    """MoCo v2 (He et al. 2020, "Momentum Contrast"; Chen et al. 2020, "Improved Baselines with Momentum
    Contrastive Learning", arXiv:2003.04297).

    Query = student projection of one view, key = EMA-teacher (key encoder) projection of the other view, negatives
    = a FIFO queue of L2-normalised keys from earlier steps; InfoNCE (:func:`moco_infonce`).

    * Head: the MoCo v2 2-layer MLP, ``Linear(d, 2048) -> ReLU -> Linear(2048, 128)`` with no BatchNorm (Chen et
      al. 2020, Sec. 2 "MLP head": hidden 2048-d, output 128-d).
    * ``temperature = 0.2``: MoCo v2's τ (Chen et al. 2020, Sec. 2 / Table 1).
    * ``momentum = 0.99`` constant (no schedule): MoCo uses m = 0.999 on ImageNet (He et al. 2020, Sec. 3.2/4.1,
      "m = 0.999"); with the few hundred to few thousand steps of this library's runs 0.999 leaves the key encoder
      almost at its random initialisation, so 0.99 is used, the common choice of small-scale (CIFAR) MoCo
      reimplementations.  MoCo's ablation (He et al. 2020, Table in Sec. 4.1) shows 0.99 still trains well.
    * ``queue_size = 4096`` instead of the paper's K = 65536 (He et al. 2020, Sec. 4.1): the datasets here have
      5k-60k images, and a 65536-key queue would hold keys older than one epoch (stale, from a very different key
      encoder) or several copies of each image.  4096 is the CIFAR-scale choice; any size is allowed.  The queue
      starts as random unit vectors (as MoCo's reference implementation initialises it) drawn from a fixed
      generator (seed 0), so the objective's construction does not touch the global RNG.
    * Symmetrised loss: ``½[InfoNCE(q1, k2) + InfoNCE(q2, k1)]``.  MoCo v1/v2 compute one direction per step; the
      symmetric form is MoCo v3's (Chen, Xie & He 2021, Alg. 1) and common small-scale practice - every image gives
      two queries per step.  It is averaged (not summed as in MoCo v3) so the value stays on the scale of one
      InfoNCE (log(K+1) at chance).  Both views' keys (2N per step) are enqueued in :meth:`update_state`.
    * No shuffling BN (He et al. 2020, Sec. 3.3): it needs several processes; here the student and teacher each see
      all views in one BatchNorm batch.  The projector has no BN, only the backbone has.
    * Enqueueing wraps around the end of the queue, so ``queue_size`` need not be a multiple of the batch size
      (MoCo's code asserts it is); a step with more keys than ``queue_size`` keeps the last ``queue_size`` ones.
    * Learning rate: MoCo trains with SGD lr 0.03 at batch 256 (He et al. 2020, Sec. 4.1).  Measured here (conv4
      width 32, 1667 mnistm5k images, batch 128, 8 epochs, queue 1024): lr 0.03 trains (loss 6.25 -> 5.42, 5-NN
      0.47 vs 0.41 for the random network), while the trainer's default lr 0.3 collapsed all queries onto one
      direction within the first steps and stayed at chance, log(K + 1).
    """

    temperature: float = 0.2
    momentum: float = 0.99
    queue_size: int = 4096
    proj_hidden: int = 2048
    proj_dim: int = 128

    name: ClassVar[str] = "moco_v2"
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ("temperature", "queue_size", "proj_hidden", "proj_dim")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"objective {self.name}: momentum must be in [0, 1], got {self.momentum!r}")
        g = torch.Generator().manual_seed(0)
        self.queue = F.normalize(torch.randn(self.queue_size, self.proj_dim, generator=g), dim=1)
        self.queue_ptr = torch.zeros((), dtype=torch.long)

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        projector = nn.Sequential(nn.Linear(feature_dim, self.proj_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(self.proj_hidden, self.proj_dim))
        return nn.ModuleDict({"projector": projector})

    def teacher_momentum(self, progress: float) -> float:
        return self.momentum

    def loss(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        if teacher is None:
            raise ValueError("moco_v2: needs the momentum teacher's outputs (keys), got teacher=None")
        q1, q2 = student[0]["z"], student[1]["z"]
        k1, k2 = teacher[0]["z"], teacher[1]["z"]
        return 0.5 * (moco_infonce(q1, k2, self.queue, self.temperature)
                      + moco_infonce(q2, k1, self.queue, self.temperature))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """FIFO: write the L2-normalised ``keys`` at the pointer (wrapping around), advance the pointer."""
        device = keys.device  # the state follows the keys' device (it is created on the CPU)
        queue = self.queue.to(device).clone()  # out of place: a saved state_dict or a live graph keeps the old one
        ptr = self.queue_ptr.to(device)
        keys = F.normalize(keys.detach(), dim=1).to(queue.dtype)
        size, m = queue.shape[0], keys.shape[0]
        if m >= size:
            queue.copy_(keys[-size:])
            self.queue, self.queue_ptr = queue, torch.zeros_like(ptr)
            return
        queue[(ptr + torch.arange(m, device=device)) % size] = keys
        self.queue, self.queue_ptr = queue, (ptr + m) % size

    def update_state(self, student: Outputs, teacher: Outputs | None) -> None:
        if teacher is None:
            raise ValueError("moco_v2: needs the momentum teacher's outputs (keys), got teacher=None")
        self.enqueue(torch.cat([t["z"] for t in teacher]))

    def state_dict(self) -> dict[str, Tensor]:
        return {"queue": self.queue.clone(), "queue_ptr": self.queue_ptr.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"queue", "queue_ptr"}:
            raise ValueError(f"{self.name}: expected state keys ['queue', 'queue_ptr'], got {sorted(state)}")
        if tuple(state["queue"].shape) != tuple(self.queue.shape):
            raise ValueError(f"{self.name}: queue of shape {tuple(state['queue'].shape)} does not fit "
                             f"queue_size={self.queue_size}, proj_dim={self.proj_dim}")
        self.queue = state["queue"].detach().clone()
        self.queue_ptr = state["queue_ptr"].detach().clone().long()
