"""The models' Conv2d, BatchNorm and max-pool: PyTorch's kernels forward and backward, cheaper double backwards.

(``MaxPool2d``, at the end, pools in NHWC and gathers in its double backward; its docstring says why.)

Why: every exact hypergradient (GeSSL's and TC²'s ``second_order`` step, MCR's, BiSSL's and AID's Hessian-vector
products) differentiates the network's gradient once more, and PyTorch's generic formulas for that second
derivative are the slow part of such a step on the CPU:

* BatchNorm: ``batchnorm_double_backward`` (``FunctionsManual.cpp``) is some thirty separate full-size tensor
  operations; it was 34-54% of a second-order GeSSL step on Conv-4 (README, "Performance").
* Convolution: ``_convolution_double_backward`` gets the weight term as a convolution of the transposed
  tensors (batch as channels, a 14 x 14 "kernel"), one of the slowest calls of the step, where the same number is a
  weight gradient that ``convolution_backward`` computes with its fast kernel.

What changes: only the double backward.  The forwards are ``aten.native_batch_norm`` and ``aten.convolution`` and
the first backwards ``native_batch_norm_backward`` and ``convolution_backward`` - the kernels ``nn.BatchNorm2d`` and
``nn.Conv2d`` reach on the CPU - so a plain SSL step (SimCLR, first-order engines) is bit-identical to the ``nn``
layers, running statistics included.  The double backwards are the closed forms below; they differ from PyTorch's
only in rounding (float64: 1e-14; ``tests/test_layers.py`` checks both against ``torch.autograd.gradgradcheck``,
against autograd through a definition written in the test, and against PyTorch's own double backward).

**BatchNorm** (training mode), per channel over the ``n`` values it normalises.  With x̂ = (x − μ)/σ,
σ = √(var + ε), γ the weight, and the backward gx = (γ/σ)·P(gy) where P(v) = v − mean(v) − x̂·mean(v x̂)
(gγ = Σ gy x̂, gβ = Σ gy), the gradients of ⟨ggx, gx⟩ + ggγ·gγ + ggβ·gβ are

* w.r.t. gy:  (γ/σ)·P(ggx) + ggγ·x̂ + ggβ             (P is self-adjoint)
* w.r.t. γ:   Σ ggx·P(gy)/σ
* w.r.t. x:   (1/σ)·P(u) − x̂·Σ(ggx·gx)/(nσ),  u = −(γ/σ)·(mean(gy x̂)·ggx + mean(ggx x̂)·gy) + ggγ·gy
  (the first term through x̂ at fixed σ, the second through ∂σ/∂x = x̂/n).

Every mean of ``u`` and ``u·x̂`` that P needs is a combination of five per-channel means (of gy, gy·x̂, ggx, ggx·x̂,
ggx·gy), so each result is one affine combination of the full-size tensors ggx, gy and x̂: about ten passes over
memory instead of thirty.

**Convolution** y = conv(x, w) (+ b).  Its backward (gx, gw) = (convT(gy, w), corr(x, gy)) is bilinear, so the
gradients of ⟨ggx, gx⟩ + ⟨ggw, gw⟩ + ⟨ggb, gb⟩ are

* w.r.t. gy:  conv(ggx, w) + conv(x, ggw) + ggb        (the forward, linear in each argument)
* w.r.t. x:   the input gradient of a convolution with weight ggw, at output gradient gy
* w.r.t. w:   the weight gradient of a convolution of input ggx, at output gradient gy

- two forward convolutions and two ``convolution_backward`` calls, each for the one output it needs.

Where: CPU tensors in training (gradient-enabled) mode; everything else - ``torch.no_grad``, eval-mode BatchNorm,
CUDA, autocast, other dtypes, padding modes other than zeros - goes to the ``nn`` layer unchanged: the measured gain
is on the CPU, and no GPU was available to check the CUDA path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def _fast_path(x: Tensor) -> bool:
    """Whether ``x`` takes this module's autograd Functions: gradient mode on, a CPU tensor of float32/64, no CPU
    autocast (the conditions every layer here shares; each adds its own, e.g. BatchNorm's training mode)."""
    return (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu"))


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against ``x`` (N, C, ...)."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


class _BatchNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                           momentum, eps)[:3]
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.affine = (weight is not None, bias is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return (gx, gw if ctx.affine[0] else None, gb if ctx.affine[1] else None, None, None, None, None)


class _BatchNormBackward(torch.autograd.Function):
    """(gy, x, γ) -> (gx, gγ, gβ) by the native kernel; its own backward is the closed form of the module doc."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps):
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(gy, x, weight, None, None, mean, invstd, True, eps,
                                                               [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        return gx, gw, gb

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight, mean, invstd, gw, gb = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        xhat = torch.addcmul(_channel_view(-mean * invstd, x), x, _channel_view(invstd, x))
        gs = invstd if weight is None else weight * invstd          # γ/σ
        m_gy, m_gyx = gb / n, gw / n                                 # mean(gy), mean(gy x̂): the first backward's
        m_gg = ggx.mean(dims)
        m_ggx = (ggx * xhat).mean(dims)
        m_gggy = (ggx * gy).mean(dims)
        p = m_gggy - m_gy * m_gg - m_gyx * m_ggx                     # mean(ggx · P(gy))
        # w.r.t. gy: (γ/σ)(ggx − mean(ggx) − x̂ mean(ggx x̂)) + ggγ x̂ + ggβ
        g_gy = torch.addcmul(_channel_view(ggb - gs * m_gg, x), ggx, _channel_view(gs, x))
        g_gy.addcmul_(xhat, _channel_view(ggw - gs * m_ggx, x))
        # w.r.t. x: (1/σ)(u − mean(u) − x̂ mean(u x̂)) − x̂ (γ/σ) mean(ggx P(gy)),  u = a ggx + c gy
        a = -gs * m_gyx
        c = ggw - gs * m_ggx
        mean_u = a * m_gg + c * m_gy
        mean_ux = a * m_ggx + c * m_gyx
        g_x = torch.addcmul(_channel_view(-invstd * mean_u, x), ggx, _channel_view(invstd * a, x))
        g_x.addcmul_(gy, _channel_view(invstd * c, x))
        g_x.addcmul_(xhat, _channel_view(-invstd * (mean_ux + gs * p), x))
        # w.r.t. γ: Σ ggx P(gy) / σ
        g_w = None if weight is None else n * invstd * p
        return g_gy, g_x, g_w, None, None, None


class _BatchNormFast:
    """Mixin for ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``: the training-mode CPU forward through
    :class:`_BatchNormTrain`, with ``nn.BatchNorm``'s own bookkeeping (``num_batches_tracked``, ``momentum=None``
    as a cumulative average)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _fast_path(x)):
            return super().forward(x)
        self._check_input_dim(x)
        if x.numel() // x.shape[1] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return _BatchNormTrain.apply(x, self.weight, self.bias, self.running_mean, self.running_var, momentum,
                                     self.eps)


class BatchNorm1d(_BatchNormFast, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with the cheaper double backward of :mod:`bilevel_ssl.layers`."""


class BatchNorm2d(_BatchNormFast, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the cheaper double backward of :mod:`bilevel_ssl.layers`."""


class _ConvTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conf):
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.has_bias = conf, bias is not None
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx, gw, gb = _ConvBackward.apply(gy, x, weight, ctx.conf, ctx.has_bias, ctx.needs_input_grad[0])
        return gx, gw, gb, None


class _ConvBackward(torch.autograd.Function):
    """(gy, x, w) -> (gx, gw, gb) by the native kernel; its own backward is the closed form of the module doc."""

    @staticmethod
    def forward(ctx, gy, x, weight, conf, has_bias, need_x):
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(gy, x, weight)
        ctx.conf = conf
        ctx.set_materialize_grads(False)  # None = that output is not used: skip its terms
        return torch.ops.aten.convolution_backward(gy, x, weight, [weight.shape[0]] if has_bias else None, stride,
                                                   padding, dilation, False, [0] * len(stride), groups,
                                                   [need_x, True, has_bias])

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        zeros = [0] * len(stride)

        def conv(inp, w):
            return torch.ops.aten.convolution(inp, w, None, stride, padding, dilation, False, zeros, groups)

        def conv_backward(inp, w, mask):
            return torch.ops.aten.convolution_backward(gy, inp, w, None, stride, padding, dilation, False, zeros,
                                                       groups, mask)

        g_gy = conv(x, ggw) if ggw is not None else torch.zeros_like(gy)
        if ggx is not None:
            g_gy = g_gy + conv(ggx, weight)
        if ggb is not None:
            g_gy = g_gy + _channel_view(ggb, gy)
        g_x = conv_backward(x, ggw, [True, False, False])[0] if ctx.needs_input_grad[1] and ggw is not None else None
        g_w = conv_backward(ggx, weight, [False, True, False])[1] if ctx.needs_input_grad[2] and ggx is not None else None
        return g_gy, g_x, g_w, None, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with the cheaper double backward of :mod:`bilevel_ssl.layers` (CPU, zero padding)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (_fast_path(x) and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return super().forward(x)
        conf = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        return _ConvTrain.apply(x, self.weight, self.bias, conf)


class _MaxPoolTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conf):
        y, idx = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), *conf)
        idx = _nchw(idx)
        ctx.save_for_backward(x, idx)
        ctx.conf = conf
        return _nchw(y)

    @staticmethod
    def backward(ctx, gy):
        x, idx = ctx.saved_tensors
        return _MaxPoolBackward.apply(gy, x, idx, ctx.conf), None


class _MaxPoolBackward(torch.autograd.Function):
    """gy -> gx by the native kernel (scatter to the arg-max); its backward: gather at the arg-max (gx is linear in
    gy and, almost everywhere, constant in x - PyTorch materialises that zero gradient, this returns None)."""

    @staticmethod
    def forward(ctx, gy, x, idx, conf):
        ctx.save_for_backward(idx)
        return torch.ops.aten.max_pool2d_with_indices_backward(gy, x, *conf, idx)

    @staticmethod
    def backward(ctx, ggx):
        idx, = ctx.saved_tensors
        n, c = idx.shape[:2]
        return ggx.reshape(n, c, -1).gather(2, idx.reshape(n, c, -1)).view(idx.shape), None, None, None


def _nchw(t: Tensor) -> Tensor:
    """``t`` with NCHW strides, also where NHWC and NCHW strides coincide (maps of 1 x 1).  With ``contiguous()``
    alone, an 8-px Conv-4 (last maps 1 x 1) got an NHWC-strided weight gradient for its last convolution and other
    rounding than ``nn.MaxPool2d`` (the 8-px case of ``tests/test_models.py``)."""
    return t.clone(memory_format=torch.contiguous_format) if t.is_contiguous(memory_format=torch.channels_last) \
        else t.contiguous()


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools CPU tensors in NHWC memory format and hands back the caller's (NCHW) layout.

    Why: PyTorch's CPU max-pool kernel for NCHW tensors is the slow one: on a 2-core AVX-512 CPU the first Conv-4
    pool of a 256-image batch took 66 ms in NCHW and 6 ms in NHWC (20 ms for the conversion); in the notebooks'
    evaluation (eval-mode feature extraction of ~5000 images per run) max-pool took more time than the convolutions.
    With autograd, a function of its own: the forward as above, the backward PyTorch's kernel with the same arg-max
    indices, the double backward a gather at them - without the zero tensor PyTorch materialises for the second
    derivative w.r.t. the input.  A second-order GeSSL step 1.27 -> 1.18 s, SimCLR unchanged (A/B in one process,
    1 thread, 64 + 64 pairs, medians of 5 interleaved steps, a notebook running beside; handing NHWC tensors to
    autograd instead made both slower, README "Performance").  Nothing else changes: the maximum of a window is
    exact and both kernels return the same spatial arg-max index, so values, gradients and double-backward
    gradients are bit-identical, ties included (ReLU zeros; ``tests/test_models.py`` and ``tests/test_layers.py``).
    CUDA tensors, tensors already in NHWC (``channels_last=True``) and ``return_indices`` go straight to the kernel.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or self.return_indices
                or x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        if x.requires_grad and torch.is_grad_enabled():
            conf = (_pair(self.kernel_size), _pair(self.stride or self.kernel_size), _pair(self.padding),
                    _pair(self.dilation), self.ceil_mode)
            return _MaxPoolTrain.apply(x, conf)
        return _nchw(super().forward(x.contiguous(memory_format=torch.channels_last)))


_SWAP = {nn.Conv2d: Conv2d, nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d}


def adopt(module: nn.Module) -> nn.Module:
    """Give every ``nn.Conv2d`` / ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` of ``module`` (exactly those types) the
    class of this module, in place (same parameters, buffers and state-dict keys), e.g. for torchvision's ResNets."""
    for m in module.modules():
        if type(m) in _SWAP:
            m.__class__ = _SWAP[type(m)]
    return module
