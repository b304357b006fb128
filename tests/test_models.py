import pytest
import torch

from bilevel_ssl.meta import SSLNet
from bilevel_ssl.models import MLPHead, load_encoder, make_backbone, save_encoder


@pytest.mark.parametrize("size,channels", [(28, 3), (28, 1), (32, 3), (84, 3)])
def test_conv4_feature_size_independent_of_input(size, channels):
    net = make_backbone("conv4", channels, width=16)
    assert net(torch.rand(2, channels, size, size)).shape == (2, 64) and net.feature_dim == 64


def test_conv4_keeps_the_2x2_map_of_small_inputs():
    net = make_backbone("conv4", 1, width=4)
    x = torch.rand(3, 1, 28, 28)
    assert net.features(x).shape[-2:] == (2, 2)
    torch.testing.assert_close(net(x), net.features(x).flatten(1))  # = the classic C4 flatten
    assert make_backbone("conv4", 1, width=4, pool_size=1).feature_dim == 4


def test_resnet18_small_stem_keeps_resolution():
    net = make_backbone("resnet18", 3)
    assert net.conv1.stride == (1, 1) and isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 512) and net.feature_dim == 512
    assert make_backbone("resnet50", 1).feature_dim == 2048


def test_unknown_backbone():
    with pytest.raises(ValueError, match="allowed: conv4, resnet18, resnet50"):
        make_backbone("vgg", 3)


def test_mlp_head_shapes():
    head = MLPHead(16, 32, 8, layers=3)
    assert head(torch.rand(4, 16)).shape == (4, 8)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 3


def test_save_load_encoder_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = make_backbone("conv4", 3, width=8)
    net(torch.rand(16, 3, 28, 28))  # update BN running stats, which must be saved too
    ssl = SSLNet(net, torch.nn.ModuleDict({"projector": MLPHead(8, 8, 4)}))
    path = save_encoder(ssl.backbone, tmp_path / "enc.pt", epochs=3)
    loaded = load_encoder(path)
    x = torch.rand(4, 3, 28, 28)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), net.eval()(x))
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"spec", "state_dict", "meta"} and blob["meta"]["epochs"] == 3
    assert not any(k.startswith("heads") for k in blob["state_dict"])


def test_conv4_channels_last_computes_the_same_function():
    import torch

    from bilevel_ssl.models import make_backbone

    torch.manual_seed(0)
    plain = make_backbone("conv4", 3, width=8)
    fast = make_backbone("conv4", 3, width=8, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(6, 3, 28, 28)
    a, b = plain(x), fast(x)
    assert a.shape == b.shape == (6, 32) and b.is_contiguous()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), list(plain.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(fast.parameters()))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-3, atol=1e-4)  # float32 sums in another order


def test_resnet_channels_last_is_the_same_function_in_nhwc():
    import torch

    from bilevel_ssl.models import make_backbone

    torch.manual_seed(0)
    a = make_backbone("resnet18", 3).eval()
    torch.manual_seed(0)
    b = make_backbone("resnet18", 3, channels_last=True).eval()
    assert b.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not a.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [28, 7, 3])
def test_cpu_max_pool_in_nhwc_is_bit_identical_to_nchw(dtype, size):
    from bilevel_ssl.models import MaxPool2d

    x = torch.randn(16, 8, size, size, dtype=dtype, generator=torch.Generator().manual_seed(size))
    x[:, :, ::2] = 0.0  # whole windows of ReLU zeros
    x[0, 0, 0, 0] = float("nan")  # a NaN must reach the output as in NCHW
    x = torch.relu(x)
    with torch.no_grad():
        y1, y0 = MaxPool2d(2, ceil_mode=True)(x), torch.nn.MaxPool2d(2, ceil_mode=True)(x)
    assert y1.is_contiguous()  # the caller's (NCHW) layout comes back
    assert torch.equal(y1.nan_to_num(7.0), y0.nan_to_num(7.0)) and y1.isnan().sum() == 1


@pytest.mark.parametrize("size", [28, 8])  # 8 px: the last maps are 1 x 1, where NHWC and NCHW strides coincide
def test_conv4_training_step_is_bit_identical_with_the_nhwc_pool(size):
    from bilevel_ssl.models import MaxPool2d

    torch.manual_seed(0)
    net = make_backbone("conv4", 3, width=8).train()
    ref = make_backbone("conv4", 3, width=8).train()
    ref.load_state_dict(net.state_dict())
    ref.features = torch.nn.Sequential(*[torch.nn.MaxPool2d(2, ceil_mode=True) if isinstance(m, MaxPool2d) else m
                                         for m in ref.features])
    assert sum(isinstance(m, MaxPool2d) for m in net.features) == 4
    x = torch.rand(12, 3, size, size, generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (net, ref):
        loss = m(x).pow(2).mean()
        g = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        hv = torch.autograd.grad(sum((gi * gi).sum() for gi in g), list(m.parameters()))  # double backward
        grads.append([t.detach() for t in (*g, *hv)])
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(*grads))
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ref.eval()(x))
