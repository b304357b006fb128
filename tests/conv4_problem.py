"""A tiny float64 bi-level problem on the default Conv-4 (3x3 conv, train-mode BatchNorm, ReLU, 2x2 max-pool),
shaped like GeSSL's step: θ = the Conv-4 and a linear head, φ = a small network that enters *only* the inner loss
(as g does), one inner step.  Used by ``tests/test_hypergrad_conv4.py`` (#24) to compare every engine with the
exact hypergradient."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bilevel_ssl.models import make_backbone

DT = torch.float64
INNER_LR = 0.1


def conv4_problem(seed: int = 0, width: int = 3, size: int = 8, batch: int = 6, smooth: bool = False,
                  dtype: torch.dtype = DT):
    """(inner_loss, outer_loss, theta, phi): L_in(θ, φ) = MSE of the head's output to targets shifted by φ's
    output (φ used only here), L_out(θ) = MSE on a query batch.  Backbone in train mode (batch statistics).
    ``smooth``: ReLU -> softplus and max-pool -> average pool (a C² loss: the control of the kink effect)."""
    torch.manual_seed(seed)
    net = nn.ModuleDict({"f": make_backbone("conv4", 3, width=width, pool_size=1), "h": nn.Linear(width, 2)})
    if smooth:
        feats = net["f"].features
        for i, m in enumerate(feats):
            if isinstance(m, nn.ReLU):
                feats[i] = nn.Softplus(beta=4.0)
            elif isinstance(m, nn.MaxPool2d):
                feats[i] = nn.AvgPool2d(2, ceil_mode=True)
    g = nn.Linear(width, 2)
    net, g = net.to(dtype).train(), g.to(dtype)
    names = [n for n, _ in net.named_parameters()]
    gnames = [n for n, _ in g.named_parameters()]
    buffers = dict(net.named_buffers())
    xs, xq = torch.randn(batch, 3, size, size, dtype=dtype), torch.randn(batch, 3, size, size, dtype=dtype)
    ys, yq = torch.randn(batch, 2, dtype=dtype), torch.randn(batch, 2, dtype=dtype)

    def forward(theta, x):
        params = {**dict(zip(names, theta)), **{k: b.clone() for k, b in buffers.items()}}
        z = functional_call(net["f"], {k[2:]: v for k, v in params.items() if k.startswith("f.")}, (x,))
        return z, functional_call(net["h"], {k[2:]: v for k, v in params.items() if k.startswith("h.")}, (z,))

    def inner_loss(theta, phi):
        z, out = forward(theta, xs)
        shift = functional_call(g, dict(zip(gnames, phi)), (z,))
        return F.mse_loss(out, ys + torch.tanh(shift))

    def outer_loss(theta, phi):
        return F.mse_loss(forward(theta, xq)[1], yq)

    theta = [p.detach().clone() for p in net.parameters()]
    phi = [p.detach().clone() for p in g.parameters()]
    return inner_loss, outer_loss, theta, phi


def unrolled(inner_loss, outer_loss, theta, phi, lr=INNER_LR):
    """F(θ, φ) = L_out(θ − α∇_θ L_in(θ, φ), φ), differentiable (create_graph)."""
    g = torch.autograd.grad(inner_loss(theta, phi), theta, create_graph=True)
    return outer_loss([t - lr * gi for t, gi in zip(theta, g)], phi)
