"""Inter-task gradient conflict: per-task gradients of the shared encoder, their cosines, and a step monitor.

TC² (Guo et al., "Exploring Transferability of Self-Supervised Learning by Task Conflict Calibration";
``shared/papers/tc2-task-conflict-calibration.md``) motivates its method with Fig. 1: a training batch split into
tasks (two in Fig. 1) that share one encoder, each trained with the base SSL loss on its own images; the cosine
similarity of the tasks' gradients fluctuates during training and is often negative ("conflicting gradients, angle
> 90°", §"Empirical Evidence").  This module measures exactly that, for any objective and meta-method:

* **Task construction** (§"Task Construction", TC²'s Algorithm 1 line 2; App. Fig. 4): the batch of B images,
  already shuffled by the data loader, is cut into K *contiguous* groups of B/K images, task k = images
  ``[k·B/K, (k+1)·B/K)``.  Every view of image b belongs to the task of b.  :func:`task_slices`.
* **Per-task loss**: the base objective's loss on the views of the task's images only, so a contrastive loss sees
  only its own task's images as negatives (a momentum queue - MoCo - is objective state and stays shared).
  :func:`task_losses`.  All views of the batch go through the network in **one** forward pass, as in plain
  training (:class:`bilevel_ssl.meta.SingleLevel`): BatchNorm normalises over the whole batch, so the per-task
  losses are exactly the terms the multi-task baseline (:class:`bilevel_ssl.multitask.MultiTask`) trains with.
* **Per-task gradient** g_k = ∇_θ L_k of the *shared encoder* θ = the backbone's parameters (``which="backbone"``,
  the default: the encoder is what is transferred) or of every network parameter (``which="all"``: backbone and
  the objective's heads, which all tasks share as well).  :func:`task_gradients`, :func:`encoder_task_gradients`.
* **Pairwise cosine matrix** C_ij = ⟨g_i, g_j⟩ / (‖g_i‖‖g_j‖), computed in float64 (:func:`cosine_matrix`); a zero
  gradient has cosine 0 with everything (it neither conflicts nor agrees).
* **Summary per step** over the K(K−1)/2 pairs i < j (:func:`conflict_summary`): ``mean_cos``, ``min_cos``,
  ``max_cos`` and ``conflict_rate`` = fraction of pairs with C_ij < 0 (for K = 2: 1 if the two gradients conflict,
  0 otherwise).  The paper plots the cosine per epoch for K = 2; the step monitor keeps every step
  (``record["steps"]`` of the trainer's history) and the trainer also averages it per epoch.

:func:`conflict_monitor` wraps this into a trainer step monitor (``step_monitors=`` of
:func:`bilevel_ssl.trainer.train`).  It is a pure observer: it evaluates the network through
:func:`torch.func.functional_call` with *cloned* buffers (BatchNorm running statistics are not advanced), takes
gradients with :func:`torch.autograd.grad` (``.grad`` is not touched), leaves weights and train/eval mode alone and
forks torch's RNG, so a run with the monitor equals a run without it bit for bit (``tests/test_conflict.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import meta
from .objectives import Objective, Outputs

__all__ = [
    "WHICH",
    "allowed_n_tasks",
    "check_n_tasks",
    "task_slices",
    "split_outputs",
    "task_losses",
    "task_gradients",
    "flatten",
    "cosine_matrix",
    "conflict_summary",
    "pairwise_conflict",
    "encoder_params",
    "encoder_task_gradients",
    "conflict_monitor",
    "step_curve",
    "epoch_means",
]

WHICH = ("backbone", "all")  # whose gradients: the shared encoder (backbone) or every network parameter

GradList = Sequence[Tensor]  # one tensor per parameter
TaskGrads = Sequence["Tensor | GradList"]  # per task: a flat vector, or a list of per-parameter tensors


# --------------------------------------------------------------------------------------------------------------------
# tasks


# the task-split check of bilevel_ssl.meta with >= 2 tasks: one task has no other task to conflict with
allowed_n_tasks = functools.partial(meta.allowed_n_tasks, min_tasks=2)
check_n_tasks = functools.partial(meta.check_n_tasks, min_tasks=2)


def task_slices(batch_size: int, n_tasks: int) -> list[slice]:
    """Task k = images ``[k·n, (k+1)·n)`` with n = batch_size / n_tasks (contiguous groups of the shuffled
    batch, TC²'s task construction).  Validates ``n_tasks`` (:func:`check_n_tasks`)."""
    check_n_tasks(batch_size, n_tasks)
    n = batch_size // n_tasks
    return [slice(k * n, (k + 1) * n) for k in range(n_tasks)]


def split_outputs(outs: Outputs | None, n_tasks: int) -> list[Outputs | None]:
    """Per-view output dicts (each tensor batch-first, one row per image) -> one such list per task."""
    if outs is None:
        return [None] * n_tasks
    batch = next(iter(outs[0].values())).shape[0]
    return [[{k: v[sl] for k, v in o.items()} for o in outs] for sl in task_slices(batch, n_tasks)]


def task_losses(objective: Objective, student: Outputs, teacher: Outputs | None, n_tasks: int) -> Tensor:
    """``(K,)`` tensor: the objective's loss on each task's images alone (its own negatives only)."""
    return torch.stack([objective.loss(s, t) for s, t in zip(split_outputs(student, n_tasks),
                                                             split_outputs(teacher, n_tasks))])


# --------------------------------------------------------------------------------------------------------------------
# gradients and cosines (pure functions)


def task_gradients(losses: Tensor | Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
                   ) -> list[list[Tensor | None]]:
    """``[k][p]`` = ∂ losses[k] / ∂ params[p] by :func:`torch.autograd.grad` (``.grad`` is not touched); None where
    the parameter does not reach the task's loss.  One backward pass per task through the shared graph; the graph
    is freed after the last one unless ``retain_graph``."""
    losses = list(losses)
    params = list(params)
    out = []
    for k, loss in enumerate(losses):
        keep = retain_graph or k < len(losses) - 1
        out.append(list(torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)))
    return out


def flatten(grads: Tensor | GradList, like: Sequence[Tensor] | None = None) -> Tensor:
    """One flat vector from a tensor or a list of per-parameter tensors; a None entry is zeros shaped like the
    matching entry of ``like`` (the parameters)."""
    if isinstance(grads, Tensor):
        return grads.reshape(-1)
    parts = []
    for i, g in enumerate(grads):
        if g is None:
            if like is None:
                raise ValueError("flatten: a gradient is None; pass like= (the parameters) to fill it with zeros")
            g = torch.zeros_like(like[i])
        parts.append(g.reshape(-1))
    return torch.cat(parts)


def _as_matrix(grads: TaskGrads | Tensor) -> Tensor:
    if isinstance(grads, Tensor):
        if grads.dim() != 2:
            raise ValueError(f"cosine_matrix: a tensor of task gradients must be (K, P), got {tuple(grads.shape)}")
        return grads
    vecs = [flatten(g) for g in grads]
    sizes = {v.numel() for v in vecs}
    if len(sizes) > 1:
        raise ValueError(f"cosine_matrix: task gradients differ in size: {sorted(sizes)}")
    return torch.stack(vecs)


def cosine_matrix(grads: TaskGrads | Tensor) -> Tensor:
    """``(K, K)`` float64 matrix C_ij = ⟨g_i, g_j⟩ / (‖g_i‖ ‖g_j‖) of K task gradients (a ``(K, P)`` tensor, or a
    list of flat vectors or of per-parameter lists).  A zero gradient has cosine 0 with every gradient, itself
    included (it neither conflicts nor agrees); otherwise the diagonal is 1."""
    g = _as_matrix(grads).detach().double()
    gram = g @ g.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       torch.zeros_like(gram)).clamp(-1.0, 1.0)


def conflict_summary(cos: Tensor) -> dict[str, float]:
    """Summary of a ``(K, K)`` cosine matrix over its K(K−1)/2 pairs i < j: ``mean_cos``, ``min_cos``,
    ``max_cos`` and ``conflict_rate`` = fraction of pairs with cosine < 0 (TC² §"Empirical Evidence": "a negative
    value indicates conflicting gradients (angle > 90°)")."""
    if cos.dim() != 2 or cos.shape[0] != cos.shape[1] or cos.shape[0] < 2:
        raise ValueError(f"conflict_summary: need a (K, K) cosine matrix with K >= 2, got {tuple(cos.shape)}")
    i, j = torch.triu_indices(cos.shape[0], cos.shape[0], offset=1)
    pairs = cos[i, j].double()
    return {"mean_cos": float(pairs.mean()), "min_cos": float(pairs.min()), "max_cos": float(pairs.max()),
            "conflict_rate": float((pairs < 0).double().mean())}


def pairwise_conflict(grads: TaskGrads | Tensor) -> dict[str, float]:
    """:func:`conflict_summary` of :func:`cosine_matrix` of ``grads``."""
    return conflict_summary(cosine_matrix(grads))


# --------------------------------------------------------------------------------------------------------------------
# per-task gradients of a network, without side effects


def encoder_params(net: torch.nn.Module, which: str = "backbone") -> list[tuple[str, Tensor]]:
    """(name, parameter) of the shared encoder (``"backbone"``) or of the whole network (``"all"``), in
    ``net.named_parameters()`` order, only those that require gradients."""
    if which not in WHICH:
        raise ValueError(f"which: unknown value {which!r}; allowed: {', '.join(WHICH)}")
    prefix = "backbone."
    return [(n, p) for n, p in net.named_parameters()
            if p.requires_grad and (which == "all" or n.startswith(prefix))]


def _functional(module: torch.nn.Module):
    """``module`` evaluated through functional_call with its own parameters and *copies* of its buffers: a train-mode
    BatchNorm normalises with the batch as usual but advances only the copies."""
    from .meta import FunctionalNet

    tensors = dict(module.named_parameters())
    tensors.update({k: b.clone() for k, b in module.named_buffers()})
    return FunctionalNet(module, tensors)


def encoder_task_gradients(net: torch.nn.Module, objective: Objective, views: Sequence[Tensor], n_tasks: int, *,
                           teacher=None, which: str = "backbone") -> tuple[Tensor, Tensor]:
    """Per-task gradients of ``net``'s shared parameters on a batch of views, with no side effect on ``net``.

    ``views``: the objective's ``n_views`` views (``(B, ...)`` each; extra views are ignored: a meta-method's
    views list starts with (x¹, x²), e.g. GeSSL's (x¹, x², anchor)).  ``teacher``: the momentum teacher
    (:class:`bilevel_ssl.meta.Teacher`, or its network) of a momentum-teacher objective; required for those.
    All views go through the network in one forward (one BatchNorm batch, as training does), with copies of the
    buffers; the teacher likewise, without gradient.  Returns ``(G, losses)``: G ``(K, P)`` (row k = flattened
    ∂L_k/∂θ, P = number of parameters selected by ``which``; zeros for parameters a task's loss does not reach) and
    the detached ``(K,)`` task losses.
    """
    n = objective.n_views
    if len(views) < n:
        raise ValueError(f"views: objective {objective.name} needs {n} view(s), got {len(views)}")
    if objective.teacher_momentum(0.0) is not None and teacher is None:
        raise ValueError(f"teacher: objective {objective.name} uses a momentum teacher; pass the meta-method's "
                         f"teacher (meta.teacher) to compute its loss")
    views = list(views[:n])
    task_slices(views[0].shape[0], n_tasks)  # validates n_tasks against the batch size
    named = encoder_params(net, which)
    if not named:
        raise ValueError(f"which: {which!r} selects no trainable parameter of the network")
    x = torch.cat(views)
    with torch.enable_grad():
        student = objective.outputs(_functional(net), x, n)
        t_outs = None
        if teacher is not None:
            t_net = getattr(teacher, "net", teacher)
            with torch.no_grad():
                t_outs = objective.outputs(_functional(t_net), x, n)
        losses = task_losses(objective, student, t_outs, n_tasks)
        params = [p for _, p in named]
        grads = task_gradients(losses, params)
    return torch.stack([flatten(g, like=params) for g in grads]).detach(), losses.detach()


def conflict_monitor(n_tasks: int, every: int = 1, *, which: str = "backbone", prefix: str = "monitor_"
                     ) -> Callable[[int, torch.nn.Module, object, list], dict[str, float]]:
    """A trainer step monitor ``f(step, net, meta, views) -> dict`` of the inter-task gradient conflict.

    Every ``every``-th step (steps count from 1) it splits the step's batch into ``n_tasks`` contiguous tasks, takes
    the base objective's loss per task (``meta.objective``, with ``meta.teacher`` for momentum-teacher objectives)
    and the per-task gradients of the shared encoder (``which``: ``"backbone"`` or ``"all"``), and returns
    ``{prefix + key: value}`` for the keys of :func:`conflict_summary` (``monitor_mean_cos``, ``monitor_min_cos``,
    ``monitor_max_cos``, ``monitor_conflict_rate``) and ``monitor_task_loss`` (mean of the task losses).  On other
    steps it returns ``{}``.

    Works with every meta-method whose views list starts with the objective's views: plain SSL, the multi-task
    baselines (x¹, x²), GeSSL (x¹, x², anchor: it uses x¹ and x²), TC² / MCR as long as they keep that
    convention.  The measured network is ``net`` at the step's parameters (before the optimizer step), in its
    current mode.

    Under torchrun each rank measures the task split of its own shard (the views it is given).

    Side effects: none on the training run (buffers are copies, ``.grad`` untouched, RNG forked - MAE draws its
    masks from a fork, so the monitor's masks are not the step's).  Caveat: the trainer averages a step
    monitor's numbers per epoch over *all* steps; with ``every`` > 1 those epoch means are diluted by the skipped
    steps - use :func:`epoch_means` or :func:`step_curve` on the history instead.
    """
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 2:
        raise ValueError(f"n_tasks: must be an integer >= 2, got {n_tasks!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every: must be an integer >= 1, got {every!r}")
    if which not in WHICH:
        raise ValueError(f"which: unknown value {which!r}; allowed: {', '.join(WHICH)}")

    def monitor(step: int, net, meta, views) -> dict[str, float]:
        if (step - 1) % every:
            return {}
        objective = meta.objective
        teacher = getattr(meta, "teacher", None)
        devices = [views[0].device] if views[0].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            grads, losses = encoder_task_gradients(net, objective, views, n_tasks, teacher=teacher, which=which)
        out = {f"{prefix}{k}": v for k, v in pairwise_conflict(grads).items()}
        out[f"{prefix}task_loss"] = float(losses.mean())
        return out

    monitor.__name__ = f"conflict_monitor_{n_tasks}tasks_every{every}_{which}"
    return monitor


# --------------------------------------------------------------------------------------------------------------------
# reading the history


def step_curve(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` from the per-step records (``record["steps"]``) of a trainer history, keeping
    only the steps where the monitor measured it."""
    steps, values = [], []
    for record in history:
        for s in record.get("steps", []):
            if key in s:
                steps.append(int(s["step"]))
                values.append(float(s[key]))
    return steps, values


def epoch_means(history: list[dict], key: str) -> list[float]:
    """Per epoch, the mean of ``key`` over the steps where it was measured (NaN for an epoch without any)."""
    out = []
    for record in history:
        vals = [float(s[key]) for s in record.get("steps", []) if key in s]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out
