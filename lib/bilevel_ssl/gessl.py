"""GeSSL: mini-batch tasks, the discriminative loss L_disc, the threshold network g and the meta-method.

GeSSL (Qiang et al., "On the Universality of Self-Supervised Learning", ICLR 2026 submission; paper in
``shared/papers/gessl-universality-of-ssl.md``) wraps any SSL objective L_ssl in a bi-level, MAML-like step.  A
batch of B images is cut into m *tasks* ("mini-batches") of n = B/m pairs; each pair i of task l is a triplet of
views {x¹_i, x²_i, x^anchor_i} of one image.  Each task is split *at the pair level* into a support set
{x¹_i, x^anchor_i} and a query set {x²_i, x^anchor_i} (§3.2).  The inner loop adapts the encoder f on the support
sets with L_ssl + μ·L_disc (g fixed); the outer loop updates f and g with L_ssl of the adapted f' on the query sets:

    min_{f,g} Σ_l L_ssl(f', Q_l)   s.t.  f' = argmin_f Σ_l [L_ssl(f, S_l) + μ·L_disc(f, g, S_l)]      (Eq. 1)
    f' = f − α ∇_f Σ_l [L_ssl(f, S_l) + μ·L_disc(f, g, S_l)]            (Eq. 4, ς = 1 step in the paper)
    f ← f − β Σ_l ∇_f L_ssl(f'(f, g), Q_l);   g ← g − β Σ_l ∇_g L_ssl(f'(f, g), Q_l)              (Eq. 5)

The hypergradient of the bi-level step comes from an engine of :mod:`bilevel_ssl.hypergrad`; the plumbing shared
with the other bi-level methods from :class:`bilevel_ssl.bilevel.BiLevelMethod`.

Notation (App. A), for one task:

* n - pairs per task; m - tasks processed in parallel (App. G.3 and :data:`M`: m = 8).
* u_j = f(x¹_j) - embedding of the j-th support sample; v_i = f(x^anchor_i) - embedding of the i-th anchor.
* d_j^i = d(u_j, v_i) = 1 − cos(u_j, v_i) - cosine distance, in [0, 2].  As a matrix: ``D[i, j] = d_j^i``, *row i
  = anchor i, column j = support sample j*.  The diagonal holds the positive pairs (same image).
* a_i = g(statistics of {u_j − v_i}_{j=1..n}) - the adaptive threshold of anchor i (§3.2 below Eq. 2, App. C).
* μ - weight of L_disc (:data:`MU` = 0.7);  k - steepness of the sigmoid gate (:data:`K` = 30), both §5.2/Fig. 3-4.
* α, ς - inner learning rate and number of inner steps (:class:`GeSSLConfig`).

What implements which equation:

* :func:`make_tasks` - the task construction of §3.2 (support/query split: :meth:`GeSSL._losses`).
* :func:`cosine_distance_matrix` - the d_j^i of Eq. 2.
* :func:`disc_loss_hard` - Eq. 2 (indicator gate; gives a_i no gradient - kept for tests and teaching).
* :func:`disc_loss` - Eq. 3 (sigmoid gate w_ij = σ(k(a_i − d_j^i))), the loss GeSSL trains with.
* :class:`ThresholdNet` - g (App. C architecture; main-text and App. H.6 inputs), a_i on the [0, 2] distance scale.
* :class:`GeSSLConfig` - the hyper-parameters with their paper defaults, validated.
* :class:`GeSSL` - the meta-method (``meta: gessl``): L_disc(f, g, S_l) = :func:`disc_loss` of
  :func:`cosine_distance_matrix` and g's thresholds, inside the inner loss.

Two facts that shape the design (both follow directly from Eq. 3):

* ∂L_disc/∂a_i = Σ_j 2k·d_ij·w_ij(1 − w_ij) ≥ 0: minimising L_disc *itself* over g always lowers every threshold
  (down to "push everything apart").  That is why g is fixed in the inner loop and trained only through the outer
  loss (Eq. 5).  The gradient through g's *input* statistics pushes f the same way (towards lower thresholds);
  :class:`GeSSLConfig` ``g_detach`` says why GeSSL keeps it nonetheless.
* ∂L_disc/∂d_ij = (2w_ij − 1) − 2k·d_ij·w_ij(1 − w_ij): ≈ +1 well below the threshold (descent pulls the pair
  together), ≈ −1 well above (pushes apart), and a sharp extra push of −k·a_i/2 exactly at d_ij = a_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .bilevel import FIRST_ORDER_ENGINES, FIRST_ORDER_WHY, BiLevelMethod, MetaArgs
from .hypergrad import set_grads
from .meta import SSLNet, check_n_tasks, take
from .objectives import Objective, Outputs
from .options import option

__all__ = [
    "MU",
    "K",
    "M",
    "STATS",
    "REDUCTIONS",
    "GeSSLConfig",
    "make_tasks",
    "cosine_distance_matrix",
    "disc_loss_hard",
    "disc_loss",
    "ThresholdNet",
    "VARIANTS",
    "GeSSL",
]

MU = 0.7  # weight of L_disc; §5.2 "Parameter Sensitivity", Fig. 3 (searched over [0.3, 1.0])
K = 30.0  # steepness of the sigmoid gate of Eq. 3; §5.2, Fig. 4 (searched over [10, 50])
M = 8  # tasks per step; App. G.3 ("we also choose m = 8"), with n = 16 or 32 pairs per task
STATS = ("meanvar", "meancov")
REDUCTIONS = ("mean", "sum", "none")
VARIANTS = ("bilevel", "joint", "per_task")


# --------------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class GeSSLConfig(MetaArgs):
    """GeSSL's hyper-parameters (``meta_args`` of ``meta: gessl``).  Paper defaults where the paper gives one; the
    rest are ours (marked).

    * ``mu`` μ = 0.7, ``k`` = 30 - §5.2, Fig. 3-4.
    * ``m`` = 8 tasks per step - App. G.3.
    * ``inner_steps`` ς = 1 - §3.2 below Eq. 4 ("We set ς = 1 for computational convenience").
    * ``inner_lr`` α = 0.1 - *ours*: the paper never states α.
    * ``stats`` = "meanvar" - the inputs of g as App. C implements them (see :class:`ThresholdNet`).
    * ``reduction`` = "mean" - how L_disc averages its n² terms (see :func:`disc_loss`; the paper sums).
    * ``g_hidden`` = 64, ``cov_rank`` = 16 - *ours*: width of g and rank of its covariance projection (not given).
    * ``g_residual`` = True - *ours*: see :class:`ThresholdNet`.
    * ``g_detach`` = False - Eq. 4 read literally: ∇_f of μ·L_disc(f, g, S) includes the path through the
      statistics of f's embeddings that g reads.  The stop-gradient alternative (``True``, the App. C
      pseudo-label reading) makes the inner update a field that is not the gradient of any function; the
      "exact" second-order hypergradient of autograd then treats a_i as a constant while AID-FD/CG/Neumann,
      which differentiate the computed values, do not - the engines would estimate different quantities and the
      App. G.4 comparison would be meaningless.  Measured on a tiny net (``tests/test_gessl_method.py``): with
      ``False`` aid_fd matches second_order to 1e-7 in float64; with ``True`` they differ by 40%.
    * ``variant`` = "bilevel" - or an ablation of Fig. 11 (:data:`VARIANTS`, see :class:`GeSSL`).
    * ``allow_untrained_meta`` = False - *ours*: ``first_order`` and ``momentum_proxy`` give g exactly zero
      gradient (g enters only the inner loss), so such a run is refused by ``check_config`` unless this is True
      (an engine ablation that means it, e.g. notebook 13).
    """

    what = "gessl option"

    mu: float = option(MU, lo=0)
    k: float = option(K, lo=0, lo_open=True)
    m: int = option(M, lo=1)
    inner_steps: int = option(1, lo=1)
    inner_lr: float = option(0.1, lo=0, lo_open=True)
    stats: str = option("meanvar", choices=STATS)
    reduction: str = option("mean", choices=REDUCTIONS[:2])
    g_hidden: int = option(64, lo=1)
    cov_rank: int = option(16, lo=1)
    g_residual: bool = option(True)
    g_detach: bool = option(False)
    variant: str = option("bilevel", choices=VARIANTS)
    allow_untrained_meta: bool = option(False)

    def threshold_net(self, dim: int) -> "ThresholdNet":
        """The g these settings describe, for embeddings of size ``dim``."""
        return ThresholdNet(dim, stats=self.stats, hidden=self.g_hidden, cov_rank=self.cov_rank,
                            residual=self.g_residual, detach_input=self.g_detach)


# --------------------------------------------------------------------------------------------------------------------
# tasks (§3.2)


def make_tasks(n_images: int, m: int, generator: torch.Generator | None = None) -> Tensor:
    """Split a batch of ``n_images`` images into ``m`` tasks of n = n_images / m pairs (§3.2).

    Returns a ``(m, n)`` long tensor of image indices; row l is task l and the rows partition ``0..n_images-1``.
    Without ``generator`` the split is contiguous (``arange(B).view(m, n)``: the data loader already shuffles);
    with one, the images are dealt to tasks in a random order.  Each task needs n >= 2 pairs (an SSL loss needs
    another pair for negatives/variance; L_disc's set {u_j − v_i}_j would hold one vector).

    Raises ValueError naming ``m``, the batch size and the allowed values of m
    (:func:`bilevel_ssl.meta.check_n_tasks`).
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"gessl: the batch size must be an integer >= 1, got {n_images!r}")
    check_n_tasks(n_images, m, key="m")
    if generator is None:
        return torch.arange(n_images).view(m, n_images // m)
    return torch.randperm(n_images, generator=generator).view(m, n_images // m)


# --------------------------------------------------------------------------------------------------------------------
# Eq. 2-3


def cosine_distance_matrix(u: Tensor, v: Tensor, eps: float = 1e-8) -> Tensor:
    """d_j^i = 1 − cos(u_j, v_i) (the d of Eq. 2): ``u`` support embeddings f(x¹_j), ``v`` anchors f(x^anchor_i).

    ``u``: ``(..., n_u, d)``, ``v``: ``(..., n_v, d)`` (leading task dimensions broadcast).  Returns
    ``(..., n_v, n_u)`` with **row i = anchor i, column j = support sample j**.  Values in [0, 2] up to rounding
    (not clamped, so the gradient is the plain one); ``eps`` guards zero vectors.
    """
    if u.shape[-1] != v.shape[-1]:
        raise ValueError(f"cosine_distance_matrix: embedding sizes differ, u {tuple(u.shape)} vs v {tuple(v.shape)}")
    un, vn = F.normalize(u, dim=-1, eps=eps), F.normalize(v, dim=-1, eps=eps)
    return 1.0 - vn @ un.transpose(-1, -2)


def _check_da(fn: str, d: Tensor, a: Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction: unknown value {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    if d.dim() < 2 or a.shape != d.shape[:-1]:
        raise ValueError(f"{fn}: d must be (..., n, n) and a (..., n) with one threshold per row (anchor) of d, "
                         f"got d {tuple(d.shape)} and a {tuple(a.shape)}")


def _reduce(terms: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return terms.mean(dim=(-2, -1))
    if reduction == "sum":
        return terms.sum(dim=(-2, -1))
    return terms


def disc_loss_hard(d: Tensor, a: Tensor, reduction: str = "mean") -> Tensor:
    """Eq. 2: Σ_i Σ_j [1{d_ij ≤ a_i}·d_ij + 1{d_ij > a_i}·(−d_ij)] - pull pairs within the threshold, push the rest.

    ``d``: ``(..., n, n)`` from :func:`cosine_distance_matrix` (row i = anchor i), ``a``: ``(..., n)``.  The gate is
    a comparison, so ``a`` gets **no gradient** (not even a zero one: it is not in the graph) - the reason the paper
    replaces Eq. 2 by Eq. 3.  Reduction as in :func:`disc_loss`.
    """
    _check_da("disc_loss_hard", d, a, reduction)
    return _reduce(torch.where(d <= a.detach().unsqueeze(-1), d, -d), reduction)


def disc_loss(d: Tensor, a: Tensor, k: float = K, reduction: str = "mean") -> Tensor:
    """Eq. 3: Σ_i Σ_j [w_ij·d_ij + (1 − w_ij)·(−d_ij)] with w_ij = σ(k·(a_i − d_ij)), i.e. Σ (2w_ij − 1)·d_ij.

    ``d``: ``(..., n, n)`` (row i = anchor i, column j = support sample j), ``a``: ``(..., n)`` (one threshold per
    anchor), ``k`` > 0 the steepness (k → ∞ recovers Eq. 2 except at ties d_ij = a_i, where Eq. 3 gives 0).

    ``reduction`` - over the n² terms (i, j) of each task; leading (task) dimensions are kept, so a ``(m, n, n)``
    input gives the m per-task values L_disc(f, g, S_l) that Eq. 1/4 sums over l (a ``(n, n)`` input gives a
    scalar).  ``"none"`` returns the terms.

    Default ``"mean"``, a deliberate deviation from the paper's double sum.  The sum makes L_disc scale with n²
    (n = 16-32 pairs per task in App. G.3: 256-1024 terms, each in [−2, 2]), so the weight μ = 0.7 (§5.2, Fig. 3)
    would mean something different for every task size, and μ·L_disc would dwarf an L_ssl that - like SimCLR's
    NT-Xent and the other objectives here - is a mean over the batch (O(1)).  With the mean, L_disc ∈ [−2, 2] is on
    the scale of L_ssl whatever n is, which is the regime in which a weight like 0.7 is meaningful.  The paper's
    value corresponds to ``"sum"`` = n² × ``"mean"`` (use it, or μ·n², to reproduce the literal Eq. 3).
    """
    _check_da("disc_loss", d, a, reduction)
    if not k > 0:
        raise ValueError(f"disc_loss: k must be > 0, got {k!r}")
    w = torch.sigmoid(k * (a.unsqueeze(-1) - d))
    return _reduce(w * d + (1.0 - w) * (-d), reduction)


# --------------------------------------------------------------------------------------------------------------------
# g


class ThresholdNet(nn.Module):
    """g: per anchor i, statistics of the difference set {u_j − v_i}_{j=1..n} → threshold a_i ∈ (0, 2).

    ``forward(u, v)``: support embeddings ``u`` = f(x¹_j) and anchors ``v`` = f(x^anchor_i), each ``(..., n, dim)``
    (leading task dimensions allowed); returns ``a`` of shape ``(..., n)``.  Vectorised over anchors and tasks.

    Embeddings are L2-normalised first (App. C normalises z "before feeding z into downstream distance ...
    modules"), so the statistics live on the same unit sphere as the cosine distances they threshold.

    Inputs (``stats``):

    * ``"meanvar"`` (**default**) - concatenated per-dimension mean and variance of the difference set, as App. C
      ("How to integrate GeSSL in the ViT setting") describes the implemented g.  It is the only input the paper
      gives an architecture for, it costs O(n·dim), and the variance is the diagonal of the main text's covariance.
    * ``"meancov"`` - mean and covariance matrix (§3.2 below Eq. 2, App. H.6).  The dim×dim covariance is reduced
      to Pᵀ Σ P for a learned projection P (dim × r, r = min(``cov_rank``, dim), orthogonal init) and its upper
      triangle, r(r+1)/2 numbers, is fed (136 for r = 16).  A linear layer on vec(Σ) computes tr(WΣ); restricting
      W to rank r is the same kind of learned linear reduction, at O(n·dim·r) instead of dim² inputs (33k for
      dim = 256), and is computed from the projected centred samples without ever forming Σ.

    Both statistics are population ones (divide by n: defined for any n, and exact in the identity below).  Note
    mean_i = ū − v_i, while the variance/covariance of {u_j − v_i}_j equals that of {u_j}_j: the spread is a
    task-level input shared by all anchors, the mean is what makes a_i anchor-specific.  Features are rescaled
    (mean × √dim, variance/covariance × dim) to be O(1) for unit vectors of any dimension.

    Architecture (App. C): Linear(features → ``hidden``) → LayerNorm → GELU → Linear(hidden → 1) = r_i.

    Output scale and initialisation: a_i = 2·σ(b_i + r_i), on the cosine-distance range (0, 2) (a threshold outside
    [0, 2] would gate all pairs the same way).  With ``residual`` (default) the offset b_i = logit(d̄_i / 2) where
    d̄_i = ½(‖mean_i‖² + Σ_k var_k) is exactly the anchor's mean cosine distance to the support samples
    (½‖u − v‖² = 1 − cos for unit vectors) - a function of g's own inputs, no extra information.  The last layer is
    initialised at 1/100 of PyTorch's default scale and zero bias, so initially a_i ≈ d̄_i: closer-than-average
    samples are pulled, farther ones pushed, a balanced split at any stage of training.  (A constant start such as
    1.0 - what ``residual=False`` gives, a_i ≈ 2σ(0) = 1 - pulls *every* pair of an encoder whose features are all
    within 90° of each other, as post-ReLU features are at initialisation: a collapse pressure.)

    ``detach_input`` (default False, as GeSSL uses it): with True the statistics are computed from detached
    embeddings, so a_i depends on g's parameters only - the threshold as a pseudo-label, which App. C generates
    with copies outside backpropagation.  Since ∂L_disc/∂a_i ≥ 0 always, the gradient through g's input only pushes
    f to lower the thresholds (e.g. shrink the task's spread); GeSSL keeps it all the same because the detached
    version makes the engines estimate different quantities (:class:`GeSSLConfig` ``g_detach``).
    """

    def __init__(self, dim: int, stats: str = "meanvar", hidden: int = 64, cov_rank: int = 16,
                 residual: bool = True, detach_input: bool = False):
        super().__init__()
        if stats not in STATS:
            raise ValueError(f"ThresholdNet: stats: unknown value {stats!r}; allowed: {', '.join(STATS)}")
        for key, value in (("dim", dim), ("hidden", hidden), ("cov_rank", cov_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ThresholdNet: {key} must be an integer >= 1, got {value!r}")
        self.dim, self.stats, self.residual, self.detach_input = dim, stats, residual, detach_input
        if stats == "meancov":
            rank = min(cov_rank, dim)
            self.proj = nn.Parameter(nn.init.orthogonal_(torch.empty(dim, rank)))
            self.register_buffer("_triu", torch.triu_indices(rank, rank), persistent=False)
            n_features = dim + rank * (rank + 1) // 2
        else:
            n_features = 2 * dim
        self.n_features = n_features
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.zero_()

    def _moments(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean_i (..., n_v, dim), spread features (..., f), Σ_k var_k (...,)) of the difference sets."""
        if (u.dim() < 2 or v.dim() < 2 or u.shape[-1] != self.dim or v.shape[-1] != self.dim
                or u.shape[:-2] != v.shape[:-2]):
            raise ValueError(f"ThresholdNet: expected u (..., n, {self.dim}) and v (..., n, {self.dim}) with the same "
                             f"leading dims, got {tuple(u.shape)} and {tuple(v.shape)}")
        if self.detach_input:
            u, v = u.detach(), v.detach()
        u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        u_bar = u.mean(dim=-2, keepdim=True)
        mean = u_bar - v  # mean_j (u_j − v_i)
        centred = u - u_bar  # u_j − v_i − mean_i, the same for every anchor i
        var = centred.pow(2).mean(dim=-2)  # (..., dim)
        if self.stats == "meanvar":
            spread = var * self.dim
        else:
            q = centred @ self.proj  # (..., n, r)
            cov = q.transpose(-1, -2) @ q / q.shape[-2]  # Pᵀ Σ P, (..., r, r)
            spread = cov[..., self._triu[0], self._triu[1]] * self.dim
        return mean, spread, var.sum(dim=-1)

    def statistics(self, u: Tensor, v: Tensor) -> Tensor:
        """g's input features, ``(..., n_v, n_features)``: [mean_i · √dim, spread] per anchor i."""
        mean, spread, _ = self._moments(u, v)
        spread = spread.unsqueeze(-2).expand(*mean.shape[:-1], spread.shape[-1])
        return torch.cat([mean * math.sqrt(self.dim), spread], dim=-1)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        mean, spread, total_var = self._moments(u, v)
        spread = spread.unsqueeze(-2).expand(*mean.shape[:-1], spread.shape[-1])
        r = self.net(torch.cat([mean * math.sqrt(self.dim), spread], dim=-1)).squeeze(-1)
        if self.residual:
            mean_dist = 0.5 * (mean.pow(2).sum(dim=-1) + total_var.unsqueeze(-1))  # = mean_j d_ij (unit vectors)
            r = r + torch.logit(mean_dist / 2, eps=1e-4)
        return 2.0 * torch.sigmoid(r)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, stats={self.stats!r}, residual={self.residual}, detach_input={self.detach_input}"


class GeSSL(BiLevelMethod):
    """GeSSL's bi-level step around any two-view base objective (``meta: gessl`` in a TrainConfig).

    One step, for a batch of B images with three views each (x¹, x², anchor; the trainer makes ``n_views = 3``):

    1. The batch is cut into m tasks of n = B/m pairs (:func:`make_tasks`, a plain reshape: the batch is already
       shuffled).  Support S_l = (x¹, anchor), query Q_l = (x², anchor) of task l (§3.2).
    2. ``inner_loss(θ, φ)`` = mean_l L_ssl(θ; S_l) + μ · mean_l L_disc(θ, φ; S_l) (Eq. 4's objective), with θ = all
       parameters of the network (backbone f and the objective's heads: "f" in the paper includes the projector
       through which L_ssl is computed) and φ = the parameters of g.  L_disc and g read the *backbone* features h
       (App. C: "z = f(x)" is the encoder's representation; g's statistics are built from it).
    3. ``outer_loss(θ', φ)`` = mean_l L_ssl(θ'; Q_l) (Eq. 5).  φ reaches it only through θ'(θ, φ).
    4. The engine ``cfg.hypergrad`` (:mod:`bilevel_ssl.hypergrad`) returns ∂outer/∂θ and ∂outer/∂φ, written into
       ``.grad``; the trainer's optimizer then updates f, the heads and g together (β of Eq. 5 = the trainer's lr).

    Choices where the paper is silent or ambiguous (each tested in ``tests/test_gessl_method.py``):

    * **Σ_l vs mean_l.** Eq. 4-5 sum over the m tasks; we average, so that α and β keep the scale of a plain SSL
      step (a sum is the same with α, β multiplied by m).
    * **Forward passes.** All support images of all tasks go through the network in one forward (and the query
      images in another), so BatchNorm normalises over the whole batch; the losses are computed per task, so a
      contrastive L_ssl only sees the n pairs of its own task as negatives (the point of tasks).
    * **BatchNorm running statistics.** Only the outer (query) forward updates them; the inner forward(s) run on
      copies of the buffers, so eval-mode statistics advance once per step as in plain training, however many
      times an engine re-evaluates the inner loss (``aid_fd``: 3ς times).
    * **Momentum-teacher objectives** (BYOL, MoCo v2, DINO): the teacher (EMA of θ) produces the targets of all
      three views once per step, without gradient; the inner loop adapts the online network only; the EMA and
      the objective's state (queue, centre) are updated after the outer optimizer step, from the query outputs.
    * **First-order and momentum-proxy engines**: g gets *exactly zero* gradient from the outer loss (L_out does
      not contain g, and these engines drop the path through θ').  g then stays at its initialisation (modulo
      weight decay): these engines train a GeSSL without a learned threshold.  Logged as ``g_grad_norm``;
      :meth:`check_config` refuses such a run unless ``meta_args: {allow_untrained_meta: true}`` (#24).

    * **Generative objectives** (MAE, §3.2: "for G-SSL methods, the anchor of each pair is the source sample;
      x¹ and x² are generated from that anchor by applying two different masking operations"): one augmented view
      per image is the anchor; the support L_ssl reconstructs it from mask A, the query L_ssl from mask B (seeds
      drawn once per step from torch's RNG, so engines that re-evaluate a loss see the same masks); L_disc compares
      the representation of the mask-A encoding (u) with that of the full anchor (v).

    Variants (``meta_args.variant``), for the paper's Fig. 11 ablation:

    * ``bilevel`` (default) - the above: one f' adapted on the support sets of all tasks together (Eq. 4 sums
      over l inside one gradient step).
    * ``joint`` - one-stage: minimise inner_loss(θ, φ) + outer_loss(θ, φ) at θ itself, no adaptation, ordinary
      backward (:class:`bilevel_ssl.bilevel.Joint`; g then gets ∇_φ of μ·L_disc directly, which only lowers
      thresholds - see the module docstring).
    * ``per_task`` - a separate f'_l per task: θ'_l adapted on S_l alone, outer loss on Q_l with θ'_l, meta-
      gradients averaged over tasks (m engine calls on n pairs each).
    """

    name = "gessl"
    options = GeSSLConfig
    one_stage_variant = "joint"
    code_modules = ("gessl",)

    @classmethod
    def _check(cls, cfg, opts: GeSSLConfig) -> None:
        check_n_tasks(cfg.batch_size, opts.m, key="meta_args.m / batch_size")  # tasks of >= 2 pairs
        from .objectives import objective_class

        if objective_class(cfg.objective).n_views not in (1, 2):
            raise ValueError(f"objective: gessl needs a two-view (discriminative) or one-view masked (generative) "
                             f"objective; {cfg.objective} uses {objective_class(cfg.objective).n_views} views")

    @classmethod
    def _untrained_meta(cls, cfg, opts: GeSSLConfig) -> str | None:
        if cfg.hypergrad in FIRST_ORDER_ENGINES and opts.variant != cls.one_stage_variant:
            return "g enters only the inner loss; " + FIRST_ORDER_WHY
        return None

    def __init__(self, objective: Objective, net: SSLNet, cfg):
        super().__init__(objective, net, cfg)
        self.own("g", self.cfg.threshold_net(net.backbone.feature_dim))

    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def generative(self) -> bool:
        """G-SSL objective (MAE): one augmented view is the anchor, x¹ and x² are two random maskings of it."""
        return self.objective.n_views == 1

    @property
    def n_views(self) -> int:
        return 1 if self.generative else 3

    def _forward(self, net: SSLNet, theta: list[Tensor], x: Tensor, *, update_stats: bool,
                 mask_seed: int | None = None) -> tuple[Outputs, Tensor, Tensor]:
        """The network at parameters θ: (L_ssl outputs of the pair, u = f(x¹), v = f(anchor)).

        Discriminative: ``x`` = the x¹ (or x²) views and the anchors concatenated, one forward.  Generative: ``x``
        = the anchors; the objective masks them with a fixed seed (the same mask every time an engine
        re-evaluates the loss in one step), u = the masked encoding's representation, v = the full image's."""
        fnet = self._functional(net, theta, update_stats=update_stats)
        if not self.generative:
            outs = self.objective.outputs(fnet, x, 2)
            return outs, outs[0]["h"], outs[1]["h"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mask_seed)
            outs = self.objective.outputs(fnet, x, 1)
        return outs, outs[0]["h"], fnet.backbone(x)

    # ---------------------------------------------------------------------------------------------- the step
    def _losses(self, net, x1, x2, anchor, teacher: Outputs | None, m: int | None = None):
        """inner_loss and outer_loss closures for the batch cut into ``m`` tasks (default ``cfg.m``): support
        S_l = (x¹, anchor) and query Q_l = (x², anchor) of the contiguous tasks l (§3.2)."""
        cfg, m = self.cfg, m or self.cfg.m
        n = x1.shape[0] // m
        stash: dict = {}

        def per_task_ssl(outs: Outputs, t_outs: Outputs | None) -> Tensor:
            tasks = [slice(l * n, (l + 1) * n) for l in range(m)]
            return torch.stack([self.objective.loss(take(outs, sl), take(t_outs, sl)) for sl in tasks]).mean()

        t_sup = None if teacher is None else [teacher[0], teacher[2]]
        t_que = None if teacher is None else [teacher[1], teacher[2]]

        support, query = ((anchor, anchor) if self.generative else (torch.cat([x1, anchor]), torch.cat([x2, anchor])))
        # the two maskings of a generative objective, drawn once per step
        seeds = torch.randint(0, 2**62, (2,)).tolist() if self.generative else [None, None]

        def inner_loss(theta, phi):
            outs, u, v = self._forward(net, theta, support, update_stats=False, mask_seed=seeds[0])
            ssl = per_task_ssl(outs, t_sup)
            u, v = u.reshape(m, n, -1), v.reshape(m, n, -1)
            a = self._call("g", phi, u, v)
            disc = disc_loss(cosine_distance_matrix(u, v), a, k=cfg.k, reduction=cfg.reduction).mean()
            if "inner_ssl" not in stash:
                stash.update(inner_ssl=ssl.item(), disc=disc.item(), threshold=a.mean().item())
            return ssl + cfg.mu * disc

        def outer_loss(theta, phi):
            outs, _, _ = self._forward(net, theta, query, update_stats=True, mask_seed=seeds[1])
            stash["query"] = outs
            return per_task_ssl(outs, t_que)

        return inner_loss, outer_loss, stash

    def _per_task(self, net, x1, x2, anchor, teacher, theta, phi):
        """The ``per_task`` variant: one engine call per task, each adapting its own f'_l; gradients averaged."""
        m, n = self.cfg.m, x1.shape[0] // self.cfg.m
        grads_t = [torch.zeros_like(p) for p in theta]
        grads_p = [torch.zeros_like(p) for p in phi]
        stashes = []
        for l in range(m):
            sl = slice(l * n, (l + 1) * n)
            inner, outer, stash = self._losses(net, x1[sl], x2[sl], anchor[sl], take(teacher, sl), m=1)
            hg = self._hypergradient(inner, outer, theta, phi, inner_lr=self.cfg.inner_lr,
                                     inner_steps=self.cfg.inner_steps)
            for acc, g in zip(grads_t + grads_p, hg.theta_grads + hg.phi_grads):
                acc.add_(g, alpha=1.0 / m)
            stashes.append((stash, hg.logs))
        query = [{k: torch.cat([s["query"][v][k] for s, _ in stashes]) for k in stashes[0][0]["query"][v]}
                 for v in range(len(stashes[0][0]["query"]))]
        logs = {key: sum(s.get(key, float("nan")) for s, _ in stashes) / m
                for key in ("inner_ssl", "disc", "threshold")}
        logs["loss"] = sum(h["outer_loss"] for _, h in stashes) / m
        return grads_t, grads_p, query, logs

    def _step(self, net: SSLNet, views: list[Tensor]) -> dict[str, float]:
        x1, x2, anchor = views * 3 if self.generative else views
        teacher = (self.objective.outputs(self.teacher, torch.cat(views), 3) if self.teacher is not None else None)
        theta = [p for _, p in net.named_parameters()]
        phi = self.meta_parameters()
        if self.variant == "per_task":
            grads_t, grads_p, query, logs = self._per_task(net, x1, x2, anchor, teacher, theta, phi)
        else:  # bilevel, or joint (one stage: the Joint engine)
            inner, outer, stash = self._losses(net, x1, x2, anchor, teacher)
            hg = self._hypergradient(inner, outer, theta, phi, inner_lr=self.cfg.inner_lr,
                                     inner_steps=self.cfg.inner_steps)
            grads_t, grads_p, query = hg.theta_grads, hg.phi_grads, stash["query"]
            logs = {"loss": hg.logs["outer_loss"], **{k: stash[k] for k in ("inner_ssl", "disc", "threshold")
                                                       if k in stash}}
        set_grads(theta, grads_t)
        set_grads(phi, grads_p)
        logs["g_grad_norm"] = self._grad_norm(grads_p)
        self._remember(query, None if teacher is None else [teacher[1], teacher[2]])
        return logs
