"""Meta-methods: how one training step turns a batch of views into parameter gradients.

A method is *objective x meta-method x hypergradient engine*.  The trainer owns the optimizer, the schedule and the
loop; a meta-method owns the step: :meth:`compute_grads` fills ``.grad`` and returns the numbers to log, and
:meth:`after_step` runs after the optimizer step (EMA teacher, objective state).  ``none`` is plain single-level
SSL; the multi-task baselines (:mod:`bilevel_ssl.multitask`) and the bi-level GeSSL, TC² and MCR (on
:class:`bilevel_ssl.bilevel.BiLevelMethod`, engines in :mod:`bilevel_ssl.hypergrad`) are the other entries of
:data:`META_METHODS`.  (BiSSL is not a per-step meta-method: it alternates whole pretext and downstream stages,
:mod:`bilevel_ssl.bissl`.)  Tasks - equal groups of a batch's images, used by the multi-task and bi-level
methods - are checked by :func:`check_n_tasks`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .objectives import Objective, Outputs
from .options import Options


def allowed_n_tasks(batch_size: int, min_tasks: int = 1) -> list[int]:
    """Task counts K >= ``min_tasks`` that split ``batch_size`` images into equal tasks of >= 2 images (an SSL loss
    needs another image of its task for negatives or batch statistics)."""
    return [k for k in range(max(1, min_tasks), batch_size // 2 + 1) if batch_size % k == 0]


def check_n_tasks(batch_size: int, n_tasks, key: str = "n_tasks", min_tasks: int = 1) -> None:
    """Raise ValueError (message starting with ``key``) unless ``n_tasks`` is in :func:`allowed_n_tasks`."""
    allowed = allowed_n_tasks(batch_size, min_tasks)
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks not in allowed:
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int):
            why = f"must be an integer, got {type(n_tasks).__name__} {n_tasks!r}"
        elif n_tasks < min_tasks:
            why = f"must be >= {min_tasks}, got {n_tasks}"
        elif batch_size % n_tasks:
            why = f"{n_tasks} does not divide the batch size {batch_size}"
        else:
            why = f"{n_tasks} leaves {batch_size // n_tasks} image per task for batch size {batch_size} (need >= 2)"
        raise ValueError(f"{key}: {why}; for batch size {batch_size} (divisors >= {min_tasks} leaving >= 2 images "
                         f"per task) allowed: {', '.join(map(str, allowed)) or 'none'}")


class MetaArgs(Options):
    """Base of a meta-method's options dataclass (``meta_args``; :mod:`bilevel_ssl.options`): errors name
    ``meta_args.<key>``, and a subclass's ``what`` (``"gessl option"``) names its unknown keys."""

    where = "meta_args"

    @classmethod
    def from_meta_args(cls, meta_args: dict):
        return cls.from_dict(meta_args)


def take(outs: list[dict[str, Tensor]] | None, idx) -> list[dict[str, Tensor]] | None:
    """The rows ``idx`` of every view's outputs (None stays None: no teacher)."""
    return None if outs is None else [{k: t[idx] for k, t in o.items()} for o in outs]


class SSLNet(nn.Module):
    """Backbone + the objective's heads.

    ``forward(x)`` returns ``{"h": backbone(x), "z": projector(h)}`` plus ``"p": predictor(z)`` and
    ``"s": prototypes(normalize(z))`` when those heads exist - everything an objective's loss reads.  One
    ``forward`` means ``torch.func.functional_call(net, params, x)`` evaluates the whole chain with other params.
    """

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.backbone(x)
        return {"h": h, **self.head_outputs(h)}

    def head_outputs(self, h: Tensor) -> dict[str, Tensor]:
        """The heads on features ``h`` (TC² runs them on calibrated features): ``z``, and ``p``, ``s`` if present."""
        out = {"z": self.heads["projector"](h)}
        if "predictor" in self.heads:
            out["p"] = self.heads["predictor"](out["z"])
        if "prototypes" in self.heads:
            out["s"] = self.heads["prototypes"](F.normalize(out["z"], dim=1))
        return out


def _resolve(root: nn.Module, path: str):
    """The attribute at a dotted path below ``root`` (ModuleDict entries by key)."""
    obj = root
    for part in filter(None, path.split(".")):
        obj = obj[part] if isinstance(obj, nn.ModuleDict) else getattr(obj, part)
    return obj


class _Dispatch(nn.Module):
    """Holds a network and calls the method at a dotted path of it - the one ``forward`` that
    :func:`torch.func.functional_call` can run with substituted tensors for any sub-module method."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, path: str, *args, **kwargs):
        return _resolve(self.net, path)(*args, **kwargs)


class FunctionalNet:
    """``net`` seen with other tensors: ``FunctionalNet(net, tensors)(x)``, ``.backbone.forward_masked(...)``,
    ``.heads["decoder"](...)`` all run the real modules with ``tensors`` (a dict name -> tensor of parameters and
    optionally buffers, names as in ``net.named_parameters()``) in place of their own, through
    :func:`torch.func.functional_call`.  Non-callable attributes (``patch_size``) read through.  This is how the
    bi-level methods evaluate any objective's :meth:`~bilevel_ssl.objectives.Objective.outputs` - including MAE's,
    which calls sub-module methods - at adapted parameters θ'."""

    def __init__(self, net: nn.Module, tensors: dict[str, Tensor], _path: str = "", _dispatch: _Dispatch = None):
        self._tensors, self._path = tensors, _path
        self._dispatch = _dispatch if _dispatch is not None else _Dispatch(net)

    def _run(self, path: str, *args, **kwargs):
        tensors = {f"net.{k}": v for k, v in self._tensors.items()}
        return torch.func.functional_call(self._dispatch, tensors, (path, *args), kwargs)

    def _child(self, name: str) -> "FunctionalNet":
        return FunctionalNet(self._dispatch.net, self._tensors, f"{self._path}.{name}".lstrip("."), self._dispatch)

    def __getattr__(self, name: str):
        attr = getattr(_resolve(self._dispatch.net, self._path), name)
        if isinstance(attr, nn.Module):
            return self._child(name)
        if callable(attr):
            return lambda *a, **k: self._run(f"{self._path}.{name}".lstrip("."), *a, **k)
        return attr

    def __getitem__(self, key: str) -> "FunctionalNet":
        return self._child(key)

    def __call__(self, *args, **kwargs):
        return self._run(f"{self._path}.forward".lstrip("."), *args, **kwargs)


class Teacher:
    """An EMA copy of the student network without its predictor (BYOL target / MoCo key encoder / DINO teacher).

    Never receives gradients.  Runs in train mode like the student (BYOL and DINO use batch statistics in the
    target too).  ``update(student, m)``: θ_t ← m·θ_t + (1 − m)·θ_s for parameters; buffers (BatchNorm running
    statistics) are copied.
    """

    def __init__(self, student: SSLNet):
        self.net = copy.deepcopy(student)
        if "predictor" in self.net.heads:
            del self.net.heads["predictor"]
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x)

    @torch.no_grad()
    def update(self, student: SSLNet, momentum: float) -> None:
        s_params = dict(student.named_parameters())
        for name, p in self.net.named_parameters():
            p.lerp_(s_params[name].detach(), 1.0 - momentum)
        s_buffers = dict(student.named_buffers())
        for name, b in self.net.named_buffers():
            b.copy_(s_buffers[name])


class SingleLevel:
    """Plain SSL: all views go through the network in *one* forward pass (one BatchNorm batch over all views, as
    SimCLR's reference implementation does with its concatenated views), the teacher likewise, then the
    objective's loss, then backward."""

    name = "none"
    # package modules this method's results depend on beyond the shared training code (the encoder cache's code
    # fingerprint, bilevel_ssl.cache, reads them along the class hierarchy)
    code_modules: tuple[str, ...] = ()

    def __init__(self, objective: Objective, net: SSLNet, cfg=None):
        self.objective = objective
        self.teacher = Teacher(net) if objective.teacher_momentum(0.0) is not None else None
        self._last: tuple[Outputs, Outputs | None] | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        """Validate ``cfg.meta_args`` (and anything else this method needs) before compute; raise ValueError."""
        if cfg.meta_args:
            raise ValueError(f"meta_args: meta-method 'none' takes no options, got {sorted(cfg.meta_args)}")
        if cfg.hypergrad_args:
            raise ValueError(f"hypergrad_args: only bi-level meta-methods use a hypergradient engine; "
                             f"meta is 'none' (allowed meta with an engine: {', '.join(META_METHODS[1:])})")

    @property
    def n_views(self) -> int:
        """Views per image the trainer must produce."""
        return self.objective.n_views

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the meta-method owns beyond the network (GeSSL's threshold network g, ...)."""
        return []

    def forward(self, net: SSLNet, views: list[Tensor]) -> tuple[Outputs, Outputs | None]:
        x, n = torch.cat(views), len(views)
        student = self.objective.outputs(net, x, n)
        teacher = self.objective.outputs(self.teacher, x, n) if self.teacher is not None else None
        return student, teacher

    dist = None  # a bilevel_ssl.distributed.Dist under torchrun (set by the trainer)

    def distributed_reduction(self) -> str:
        """How the trainer all-reduces this method's gradients under torchrun: "sum" when :meth:`compute_grads`
        computes the loss of the gathered global batch (each rank then holds a part of its gradient), "mean" when
        each rank's gradient is a full gradient of its own shard's loss (the bi-level methods' outer steps)."""
        return "sum" if type(self).compute_grads is SingleLevel.compute_grads else "mean"

    def compute_grads(self, net: SSLNet, views: list[Tensor]) -> dict[str, float]:
        student, teacher = self.forward(net, views)
        if self.dist is not None:  # torchrun: the loss of the global batch (bilevel_ssl.distributed)
            from .distributed import gather_outputs

            student, teacher = gather_outputs(student, self.dist), gather_outputs(teacher, self.dist)
        loss = self.objective.loss(student, teacher)
        loss.backward()
        self._last = (student, teacher)
        return {"loss": loss.item()}

    @torch.no_grad()
    def after_step(self, net: SSLNet, progress: float) -> None:
        """EMA teacher update at the scheduled momentum, then the objective's own state (queue, centre...)."""
        if self.teacher is not None:
            self.teacher.update(net, self.objective.teacher_momentum(progress))
        if self._last is not None:
            student, teacher = self._last
            detach = lambda outs: None if outs is None else [{k: v.detach() for k, v in o.items()} for o in outs]
            self.objective.update_state(detach(student), detach(teacher))
            self._last = None

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.net.state_dict() if self.teacher is not None else None,
                "objective": self.objective.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None:
            self.teacher.net.load_state_dict(state["teacher"])
        self.objective.load_state_dict(state["objective"])

    def to(self, device) -> "SingleLevel":
        if self.teacher is not None:
            self.teacher.net.to(device)
        return self


# name -> "module:Class", resolved on use (the bi-level methods import the hypergradient engines).  The modules a
# method declares (``code_modules``) enter the encoder cache's code fingerprint only for its runs (bilevel_ssl.cache).
_REGISTRY = {"none": "meta:SingleLevel", "gessl": "gessl:GeSSL", "multitask": "multitask:MultiTask",
             "tc2": "tc2:TC2", "mcr": "mcr:MCR"}
META_METHODS = tuple(_REGISTRY)


def meta_class(name: str) -> type:
    import importlib

    if name not in _REGISTRY:
        raise ValueError(f"meta: unknown name {name!r}; allowed: {', '.join(META_METHODS)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"bilevel_ssl.{module}"), cls)


def make_meta(name: str, objective: Objective, net: SSLNet, cfg=None):
    """Build meta-method ``name`` for ``objective`` training ``net``; its options come from ``cfg``
    (``meta_args``, ``hypergrad``, ``hypergrad_args`` of a :class:`bilevel_ssl.config.TrainConfig`)."""
    return meta_class(name)(objective, net, cfg)
