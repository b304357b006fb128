"""One optimisation step of a benchmark case in float64, from fixed weights and views - shared by the CPU/GPU
comparison (``test_cuda.py``) and the golden-gradient regression test (``test_golden_gradients.py``).

The network is built by :func:`bilevel_ssl.bench._setup` (``build_net`` seeds torch, so every call starts from the
same weights), moved to float64 with the meta-method's own modules; the views are drawn from a CPU generator; the
step's random draws (GeSSL's masks, MCR's mixing weights, PCGrad's order) come from torch's global CPU RNG,
re-seeded just before :meth:`compute_grads`.
"""

from __future__ import annotations

import torch

from bilevel_ssl.augment import make_views
from bilevel_ssl.bench import _setup


def build64(overrides: dict, batch: int, device: str, *, channels: int = 3, size: int = 28):
    """(cfg, device, net, meta) of a case, all in float64 on ``device``."""
    cfg, dev, net, meta, _ = _setup(overrides, batch, device, channels, size)
    for m in (net, meta):
        m.to(torch.float64)  # the meta-methods' .to moves their own networks (g, f_v/f_w, CompMod, teachers)
    return cfg, dev, net, meta


def views64(cfg, meta, batch: int, *, channels: int = 3, size: int = 28, seed: int = 3) -> list[torch.Tensor]:
    """The case's views of a random float64 batch, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, channels, size, size), generator=gen, dtype=torch.uint8).double().div(255)
    return make_views(x, meta.n_views, cfg.augmentation(), gen)


def step64(net, meta, views: list[torch.Tensor], device, *, seed: int = 11) -> dict[str, float]:
    """``meta.compute_grads`` on ``views`` (moved to ``device``) after seeding torch's global RNG."""
    torch.manual_seed(seed)
    return meta.compute_grads(net, [v.to(device) for v in views])


def grads(net, meta) -> torch.Tensor:
    """The gradients of the network and of the meta-method's trainable parameters, flattened (zeros for None)."""
    ps = [*net.parameters(), *meta.parameters()]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().cpu() for p in ps])
