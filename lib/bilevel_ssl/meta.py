"""Meta-methods: how one training step turns a batch of views into parameter gradients.

A method is *objective x meta-method x hypergradient engine*.  The trainer owns the optimizer, the schedule and the
loop; a meta-method owns one thing - :meth:`compute_grads`, which fills ``.grad`` of the parameters and returns
the numbers to log.  ``none`` is plain single-level SSL; GeSSL, TC², BiSSL and MCR are further entries of
:data:`META_METHODS` that compose the same objective with an inner/outer step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class SSLNet(nn.Module):
    """Backbone + the objective's heads.  ``forward`` returns the projector output (the SSL embedding)."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        return self.heads["projector"](self.backbone(x))


class SingleLevel:
    """Plain SSL: all views go through the network in *one* forward pass (one BatchNorm batch over all views, as
    SimCLR's reference implementation does with its concatenated views), then the objective's loss, then backward."""

    name = "none"

    def __init__(self, objective):
        self.objective = objective

    def compute_grads(self, net: SSLNet, views: list[Tensor]) -> dict[str, float]:
        z = net(torch.cat(views)).chunk(len(views))
        loss = self.objective.loss(list(z))
        loss.backward()
        return {"loss": loss.item()}


META_METHODS = {"none": SingleLevel}


def make_meta(name: str, objective):
    if name not in META_METHODS:
        raise ValueError(f"meta: unknown name {name!r}; allowed: {', '.join(META_METHODS)}")
    return META_METHODS[name](objective)
