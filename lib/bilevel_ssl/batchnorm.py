"""BatchNorm with a hand-derived double backward: the same numbers forward and backward, a cheaper Hessian.

Why: every exact hypergradient (GeSSL's and TC²'s ``second_order`` step, MCR's, BiSSL's and AID's Hessian-vector
products) differentiates the network's gradient once more, and in PyTorch the derivative of BatchNorm's backward
(``batchnorm_double_backward`` in ``FunctionsManual.cpp``) is some thirty separate full-size tensor operations.
It was the largest single cost of a second-order GeSSL step on Conv-4 (README, "Performance": 34-54% of the step).

What changes: only that double backward.  The forward is ``torch.ops.aten.native_batch_norm`` and the first
backward ``native_batch_norm_backward`` - the kernels ``nn.BatchNorm2d`` itself calls on the CPU - so a plain SSL
step (SimCLR, first-order engines) is bit-identical to ``nn.BatchNorm2d``, and the running statistics are updated
the same way.  The double backward below is the closed form, per channel over the ``n`` values it normalises.  With
x̂ = (x − μ)/σ, σ = √(var + ε), γ the weight, and the backward gx = (γ/σ)·P(gy) where P(v) = v − mean(v) − x̂·mean(v x̂)
(gγ = Σ gy x̂, gβ = Σ gy), the gradients of ⟨ggx, gx⟩ + ggγ·gγ + ggβ·gβ are

* w.r.t. gy:  (γ/σ)·P(ggx) + ggγ·x̂ + ggβ             (P is self-adjoint)
* w.r.t. γ:   Σ ggx·P(gy)/σ
* w.r.t. x:   (1/σ)·P(u) − x̂·Σ(ggx·gx)/(nσ),  u = −(γ/σ)·(mean(gy x̂)·ggx + mean(ggx x̂)·gy) + ggγ·gy
  (the first term through x̂ at fixed σ, the second through ∂σ/∂x = x̂/n).

Every mean of ``u`` and ``u·x̂`` that P needs is a combination of five per-channel means (of gy, gy·x̂, ggx, ggx·x̂,
ggx·gy), so each result is one affine combination of the full-size tensors ggx, gy and x̂: about ten passes over
memory instead of thirty.  It differs from PyTorch's formula only in rounding (float64: 2e-15;
``tests/test_batchnorm.py`` checks it against ``torch.autograd.gradgradcheck`` and against PyTorch's own double
backward).

Where: CPU tensors of float32/float64 in training mode with gradients enabled; everything else (eval mode, CUDA,
autocast, ``torch.no_grad``) goes to ``nn.BatchNorm*d`` unchanged - the measured gain is on the CPU, and no GPU was
available to check the CUDA path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


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


class _FastDoubleBackward:
    """Mixin for ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``: the training-mode CPU forward through
    :class:`_BatchNormTrain`, with ``nn.BatchNorm``'s own bookkeeping (``num_batches_tracked``, ``momentum=None``
    as a cumulative average)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")):
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


class BatchNorm1d(_FastDoubleBackward, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with the cheaper double backward of :mod:`bilevel_ssl.batchnorm`."""


class BatchNorm2d(_FastDoubleBackward, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the cheaper double backward of :mod:`bilevel_ssl.batchnorm`."""
