"""Tests for bilevel_ssl.augment (batched per-sample SimCLR augmentation)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bilevel_ssl.augment import PRESETS, AugmentConfig, _hue_matrices, augment, make_views, preset

# Crop covers the whole image, nothing random happens.
IDENTITY = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
)
LUMA = torch.tensor([0.299, 0.587, 0.114])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(b: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 123, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(b, c, h, w, generator=gen(seed))


def only(**kw) -> AugmentConfig:
    """Identity config with some fields changed."""
    return dataclasses.replace(IDENTITY, **kw)


# ---------------------------------------------------------------- shapes, dtype, range
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_device_range(c, dtype):
    x = rand_images(c=c).to(dtype)
    y = augment(x, PRESETS["stl10"], gen())
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)


@pytest.mark.parametrize("c", [1, 3])
def test_out_size(c):
    x = rand_images(c=c, h=20, w=12)
    y = augment(x, dataclasses.replace(PRESETS["imagenet"], out_size=10), gen())
    assert y.shape == (8, c, 10, 10)
    assert y.min() >= 0 and y.max() <= 1


def test_non_square_full_crop_is_identity():
    # crop_ratio is width/height in pixels, so the full crop of a 9x14 image has ratio 14/9
    x = rand_images(c=1, h=9, w=14)
    torch.testing.assert_close(augment(x, only(crop_ratio=(14 / 9, 14 / 9)), gen()), x, atol=1e-5, rtol=0)
    assert not torch.allclose(augment(x, IDENTITY, gen()), x, atol=1e-3)  # square crop != full image


# ---------------------------------------------------------------- randomness
def test_per_sample_crops_differ():
    x = rand_images(b=1).expand(6, -1, -1, -1).contiguous()  # six identical images
    y = augment(x, only(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3)), gen())
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.allclose(y[i], y[j], atol=1e-3), (i, j)


def test_same_seed_bit_identical_different_seed_differs():
    x = rand_images()
    cfg = PRESETS["imagenet"]
    assert torch.equal(augment(x, cfg, gen(7)), augment(x, cfg, gen(7)))
    assert not torch.equal(augment(x, cfg, gen(7)), augment(x, cfg, gen(8)))


def test_generator_state_advances():
    x, g = rand_images(), gen(3)
    assert not torch.equal(augment(x, PRESETS["cifar"], g), augment(x, PRESETS["cifar"], g))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_same_seed():
    x = rand_images()
    y_cpu = augment(x, PRESETS["imagenet"], gen(5))
    y_gpu = augment(x.cuda(), PRESETS["imagenet"], gen(5))
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- crop and flip geometry
@pytest.mark.parametrize("c", [1, 3])
def test_identity_config_returns_input(c):
    x = rand_images(c=c)
    torch.testing.assert_close(augment(x, IDENTITY, gen()), x, atol=1e-5, rtol=0)


def test_flip_p_one_is_horizontal_flip():
    x = rand_images()
    torch.testing.assert_close(augment(x, only(flip_p=1.0), gen()), x.flip(-1), atol=1e-5, rtol=0)


def test_flip_is_per_sample():
    x = rand_images(b=32)
    y = augment(x, only(flip_p=0.5), gen())
    flipped = [torch.allclose(y[i], x[i].flip(-1), atol=1e-5) for i in range(32)]
    kept = [torch.allclose(y[i], x[i], atol=1e-5) for i in range(32)]
    assert all(f != k for f, k in zip(flipped, kept))  # each sample is exactly one of the two
    assert 4 < sum(flipped) < 28


def ramp(b: int, side: int, axis: int) -> torch.Tensor:
    """Images whose value is linear in the column (axis=-1) or row (axis=-2) index."""
    r = torch.linspace(0.0, 1.0, side)
    img = r.view(1, side).expand(side, side) if axis == -1 else r.view(side, 1).expand(side, side)
    return img.expand(b, 1, side, side).contiguous()


@pytest.mark.parametrize("scale, ratio", [(0.25, 1.0), (0.25, 2.0), (0.5, 0.5)])
def test_crop_size_matches_scale_and_ratio(scale, ratio):
    side, b = 32, 8
    cfg = only(crop_scale=(scale, scale), crop_ratio=(ratio, ratio))
    # bilinear resampling of a linear ramp is exact, so the output slope is the crop fraction
    sx = augment(ramp(b, side, -1), cfg, gen()).diff(dim=-1)
    sy = augment(ramp(b, side, -2), cfg, gen()).diff(dim=-2)
    expect_w, expect_h = min(1.0, (scale * ratio) ** 0.5), min(1.0, (scale / ratio) ** 0.5)
    step = 1.0 / (side - 1)
    torch.testing.assert_close(sx, torch.full_like(sx, expect_w * step), atol=1e-5, rtol=0)
    torch.testing.assert_close(sy, torch.full_like(sy, expect_h * step), atol=1e-5, rtol=0)


def test_random_crops_stay_inside_image():
    # a crop leaving the image would hit the border padding and bend the ramp by up to a full
    # step (~0.03); only the outermost half-pixel (sampled flat, as in torchvision) may deviate
    side = 32
    y = augment(ramp(64, side, -1), only(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3)), gen())
    slope = y.diff(dim=-1)
    torch.testing.assert_close(slope, slope[..., 1:2].expand_as(slope), atol=2e-3, rtol=0)
    frac = slope[:, 0, 0, 0] * (side - 1)  # crop width fraction per sample
    assert frac.min() > 0.08**0.5 * (3 / 4) ** 0.5 - 1e-4 and frac.max() <= 1 + 1e-5
    assert frac.std() > 0.05  # widths vary across samples


# ---------------------------------------------------------------- colour
def test_grayscale_p_one_gives_luminance():
    x = rand_images()
    y = augment(x, only(grayscale_p=1.0), gen())
    lum = torch.einsum("bchw,c->bhw", x, LUMA)
    for ch in range(3):
        torch.testing.assert_close(y[:, ch], lum, atol=1e-5, rtol=0)


def test_grayscale_is_noop_for_one_channel():
    x = rand_images(c=1)
    torch.testing.assert_close(augment(x, only(grayscale_p=1.0), gen()), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_brightness_only_scales_each_image(c):
    x = rand_images(b=16, c=c, lo=0.05, hi=0.5)  # 1.3 * 0.5 < 1: no clamping
    y = augment(x, only(jitter_p=1.0, brightness=0.3, contrast=0, saturation=0, hue=0), gen())
    factor = (y / x).flatten(1)
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor), atol=1e-4, rtol=0)
    f = factor[:, 0]
    assert f.min() >= 0.7 - 1e-5 and f.max() <= 1.3 + 1e-5 and f.std() > 0.05


@pytest.mark.parametrize("c", [1, 3])
def test_contrast_only_keeps_mean_and_scales_spread(c):
    x = rand_images(b=16, c=c, lo=0.3, hi=0.7)  # |c*(x-m)| stays inside [0, 1]
    y = augment(x, only(jitter_p=1.0, brightness=0, contrast=0.4, saturation=0, hue=0), gen())
    gray = (lambda t: torch.einsum("bchw,c->bhw", t, LUMA)) if c == 3 else (lambda t: t[:, 0])
    mx, my = gray(x).mean((1, 2)), gray(y).mean((1, 2))
    torch.testing.assert_close(my, mx, atol=1e-5, rtol=0)
    k = ((y - my.view(-1, 1, 1, 1)) / (x - mx.view(-1, 1, 1, 1))).flatten(1)
    assert k.min() >= 0.6 - 1e-3 and k.max() <= 1.4 + 1e-3 and k[:, 0].std() > 0.05


def test_saturation_and_hue_keep_luminance():
    x = rand_images(b=16, lo=0.35, hi=0.65)  # low chroma: no clamping
    for cfg in (only(jitter_p=1.0, brightness=0, contrast=0, saturation=0.4, hue=0),
                only(jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0.5)):
        y = augment(x, cfg, gen())
        assert not torch.allclose(y, x, atol=1e-3)
        lum_x, lum_y = (torch.einsum("bchw,c->bhw", t, LUMA) for t in (x, y))
        torch.testing.assert_close(lum_y, lum_x, atol=1e-4, rtol=0)


def test_hue_rotation_direction_matches_hsv():
    # +1/3 turn in HSV takes red to green; the YIQ approximation must go the same way
    red = torch.tensor([0.6, 0.4, 0.4], dtype=torch.float64)
    assert (_hue_matrices(torch.tensor([1 / 3], dtype=torch.float64))[0] @ red).argmax() == 1
    assert (_hue_matrices(torch.tensor([-1 / 3], dtype=torch.float64))[0] @ red).argmax() == 2


def test_hue_shift_goes_both_ways():
    x = torch.tensor([0.6, 0.4, 0.4]).view(1, 3, 1, 1).expand(64, 3, 4, 4).contiguous()
    y = augment(x, only(jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0.5), gen())
    dominant = set(y[:, :, 0, 0].argmax(dim=1).tolist())
    assert {1, 2} <= dominant  # shifts towards green and towards blue both occur


def test_jitter_p_zero_leaves_colours_unchanged():
    x = rand_images()
    y = augment(x, only(jitter_p=0.0, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5), gen())
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- blur
def test_blur_reduces_variance_and_keeps_mean():
    x = rand_images(b=4, h=32, w=32)
    y = augment(x, only(blur_p=1.0, blur_sigma=(1.0, 2.0)), gen())
    assert (y.var(dim=(2, 3)) < 0.5 * x.var(dim=(2, 3))).all()
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)


@pytest.mark.parametrize("side, frac, k", [(16, 0.1, 3), (32, 0.1, 3), (64, 0.1, 7), (64, 0.25, 17), (40, 0.2, 9)])
def test_blur_kernel_size(side, frac, k):
    # a wide gaussian spreads an impulse over exactly the kernel support (k x k pixels)
    x = torch.zeros(1, 1, side, side)
    x[..., side // 2, side // 2] = 1.0
    y = augment(x, only(blur_p=1.0, blur_sigma=(5.0, 5.0), blur_kernel_frac=frac), gen())
    support = y[0, 0] > 1e-4  # (identity resampling leaves ~1e-7 leaks next to the impulse)
    assert support.sum(dim=1).max() == k and support.sum(dim=0).max() == k
    torch.testing.assert_close(y.sum(), torch.tensor(1.0))


def test_blur_kernel_size_follows_output_side():
    x = torch.zeros(1, 1, 64, 64)
    x[..., 32, 32] = 1.0
    cfg = only(blur_p=1.0, blur_sigma=(5.0, 5.0), blur_kernel_frac=0.25, out_size=32)
    support = augment(x, cfg, gen())[0, 0] > 1e-4
    assert support.sum(dim=1).max() == 9  # int(0.25 * 32) = 8, made odd; not 17 from the input side


def test_blur_p_zero_leaves_input_unchanged():
    x = rand_images(h=32, w=32)
    torch.testing.assert_close(augment(x, only(blur_p=0.0, blur_sigma=(1.0, 2.0)), gen()), x, atol=1e-5, rtol=0)


def test_blur_is_per_sample():
    x = rand_images(b=32, c=1, h=32, w=32)
    y = augment(x, only(blur_p=0.5, blur_sigma=(1.0, 2.0)), gen())
    same = [torch.allclose(y[i], x[i], atol=1e-5) for i in range(32)]
    assert 4 < sum(same) < 28  # unselected samples untouched, the others blurred


# ---------------------------------------------------------------- make_views
@pytest.mark.parametrize("n", [2, 3, 5])
def test_make_views_distinct(n):
    x = rand_images(b=4)
    views = make_views(x, n, PRESETS["cifar"], gen())
    assert len(views) == n and all(v.shape == x.shape for v in views)
    for i in range(n):
        for j in range(i + 1, n):
            assert not torch.allclose(views[i], views[j], atol=1e-3)


def test_make_views_one_equals_augment():
    x = rand_images()
    (v,) = make_views(x, 1, PRESETS["cifar"], gen(11))
    assert torch.equal(v, augment(x, PRESETS["cifar"], gen(11)))


@pytest.mark.parametrize("n", [0, -1])
def test_make_views_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n_views"):
        make_views(rand_images(), n, PRESETS["cifar"], gen())


# ---------------------------------------------------------------- presets
def test_presets():
    assert set(PRESETS) == {"mnist", "mnistm", "cifar", "stl10", "imagenet"}
    assert preset("cifar") == AugmentConfig()
    assert preset("imagenet").blur_p == preset("stl10").blur_p == 0.5
    assert preset("mnist").flip_p == preset("mnistm").flip_p == 0.0
    assert preset("mnist").crop_scale == (0.3, 1.0)
    for name, cfg in PRESETS.items():
        c = 1 if name == "mnist" else 3
        assert augment(rand_images(b=2, c=c), cfg, gen()).shape == (2, c, 16, 16)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="svhn") as e:
        preset("svhn")
    for name in PRESETS:
        assert name in str(e.value)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "field, value",
    [
        ("flip_p", 1.5),
        ("jitter_p", -0.1),
        ("grayscale_p", float("nan")),
        ("blur_p", 2.0),
        ("crop_scale", (0.5, 0.2)),
        ("crop_scale", (0.0, 1.0)),
        ("crop_ratio", (4 / 3, 3 / 4)),
        ("blur_sigma", (0.0, 1.0)),
        ("brightness", -0.1),
        ("hue", 0.7),
        ("blur_kernel_frac", 0.0),
        ("out_size", 0),
    ],
)
def test_bad_config_field_is_named(field, value):
    cfg = dataclasses.replace(AugmentConfig(), **{field: value})
    with pytest.raises(ValueError, match=field):
        augment(rand_images(), cfg, gen())


@pytest.mark.parametrize(
    "x", [torch.rand(3, 8, 8), torch.rand(2, 2, 8, 8), torch.randint(0, 255, (2, 3, 8, 8))]
)
def test_bad_input_rejected(x):
    with pytest.raises(ValueError, match="x must be"):
        augment(x, AugmentConfig(), gen())


def test_rotate90_shows_the_crop_rotated_by_a_right_angle_exactly():
    x = torch.rand(64, 3, 12, 12)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                        rotate90_p=1.0)
    y = augment(x, cfg, torch.Generator().manual_seed(0))
    turns = []
    for i in range(len(x)):
        match = [r for r in (1, 2, 3) if torch.allclose(y[i], torch.rot90(x[i], r, dims=(1, 2)), atol=1e-6)]
        assert len(match) == 1, i  # never unrotated, never interpolated
        turns.append(match[0])
    assert set(turns) == {1, 2, 3}  # every right angle occurs (64 draws)
    half = AugmentConfig(**{**cfg.__dict__, "rotate90_p": 0.5})
    y = augment(x, half, torch.Generator().manual_seed(0))
    kept = sum(torch.allclose(y[i], x[i], atol=1e-6) for i in range(len(x)))
    assert 16 <= kept <= 48


def test_rotation_off_keeps_the_random_stream_of_existing_configs():
    x = torch.rand(8, 3, 12, 12)
    a = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    b = augment(x, AugmentConfig(rotate90_p=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_overrides_are_validated_with_the_key_named():
    from bilevel_ssl.augment import PRESETS, with_overrides

    cfg = with_overrides(PRESETS["mnistm"], {"rotate90_p": 0.75, "crop_scale": [1, 1], "flip_p": 0})
    assert cfg.crop_scale == (1.0, 1.0) and cfg.rotate90_p == 0.75 and cfg.flip_p == 0.0
    assert PRESETS["mnistm"].rotate90_p == 0.0  # the preset itself is untouched
    for bad, match in (({"rotate": 1}, r"augment_args: unknown field\(s\) \['rotate'\]; allowed: .*rotate90_p"),
                       ({"flip_p": 2.0}, r"augment_args: AugmentConfig.flip_p must be in \[0, 1\]"),
                       ({"crop_scale": [0.5]}, r"augment_args.crop_scale: expected a pair"),
                       ({"jitter_p": "0.8"}, r"augment_args.jitter_p: expected a number")):
        with pytest.raises(ValueError, match=match):
            with_overrides(PRESETS["mnistm"], bad)
    with pytest.raises(ValueError, match="rotate90_p must be 0 for non-square images"):
        augment(torch.rand(2, 3, 8, 10), AugmentConfig(rotate90_p=0.5), torch.Generator())
