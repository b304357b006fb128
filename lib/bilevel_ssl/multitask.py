"""Multi-task baselines of TC²: a batch split into tasks, per-task gradients, and gradient surgery.

TC² (``shared/papers/tc2-task-conflict-calibration.md``) starts from the observation (Fig. 1, App. "Motivational
experiment", Fig. 4) that splitting each SSL batch into tasks which share one encoder - "SimCLR+T", the encoder
"jointly optimized using the combined loss from both tasks" - helps transfer on average but unstably, and that the
tasks' gradients often conflict.  Its appendix compares TC² with three multi-task gradient methods on the same task
split (PCGrad, GradVac, GradDrop).  :class:`MultiTask` (``meta: multitask``) is that family:

1. The batch of B images (shuffled by the loader) is cut into K = ``n_tasks`` contiguous tasks of B/K images
   (:func:`bilevel_ssl.conflict.task_slices`; the same split as TC²'s task construction).
2. All views go through the network in one forward pass (one BatchNorm batch, as plain training); the base
   objective's loss is computed per task on the task's own images, L_1 .. L_K
   (:func:`bilevel_ssl.conflict.task_losses`: a contrastive loss sees only its own task's negatives).
3. Per-task gradients g_k = ∇_θ L_k of the shared parameters θ (``shared``: every network parameter, the default,
   or the backbone only - then the heads get the plain mean of their task gradients), one backward per task.
4. ``combine`` turns {g_k} into the update direction written into ``.grad``; the trainer's optimizer applies it.
   Every rule returns the *mean* (1/K)·Σ_k g̃_k of its modified task gradients g̃_k, so all of them keep the
   scale of ``sum`` (the gradient of the mean task loss) and share one learning rate.  (The papers sum; a sum is
   the same with the learning rate multiplied by K.)

The cosines of the raw task gradients {g_k} (before surgery) over the shared parameters are logged every step:
``task_mean_cos``, ``task_min_cos``, ``task_conflict_rate`` (:func:`bilevel_ssl.conflict.conflict_summary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .conflict import check_n_tasks, conflict_summary, cosine_matrix, flatten, task_gradients, task_losses
from .meta import MetaArgs, SingleLevel, SSLNet
from .objectives import Objective
from .options import option

__all__ = ["COMBINES", "SHARED", "MultiTaskConfig", "pcgrad", "gradvac", "graddrop", "MultiTask"]

COMBINES = ("sum", "pcgrad", "gradvac", "graddrop")
SHARED = ("all", "backbone")


# --------------------------------------------------------------------------------------------------------------------
# gradient surgery on flat task gradients (pure functions)


def _order(i: int, k: int, generator: torch.Generator | None) -> list[int]:
    """The other tasks j ≠ i in a uniformly random order drawn from ``generator`` (torch's global RNG if None)."""
    return [j for j in torch.randperm(k, generator=generator).tolist() if j != i]


def pcgrad(grads: list[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1), on flat task gradients.

    For each task i, starting from g_i^PC = g_i, and for every other task j in a random order::

        if  g_i^PC · g_j < 0:   g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) · g_j          (Yu et al., Eq. 1 / Alg. 1)

    i.e. g_i^PC is projected onto the normal plane of each *original* g_j it conflicts with.  The order is drawn
    per task i with :func:`torch.randperm` (``generator``, default torch's global RNG: deterministic under a seed and
    saved in the trainer's checkpoints).  Returns [g_1^PC, ..., g_K^PC]; Δθ = Σ_i g_i^PC in the paper (the caller
    averages).  A zero g_j is skipped (nothing to project on).
    """
    k = len(grads)
    out = []
    for i in range(k):
        g = grads[i].clone()
        for j in _order(i, k, generator):
            dot = torch.dot(g, grads[j])
            nsq = torch.dot(grads[j], grads[j])
            if dot < 0 and nsq > 0:
                g = g - (dot / nsq) * grads[j]
        out.append(g)
    return out


def gradvac(grads: list[Tensor], targets: Tensor, beta: float, generator: torch.Generator | None = None
            ) -> tuple[list[Tensor], Tensor]:
    """Gradient Vaccine (Wang et al. 2021, "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", Algorithm 1), one parameter group (the whole shared vector).

    ``targets`` φ̂ (K × K, EMA of past cosines, 0 at the start) is the adaptive similarity goal.  For each task i,
    from g_i' = g_i, for every other task j in a random order::

        φ_ij = cos(g_i', g_j)
        if φ_ij < φ̂_ij:                                                                       (Wang et al., Eq. 3)
            g_i' ← g_i' + ‖g_i'‖ (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (‖g_j‖ √(1 − φ̂_ij²)) · g_j
        φ̂_ij ← (1 − β) φ̂_ij + β φ_ij                                                          (Wang et al., Eq. 4)

    The update sets cos(g_i', g_j) to φ̂_ij exactly (in the plane of g_i', g_j) when it is below the target; with
    φ̂_ij = 0 it is PCGrad's projection.  The EMA uses the φ_ij measured before the update, every step.  Returns
    ([g_1', ..., g_K'], new targets); the input ``targets`` is not modified.  A zero g_i' or g_j changes nothing;
    |φ̂| is kept ≤ 1 − 1e-6 in the denominator.
    """
    k = len(grads)
    if targets.shape != (k, k):
        raise ValueError(f"gradvac: targets must be ({k}, {k}), got {tuple(targets.shape)}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"gradvac: beta must be in [0, 1], got {beta!r}")
    new = targets.detach().clone().double()
    out = []
    for i in range(k):
        g = grads[i].clone()
        for j in _order(i, k, generator):
            gj = grads[j]
            ni, nj = g.norm().double(), gj.norm().double()
            phi = float(torch.dot(g, gj).double() / (ni * nj)) if ni > 0 and nj > 0 else 0.0
            phi = min(1.0, max(-1.0, phi))
            target = float(new[i, j])
            if phi < target and ni > 0 and nj > 0:
                t = min(1.0 - 1e-6, max(-(1.0 - 1e-6), target))
                coef = ni * (t * math.sqrt(1.0 - phi ** 2) - phi * math.sqrt(1.0 - t ** 2)) / (nj * math.sqrt(1.0 - t ** 2))
                g = g + coef.to(g.dtype) * gj
            new[i, j] = (1.0 - beta) * target + beta * phi
        out.append(g)
    return out, new.to(targets.dtype)


def graddrop(grads: list[Tensor], leak: float = 0.0, u: Tensor | None = None,
             generator: torch.Generator | None = None) -> list[Tensor]:
    """GradDrop (Chen et al. 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout", Algorithm 1), applied elementwise to the flat gradients of the shared parameters.

    Gradient positive sign purity per element (Chen et al., Eq. 1), and the sign-consistent mask::

        P = ½ (1 + Σ_i g_i / Σ_i |g_i|)            (P = ½ where every g_i is 0)
        U ~ Uniform(0, 1) per element (one draw shared by the tasks)
        M_i = 1[P > U] · 1[g_i > 0] + 1[P < U] · 1[g_i < 0]
        g̃_i = ℓ g_i + (1 − ℓ) M_i g_i                 (leak ℓ ∈ [0, 1]; ℓ = 0 is full GradDrop)

    so at each element either only the positive or only the negative task gradients pass, positive with
    probability P.  Deviation: the paper applies the mask to gradients w.r.t. the activations of a GradDrop layer
    (summed over the batch) and backpropagates the masked sum into the shared layers; here, as in most multi-task
    libraries' baselines, it is applied directly to the parameter gradients (no extra layer to insert in
    arbitrary backbones).  ``u`` fixes U (tests); otherwise it is drawn from ``generator`` (default torch's global
    RNG).  Returns [g̃_1, ..., g̃_K] (Δθ = Σ_i g̃_i in the paper; the caller averages).
    """
    if not (isinstance(leak, (int, float)) and 0.0 <= leak <= 1.0):
        raise ValueError(f"graddrop: leak must be in [0, 1], got {leak!r}")
    g = torch.stack(grads)
    total, mag = g.sum(0), g.abs().sum(0)
    purity = torch.where(mag > 0, 0.5 * (1.0 + total / torch.where(mag > 0, mag, torch.ones_like(mag))),
                         torch.full_like(mag, 0.5))
    if u is None:
        u = torch.rand(purity.shape, generator=generator, dtype=purity.dtype).to(purity.device)
    elif u.shape != purity.shape:
        raise ValueError(f"graddrop: u must have the gradients' shape {tuple(purity.shape)}, got {tuple(u.shape)}")
    keep_pos, keep_neg = (purity > u).to(g.dtype), (purity < u).to(g.dtype)
    mask = keep_pos * (g > 0).to(g.dtype) + keep_neg * (g < 0).to(g.dtype)
    return list(leak * g + (1.0 - leak) * mask * g)


# --------------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class MultiTaskConfig(MetaArgs):
    """Options of ``meta: multitask`` (``meta_args``), with their sources.

    * ``n_tasks`` K = 2: Fig. 1 / App. Fig. 4 split each batch into two tasks ("SimCLR+T"); TC² itself uses 4.
    * ``combine`` = "sum": the plain split (mean of the task losses); "pcgrad", "gradvac", "graddrop": the
      baselines of TC²'s appendix comparison (see :func:`pcgrad`, :func:`gradvac`, :func:`graddrop`).
    * ``shared`` = "all": gradient surgery on every network parameter, since backbone and heads are all shared by
      the tasks (PCGrad et al. operate on the shared parameters); "backbone": on the encoder only, heads get the
      mean of their task gradients.
    * ``gradvac_beta`` β = 0.01: the EMA rate of GradVac's targets (Wang et al. 2021 use β = 1e-2).
    * ``graddrop_leak`` ℓ = 0: full GradDrop (Chen et al. 2020's default; ℓ = 1 is ``sum``).
    """

    n_tasks: int = option(2)  # its range depends on the batch size: MultiTask.check_config
    combine: str = option("sum", choices=COMBINES)
    shared: str = option("all", choices=SHARED)
    gradvac_beta: float = option(0.01, lo=0, hi=1)
    graddrop_leak: float = option(0.0, lo=0, hi=1)

    what = "multitask option"


# --------------------------------------------------------------------------------------------------------------------
# the meta-method


class MultiTask(SingleLevel):
    """``meta: multitask`` - the batch split into tasks, per-task gradients combined by ``combine`` (see the module
    docstring for the step and :class:`MultiTaskConfig` for the options).

    Works with every objective: momentum-teacher objectives get their targets from the EMA teacher of the whole
    batch (one no-grad forward, sliced per task); objective state (MoCo's queue, DINO's centre) is updated after the
    optimizer step from the whole batch, as in plain training.  GradVac's similarity targets are state of the
    method (``state_dict``), so a resumed run continues exactly.

    Under torchrun (:mod:`bilevel_ssl.distributed`) each rank splits *its shard* into ``n_tasks`` tasks (the
    trainer checks the per-rank batch against ``n_tasks`` before compute), combines its own task gradients, and the
    trainer averages the ranks' directions (:meth:`distributed_reduction` is "mean", as for the bi-level methods):
    the surgery then acts on per-shard task gradients, so the numbers differ from a one-process run of the same
    global batch.  The objective's state is updated from the gathered outputs of all ranks, so it stays identical
    on every rank (and in rank 0's checkpoint).

    Logs: ``loss`` (mean task loss), ``task_mean_cos``, ``task_min_cos``, ``task_conflict_rate`` (raw task
    gradients over the shared parameters), and for ``pcgrad`` ``task_projected`` (fraction of ordered pairs (i, j)
    whose projection fired, as measured on the raw gradients: g_i · g_j < 0).
    """

    name = "multitask"
    options = MultiTaskConfig
    code_modules = ("multitask", "conflict")

    @classmethod
    def check_config(cls, cfg) -> None:
        opts = cls.options.from_meta_args(cfg.meta_args)
        check_n_tasks(cfg.batch_size, opts.n_tasks, key="meta_args.n_tasks / batch_size")
        if cfg.hypergrad_args:
            raise ValueError("hypergrad_args: meta 'multitask' is single-level and uses no hypergradient engine; "
                             "allowed: {} (empty)")

    def __init__(self, objective: Objective, net: SSLNet, cfg=None):
        super().__init__(objective, net)
        self.cfg = self.options.from_meta_args(cfg.meta_args if cfg is not None else {})
        k = self.cfg.n_tasks
        self.gradvac_targets = torch.zeros(k, k, dtype=torch.float64)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["gradvac_targets"] = self.gradvac_targets.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "gradvac_targets" in state:
            self.gradvac_targets = state["gradvac_targets"].detach().clone().double().cpu()

    def _combine(self, g: Tensor) -> tuple[Tensor, dict[str, float]]:
        """(K, P) raw task gradients -> the (P,) update direction (mean of the modified task gradients)."""
        k = g.shape[0]
        logs: dict[str, float] = {}
        rule = self.cfg.combine
        if rule == "sum":
            return g.mean(0), logs
        rows = list(g)
        if rule == "pcgrad":
            gram = g @ g.T
            off = ~torch.eye(k, dtype=torch.bool, device=g.device)
            logs["task_projected"] = float((gram[off] < 0).double().mean())
            rows = pcgrad(rows)
        elif rule == "gradvac":
            rows, self.gradvac_targets = gradvac(rows, self.gradvac_targets, self.cfg.gradvac_beta)
            i, j = torch.triu_indices(k, k, offset=1)
            logs["task_gradvac_target"] = float(self.gradvac_targets[i, j].mean())
        else:
            rows = graddrop(rows, self.cfg.graddrop_leak)
        return torch.stack(rows).mean(0), logs

    def compute_grads(self, net: SSLNet, views: list[Tensor]) -> dict[str, float]:
        k = self.cfg.n_tasks
        student, teacher = self.forward(net, views)
        losses = task_losses(self.objective, student, teacher, k)
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        per_task = task_gradients(losses, params)  # [k][p], None where a parameter does not reach a task loss
        is_shared = [self.cfg.shared == "all" or n.startswith("backbone.") for n, _ in named]
        shared = [p for p, s in zip(params, is_shared) if s]
        g = torch.stack([flatten([t[i] for i, s in enumerate(is_shared) if s], like=shared) for t in per_task])
        logs = {"loss": float(losses.detach().mean())}
        with torch.autocast(device_type=g.device.type, enabled=False):  # surgery in the gradients' own precision
            logs.update({f"task_{key}": v for key, v in conflict_summary(cosine_matrix(g)).items()
                         if key != "max_cos"})
            direction, extra = self._combine(g.detach())
        logs.update(extra)
        offset = 0
        for idx, (p, s) in enumerate(zip(params, is_shared)):
            reached = any(t[idx] is not None for t in per_task)
            if s:
                n = p.numel()
                if reached:
                    p.grad = direction[offset:offset + n].view_as(p).clone()
                offset += n
            elif reached:
                p.grad = torch.stack([torch.zeros_like(p) if t[idx] is None else t[idx] for t in per_task]).mean(0)
        if self.dist is not None:  # torchrun: the objective's state (queue, centre) from the global batch, so that
            from .distributed import gather_outputs  # it stays the same on every rank

            detach = lambda outs: None if outs is None else [{k: v.detach() for k, v in o.items()} for o in outs]
            student, teacher = gather_outputs(detach(student), self.dist), gather_outputs(detach(teacher), self.dist)
        self._last = (student, teacher)
        return logs
