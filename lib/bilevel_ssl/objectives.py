"""Base self-supervised objectives.

Each objective is (a) a *pure loss* on embeddings - a function of tensors only, so the bi-level methods can call it
on any support/query views and with functional parameters (``torch.func.functional_call``) - and (b) a small
spec object that says how many views it needs and which heads (projector, ...) it trains.

Only SimCLR lives here so far; the rest of the zoo (MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg, SwAV, DINO, MAE)
plugs into the same :data:`OBJECTIVES` registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .models import MLPHead


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
class SimCLR:
    """SimCLR (Chen et al. 2020): two views, MLP projector, NT-Xent.  τ = 0.5 is the SimCLR CIFAR-10 default."""

    temperature: float = 0.5
    proj_hidden: int = 512
    proj_dim: int = 128

    name = "simclr"
    n_views = 2

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({"projector": MLPHead(feature_dim, self.proj_hidden, self.proj_dim, layers=2)})

    def loss(self, z: list[Tensor]) -> Tensor:
        return nt_xent(z[0], z[1], self.temperature)


OBJECTIVES = {"simclr": SimCLR}


def make_objective(name: str, **kwargs):
    if name not in OBJECTIVES:
        raise ValueError(f"objective: unknown name {name!r}; allowed: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)
