"""Stage 2 of Fig. 1, the downstream head warm-up (§4.2.2): ϕ_D (:class:`DownstreamHead`, a linear head, optionally
behind a fixed feature normalisation) fitted on the frozen backbone (:func:`warmup_head`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..augment import augment as augment_batch
from ..data import ImageSet, to_channels
from ..evaluate import batch_features, feature_normalizer
from ..trainer import make_optimizer
from .config import BiSSLConfig, crop_flip, stream_seeds


class DownstreamHead(nn.Module):
    """ϕ_D: a linear classifier on the backbone features, optionally behind a *fixed* normalisation
    ``(f − mean) / scale`` (buffers, not trained) with a per-feature ``mean`` and **one** ``scale`` for all features
    (:func:`bilevel_ssl.evaluate.feature_normalizer`).  The composition is still a linear function of the features
    (reparametrised), i.e. the paper's linear head (§4.2.1)."""

    def __init__(self, feature_dim: int, n_classes: int, mean: Tensor | None = None, scale: float | Tensor = 1.0):
        super().__init__()
        self.standardize = mean is not None
        self.register_buffer("mean", torch.zeros(feature_dim) if mean is None else mean.detach().clone())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())
        self.linear = nn.Linear(feature_dim, n_classes)

    def forward(self, f: Tensor) -> Tensor:
        if self.standardize:
            f = (f - self.mean) / self.scale
        return self.linear(f)


def warmup_head(backbone: nn.Module, train: ImageSet, cfg: BiSSLConfig, *, n_classes: int | None = None
                ) -> tuple[DownstreamHead, list[dict]]:
    """Stage 2 of Fig. 1 (§4.2.2 "Downstream Head Warm-up"): fit ϕ_D, a linear head, on the *frozen* backbone with
    cross-entropy, SGD (``downstream_lr``, ``downstream_momentum``, ``downstream_weight_decay``), a constant learning
    rate, ``warmup_epochs`` epochs of near-equal batches of at most ``downstream_batch_size`` images.

    The backbone runs in train mode (batch statistics, as the upper level will see it) on a copy, so its running
    statistics are unchanged.  Head init: weights N(0, 0.01), bias 0 (as :mod:`bilevel_ssl.semisup`), from a
    generator seeded by ``cfg.seed``.  Returns the head and one record per epoch (``loss``, ``acc`` on the batches).
    """
    device = torch.device(cfg.resolved_device())
    bb = copy.deepcopy(backbone).to(device).train()
    bb.requires_grad_(False)
    want = backbone.spec["in_channels"] if hasattr(backbone, "spec") else train.channels
    images = to_channels(train.images, want)
    labels = train.labels.to(device)
    if n_classes is None:
        n_classes = int(train.labels.max()) + 1
    g = torch.Generator().manual_seed(stream_seeds(cfg.seed, 4)[3])
    n = len(train)
    chunks = max(1, math.ceil(n / cfg.downstream_batch_size))
    mean, scale = None, 1.0
    if cfg.head_standardize:
        mean, scale = feature_normalizer(batch_features(bb, images, torch.tensor_split(torch.arange(n), chunks),
                                                         device))
    feature_dim = getattr(backbone, "feature_dim", None) or batch_features(bb, images, [torch.arange(2)], device).shape[1]
    head = DownstreamHead(feature_dim, n_classes, mean, scale)
    with torch.no_grad():
        head.linear.weight.normal_(0.0, 0.01, generator=g)
        head.linear.bias.zero_()
    head.to(device)
    aug = crop_flip(cfg.downstream_augment)
    opt = make_optimizer("sgd", head.parameters(), lr=cfg.downstream_lr, momentum=cfg.downstream_momentum,
                         weight_decay=cfg.downstream_weight_decay)
    history = []
    for epoch in range(cfg.warmup_epochs):
        perm = torch.randperm(n, generator=g)
        tot = correct = 0.0
        for b in torch.tensor_split(perm, chunks):
            x = images[b].to(device).float().div_(255)
            if aug is not None:
                x = augment_batch(x, aug, g)
            with torch.no_grad():
                f = bb(x)
            logits = head(f)
            y = labels[b.to(device)]
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(b)
            correct += float((logits.argmax(1) == y).sum())
        history.append({"epoch": epoch + 1, "loss": tot / n, "acc": correct / n})
    return head, history
