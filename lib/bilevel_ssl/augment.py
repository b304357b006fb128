"""Batched SimCLR-style image augmentation with per-sample random parameters.

Unlike torchvision transforms applied to a batch tensor (one random crop for
the whole batch), every sample here gets its own crop, flip, colour jitter,
grayscale and blur parameters, and the whole batch is processed with a handful
of batched tensor ops on whatever device the images live on (no Python loop
over samples).

Pipeline (the SimCLR order): random resized crop + horizontal flip -> colour
jitter -> random grayscale -> gaussian blur -> clamp to [0, 1]. The crop is resampled
with bilinear ``grid_sample`` (no antialiasing, unlike torchvision's resize), so small
crops upscaled are smooth but large downscales can alias.

Randomness: all parameters are drawn as B-sized tensors on the CPU from the
given ``torch.Generator``, always in the same order and amount whatever the
config or channel count, then moved to ``x.device``. So a seed gives the same
parameters on any device, and the same generator state gives bit-identical
output on CPU.

Reference: T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework
for Contrastive Learning of Visual Representations", ICML 2020
(arXiv:2002.05709), Appendix A (augmentation details) and B.9 (CIFAR-10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentConfig", "PRESETS", "preset", "augment", "make_views"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights
_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
    dtype=torch.float64,
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the augmentation pipeline (defaults: SimCLR CIFAR-10 recipe).

    Colour jitter is applied to a Bernoulli(``jitter_p``) subset of samples, in
    the fixed order brightness, contrast, saturation, hue (SimCLR/torchvision
    randomise the order per sample; we do not). Brightness/contrast/saturation
    factors are drawn from U[max(0, 1 - v), 1 + v], the hue shift from
    U[-hue, hue] (in turns). Saturation and hue only act on RGB images.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (log-uniform)
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # probability colour jitter is applied
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # gaussian blur probability
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # kernel size ~ this fraction of the side, odd, >= 3
    out_size: int | None = None  # output side; None = input side
    rotate90_p: float = 0.0  # probability of a right-angle rotation (90, 180 or 270 degrees, equally likely)


# SimCLR jitter "strength" s gives (0.8s, 0.8s, 0.8s, 0.2s); the values below are s = 0.5.
PRESETS: dict[str, AugmentConfig] = {
    # SimCLR CIFAR-10 recipe (App. B.9): strength 0.5, no blur (32 px images are too small).
    "cifar": AugmentConfig(),
    # SimCLR ImageNet recipe adds blur with p = 0.5, sigma in [0.1, 2], kernel = 10% of the side.
    # Deviation: jitter strength 0.5 as for CIFAR, where the paper's ImageNet default is 1.0
    # (0.8, 0.8, 0.8, 0.2).
    "stl10": AugmentConfig(blur_p=0.5),
    "imagenet": AugmentConfig(blur_p=0.5),
    # Grayscale digits. Deviations: milder crops (a 8% crop of a digit can remove its identity),
    # no flips (digits are not flip-invariant: 2/5, 3/E...), saturation/hue/grayscale are
    # meaningless on one channel, no blur (28 px).
    "mnist": AugmentConfig(
        crop_scale=(0.3, 1.0), flip_p=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0
    ),
    # RGB digits on photo backgrounds: full colour recipe (colour is a nuisance here),
    # but milder crops, no flips and no blur, for the same reasons as "mnist".
    "mnistm": AugmentConfig(crop_scale=(0.3, 1.0), flip_p=0.0),
}


def preset(name: str) -> AugmentConfig:
    """Return the preset config ``name``; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown augmentation preset {name!r}; valid presets: {sorted(PRESETS)}"
        ) from None


def _check(x: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> None:
    """Cheap validation of the input and the config; errors name the offending field."""
    if not (isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point() and x.shape[1] in (1, 3)):
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", type(x))
        raise ValueError(
            f"x must be a 4-D float tensor (B, C, H, W) with C in {{1, 3}}, got shape {shape}, dtype {dtype}"
        )
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator")

    def bad(field: str, allowed: str) -> ValueError:
        return ValueError(f"AugmentConfig.{field} must be {allowed}, got {getattr(cfg, field)!r}")

    for f in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "rotate90_p"):
        if not 0.0 <= getattr(cfg, f) <= 1.0:
            raise bad(f, "in [0, 1]")
    for f in ("brightness", "contrast", "saturation"):
        if not getattr(cfg, f) >= 0.0:
            raise bad(f, ">= 0")
    if not 0.0 <= cfg.hue <= 0.5:
        raise bad("hue", "in [0, 0.5]")
    (s0, s1), (r0, r1), (b0, b1) = cfg.crop_scale, cfg.crop_ratio, cfg.blur_sigma
    if not 0.0 < s0 <= s1 <= 1.0:
        raise bad("crop_scale", "(lo, hi) with 0 < lo <= hi <= 1")
    if not 0.0 < r0 <= r1:
        raise bad("crop_ratio", "(lo, hi) with 0 < lo <= hi")
    if not 0.0 < b0 <= b1:
        raise bad("blur_sigma", "(lo, hi) with 0 < lo <= hi")
    if not 0.0 < cfg.blur_kernel_frac <= 1.0:
        raise bad("blur_kernel_frac", "in (0, 1]")
    if cfg.out_size is not None and not (isinstance(cfg.out_size, int) and cfg.out_size >= 1):
        raise bad("out_size", "None or an int >= 1")
    if cfg.rotate90_p > 0 and x.shape[-1] != x.shape[-2]:
        raise bad("rotate90_p", f"0 for non-square images ({x.shape[-2]}x{x.shape[-1]})")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _bernoulli(n: int, p: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) < p


def _crop_flip_theta(n: int, h: int, w: int, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    """Per-sample (n, 2, 3) affine matrices for ``F.affine_grid`` (normalised coords).

    As torchvision's RandomResizedCrop: area fraction ~ U[crop_scale], aspect ratio
    (width/height, in pixels) log-uniform in crop_ratio. Instead of rejection sampling,
    crop width/height are clamped to the image, then a centre is drawn uniformly so the
    crop stays inside. A flip negates the x scale.
    """
    area = _uniform(n, *cfg.crop_scale, g)
    ratio = torch.exp(_uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g))
    cw = torch.sqrt(area * ratio * h / w).clamp(max=1.0)  # crop width / image width
    ch = torch.sqrt(area / ratio * w / h).clamp(max=1.0)  # crop height / image height
    cx = (1.0 - cw) * _uniform(n, -1.0, 1.0, g)
    cy = (1.0 - ch) * _uniform(n, -1.0, 1.0, g)
    flip = _bernoulli(n, cfg.flip_p, g)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flip, -cw, cw)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    return theta


_COS90, _SIN90 = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0, -1.0],
                                                                                       dtype=torch.float64)


def _rotate90(theta: Tensor, on: Tensor, k: Tensor) -> Tensor:
    """Compose each sample's sampling map with a rotation of the *output* frame by k·90° where ``on``: the crop
    is taken as before and shown rotated.  A right-angle rotation maps the pixel centres of a square grid onto
    pixel centres (``align_corners=False`` coordinates are symmetric), so it adds no interpolation of its own."""
    k = torch.where(on, k, torch.zeros_like(k))
    c, s = _COS90[k], _SIN90[k]
    rot = torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)  # (n, 2, 2)
    out = theta.clone()
    out[:, :, :2] = theta[:, :, :2] @ rot
    return out


def with_overrides(cfg: AugmentConfig, overrides: dict, key: str = "augment_args") -> AugmentConfig:
    """``cfg`` with some fields replaced (a ``TrainConfig.augment_args``), validated before any compute: unknown
    fields and bad values raise ValueError naming ``<key>.<field>``; lists become the tuples the ranges need."""
    from dataclasses import fields, replace

    names = [f.name for f in fields(AugmentConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"{key}: unknown field(s) {unknown}; allowed: {', '.join(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    for k, v in values.items():
        default = getattr(cfg, k)
        if isinstance(default, tuple) and not (isinstance(v, tuple) and len(v) == 2
                                                and all(isinstance(e, (int, float)) for e in v)):
            raise ValueError(f"{key}.{k}: expected a pair [lo, hi] of numbers, got {v!r}")
        if isinstance(default, float) and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            raise ValueError(f"{key}.{k}: expected a number, got {type(v).__name__} {v!r}")
    new = replace(cfg, **{k: (float(v) if isinstance(getattr(cfg, k), float) else v) for k, v in values.items()})
    try:
        _check(torch.zeros(1, 3, 8, 8), new, torch.Generator())
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    return new


def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luminance."""
    return torch.einsum("bchw,c->bhw", x, x.new_tensor(_LUMA)).unsqueeze(1)


def _hue_matrices(h: Tensor) -> Tensor:
    """Per-sample (B, 3, 3) RGB->RGB matrices rotating chroma by h turns in YIQ space.

    This is the YIQ-rotation approximation of torchvision's HSV hue shift: it keeps
    luminance Y and chroma magnitude, and rotates the (I, Q) plane by -2*pi*h, the
    sign for which positive h moves red towards yellow/green as in HSV.
    """
    cos, sin = torch.cos(-2 * math.pi * h), torch.sin(-2 * math.pi * h)
    rot = torch.zeros(h.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return _YIQ2RGB @ rot @ _RGB2YIQ


def _color_jitter(x: Tensor, b: Tensor, c: Tensor, s: Tensor, hue_m: Tensor) -> Tensor:
    """Brightness, contrast, saturation, hue in this fixed order, clamping after each."""
    rgb = x.shape[1] == 3
    x = (x * b).clamp_(0, 1)
    mean = (_gray(x) if rgb else x).mean(dim=(1, 2, 3), keepdim=True)
    x = torch.lerp(mean, x, c).clamp_(0, 1)  # c * x + (1 - c) * mean
    if rgb:
        x = torch.lerp(_gray(x), x, s).clamp_(0, 1)
        x = torch.bmm(hue_m, x.flatten(2)).view_as(x).clamp_(0, 1)
    return x


def _gaussian_blur(x: Tensor, sigma: Tensor, k: int) -> Tensor:
    """Blur each sample with its own sigma: separable depthwise conv, groups = B*C."""
    n, c, h, w = x.shape
    t = torch.arange(k, dtype=torch.float64) - k // 2
    kern = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kern = (kern / kern.sum(1, keepdim=True)).to(x).repeat_interleave(c, dim=0)  # (n*c, k)
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)
    y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
    return y.view(n, c, h, w)


def augment(x: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Augment each image of ``x`` (B, C, H, W), values in [0, 1], C in {1, 3}, independently.

    Returns a tensor of shape (B, C, S, S) if ``cfg.out_size = S`` else (B, C, H, W), same
    dtype/device, clamped to [0, 1]. ``generator`` must be a CPU generator (see module doc).
    """
    _check(x, cfg, generator)
    n, c, h, w = x.shape
    g, dev, dt = generator, x.device, x.dtype
    oh, ow = (h, w) if cfg.out_size is None else (cfg.out_size, cfg.out_size)

    # All parameters on CPU, fixed order and amount.
    theta = _crop_flip_theta(n, h, w, cfg, g)
    jit = _bernoulli(n, cfg.jitter_p, g)
    fb, fc, fs = (_uniform(n, max(0.0, 1 - v), 1 + v, g) for v in (cfg.brightness, cfg.contrast, cfg.saturation))
    hue_m = _hue_matrices(_uniform(n, -cfg.hue, cfg.hue, g))
    gray = _bernoulli(n, cfg.grayscale_p, g)
    blur = _bernoulli(n, cfg.blur_p, g)
    sigma = _uniform(n, *cfg.blur_sigma, g)
    if cfg.rotate90_p > 0:  # drawn last and only when on: configs without rotation keep their random stream
        theta = _rotate90(theta, _bernoulli(n, cfg.rotate90_p, g), torch.randint(1, 4, (n,), generator=g))

    def col(v: Tensor) -> Tensor:  # CPU (n,) -> (n, 1, 1, 1) on x's device
        return v.to(device=dev, dtype=dt if v.is_floating_point() else v.dtype).view(n, 1, 1, 1)

    grid = F.affine_grid(theta.to(device=dev, dtype=dt), [n, c, oh, ow], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    jittered = _color_jitter(out, col(fb), col(fc), col(fs), hue_m.to(device=dev, dtype=dt))
    out = torch.where(col(jit), jittered, out)
    if c == 3:
        out = torch.where(col(gray), _gray(out).expand_as(out), out)

    idx = blur.nonzero().squeeze(1)
    if idx.numel() > 0:  # blur only the selected samples (mask is on CPU: no device sync)
        k = int(cfg.blur_kernel_frac * min(oh, ow))
        k = max(3, k + 1 - k % 2)
        idx_d = idx.to(dev)
        out = out.index_copy(0, idx_d, _gaussian_blur(out.index_select(0, idx_d), sigma[idx], k))
    return out.clamp(0, 1)


def make_views(x: Tensor, n_views: int, cfg: AugmentConfig, generator: torch.Generator) -> list[Tensor]:
    """Return ``n_views`` independent augmentations of the batch ``x``.

    The views are computed in one batched ``augment`` call on ``n_views`` stacked copies of
    ``x``; with ``n_views = 1`` the result equals ``[augment(x, cfg, generator)]``.
    """
    if not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be an int >= 1, got {n_views!r}")
    return list(augment(x.repeat(n_views, 1, 1, 1), cfg, generator).chunk(n_views))
