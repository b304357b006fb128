"""TC² - Task Conflict Calibration (Guo, Wang et al., "Exploring Transferability of Self-Supervised Learning by
Task Conflict Calibration"; paper in ``shared/papers/tc2-task-conflict-calibration.md``), as meta-method ``tc2``.

What the paper does, per training batch (§Methodology, Algorithm 1):

1. **Tasks** (§Task Construction).  The batch X_tr of N images is split into K = n_t groups B_1..B_K, one SSL task
   each; every image gets m augmented views; the *support* set of a task holds m′ views of each of its images, the
   *query* set the other m − m′.
2. **Factors** (Eq. 1).  S = [mean; covariance] ∈ R^{(d+1)×d} of the representations of the whole batch goes
   through the factor network f_v, giving V = f_v(S) ∈ R^{d×n_f} (column a = factor a).
   L_v(f_v) = ‖VᵀV − I‖²_F + ‖Z − Z V Vᵀ‖²_F  (orthogonality + reconstruction of the batch Z = Z_tr^aug).
3. **Weights** (Eq. 2).  The weight network f_w maps one representation z_j to W_j = f_w(z_j) ∈ R^{n_f};
   L_w(f_w) = Σ_k Σ_{z_j ∈ task k} ‖z_j − W_j Vᵀ‖²₂ + ‖W_j‖₁  (sparse reconstruction, V "pre-given").
   The calibrated representation is ẑ_j = f_w(z_j) Vᵀ (§Task Conflict Calibration, question iii).
   L_tc² = L_v + λ_s L_w (Eq. 3).
4. **Stage 1** (Eq. 4-5): encoder fixed, bi-level update of ψ = (f_v, f_w): inner step on
   L̄^s = mean_k L_ssl^s(ψ; B_k) + L_tc²(ψ), outer loss L̄^q = mean_k L_sse^q(ψ′; B_k) + L_tc²(ψ′).
5. **Stage 2** (Eq. 6-7): f_v, f_w held, bi-level update of the encoder θ: θ^k = θ − β₁∇L_ssl^s(θ; B_k) for each
   task k, then θ ← θ − β₂ ∇_θ Σ_k L_sse^q(θ^k(θ); B_k).

What implements which equation:

* :class:`TC2Config` - the options (``meta_args``), validated with the offending key in every message.
* :func:`make_tasks` - the split into K tasks; :func:`split_views` - support / query views (§Task Construction).
* In :mod:`bilevel_ssl.tc2_losses` (re-exported here): :func:`batch_statistics` - S of §Task Conflict
  Calibration; :class:`FactorNet` (f_v), :class:`WeightNet` (f_w) - the two networks (App. IV: 3-layer MLPs);
  :func:`orthogonality_loss`, :func:`reconstruction_loss`, :func:`loss_v` (Eq. 1), :func:`loss_w` (Eq. 2),
  :func:`calibrate` (ẑ = f_w(z)Vᵀ), :func:`sse_loss` (our reading of L_sse, see below).
* :class:`TC2` - the meta-method: the two stages through the engines of :mod:`bilevel_ssl.hypergrad`.

Choices where the paper is silent or ambiguous (tested in ``tests/test_tc2.py`` where a test can decide them;
the measurements quoted were made on ``mnistm5k`` with Conv-4):

* **Which representation is z.**  The backbone output h (the paper's "sample representation", dimension d; App.
  IV: "a linear projection head maps the learned representations into a latent embedding space").  TC²
  calibrates h, and the calibrated ĥ = f_w(h)Vᵀ replaces h as the input of the objective's heads, so every
  two-view objective's loss is used unchanged ("losses are computed in the factor space", below Eq. 4).  The
  encoder that is evaluated downstream is the backbone alone (Algorithm 1 returns f_θ).
* **W_j.**  Eq. 2 writes "W_j = f_w(z_j)Vᵀ", which does not type-check against ‖z_j − W_j Vᵀ‖ unless n_f = d;
  the text ("the output of f_w is a weight vector with n_f dimension") gives W_j = f_w(z_j) ∈ R^{n_f}.
* **f_v's architecture.**  "We fed the concatenated matrix into a factor extraction network f_v" with "a
  lightweight three-layer MLP" (App. IV): the MLP reads the flattened S ((d+1)·d inputs) and its d·n_f outputs are
  V.  Its cost is in parameters, not compute (8.5M for d = 256 with ``fv_hidden`` = 64; about 30 MFLOP a step).
  The lighter reading, one shared MLP R^{d+1} -> R^{n_f} on each column [μ_i; Σ_{:,i}] of S giving row i of V,
  does not work on Conv-4 features: their columns of S are nearly parallel (ReLU features are strongly
  correlated), so V starts with effective rank 7.9 of 256 (flattened: 206), ĥ = f_w(h)Vᵀ is nearly
  one-dimensional (L_sse = 0 after one step) and the scale-invariant projector's gradients blow ψ up in the first
  step.  f_v reads S scaled
  to unit Frobenius norm (see :class:`FactorNet`: with one input per batch the raw S makes the first layer's
  effective step size α‖S‖²).
* **Statistics.**  S uses the batch mean and the unbiased (N − 1) covariance of all views of all images of the
  batch, detached (the encoder is fixed in stage 1 and f_v is "held" in stage 2).
* **"V is a pre-given matrix" in L_w** (below Eq. 2) is read as "V is f_v's output, not a free matrix of L_w": Eq. 4
  differentiates L_tc²(f_v, f_w) = L_v + λ_s L_w (Eq. 3) as one function of both networks, so L_w's gradient also
  reaches f_v.  The other reading - V detached in L_w, so that L_w trains f_w only - makes the inner update of
  Eq. 4 a field that is not the gradient of any function (f_w's gradient depends on f_v through V, f_v's has no L_w
  term), and the engines then estimate different things: the "exact" ``second_order`` (reverse mode through a
  graph in which V is a constant) drops the f_v -> f_w cross term that ``aid_fd`` (finite differences of the field
  actually computed) keeps.  Measured on the tiny net of ``tests/test_tc2.py`` in float64: 2.5e-4 relative
  difference for every fd_r from 1e-3 to 1e-9 with the detach, agreement to 1e-9 without it (GeSSL's ``g_detach``
  is the same trap).  L_v still sends no gradient to f_w.
* **Data of each term.**  L_v on all views of the whole batch (Eq. 1 names Z_tr^aug).  L_w on the rows of the set
  the stage evaluates: the support views in Eq. 4, the query views in Eq. 5 (support and query "represent shifted
  distributions" and the factors should be invariant across them, §Learning Process).
* **L_sse** (below Eq. 5: "the sum of squared errors on query set Q_k").  The paper never says what is compared.
  ``query_loss: sse`` (default) reads it as the prototype error of meta-learning: each query view's calibrated
  representation against its image's support prototype, c_j = mean of the support views' ẑ (after L2
  normalisation, ``sse_normalize``): Σ_{v∈Q} ‖ê_{j,v} − c_j‖² - the support/query invariance the paper asks for,
  computed in factor space.  It is an alignment loss with no repulsive term: the encoder's only other signal is
  the support SSL loss through the inner step (Eq. 7 updates θ with L_sse alone).  ``query_loss: ssl`` reads the
  outer loss as the base objective on the query views instead (a MAML-style SSL outer loss, as GeSSL's).
  Sanity check (1024 images, batch 128, 4 epochs, 1 seed, Conv-4 width 64): neither reading collapses; 5-NN /
  linear 0.634 / 0.774 with ``sse``, 0.540 / 0.754 with ``ssl``, 0.636 / 0.812 for SimCLR alone (notebook 21
  compares them with seeds and CIs).
* **Reductions.**  ``reduction: mean`` (default) divides each squared-norm / L1 term by its number of entries
  (orthogonality by n_f², reconstructions by rows·d, L1 by rows·n_f), so every term is O(1) whatever N, m, d and
  n_f - the n_f sweep of Table 9 then does not also change the terms' weights - and the tasks are averaged
  (Eq. 5's 1/K; Eq. 7's Σ_k becomes a mean, i.e. β₂ scaled by K).  ``reduction: sum`` is the paper's sums.  L_sse
  with ``mean`` averages over (image, query view) pairs.
* **Learning rates.**  α₁ = α₂ = ``tc_inner_lr`` (Eq. 4), α₃ = α₄ = ``tc_lr`` (Eq. 5), β₁ = ``inner_lr``
  (Eq. 6); β₂ is the trainer's optimizer and schedule (Eq. 7).  f_v and f_w are updated *inside*
  :meth:`TC2.compute_grads` by plain gradient descent with ``tc_lr`` (the form of Eq. 5), before stage 2, so that
  stage 2 uses the updated f_v, f_w as Algorithm 1 orders it (line 4 before line 5).  They are therefore not in
  :meth:`TC2.parameters` (the trainer's optimizer never sees them); :meth:`TC2.meta_parameters` lists them.
* **Bi-level form of Eq. 5.**  "f_v ← f′_v − α₃∇_{f′_v} L̄^q" read literally is a support step followed by a query
  step.  We implement it, like Eq. 7 (which writes ∇_{f_θ}), as the meta-gradient of L̄^q(ψ′(ψ)) w.r.t. the
  initial ψ (the paper calls both stages bi-level); the engine ``first_order`` gives ∇_{ψ′}L̄^q applied to ψ.
* **Per-task adaptation.**  Stage 1 adapts one ψ′ on all support sets (Eq. 4 averages the tasks inside one step);
  stage 2 adapts one θ^k per task (Eq. 6, "for each task"): one engine call per task.
* **Views.**  Views are i.i.d. augmentations (:func:`bilevel_ssl.augment.make_views`), so "randomly selecting
  m′ views of each sample" is the same in distribution as taking views 0..m′−1 as support.  A loss on a set of
  more than two views is the mean of the two-view objective over all pairs of them.
* **Teacher objectives** (BYOL, MoCo v2, DINO): the EMA teacher's backbone features of all views are computed once
  per step without gradient and calibrated with the ψ of the stage that uses them (ψ before the update in stage 1,
  after it in stage 2; V from the teacher's own batch statistics), so teacher heads see calibrated inputs like
  the student heads they average.
* **BatchNorm.**  One no-grad forward of the whole batch (all views, current θ and ψ) at the start of a step
  provides S and the outputs that update the objective's state, and is the only forward that advances the running
  statistics; every forward inside the engines runs on copies of the buffers (so ``aid_fd``'s repeated evaluations
  do not advance them either).
* **Data parallelism** (torchrun, :mod:`bilevel_ssl.distributed`): each rank splits its own shard into tasks and
  computes S from it (as BatchNorm normalises each rank's batch); ψ's stage-1 gradient is averaged over ranks
  before the in-place update, the encoder's gradient by the trainer (``distributed_reduction`` = "mean").
* **Ablations** (Table 12, ``variant``): ``no_lv`` / ``no_lw`` / ``no_lv_lw`` drop L_v / L_w / both from
  L_tc² in both stage-1 losses; ``no_bilevel`` evaluates the same support and query losses at the *same*
  parameters and descends their sum (stage 1: ψ ← ψ − α₃∇(L̄^s + L̄^q); stage 2: ∇_θ mean_k(L_ssl^s + L_sse^q)),
  the one-stage convention of GeSSL's ``joint`` variant (both are :class:`bilevel_ssl.bilevel.Joint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call
from torch.profiler import record_function

from .bilevel import BiLevelMethod, MetaArgs
from .hypergrad import set_grads
from .meta import SSLNet, allowed_n_tasks, check_n_tasks, take
from .objectives import Objective, Outputs
from .options import option
from .tc2_losses import (REDUCTIONS, FactorNet, WeightNet, batch_statistics, calibrate, l1_loss, loss_v, loss_w,
                         orthogonality_loss, reconstruction_loss, sse_loss)

__all__ = [
    "VARIANTS",
    "QUERY_LOSSES",
    "REDUCTIONS",
    "TC2Config",
    "allowed_n_tasks",
    "make_tasks",
    "split_views",
    "batch_statistics",
    "FactorNet",
    "WeightNet",
    "calibrate",
    "orthogonality_loss",
    "reconstruction_loss",
    "l1_loss",
    "loss_v",
    "loss_w",
    "sse_loss",
    "TC2",
]

VARIANTS = ("full", "no_lv", "no_lw", "no_lv_lw", "no_bilevel")
QUERY_LOSSES = ("sse", "ssl")


# --------------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class TC2Config(MetaArgs):
    """TC²'s options (``meta_args`` of a TrainConfig).  Paper values where the paper gives one, else ours.

    * ``n_tasks`` n_t = K = 4 - App. IV ("we construct four self-supervised tasks"), Table 13.
    * ``n_views`` m = 4, ``n_support`` m′ = 2 - *ours* (not given): two support and two query views per image, so
      a two-view objective can run on the support set and (``query_loss: ssl``) on the query set.
    * ``n_f`` = 0 means n_f = d, the paper's default (Table 9); any integer >= 1 sets it.
    * ``lambda_s`` λ_s = 0.1 - best for SimCLR in Table 10.
    * ``variant`` - ``full`` or a Table 12 ablation (:data:`VARIANTS`).
    * ``query_loss`` - what L_sse compares (:data:`QUERY_LOSSES`; see the module docstring).
    * ``inner_lr`` β₁ = 0.1, ``tc_inner_lr`` α₁ = α₂ = 0.1, ``tc_lr`` α₃ = α₄ = 0.05, ``inner_steps`` = 1 (one
      step in Eq. 4 and 6) - the rates are *ours* (the paper gives none), for losses on SimCLR's / BYOL's scale;
      Barlow Twins and VICReg (losses 10-25x larger) need about 0.004 for all three, as GeSSL's ``inner_lr`` in
      :data:`bilevel_ssl.experiments.RECIPES` (with the defaults one step sends ψ's gradient to ~4e7 there).
    * ``fv_hidden`` = 64, ``fw_hidden`` = 128 - widths of the two hidden layers of f_v and f_w (App. IV gives the
      depth, not the width; f_v's input and output layers have (d+1)·d and d·n_f units, hence the narrower
      hidden layers).
    * ``reduction`` - ``mean`` or the paper's ``sum`` (see the module docstring).
    * ``sse_normalize`` - L2-normalise ẑ before the squared errors of L_sse (scale-free, as BYOL's loss).
    """

    n_tasks: int = option(4, lo=1)
    n_views: int = option(4, lo=2)
    n_support: int = option(2, lo=1)
    n_f: int = option(0, lo=0, help="0: n_f = d")
    lambda_s: float = option(0.1, lo=0)
    variant: str = option("full", choices=VARIANTS)
    query_loss: str = option("sse", choices=QUERY_LOSSES)
    inner_lr: float = option(0.1, lo=0, lo_open=True)
    inner_steps: int = option(1, lo=1)
    tc_inner_lr: float = option(0.1, lo=0, lo_open=True)
    tc_lr: float = option(0.05, lo=0, lo_open=True)
    fv_hidden: int = option(64, lo=1)
    fw_hidden: int = option(128, lo=1)
    reduction: str = option("mean", choices=REDUCTIONS)
    sse_normalize: bool = option(True)

    what = "tc2 option"

    def __post_init__(self) -> None:
        super().__post_init__()
        n_query = self.n_views - self.n_support
        if self.n_support < 2 or n_query < 1:
            raise ValueError(f"meta_args.n_support: the support set needs >= 2 views per image (a pair for the SSL "
                             f"loss of Eq. 4/6) and the query set >= 1; allowed for n_views={self.n_views}: "
                             f"{', '.join(map(str, range(2, self.n_views))) or 'none (raise n_views)'}, got "
                             f"{self.n_support!r}")
        if self.query_loss == "ssl" and n_query < 2:
            raise ValueError(f"meta_args.n_views: query_loss 'ssl' runs the two-view objective on the query set, which "
                             f"needs >= 2 views per image; n_views - n_support = {n_query}; allowed n_views for "
                             f"n_support={self.n_support}: >= {self.n_support + 2}")

    def factors(self, d: int) -> int:
        """n_f for representations of dimension d (``n_f = 0`` means d)."""
        return d if self.n_f == 0 else self.n_f

    @property
    def uses_lv(self) -> bool:
        return self.variant not in ("no_lv", "no_lv_lw")

    @property
    def uses_lw(self) -> bool:
        return self.variant not in ("no_lw", "no_lv_lw")


# --------------------------------------------------------------------------------------------------------------------
# tasks (§Task Construction)


def make_tasks(batch_size: int, n_tasks: int) -> Tensor:
    """``(K, n)`` image indices of the K = ``n_tasks`` tasks: row k = task k, contiguous (the trainer already
    shuffles the batch).  Every task needs n >= 2 images (negatives / batch statistics of an SSL loss)."""
    check_n_tasks(batch_size, n_tasks, key="meta_args.n_tasks")
    return torch.arange(batch_size).view(n_tasks, batch_size // n_tasks)


def split_views(views: list[Tensor], n_support: int) -> tuple[list[Tensor], list[Tensor]]:
    """(support views, query views): views 0..m′−1 and m′..m−1 of every image (i.i.d. views: the same in
    distribution as a random choice of m′ views per image)."""
    if not 1 <= n_support < len(views):
        raise ValueError(f"meta_args.n_support: must be in 1..{len(views) - 1} for {len(views)} views, "
                         f"got {n_support!r}")
    return list(views[:n_support]), list(views[n_support:])


# --------------------------------------------------------------------------------------------------------------------
# the meta-method


class _Calibrated(nn.Module):
    """backbone -> ĥ = f_w(h)Vᵀ -> heads, one ``forward`` so :func:`torch.func.functional_call` can substitute the
    parameters of the network (``net.*``) and of f_w (``f_w.*``).  ``from_features``: ``x`` is already h."""

    def __init__(self, net: nn.Module, f_w: WeightNet):
        super().__init__()
        self.net = net
        self.f_w = f_w

    def forward(self, x: Tensor, v: Tensor, from_features: bool = False, heads: bool = True) -> dict[str, Tensor]:
        h = x if from_features else self.net.backbone(x)
        w = self.f_w(h)
        hc = calibrate(w, v)
        out = self.net.head_outputs(hc) if heads else {}
        return {"h": h, "w": w, "hc": hc, **out}


def _views(out: dict[str, Tensor], n: int) -> Outputs:
    parts = {k: t.chunk(n) for k, t in out.items()}
    return [{k: parts[k][i] for k in parts} for i in range(n)]


def _finite(xs) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


class TC2(BiLevelMethod):
    """TC²'s two-stage bi-level step around any two-view base objective (``meta: tc2`` in a TrainConfig).

    One step on a batch of B images with m views each (the trainer makes ``n_views = m``):

    0. No-grad forward of all views at (θ, ψ): the backbone features h give S (:func:`batch_statistics`) and the
       calibrated outputs update the objective's state after the step; the only forward that advances BatchNorm
       running statistics.
    1. Stage 1 (Eq. 4-5): ``engine(L̄^s, L̄^q, ψ, [])`` with the encoder and heads fixed (h precomputed, heads
       evaluated at the current θ) gives the meta-gradient of L̄^q(ψ′(ψ)); ψ ← ψ − ``tc_lr`` · it, in place.
    2. Stage 2 (Eq. 6-7): with V = f_v(S) and f_w held at the updated ψ, for every task k
       ``engine(L_ssl^s(·; B_k), L_sse^q(·; B_k), θ, [])`` gives ∂L_sse^q(θ^k(θ))/∂θ; their mean goes to ``.grad``
       of the network and the trainer's optimizer applies it (β₂ = the trainer's learning rate).

    θ = every parameter of the network (backbone and the objective's heads, through which L_ssl is computed).
    See the module docstring for the choices where the paper is silent.
    """

    name = "tc2"
    options = TC2Config
    one_stage_variant = "no_bilevel"
    unsupported_engines = {"momentum_proxy": "momentum_proxy keeps one EMA copy of its parameters between calls; TC² "
                                             "calls the engine for f_v/f_w and for every task"}
    trainer_updates = False  # ψ = f_v, f_w: updated inside the step (stage 1)
    code_modules = ("tc2", "tc2_losses")

    @classmethod
    def _check(cls, cfg, opts: TC2Config) -> None:
        make_tasks(cfg.batch_size, opts.n_tasks)
        from .objectives import OBJECTIVES, objective_class

        two_view = [o for o in OBJECTIVES if objective_class(o).n_views == 2]
        if cfg.objective not in two_view:
            raise ValueError(f"objective: tc2 needs a two-view (discriminative) objective; {cfg.objective} uses "
                             f"{objective_class(cfg.objective).n_views} view(s) (the G-SSL masking variant of TC² is "
                             f"not implemented); allowed: {', '.join(two_view)}")

    def __init__(self, objective: Objective, net: SSLNet, cfg):
        super().__init__(objective, net, cfg)
        d = net.backbone.feature_dim
        self.d, self.n_f = d, self.cfg.factors(d)
        self.own("f_v", FactorNet(d, self.n_f, self.cfg.fv_hidden))
        self.own("f_w", WeightNet(d, self.n_f, self.cfg.fw_hidden))
        self._wrap = _Calibrated(net, self.f_w)
        self._twrap = _Calibrated(self.teacher.net, self.f_w) if self.teacher is not None else None

    @property
    def n_views(self) -> int:
        return self.cfg.n_views

    def _pairs(self, outs: Outputs, t_outs: Outputs | None, tasks: Tensor) -> Tensor:
        """mean over tasks of (mean over the view pairs of the two-view objective on that task's images)."""
        losses = []
        for idx in tasks:
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            o, t = take(outs, sl), take(t_outs, sl)
            for a, b in combinations(range(len(o)), 2):
                losses.append(self.objective.loss([o[a], o[b]], None if t is None else [t[a], t[b]]))
        return torch.stack(losses).mean()

    def _sse(self, sup: Outputs, que: Outputs, tasks: Tensor) -> Tensor:
        c = self.cfg
        losses = []
        for idx in tasks:
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            losses.append(sse_loss([o["hc"][sl] for o in sup], [o["hc"][sl] for o in que],
                                   normalize=c.sse_normalize, reduction=c.reduction))
        return torch.stack(losses).mean()

    def _tc2(self, v: Tensor, w: Tensor, z_task: Tensor, z_all: Tensor, stash: dict | None) -> Tensor:
        """L_tc² = L_v + λ_s L_w (Eq. 3) with the variant's terms; L_w on the stage's rows."""
        c = self.cfg
        lv = loss_v(v, z_all, c.reduction)
        lw = loss_w(w, z_task, v, c.reduction)
        if stash is not None:
            stash.update(l_v=float(lv.detach()), l_w=float(lw.detach()),
                         orth=float(orthogonality_loss(v.detach(), c.reduction)),
                         l1=float(l1_loss(w.detach(), c.reduction)))
        total = torch.zeros((), dtype=v.dtype, device=v.device)
        if c.uses_lv:
            total = total + lv
        if c.uses_lw:
            total = total + c.lambda_s * lw
        return total

    # ------------------------------------------------------------------------------------------------ stage 1
    def _stage1_losses(self, net: SSLNet, h_sup: list[Tensor], h_que: list[Tensor], s: Tensor,
                       t_sup: Outputs | None, t_que: Outputs | None, tasks: Tensor):
        """L̄^s(ψ) (Eq. 4) and L̄^q(ψ) (Eq. 5) as closures over ψ = f_v + f_w parameters; θ fixed (detached)."""
        theta0 = [p.detach() for _, p in net.named_parameters()]
        z_all = torch.cat(h_sup + h_que)
        stash: dict = {}

        def run(psi, hs, heads):
            v = self._call("f_v", psi, s)
            fw = {f"f_w.{n}": t for n, t in self._split(psi)["f_w"].items()}
            tensors = {**self._net_tensors(net, theta0, prefix="net."), **fw}
            out = functional_call(self._wrap, tensors, (torch.cat(hs), v), {"from_features": True, "heads": heads})
            return v, _views(out, len(hs))

        def support_loss(psi, _phi):
            v, outs = run(psi, h_sup, True)
            ssl = self._pairs(outs, t_sup, tasks)
            tc = self._tc2(v, torch.cat([o["w"] for o in outs]), torch.cat(h_sup), z_all,
                           stash if "tc_ssl" not in stash else None)
            stash.setdefault("tc_ssl", float(ssl.detach()))
            return ssl + tc

        def query_loss(psi, _phi):
            if self.cfg.query_loss == "sse":
                v, outs = run(psi, h_sup + h_que, False)
                sup, que = outs[:len(h_sup)], outs[len(h_sup):]
                q = self._sse(sup, que, tasks)
            else:
                v, que = run(psi, h_que, True)
                q = self._pairs(que, t_que, tasks)
            tc = self._tc2(v, torch.cat([o["w"] for o in que]), torch.cat(h_que), z_all, None)
            stash.setdefault("tc_query", float(q.detach()))
            return q + tc

        return support_loss, query_loss, stash

    # ------------------------------------------------------------------------------------------------ stage 2
    def _stage2_losses(self, net: SSLNet, sup: list[Tensor], que: list[Tensor], v: Tensor,
                       t_sup: Outputs | None, t_que: Outputs | None):
        """L_ssl^s(θ; B_k) (Eq. 6) and L_sse^q(θ; B_k) (Eq. 7) of one task; f_v (through V) and f_w held."""
        fw = {f"f_w.{n}": p.detach() for n, p in self.f_w.named_parameters()}
        one = torch.arange(sup[0].shape[0]).view(1, -1)  # the task's images, as one task
        stash: dict = {}

        def run(theta, xs, heads):
            tensors = {**self._net_tensors(net, theta, prefix="net."), **fw}
            return _views(functional_call(self._wrap, tensors, (torch.cat(xs), v), {"heads": heads}), len(xs))

        def support_loss(theta, _phi):
            loss = self._pairs(run(theta, sup, True), t_sup, one)
            stash.setdefault("inner_ssl", float(loss.detach()))
            return loss

        def query_loss(theta, _phi):
            if self.cfg.query_loss == "sse":
                outs = run(theta, sup + que, False)
                return self._sse(outs[:len(sup)], outs[len(sup):], one)
            return self._pairs(run(theta, que, True), t_que, one)

        return support_loss, query_loss, stash

    # ---------------------------------------------------------------------------------------------- the step
    def _reduce_across_ranks(self, psi: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """torchrun: the mean of ψ's stage-1 gradient over ranks, so that every rank applies the same f_v, f_w
        update (the trainer all-reduces only the optimizer's parameters).  Done before the finiteness check: a
        non-finite value reaches every rank, and all of them stop together instead of waiting in a collective."""
        from .distributed import reduce_grads

        saved = [p.grad for p in psi]
        for p, g in zip(psi, grads):
            p.grad = g.detach()
        reduce_grads(psi, self.dist, "mean")
        reduced = [p.grad for p in psi]
        for p, g in zip(psi, saved):
            p.grad = g
        return reduced

    @torch.no_grad()
    def _teacher_outputs(self, h_t: Tensor | None, s_t: Tensor | None, m: int) -> Outputs | None:
        """The EMA teacher's outputs of all views: its backbone features h_t calibrated with the current f_v
        (on the teacher's own batch statistics S_t) and f_w, then its heads."""
        if h_t is None:
            return None
        return _views(self._twrap(h_t, self.f_v(s_t), from_features=True), m)

    def _step(self, net: SSLNet, views: list[Tensor]) -> dict[str, float]:
        c, m, ms = self.cfg, len(views), self.cfg.n_support
        if m != c.n_views:
            raise ValueError(f"tc2: expected {c.n_views} views per image (meta_args.n_views), got {m}")
        batch = views[0].shape[0]
        tasks = make_tasks(batch, c.n_tasks)
        x_all = torch.cat(views)
        # Each stage runs under a torch.profiler label (free without a profiler); its time is reported by
        # ``python -m bilevel_ssl.bench --stages tc2_second_order``.
        # 0. one no-grad forward: S, the objective-state outputs, the BatchNorm running statistics
        with record_function("tc2.stage0_forward"):
            with torch.no_grad():
                h_all = net.backbone(x_all)
                s = batch_statistics(h_all)
                v_old = self.f_v(s)
                student0 = _views(self._wrap(h_all, v_old, from_features=True), m)
                h_t = self.teacher.net.backbone(x_all) if self.teacher is not None else None
                s_t = batch_statistics(h_t) if h_t is not None else None
            hs = list(h_all.chunk(m))
            teacher_old = self._teacher_outputs(h_t, s_t, m)

        # 1. stage 1: f_v, f_w
        with record_function("tc2.stage1_psi"):
            psi = self.meta_parameters()
            t_sup, t_que = (None, None) if teacher_old is None else (teacher_old[:ms], teacher_old[ms:])
            sup1, que1, stash1 = self._stage1_losses(net, hs[:ms], hs[ms:], s, t_sup, t_que, tasks)
            hg = self._hypergradient(sup1, que1, psi, [], inner_lr=c.tc_inner_lr, inner_steps=c.inner_steps)
            psi_grads, tc_query = hg.theta_grads, hg.logs["outer_loss"]
            if self.dist is not None:
                psi_grads = self._reduce_across_ranks(psi, psi_grads)
            logs = {"tc_support": stash1.get("tc_ssl", float("nan")), "tc_query": tc_query,
                    **{k: stash1[k] for k in ("l_v", "l_w", "orth", "l1") if k in stash1},
                    "psi_grad_norm": self._grad_norm(psi_grads)}
            if not (_finite(psi_grads) and all(math.isfinite(x) for x in logs.values())):
                logs["loss"] = float("nan")  # the trainer stops before any update; ψ is left as it was
                return logs
            with torch.no_grad():
                for p, g in zip(psi, psi_grads):
                    p.sub_(c.tc_lr * g.to(p.dtype))

        # 2. stage 2: the encoder, with f_v and f_w held at their updated values
        with record_function("tc2.stage2_encoder"):
            with torch.no_grad():
                v_new = self.f_v(s)
            teacher_new = self._teacher_outputs(h_t, s_t, m)
            theta = [p for _, p in net.named_parameters()]
            grads = [torch.zeros_like(p) for p in theta]
            inner_ssl, outer = [], []
            for idx in tasks:
                sl = slice(int(idx[0]), int(idx[-1]) + 1)
                t_k = take(teacher_new, sl)
                sup2, que2, stash2 = self._stage2_losses(
                    net, [x[sl] for x in views[:ms]], [x[sl] for x in views[ms:]], v_new,
                    None if t_k is None else t_k[:ms], None if t_k is None else t_k[ms:])
                hg = self._hypergradient(sup2, que2, theta, [], inner_lr=c.inner_lr, inner_steps=c.inner_steps)
                g_k = hg.theta_grads
                outer.append(hg.logs["outer_loss"])
                inner_ssl.append(stash2.get("inner_ssl", float("nan")))
                for acc, g in zip(grads, g_k):
                    acc.add_(g.detach(), alpha=1.0 / len(tasks))
            set_grads(theta, grads)
        logs.update(loss=sum(outer) / len(outer), inner_ssl=sum(inner_ssl) / len(inner_ssl))
        self._remember(student0, teacher_old)
        return logs
