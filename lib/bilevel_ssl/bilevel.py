"""What the per-step bi-level meta-methods (GeSSL, TC², MCR) share: :class:`BiLevelMethod`.

Each of them wraps a base objective in an inner/outer step whose hypergradient comes from an engine of
:mod:`bilevel_ssl.hypergrad`, and owns small networks of its own (GeSSL's threshold network g, TC²'s f_v and f_w,
MCR's CompMod).  The base class holds the plumbing around that: the options (``meta_args``, parsed once into the
method's dataclass), the engine, the method's own modules (their parameters, device, checkpoint state, and
functional calls at substituted parameters), the network evaluated at other parameters θ with copied BatchNorm
buffers, the attention kernel that admits second derivatives, the gradient-norm log, and the one-stage ablation
(:class:`Joint`: the inner and outer losses summed and differentiated at the same parameters).  A subclass
declares its options, its modules and its step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from .hessian import _grad, _leaves
from .hypergrad import ENGINES, HyperGrad, _Engine, make_engine
from .meta import FunctionalNet, MetaArgs, SingleLevel, SSLNet
from .objectives import Objective, Outputs

__all__ = ["MetaArgs", "Joint", "BiLevelMethod"]


# the engines that give the outer-only parameters φ the term through the inner step (−α∇²_φθ L_in · v)
SECOND_ORDER_ENGINES = ("second_order", "aid_fd", "aid_cg", "aid_neumann")
# the engines that drop it: φ receives only ∂_φ L_out
FIRST_ORDER_ENGINES = ("first_order", "momentum_proxy")
FIRST_ORDER_WHY = ("first-order engines drop the term −α∇²_φθ L_in · ∇L_out through which it acts, and the outer "
                   "loss does not use it directly")


@dataclass(eq=False)
class Joint(_Engine):
    """The one-stage ablation of a bi-level step: no inner adaptation; the inner and the outer loss are evaluated
    at the same parameters and their sum is differentiated once (GeSSL's ``joint``, TC²'s ``no_bilevel``).
    Used with the engine's call signature, so a method runs either with the same code; ``inner_lr`` and
    ``inner_steps`` are accepted and unused.  The outer loss is evaluated first (it is the one that may update
    BatchNorm running statistics) and logged as ``outer_loss``."""

    name = "joint"

    def _run(self, inner_loss, outer_loss, theta, phi, lr, steps) -> HyperGrad:
        th, ph = _leaves(theta), _leaves(phi)
        outer = outer_loss(th, ph)
        gs = _grad(inner_loss(th, ph) + outer, th + ph)
        return HyperGrad(gs[:len(th)], gs[len(th):], th, {"outer_loss": float(outer.detach())})


class BiLevelMethod(SingleLevel):
    """Base of the per-step bi-level meta-methods.

    A subclass sets ``name``, ``options`` (its :class:`MetaArgs` dataclass; parsed from ``cfg.meta_args`` into
    ``self.cfg``), optionally ``one_stage_variant`` (the ``variant`` value that replaces the engine by
    :class:`Joint`), ``unsupported_engines`` (engine -> why) and ``trainer_updates`` (False when the method updates
    its own modules inside the step, as TC² does: the trainer's optimizer then never sees them), registers its
    modules with :meth:`own` and implements :meth:`_step`.  ``code_modules`` names the package modules a method's
    results depend on beyond the shared training code (:func:`bilevel_ssl.cache.code_fingerprint` reads it along
    the class hierarchy).
    """

    options: ClassVar[type] = MetaArgs
    one_stage_variant: ClassVar[str | None] = None
    unsupported_engines: ClassVar[dict[str, str]] = {}
    trainer_updates: ClassVar[bool] = True
    code_modules = ("bilevel",)

    # ------------------------------------------------------------------------------------------- configuration
    @classmethod
    def check_config(cls, cfg) -> None:
        """Options, then the method's own checks (:meth:`_check`), then the engine and its options."""
        opts = cls.options.from_meta_args(dict(cfg.meta_args))
        cls._check(cfg, opts)
        if cfg.hypergrad in cls.unsupported_engines:
            allowed = [e for e in ENGINES if e not in cls.unsupported_engines]
            raise ValueError(f"hypergrad: {cls.name} does not support {cfg.hypergrad!r} "
                             f"({cls.unsupported_engines[cfg.hypergrad]}); allowed: {', '.join(allowed)}")
        make_engine(cfg.hypergrad, **cfg.hypergrad_args)  # errors name hypergrad_args.<key>
        why = cls._untrained_meta(cfg, opts)
        if why and not getattr(opts, "allow_untrained_meta", False):
            raise ValueError(
                f"hypergrad: {cls.name} with engine {cfg.hypergrad!r} gives its meta-network exactly zero gradient "
                f"({why}), so it would never train. Use an engine that differentiates through the inner step "
                f"({', '.join(e for e in SECOND_ORDER_ENGINES if e not in cls.unsupported_engines)}), or set "
                f"meta_args: {{allow_untrained_meta: true}} if that is what you mean (e.g. an engine ablation)")

    @classmethod
    def _untrained_meta(cls, cfg, opts) -> str | None:
        """Why the engine of ``cfg`` gives the method's meta-network exactly zero gradient, or None.  Checked in
        :meth:`check_config`, before any compute: such a run is refused unless ``allow_untrained_meta``."""
        return None

    @classmethod
    def _check(cls, cfg, opts) -> None:
        """The method's checks of ``cfg`` with its parsed options ``opts`` (batch size, objective); raise
        ValueError."""

    def __init__(self, objective: Objective, net: SSLNet, cfg):
        super().__init__(objective, net)
        self.cfg = self.options.from_meta_args(dict(cfg.meta_args))
        self.engine = make_engine(cfg.hypergrad, **cfg.hypergrad_args)
        self._net_names = [n for n, _ in net.named_parameters()]
        self._own: dict[str, nn.Module] = {}
        self._quality: dict[str, float] = {}  # the engine's quality logs of the current step
        p0 = next(net.parameters())
        self._home = {"device": p0.device, "dtype": p0.dtype}

    def own(self, name: str, module: nn.Module) -> nn.Module:
        """Register ``module`` as the method's module ``name`` (an attribute, a checkpoint entry, parameters in
        :meth:`meta_parameters`), on the network's device and dtype."""
        module.to(**self._home)
        self._own[name] = module
        setattr(self, name, module)
        return module

    @property
    def one_stage(self) -> bool:
        return self.one_stage_variant is not None and self.cfg.variant == self.one_stage_variant

    # ------------------------------------------------------------------------------------------------ plumbing
    def meta_parameters(self) -> list[nn.Parameter]:
        """The parameters of the method's own modules, in registration order (the φ / ψ / ξ of the engines)."""
        return [p for m in self._own.values() for p in m.parameters()]

    def parameters(self) -> list[nn.Parameter]:
        """What the trainer's optimizer updates beyond the network: :meth:`meta_parameters`, unless the method
        updates them itself (``trainer_updates = False``)."""
        return self.meta_parameters() if self.trainer_updates else []

    def to(self, device) -> "BiLevelMethod":
        super().to(device)
        for m in self._own.values():
            m.to(device)
        return self

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({name: m.state_dict() for name, m in self._own.items()})
        state["engine"] = self.engine.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name, m in self._own.items():
            m.load_state_dict(state[name])
        self.engine.load_state_dict(state.get("engine", {}))  # a checkpoint without engine state: {}

    def _split(self, params: list[Tensor]) -> dict[str, dict[str, Tensor]]:
        """``params`` (in :meth:`meta_parameters` order) by module: name -> {parameter name -> tensor}."""
        out, i = {}, 0
        for name, m in self._own.items():
            names = [n for n, _ in m.named_parameters()]
            out[name] = dict(zip(names, params[i:i + len(names)]))
            i += len(names)
        return out

    def _call(self, name: str, params: list[Tensor], *args):
        """Module ``name`` evaluated with its parameters taken from ``params`` (all meta-parameters)."""
        return functional_call(self._own[name], self._split(params)[name], args)

    def _net_tensors(self, net: SSLNet, theta: list[Tensor], *, update_stats: bool = False,
                     prefix: str = "") -> dict[str, Tensor]:
        """The network's parameters replaced by ``theta`` and, unless ``update_stats``, its buffers by copies: the
        engines evaluate a loss several times per step, and only the step's one real forward may advance the
        BatchNorm running statistics.  ``prefix``: for a module that holds the network as ``net``."""
        tensors = {prefix + n: t for n, t in zip(self._net_names, theta)}
        if not update_stats:
            tensors.update({prefix + k: b.clone() for k, b in net.named_buffers()})
        return tensors

    def _functional(self, net: SSLNet, theta: list[Tensor], *, update_stats: bool = False) -> FunctionalNet:
        """The network at parameters θ (see :meth:`_net_tensors`)."""
        return FunctionalNet(net, self._net_tensors(net, theta, update_stats=update_stats))

    def _hypergradient(self, inner_loss, outer_loss, theta, phi, *, inner_lr: float, inner_steps: int) -> HyperGrad:
        """The engine's meta-gradients, or :class:`Joint`'s for the one-stage variant.  The engine's quality logs
        (``cg_residual``, ``neumann_growth``, ``fd_check_error``; the worst over the step's calls) are added to the
        step's logs by :meth:`compute_grads`."""
        engine = Joint() if self.one_stage else self.engine
        hg = engine(inner_loss, outer_loss, theta, phi, inner_lr=inner_lr, inner_steps=inner_steps)
        for key in engine.QUALITY_LOGS:  # the engine's own quality measure, the worst of the step's calls (#24)
            if key in hg.logs:
                self._quality[key] = max(self._quality.get(key, hg.logs[key]), hg.logs[key])
        return hg

    @staticmethod
    def _grad_norm(grads: list[Tensor]) -> float:
        """‖grads‖₂ over all tensors, summed in float64 (a log)."""
        return float(torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads)))

    @staticmethod
    def _grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
        """∇loss w.r.t. ``params``, exact zeros for the ones it does not use."""
        return _grad(loss, params)

    def _remember(self, student: Outputs, teacher: Outputs | None) -> None:
        """The outputs :meth:`after_step` updates the objective's state from (detached: no graph kept)."""
        self._last = ([{k: v.detach() for k, v in o.items()} for o in student], teacher)

    # ------------------------------------------------------------------------------------------------ the step
    def compute_grads(self, net: SSLNet, views: list[Tensor]) -> dict[str, float]:
        # Second derivatives through attention need the math kernel: the fused CPU/GPU kernels of
        # scaled_dot_product_attention implement only first derivatives (ViT backbones, MAE).
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self._quality: dict[str, float] = {}
        with sdpa_kernel(SDPBackend.MATH):
            logs = self._step(net, views)
        return {**logs, **self._quality}

    def _step(self, net: SSLNet, views: list[Tensor]) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError
