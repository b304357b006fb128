"""Backbones, heads and encoder files.

* ``conv4``    - the "C4" of the few-shot literature used by GeSSL/TC² (Vinyals et al. 2016; Snell et al. 2017):
  four blocks of 3x3 conv (``width`` channels) -> BatchNorm -> ReLU -> 2x2 max-pool (ceil mode), then the final
  map is flattened.  The classic C4 flattens whatever map is left; here it is first average-pooled to
  ``pool_size`` x ``pool_size`` cells (default 2) so the feature size, ``width * pool_size**2``, does not depend on
  the input size.  For 28-32 px inputs the map is already 2x2, i.e. this *is* the classic flatten.  Keeping the
  spatial cells matters: on ``mnistm5k`` SimCLR features with global average pooling (64-d) gave 5-NN 0.58, with
  the 2x2 map (256-d) 0.69 (15 epochs, same settings).
* ``resnet18`` - torchvision's ResNet-18 with the small-image stem of SimCLR's CIFAR recipe (3x3 stride-1 first
  conv, no max-pool); ``resnet50`` - torchvision's ResNet-50 with the ImageNet stem.  ``fc`` is removed: the
  backbone returns pooled features.
* :class:`MLPHead` - projector / predictor: Linear-BN-ReLU blocks then a final Linear.

Every Conv2d, BatchNorm and Conv-4 max-pool here is :mod:`bilevel_ssl.layers`' ``Conv2d`` / ``BatchNorm*d`` /
``MaxPool2d``: the ``nn`` layer's numbers, faster on the CPU (closed-form double backwards, the max-pool in NHWC),
which is what exact hypergradients and the evaluation's feature extraction cost.

Every backbone has ``feature_dim``.  :func:`save_encoder` / :func:`load_encoder` store only the architecture
spec and the weights, so a trained encoder loads without the trainer, optimizer or objective.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .layers import BatchNorm1d, BatchNorm2d, Conv2d, MaxPool2d, adopt

BACKBONE_OPTIONS = {"conv4": ("width", "pool_size", "channels_last"), "resnet18": ("small_stem", "channels_last"),
                    "resnet50": ("small_stem", "channels_last"),
                    "vit_tiny": ("image_size", "patch_size", "dim", "depth", "heads", "mlp_ratio")}
BACKBONES = tuple(BACKBONE_OPTIONS)


class Conv4(nn.Module):
    """``channels_last``: keep weights and activations in NHWC memory format.  Same function, other rounding;
    on this 2-core CPU the forward pass of a 512-image batch ran 3x faster (0.13 s vs 0.38 s, one thread), the
    backward and double backward at the same speed.  Off by default so that stored results stay bit-identical."""

    def __init__(self, in_channels: int = 3, width: int = 64, pool_size: int = 2, channels_last: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(4):
            layers += [Conv2d(c, width, 3, padding=1, bias=False), BatchNorm2d(width), nn.ReLU(inplace=True),
                       MaxPool2d(2, ceil_mode=True)]
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.feature_dim = width * pool_size * pool_size
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.pool(self.features(x)).flatten(1).contiguous()


def _torchvision_resnet(name: str, in_channels: int, small_stem: bool, channels_last: bool = False) -> nn.Module:
    """torchvision's ResNet without its classifier.  ``channels_last``: weights in NHWC, so convolutions run (and
    return) NHWC - the fast layout for cuDNN with tensor cores (and AMP); off by default."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    adopt(net)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def make_backbone(name: str, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a backbone by name.  Options (``kwargs``) per backbone: :data:`BACKBONE_OPTIONS`.
    ResNets: ``small_stem`` defaults to True for resnet18 (CIFAR-size images), False for resnet50.
    ``vit_tiny``: the tiny ViT of :mod:`bilevel_ssl.vit` (MAE's encoder); ``image_size`` is required."""
    if name not in BACKBONE_OPTIONS:
        raise ValueError(f"backbone: unknown name {name!r}; allowed: {', '.join(BACKBONES)}")
    unknown = sorted(set(kwargs) - set(BACKBONE_OPTIONS[name]))
    if unknown:
        raise ValueError(f"backbone {name}: unknown option(s) {unknown}; allowed: {', '.join(BACKBONE_OPTIONS[name])}")
    if name == "conv4":
        net = Conv4(in_channels, **kwargs)
    elif name == "vit_tiny":
        from .vit import ViT

        net = ViT(in_channels=in_channels, **kwargs)
    else:
        net = _torchvision_resnet(name, in_channels, kwargs.get("small_stem", name == "resnet18"),
                                  kwargs.get("channels_last", False))
    net.spec = {"name": name, "in_channels": in_channels, **kwargs}
    return net


class MLPHead(nn.Module):
    """``in -> [hidden -> BN -> ReLU] * (layers-1) -> out``: SimCLR's projector with ``layers=2``; BYOL/SimSiam
    predictors use the same shape."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False):
        super().__init__()
        if layers < 1:
            raise ValueError(f"MLPHead layers: must be >= 1, got {layers}")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden_dim, bias=False), BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            d = hidden_dim
        mods.append(nn.Linear(d, out_dim, bias=not last_bn))
        if last_bn:
            mods.append(BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*mods)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def save_encoder(backbone: nn.Module, path: str | Path, **meta) -> Path:
    """Write ``{"spec", "state_dict", "meta"}``: enough to rebuild the backbone, nothing of the training state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": dict(backbone.spec), "state_dict": backbone.state_dict(), "meta": meta}, path)
    return path


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a backbone saved by :func:`save_encoder` (in eval mode)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    spec = dict(blob["spec"])
    net = make_backbone(spec.pop("name"), spec.pop("in_channels"), **spec)
    net.load_state_dict(blob["state_dict"])
    return net.eval()
