"""bilevel_ssl.layers: the closed-form double backwards of BatchNorm and Conv2d.

Each is checked against (a) finite differences of the backward (``gradgradcheck``, float64), (b) an independent
reference written here - BatchNorm as plain tensor operations, convolution as unfold + matrix product, so autograd
derives the double backward itself - and (c) the ``nn`` layer: forward, first backward and running statistics
bit-identical, double backward equal to rounding.  Plus the models use them, and everything outside the CPU
training path is the ``nn`` layer itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torch.nn.functional as F

from bilevel_ssl.layers import BatchNorm1d, BatchNorm2d, Conv2d, MaxPool2d, adopt
from bilevel_ssl.models import MLPHead, make_backbone

CASES = [(BatchNorm2d, nn.BatchNorm2d, (6, 3, 4, 5)), (BatchNorm1d, nn.BatchNorm1d, (7, 4))]


def reference_bn(x, weight, bias, eps=1e-5):
    """Training-mode batch norm from its definition (biased variance over all but the channel axis)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y


def _pair(fast_cls, ref_cls, shape, affine, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    fast = fast_cls(shape[1], affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            fast.weight.normal_()
            fast.bias.normal_()
    ref = ref_cls(shape[1], affine=affine).to(dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    return fast, ref, x


def _second_order(module, x, forward=None, seed=1):
    """Output, gradients (x if it requires one, then the parameters) and the gradients of a scalar that contains
    those gradients: the double backward.  ``forward``: another function of x computed with the module's
    parameters (default: the module).  The loss is Σ y²·v so that the output gradient depends on the weights, as in
    a network (with Σ y·v a convolution's weight gradient corr(x, v) is constant when x needs no gradient)."""
    y = (forward or module)(x)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(y.shape, dtype=y.dtype, generator=gen)
    params = ([x] if x.requires_grad else []) + list(module.parameters())
    grads = torch.autograd.grad((y * y * v).sum(), params, create_graph=True)
    s = sum((g ** 2).sum() * (i + 1) + (g * torch.randn(g.shape, dtype=g.dtype, generator=gen)).sum()
            for i, g in enumerate(grads))
    return y, grads, torch.autograd.grad(s, params, allow_unused=True, materialize_grads=True)


def _passes_gradgradcheck(module, x) -> bool:
    names = [n for n, _ in module.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    return torch.autograd.gradgradcheck(f, (x, *module.parameters()))


def _assert_same_as_nn(fast, ref, x):
    """Forward and first backward bit-identical to the ``nn`` layer (the same native kernels); the double backward
    equal to float32 rounding (another formula, other summation order)."""
    y_f, g_f, gg_f = _second_order(fast, x)
    y_r, g_r, gg_r = _second_order(ref, x)
    assert torch.equal(y_f, y_r)
    for a, b in zip(g_f, g_r):
        assert torch.equal(a, b)
    for a, b in zip(gg_f, gg_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fast_cls,ref_cls,shape", CASES)
def test_double_backward_passes_gradgradcheck(fast_cls, ref_cls, shape, affine):
    fast, _, x = _pair(fast_cls, ref_cls, shape, affine)
    assert _passes_gradgradcheck(fast, x)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fast_cls,ref_cls,shape", CASES)
def test_double_backward_matches_the_definition(fast_cls, ref_cls, shape, affine):
    fast, _, x = _pair(fast_cls, ref_cls, shape, affine)
    y, g, gg = _second_order(fast, x)
    y_ref, g_ref, gg_ref = _second_order(fast, x, forward=lambda x: reference_bn(x, fast.weight, fast.bias))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(gg, gg_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fast_cls,ref_cls,shape", CASES)
def test_same_as_torch_batchnorm_forward_backward_and_running_stats(fast_cls, ref_cls, shape, affine):
    fast, ref, x = _pair(fast_cls, ref_cls, shape, affine, dtype=torch.float32)
    _assert_same_as_nn(fast, ref, x)
    for name, buf in ref.named_buffers():
        assert torch.equal(getattr(fast, name), buf), name


def test_cumulative_average_and_eval_mode_as_torch():
    fast, ref, x = _pair(BatchNorm2d, nn.BatchNorm2d, (5, 3, 2, 2), True, dtype=torch.float32)
    fast.momentum = ref.momentum = None  # running stats as a cumulative average
    for _ in range(3):
        fast(x), ref(x)
    for name, buf in ref.named_buffers():
        assert torch.equal(getattr(fast, name), buf), name
    fast.eval(), ref.eval()
    assert torch.equal(fast(x), ref(x))


def test_one_value_per_channel_is_refused_as_torch_does():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm1d(4)(torch.randn(1, 4, requires_grad=True))


def test_models_use_it():
    conv4 = make_backbone("conv4", 3, width=8)
    assert sum(type(m) is BatchNorm2d for m in conv4.modules()) == 4
    head = MLPHead(16, 32, 8, layers=3, last_bn=True)
    assert sum(type(m) is BatchNorm1d for m in head.modules()) == 3
    assert sum(type(m) is Conv2d for m in conv4.modules()) == 4
    resnet = make_backbone("resnet18", 3)
    assert all(type(m) is BatchNorm2d for m in resnet.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert all(type(m) is Conv2d for m in resnet.modules() if isinstance(m, nn.Conv2d))


# ---- Conv2d ---------------------------------------------------------------------------------------------------

CONV_CASES = [dict(stride=1, padding=1, bias=False), dict(stride=2, padding=1, bias=True),
              dict(stride=1, padding=0, bias=True, dilation=2), dict(stride=1, padding=1, bias=False, groups=2)]


def reference_conv(x, weight, bias, stride, padding, dilation, groups):
    """Convolution from its definition: unfold the input patches, one matrix product per group."""
    n, c, h, w = x.shape
    out_c, in_per_group, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # n, c*kh*kw, L
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    cols = cols.view(n, groups, in_per_group * kh * kw, oh * ow)
    wg = weight.view(groups, out_c // groups, in_per_group * kh * kw)
    y = torch.einsum("gok,ngkl->ngol", wg, cols).reshape(n, out_c, oh, ow)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _conv_pair(case, dtype=torch.float64, x_grad=True, seed=0):
    torch.manual_seed(seed)
    kw = {"stride": case["stride"], "padding": case["padding"], "bias": case["bias"],
          "dilation": case.get("dilation", 1), "groups": case.get("groups", 1)}
    fast = Conv2d(4, 6, 3, **kw).to(dtype)
    ref = nn.Conv2d(4, 6, 3, **kw).to(dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 4, 7, 7, dtype=dtype, requires_grad=x_grad)
    return fast, ref, x, kw


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_double_backward_passes_gradgradcheck(case):
    fast, _, x, _ = _conv_pair(case)
    assert _passes_gradgradcheck(fast, x)


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_double_backward_matches_the_definition(case, x_grad):
    fast, _, x, kw = _conv_pair(case, x_grad=x_grad)
    y, g, gg = _second_order(fast, x)
    y_ref, g_ref, gg_ref = _second_order(
        fast, x, forward=lambda x: reference_conv(x, fast.weight, fast.bias, kw["stride"], kw["padding"],
                                                  kw["dilation"], kw["groups"]))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip([*g, *gg], [*g_ref, *gg_ref]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_same_as_torch_forward_backward(case):
    fast, ref, x, _ = _conv_pair(case, dtype=torch.float32)
    _assert_same_as_nn(fast, ref, x)


def test_outside_the_cpu_training_path_the_nn_layers_run():
    conv, bn = Conv2d(3, 4, 3, padding="same"), BatchNorm2d(3)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    assert conv(x).grad_fn.name() == "ConvolutionBackward0"  # padding "same": nn.Conv2d's own path
    with torch.no_grad():
        assert Conv2d(3, 4, 3)(x).grad_fn is None
    assert bn(x).grad_fn.name() != "ConvolutionBackward0" and "_BatchNormTrain" in bn(x).grad_fn.name()
    bn.eval()
    assert bn(x).grad_fn.name() == "NativeBatchNormBackward0"


def test_adopt_keeps_parameters_and_state_dict():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adopt(net)
    assert [type(m) for m in net] == [Conv2d, BatchNorm2d, nn.Flatten, nn.Linear, BatchNorm1d]
    assert before.keys() == net.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---- MaxPool2d ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("size", [28, 7])
def test_max_pool_training_path_is_bit_identical_to_nn_ties_included(size, ceil_mode):
    x0 = torch.randn(6, 5, size, size, generator=torch.Generator().manual_seed(size))
    x0[:, :, ::2] = 0.0  # whole windows of ReLU zeros: ties, where the arg-max convention matters
    x0 = torch.relu(x0)
    out = []
    for pool in (MaxPool2d(2, ceil_mode=ceil_mode), nn.MaxPool2d(2, ceil_mode=ceil_mode)):
        x = x0.clone().requires_grad_(True)
        y = pool(x * 1.0)  # a non-leaf input, as in a network
        v = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (g,) = torch.autograd.grad((y * y * v).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), x)
        out.append((y, g, gg))
    assert type(out[0][0].grad_fn).__name__ == "_MaxPoolTrainBackward"  # the function of layers.py ran
    assert out[0][0].is_contiguous()
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_max_pool_double_backward_passes_gradgradcheck():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)  # distinct values: no ties
    assert torch.autograd.gradgradcheck(lambda x: MaxPool2d(2, ceil_mode=True)(x) ** 2, (x,))
