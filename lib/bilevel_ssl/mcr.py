"""MCR: CompMod with Meta Comprehensive Regularization (Guo, Ba, Hu, Si, Qiang, Shi, AAAI 2024; paper in
``shared/papers/mcr-meta-comprehensive-regularization.md``).

A plug-in around any two-view SSL objective L_ssl.  Per batch, the backbone features of the two views are fused
into a "comprehensive" representation ĥ_i = h¹_i ⊕ h²_i (Eq. 5), mapped by the CompMod g_ξ (2d′ → d′ → d) to
ẑ_i in the embedding space, and two maximum-entropy-coding terms tie everything together:

    L_comp(Ẑ)       = −Tr(μ Σ_{k=1}^m (−1)^{k+1}/k (λ Ẑ Ẑᵀ)^k)                 (Eq. 6)  ≈ −μ log det(I + λ Ẑ Ẑᵀ)
    L_mcr(Z1, Z2)   = −Σ_{t=1,2} Tr(μ Σ_{k=1}^m (−1)^{k+1}/k (λ Ẑ Z_tᵀ)^k)    (Eq. 7)  ≈ −μ Σ_t log det(I + λ Ẑ Z_tᵀ)

trained by the two-step update of Algorithm 1:

    {θ, φ} ← {θ, φ} − r ∇_{θ,φ} (L_ssl + λ1 L_mcr)                           (Eq. 8, ξ fixed)
    ξ      ← ξ − r ∇_ξ (L_ssl(θ_ξ, φ_ξ) + λ2 L_comp),  θ_ξ, φ_ξ = the step of Eq. 8 as a function of ξ    (Eq. 9)

What implements which equation:

* :func:`taylor_logdet` - the truncated series Σ_{k≤m} (−1)^{k+1}/k Tr((λ A Bᵀ)^k) shared by Eq. 6-7, with the
  convergence guard (:func:`series_bound`, :func:`series_radius`, :func:`check_series`).
* :func:`comp_loss` (Eq. 6), :func:`mcr_loss` (Eq. 7); :func:`coding_mu`, :func:`default_lam` their defaults.
* :class:`CompMod` - g_ξ; :func:`fuse` - the fusion strategies of Eq. 5 (representation space, "M(h)"), Eq. 12
  (embedding space, "M(z)") and Eq. 11 (mixup), compared in Table 7.
* :class:`MCRConfig` - the options (``meta_args``), validated; :class:`MCR` - the meta-method (``meta: mcr``).

The augmentation subsets of Table 4 (an experiment, not part of the method) are in :mod:`bilevel_ssl.experiments`.

**Convergence of the series.**  For a square matrix C, Σ_k (−1)^{k+1}/k Tr(C^k) = Tr log(I + C) = log det(I + C)
iff the spectral radius ρ(C) < 1 (the scalar series log(1 + x) = Σ (−1)^{k+1} x^k / k converges for |x| < 1 and
diverges for |x| > 1); for C = λ Ẑ Ẑᵀ (Eq. 6, symmetric PSD) ρ = λ‖Ẑ‖₂².  A cheap sufficient condition for both
equations is λ ‖A‖₂ ‖B‖₂ < 1 (ρ(C) ≤ ‖C‖₂ ≤ λ‖A‖₂‖B‖₂), and for L2-normalised rows ‖A‖₂² ≤ ‖A‖_F² = n, so

    **λ < 1/n (n = batch size) guarantees convergence for any batch of normalised embeddings**,

with equality reached by a fully collapsed batch (all rows equal).  The MEC authors' code uses order 4 and warms λ
up so that the series converges (``shared/reference-facts.md``); here λ is fixed below the bound instead (default
λ = 1/(2n)), which needs no warm-up.  :func:`taylor_logdet` raises :class:`SeriesDivergenceError` (or warns) when
ρ ≥ 1; :class:`MCR` checks the bound once per step and :meth:`MCRConfig.check_bound` rejects λ ≥ 1/batch_size
before compute.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .bilevel import FIRST_ORDER_ENGINES, FIRST_ORDER_WHY, BiLevelMethod, MetaArgs
from .hypergrad import set_grads
from .meta import SSLNet
from .objectives import Objective, Outputs
from .options import option

__all__ = [
    "ORDER",
    "FUSIONS",
    "VARIANTS",
    "CHECKS",
    "SeriesDivergenceError",
    "series_bound",
    "series_radius",
    "check_series",
    "taylor_logdet",
    "coding_mu",
    "default_lam",
    "comp_loss",
    "mcr_loss",
    "CompMod",
    "compmod_dims",
    "fuse",
    "MCRConfig",
    "MCR",
]

ORDER = 4  # Taylor order m of Eq. 6-7: the MEC authors' code uses 4 (shared/reference-facts.md)
FUSIONS = ("representation", "embedding", "mixup")  # Eq. 5 "M(h)", Eq. 12 "M(z)", Eq. 11 (Table 7)
VARIANTS = ("bilevel", "no_bilevel")  # Algorithm 1 / Table 7 "No bi-level"
CHECKS = ("error", "warn", "off")  # what a divergent Taylor series does


# --------------------------------------------------------------------------------------------------------------------
# the truncated log-det series (Eq. 6-7) and its convergence bound


class SeriesDivergenceError(ValueError):
    """The Taylor series of log det(I + λ·A·Bᵀ) diverges for these embeddings and this λ (ρ(λ·A·Bᵀ) ≥ 1)."""


def _check_pair(fn: str, a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{fn}: A and B must be (n, d) matrices of equal shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _check_lam(fn: str, lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"{fn}: lam must be a finite number > 0, got {lam!r}")
    return float(lam)


def _small_product(a: Tensor, b: Tensor) -> Tensor:
    """A·Bᵀ (n×n) or Bᵀ·A (d×d), whichever is smaller: both have the same non-zero eigenvalues and the same
    Tr(·^k) for every k (cyclic trace: Tr((ABᵀ)^k) = Tr(A (BᵀA)^{k−1} Bᵀ) = Tr((BᵀA)^k))."""
    return a @ b.T if a.shape[0] <= a.shape[1] else b.T @ a


def _spectral_norm(a: Tensor) -> float:
    """‖A‖₂ (largest singular value) from the eigenvalues of the smaller Gram matrix, in float64, no gradient."""
    a = a.detach().double()
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0.0).sqrt())


def series_bound(a: Tensor, b: Tensor, lam: float) -> float:
    """λ‖A‖₂‖B‖₂ - an upper bound on ‖λ·A·Bᵀ‖₂ and hence on the spectral radius ρ(λ·A·Bᵀ); equal to ρ for
    A = B (Eq. 6).  Below 1 the series of :func:`taylor_logdet` converges.  For L2-normalised rows it is ≤ λ·n."""
    _check_pair("series_bound", a, b)
    lam = _check_lam("series_bound", lam)
    na = _spectral_norm(a)
    return lam * na * (na if b is a else _spectral_norm(b))


def series_radius(a: Tensor, b: Tensor, lam: float) -> float:
    """ρ(λ·A·Bᵀ), the spectral radius (largest |eigenvalue|): the series of :func:`taylor_logdet` converges iff it
    is < 1.  Exact, from the eigenvalues of the smaller of A·Bᵀ and Bᵀ·A (float64, no gradient)."""
    _check_pair("series_radius", a, b)
    lam = _check_lam("series_radius", lam)
    c = _small_product(a.detach().double(), b.detach().double())
    if b is a:
        return lam * float(torch.linalg.eigvalsh(c).abs().max())
    return lam * float(torch.linalg.eigvals(c).abs().max())


def _divergence_message(rho: float, lam: float, n: int) -> str:
    return (f"the Taylor series of log det(I + λ·A·Bᵀ) (MCR Eq. 6-7) diverges: the spectral radius of λ·A·Bᵀ is "
            f"{rho:.4g} >= 1 with lam = {lam:.4g}.  It converges iff the radius is < 1, i.e. lam < "
            f"{lam / rho:.4g} for these embeddings; with L2-normalised rows lam < 1/n = {1.0 / n:.4g} (n = {n} rows) "
            f"always suffices.  Lower lam (meta_args.lam), or pass check='warn' to accept a divergent truncated series")


def check_series(a: Tensor, b: Tensor, lam: float, check: str = "error") -> float:
    """Guard of :func:`taylor_logdet`: returns :func:`series_bound` (≥ ρ); when that bound is ≥ 1 the exact
    :func:`series_radius` decides, and a radius ≥ 1 raises :class:`SeriesDivergenceError` (``check="error"``) or
    warns with a ``RuntimeWarning`` (``"warn"``).  ``"off"`` computes nothing and returns NaN."""
    if check not in CHECKS:
        raise ValueError(f"check: unknown value {check!r}; allowed: {', '.join(CHECKS)}")
    if check == "off":
        return float("nan")
    bound = series_bound(a, b, lam)
    if bound >= 1.0:
        rho = series_radius(a, b, lam)
        if rho >= 1.0:
            if check == "error":
                raise SeriesDivergenceError(_divergence_message(rho, lam, a.shape[0]))
            warnings.warn(_divergence_message(rho, lam, a.shape[0]), RuntimeWarning, stacklevel=3)
    return bound


def taylor_logdet(a: Tensor, b: Tensor | None = None, *, lam: float, order: int = ORDER, check: str = "error"
                  ) -> Tensor:
    """Σ_{k=1}^{order} (−1)^{k+1}/k · Tr((λ·A·Bᵀ)^k), the order-m Taylor series of log det(I + λ·A·Bᵀ) used by
    Eq. 6 (B = A = Ẑ) and Eq. 7 (A = Ẑ, B = Z_t).  ``a``, ``b``: ``(n, d)``; ``b`` defaults to ``a``.

    Computed on the smaller of the n×n matrix λ·A·Bᵀ and the d×d matrix λ·Bᵀ·A (same traces of every power).
    The series equals log det(I + λ·A·Bᵀ) in the limit order → ∞ iff ρ(λ·A·Bᵀ) < 1, with truncation error at most
    r·ρ^{m+1} / ((m+1)(1 − ρ)) (r = rank); ``check`` (:func:`check_series`) guards that condition.  Differentiable
    in ``a`` and ``b``."""
    b = a if b is None else b
    _check_pair("taylor_logdet", a, b)
    lam = _check_lam("taylor_logdet", lam)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"taylor_logdet: order must be an integer >= 1, got {order!r}")
    check_series(a, b, lam, check)
    c = lam * _small_product(a, b)
    total = torch.diagonal(c).sum()
    power = c
    for k in range(2, order + 1):
        if k < order:
            power = power @ c
            tr = torch.diagonal(power).sum()
        else:  # the last power is needed only through its trace: Tr(P·C) = Σ P ⊙ Cᵀ
            tr = (power * c.T).sum()
        total = total + ((-1.0) ** (k + 1) / k) * tr
    return total


def coding_mu(n: int, d: int) -> float:
    """μ = (n + d)/2, the constant of the lossy coding length (n + d)/2 · log det(I + d/(n ε²) Z Zᵀ) that MEC (and
    MCR's "code length of the lossy data coding", above Eq. 6) builds on.  The default μ of :class:`MCRConfig`."""
    return (n + d) / 2.0


def default_lam(n: int) -> float:
    """λ = 1/(2n): half the convergence bound 1/n for normalised rows (= the coding length's d/(n ε²) with
    ε² = 2d).  The default λ of :class:`MCRConfig`."""
    return 1.0 / (2.0 * n)


def _mu_lam(z: Tensor, mu: float | None, lam: float | None) -> tuple[float, float]:
    n, d = z.shape
    return (coding_mu(n, d) if mu is None else float(mu)), (default_lam(n) if lam is None else float(lam))


def comp_loss(z_hat: Tensor, *, mu: float | None = None, lam: float | None = None, order: int = ORDER,
              check: str = "error") -> Tensor:
    """Eq. 6: L_comp(Ẑ) = −μ · Σ_{k=1}^m (−1)^{k+1}/k Tr((λ Ẑ Ẑᵀ)^k) ≈ −μ log det(I + λ Ẑ Ẑᵀ), the (negative)
    coding length of the comprehensive embeddings Ẑ ``(n, d)``: minimising it maximises their entropy.
    ``mu``/``lam`` None: :func:`coding_mu` and :func:`default_lam` of Ẑ's shape."""
    mu, lam = _mu_lam(z_hat, mu, lam)
    return -mu * taylor_logdet(z_hat, z_hat, lam=lam, order=order, check=check)


def mcr_loss(z_hat: Tensor, z1: Tensor, z2: Tensor, *, mu: float | None = None, lam: float | None = None,
             order: int = ORDER, check: str = "error") -> Tensor:
    """Eq. 7: L_mcr = −μ · Σ_{t=1,2} Σ_{k=1}^m (−1)^{k+1}/k Tr((λ Ẑ Z_tᵀ)^k) ≈ −μ Σ_t log det(I + λ Ẑ Z_tᵀ).
    Its first-order term −μλ Σ_t Σ_i ⟨ẑ_i, z^t_i⟩ pulls each view's embedding towards the comprehensive one (the
    paper: "it is necessary for Z_t to be equal to Ẑ").  ``mu``/``lam`` None as in :func:`comp_loss`."""
    mu, lam = _mu_lam(z_hat, mu, lam)
    return -mu * sum(taylor_logdet(z_hat, z, lam=lam, order=order, check=check) for z in (z1, z2))


# --------------------------------------------------------------------------------------------------------------------
# CompMod and the fusion strategies (Eq. 5, 11, 12)


class CompMod(nn.Module):
    """g_ξ: ``in_dim → hidden_dim → out_dim``, ``Linear → ReLU → Linear``.

    The paper: "The CompMod consists of a multi-layer linear network, which is set to 2d′ − d′ − d" (Experimental
    Setting).  Choice: a ReLU between the two layers (the usual reading of a projection head; two stacked linear
    maps without it are one linear map of rank ≤ d′) and no BatchNorm, so that g_ξ is a pure function of ξ - the
    hypergradient engines evaluate it at substituted parameters without running statistics to handle."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        for key, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CompMod: {key} must be an integer >= 1, got {v!r}")
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"CompMod: input must be (n, {self.in_dim}), got {tuple(x.shape)}")
        return self.net(x)


def compmod_dims(fusion: str, feature_dim: int, embed_dim: int) -> tuple[int, int, int]:
    """(in, hidden, out) of g_ξ per fusion: ``representation`` 2d′ → d′ → d (Eq. 5, "2d′ − d′ − d"),
    ``embedding`` 2d → d → d (Eq. 12, "2d − d − d"), ``mixup`` d′ → d′ → d (Eq. 11 fuses into R^{d′}; the
    hidden width d′ of the representation-space CompMod is kept)."""
    if fusion == "representation":
        return 2 * feature_dim, feature_dim, embed_dim
    if fusion == "embedding":
        return 2 * embed_dim, embed_dim, embed_dim
    if fusion == "mixup":
        return feature_dim, feature_dim, embed_dim
    raise ValueError(f"fusion: unknown value {fusion!r}; allowed: {', '.join(FUSIONS)}")


def fuse(fusion: str, h1: Tensor, h2: Tensor, z1: Tensor, z2: Tensor, alpha: float | Tensor | None = None
         ) -> Tensor:
    """The CompMod input of one batch: ``representation`` [h¹ h²] (Eq. 5), ``embedding`` [z¹ z²] (Eq. 12),
    ``mixup`` α·h¹ + (1 − α)·h² (Eq. 11; ``alpha`` a number in [0, 1] or an ``(n, 1)`` tensor, one α per sample)."""
    if fusion == "representation":
        return torch.cat([h1, h2], dim=1)
    if fusion == "embedding":
        return torch.cat([z1, z2], dim=1)
    if fusion == "mixup":
        if alpha is None:
            raise ValueError("fuse: fusion 'mixup' needs alpha (a number in [0, 1] or an (n, 1) tensor)")
        return alpha * h1 + (1.0 - alpha) * h2
    raise ValueError(f"fusion: unknown value {fusion!r}; allowed: {', '.join(FUSIONS)}")


# --------------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class MCRConfig(MetaArgs):
    """MCR's options (``meta_args`` of ``meta: mcr``).  Paper values where the paper gives one; the rest ours.

    * ``lambda1`` = 0.01, ``lambda2`` = 0.1 - weights of L_mcr (Eq. 8) and L_comp (Eq. 9).  Not stated for Table 1;
      Table 6's best cell (λ1 = 0.01, λ2 = 0.1: 93.91) is exactly Table 1's SimCLR+ CIFAR-10 accuracy, so that is
      the setting the paper reports.
    * ``mu`` μ, ``lam`` λ of Eq. 6-7 - not given.  None: μ = (n + d)/2 (:func:`coding_mu`, the lossy coding length
      constant) and λ = 1/(2n) (:func:`default_lam`, half the convergence bound; see the module docstring).
    * ``order`` m = 4 - the MEC authors' Taylor order (reference-facts).
    * ``fusion`` = "representation" - Eq. 5, the paper's method ("M(h)"); "embedding" (Eq. 12), "mixup" (Eq. 11).
    * ``mixup_alpha`` - α of Eq. 11: None draws α ~ U(0, 1) per sample and step (the text of Eq. 11); a number fixes
      it (Table 7's columns 0.1 … 0.9).  Only with ``fusion: mixup``.
    * ``variant`` = "bilevel" (Algorithm 1) or "no_bilevel" (Table 7's row; see :class:`MCR`).
    * ``inner_lr`` - r of the virtual step θ_ξ (Eq. 9).  None: the trainer's ``lr``, the same r as the real
      update of Eq. 8, so θ_ξ is (up to momentum and weight decay) the step θ actually takes.
    * ``normalize`` = True - L2-normalise the rows of Ẑ, Z1, Z2 before Eq. 6-7 (MEC normalises its embeddings;
      it is also what makes λ < 1/n a convergence guarantee).
    * ``detach_target`` = True - Ẑ is a *target* in the θ-step: the CompMod input (h or z) is detached, so Eq. 8
      moves Z_t towards Ẑ and not Ẑ (through h) towards Z_t.  Reason: "when Ẑ is predetermined and carries maximal
      information content, in order to minimize Eq. 7, it is necessary for Z_t to be equal to Ẑ" (below Eq. 7).
      Ẑ still depends on ξ, which is what carries ξ's hypergradient through θ_ξ (Eq. 9).  L_comp (Eq. 9, ξ only)
      always reads a detached input.
    * ``check`` = "error" - a divergent series raises (:class:`SeriesDivergenceError`); "warn", "off".
    * ``allow_untrained_meta`` = False - *ours*: with ``lambda2: 0`` the outer loss does not use ξ, so
      ``first_order`` / ``momentum_proxy`` give CompMod exactly zero gradient; ``check_config`` refuses such a run
      unless this is True.
    """

    lambda1: float = option(0.01, lo=0)
    lambda2: float = option(0.1, lo=0)
    mu: float | None = option(None, lo=0, lo_open=True, help="None: (n + d)/2")
    lam: float | None = option(None, lo=0, lo_open=True, help="None: 1/(2n)")
    order: int = option(ORDER, lo=1, help="Taylor order m of Eq. 6-7")
    fusion: str = option("representation", choices=FUSIONS)
    mixup_alpha: float | None = option(None, lo=0, hi=1, help="None: α ~ U(0, 1) per sample")
    variant: str = option("bilevel", choices=VARIANTS)
    inner_lr: float | None = option(None, lo=0, lo_open=True, help="None: the trainer's lr")
    normalize: bool = option(True)
    detach_target: bool = option(True)
    check: str = option("error", choices=CHECKS)
    allow_untrained_meta: bool = option(False)

    what = "mcr option"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixup_alpha is not None and self.fusion != "mixup":
            raise ValueError(f"meta_args.mixup_alpha: only used with fusion 'mixup', got fusion {self.fusion!r}; "
                             f"allowed: null (default) or set fusion: mixup")

    def lam_for(self, n: int) -> float:
        return default_lam(n) if self.lam is None else float(self.lam)

    def check_bound(self, batch_size: int) -> None:
        """Reject, before compute, a λ for which the series can diverge on a batch of normalised embeddings
        (λ·n ≥ 1; see the module docstring).  Only with ``check: error`` and ``normalize: true`` (without
        normalisation the bound depends on the data and is checked per step)."""
        if self.check == "error" and self.normalize and self.lam_for(batch_size) * batch_size >= 1.0:
            raise ValueError(f"meta_args.lam: lam = {self.lam} with batch_size {batch_size} gives lam·n = "
                             f"{self.lam * batch_size:.4g} >= 1: the Taylor series of Eq. 6-7 can diverge (it "
                             f"converges iff ρ(λ·Ẑ·Z_tᵀ) < 1, and for L2-normalised rows ρ <= λ·n, reached by a "
                             f"collapsed batch); allowed: 0 < lam < 1/batch_size = {1.0 / batch_size:.4g}, or "
                             f"meta_args.check: warn / off to accept it")


# --------------------------------------------------------------------------------------------------------------------
# the meta-method


def _embed_dim(net: SSLNet) -> int:
    """d: the width of the projector's output z (one eval-mode forward of two zero features, no state changed)."""
    proj = net.heads["projector"]
    was = proj.training
    proj.eval()
    try:
        with torch.no_grad():
            p0 = next(proj.parameters())
            z = proj(torch.zeros(2, net.backbone.feature_dim, device=p0.device, dtype=p0.dtype))
    finally:
        proj.train(was)
    return int(z.shape[1])


class MCR(BiLevelMethod):
    """MCR around any two-view objective (``meta: mcr`` in a TrainConfig): Algorithm 1, one batch per step.

    One step on the two views x¹, x² of a batch of n images:

    1. **θ-step (Eq. 8).**  One forward of both views at θ (one BatchNorm batch; it updates the running statistics
       once per step, as plain training): L_ssl, the CompMod input (:func:`fuse`, detached by default: see
       :class:`MCRConfig` ``detach_target``), Ẑ = g_ξ(·), and L_mcr (Eq. 7).  θ = *all* network parameters (backbone
       f_θ and the objective's heads g_φ, BYOL's predictor included) gets ``.grad`` = ∇(L_ssl + λ1 L_mcr).
    2. **ξ-step (Eq. 9).**  ``inner_loss(θ, ξ)`` = L_ssl + λ1 L_mcr (the objective of Eq. 8) and
       ``outer_loss(θ', ξ)`` = L_ssl(θ') + λ2 L_comp(Ẑ(ξ)) go to the engine ``cfg.hypergrad``
       (:mod:`bilevel_ssl.hypergrad`) with inner_lr = r and one inner step: θ_ξ = θ − r∇_θ inner_loss(θ, ξ), and
       ξ.grad = d outer/dξ - for ``second_order`` exactly ∂_ξ(λ2 L_comp) − r ∇²_{ξθ}(λ1 L_mcr) · ∇_θ' L_ssl(θ').
       The engine's θ-gradient is not used: θ follows Eq. 8.
    3. The trainer's optimizer applies both (so ξ's r is the trainer's learning rate, as θ's).

    Choices where the paper is silent (each tested in ``tests/test_mcr.py``):

    * **Which Ẑ in L_comp.**  Algorithm 1 computes ẑ once per batch (line 8) before the update; L_comp in Eq. 9
      uses that Ẑ - from the features at the current θ (detached: L_comp trains ξ only), with ξ free.
    * **Same batch** for the inner and outer losses (Algorithm 1 has one batch X per iteration).
    * **BatchNorm.**  The engine's forwards run on copies of the buffers (batch statistics as in training, running
      statistics advanced only by step 1), however many times an engine evaluates the losses.
    * **Momentum teachers** (BYOL): the teacher's outputs are computed once per step and used by every L_ssl; EMA
      and objective state are updated after the optimizer step from step 1's outputs.
    * **Variant ``no_bilevel``** (Table 7): one ordinary backward of L_ssl + λ1 L_mcr + λ2 L_comp at θ: θ gets the
      same gradient as above, ξ gets ∇_ξ(λ1 L_mcr + λ2 L_comp) (single-level joint optimisation of one total loss).
      The other conceivable reading - ξ trained by λ2 L_comp alone - is the ``first_order`` engine (which drops
      the path through θ_ξ, leaving ξ only ∂_ξ outer = λ2 ∇L_comp).
    * **Convergence guard.**  The series bound (:func:`series_bound`) of the three pairs (Ẑ,Ẑ), (Ẑ,Z1), (Ẑ,Z2) is
      checked once per step on step 1's embeddings (the inner loss at θ evaluates the same matrices) and logged as
      ``taylor_bound``; with the default λ it is ≤ 1/2.
    """

    name = "mcr"
    options = MCRConfig
    code_modules = ("mcr",)

    @classmethod
    def _check(cls, cfg, opts: MCRConfig) -> None:
        opts.check_bound(cfg.batch_size)
        from .objectives import objective_class

        if objective_class(cfg.objective).n_views != 2 or cfg.objective == "mae":
            raise ValueError(f"objective: mcr needs a two-view discriminative objective with embeddings z (it fuses "
                             f"the two views' features); got {cfg.objective!r}")

    @classmethod
    def _untrained_meta(cls, cfg, opts: MCRConfig) -> str | None:
        if cfg.hypergrad in FIRST_ORDER_ENGINES and opts.variant == "bilevel" and opts.lambda2 == 0:
            return "with lambda2 = 0 CompMod's ξ enters only the inner loss; " + FIRST_ORDER_WHY
        return None

    def __init__(self, objective: Objective, net: SSLNet, cfg):
        super().__init__(objective, net, cfg)
        self.inner_lr = float(cfg.lr if self.cfg.inner_lr is None else self.cfg.inner_lr)
        self.feature_dim, self.embed_dim = net.backbone.feature_dim, _embed_dim(net)
        self.own("compmod", CompMod(*compmod_dims(self.cfg.fusion, self.feature_dim, self.embed_dim)))

    @property
    def n_views(self) -> int:
        return 2

    # ------------------------------------------------------------------------------------------------ pieces
    def _alpha(self, n: int, like: Tensor) -> float | Tensor | None:
        """Eq. 11's α for this step: the fixed ``mixup_alpha``, or α ~ U(0, 1) per sample drawn once per step from
        torch's global RNG (on the CPU, then moved: the same numbers on any device; the trainer checkpoints it)."""
        if self.cfg.fusion != "mixup":
            return None
        if self.cfg.mixup_alpha is not None:
            return float(self.cfg.mixup_alpha)
        return torch.rand(n, 1).to(device=like.device, dtype=like.dtype)

    def _compmod_input(self, outs: Outputs, alpha) -> Tensor:
        return fuse(self.cfg.fusion, outs[0]["h"], outs[1]["h"], outs[0]["z"], outs[1]["z"], alpha)

    def _norm(self, z: Tensor) -> Tensor:
        return F.normalize(z, dim=1) if self.cfg.normalize else z

    def _mcr(self, z_hat: Tensor, outs: Outputs) -> Tensor:
        c = self.cfg
        return mcr_loss(self._norm(z_hat), self._norm(outs[0]["z"]), self._norm(outs[1]["z"]), mu=c.mu,
                        lam=c.lam_for(z_hat.shape[0]), order=c.order, check="off")

    def _comp(self, z_hat: Tensor) -> Tensor:
        c = self.cfg
        return comp_loss(self._norm(z_hat), mu=c.mu, lam=c.lam_for(z_hat.shape[0]), order=c.order, check="off")

    def _guard(self, z_hat: Tensor, outs: Outputs) -> float:
        """The convergence check of the three series of this step (see the class docstring); returns the largest
        :func:`series_bound` (NaN with ``check: off``)."""
        if self.cfg.check == "off":
            return float("nan")
        zh = self._norm(z_hat.detach())
        lam = self.cfg.lam_for(zh.shape[0])
        return max(check_series(zh, b, lam, self.cfg.check)
                   for b in (zh, self._norm(outs[0]["z"].detach()), self._norm(outs[1]["z"].detach())))

    # ---------------------------------------------------------------------------------------------- the step
    def _step(self, net: SSLNet, views: list[Tensor]) -> dict[str, float]:
        if len(views) != 2:
            raise ValueError(f"mcr: needs 2 views per image, got {len(views)}")
        c = self.cfg
        x, n = torch.cat(views), views[0].shape[0]
        teacher = self.objective.outputs(self.teacher, x, 2) if self.teacher is not None else None
        theta = [p for _, p in net.named_parameters()]
        xi = self.meta_parameters()
        alpha = self._alpha(n, x)

        # step 1 (Eq. 8) at θ: the real forward
        student = self.objective.outputs(net, x, 2)
        ssl = self.objective.loss(student, teacher)
        comp_in = self._compmod_input(student, alpha).detach()
        z_hat = self.compmod(comp_in if c.detach_target else self._compmod_input(student, alpha))
        bound = self._guard(z_hat, student)
        mcr = self._mcr(z_hat, student)
        logs = {"loss": ssl.item(), "mcr": mcr.item()}
        if c.check != "off":  # (the trainer rejects non-finite logs)
            logs["taylor_bound"] = bound

        if c.variant == "no_bilevel":
            comp = self._comp(z_hat if c.detach_target else self.compmod(comp_in))
            grads = self._grads(ssl + c.lambda1 * mcr + c.lambda2 * comp, theta + xi)
            g_theta, g_xi = grads[:len(theta)], grads[len(theta):]
            logs["comp"] = comp.item()
        else:
            g_theta = self._grads(ssl + c.lambda1 * mcr, theta)
            inner, outer, stash = self._losses(net, x, teacher, comp_in, alpha)
            hg = self._hypergradient(inner, outer, theta, xi, inner_lr=self.inner_lr, inner_steps=1)
            g_xi = hg.phi_grads
            logs.update(comp=stash["comp"], outer_ssl=stash["outer_ssl"], outer_loss=hg.logs["outer_loss"])
        set_grads(theta, g_theta)
        set_grads(xi, g_xi)
        logs["xi_grad_norm"] = self._grad_norm(g_xi)
        self._remember(student, teacher)
        return logs

    def _losses(self, net: SSLNet, x: Tensor, teacher: Outputs | None, comp_in: Tensor, alpha):
        """inner_loss(θ, ξ) = L_ssl + λ1 L_mcr (Eq. 8's objective) and outer_loss(θ′, ξ) = L_ssl(θ′) + λ2 L_comp
        (Eq. 9) as closures over lists of tensors, for the hypergradient engine."""
        c = self.cfg
        stash: dict = {}

        def forward(theta: list[Tensor]) -> Outputs:  # running statistics: step 1's job
            return self.objective.outputs(self._functional(net, theta), x, 2)

        def g(xi: list[Tensor], inp: Tensor) -> Tensor:
            return self._call("compmod", xi, inp)

        def inner_loss(theta, xi):
            outs = forward(theta)
            z_hat = g(xi, comp_in if c.detach_target else self._compmod_input(outs, alpha))
            return self.objective.loss(outs, teacher) + c.lambda1 * self._mcr(z_hat, outs)

        def outer_loss(theta, xi):
            ssl = self.objective.loss(forward(theta), teacher)
            comp = self._comp(g(xi, comp_in))
            stash.update(outer_ssl=ssl.item(), comp=comp.item())
            return ssl + c.lambda2 * comp

        return inner_loss, outer_loss, stash
