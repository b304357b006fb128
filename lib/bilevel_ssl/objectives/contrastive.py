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
