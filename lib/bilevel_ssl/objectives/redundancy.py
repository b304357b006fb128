"""Redundancy-reduction objectives: Barlow Twins and VICReg.

Both are symmetric two-view objectives without negatives, teacher or state: the loss reads the projector outputs
``z`` of the two views only, and collapse is prevented by statistics of the batch (the cross-correlation matrix of
the two views for Barlow Twins; per-branch variance and covariance for VICReg).  The core formulas are the
module-level pure functions :func:`barlow_twins_loss` and :func:`vicreg_loss` (with :func:`cross_correlation` and
:func:`vicreg_terms` for the parts), so the bi-level methods can call them on any embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models import MLPHead
from . import Objective, Outputs

BN_EPS = 1e-5  # the epsilon of the (affine-free) BatchNorm that Barlow Twins applies to the embeddings


def _check_pair(name: str, z1: Tensor, z2: Tensor) -> None:
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"{name}: z1 and z2 must be (N, d) of equal shape, "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"{name}: batch statistics need N >= 2 samples, got N = {z1.shape[0]}")


def _off_diagonal(m: Tensor) -> Tensor:
    """The d(d-1) off-diagonal entries of a square matrix, as a flat tensor."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = BN_EPS) -> Tensor:
    """Barlow Twins' cross-correlation matrix C (Zbontar et al. 2021, Eq. 2), shape (d, d).

    Each embedding is normalised along the batch dimension - mean-centred and divided by its (biased, 1/N)
    standard deviation, i.e. an affine-free BatchNorm in training mode with variance epsilon ``eps`` - and
    ``C = z1_norm.T @ z2_norm / N``.  With ``eps = 0``, ``C_ij`` is exactly the Pearson correlation between unit i of
    view 1 and unit j of view 2 over the batch, which is Eq. 2 with mean-centred embeddings.
    """
    _check_pair("cross_correlation", z1, z2)
    n = z1.shape[0]
    z1n = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    z2n = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    return z1n.T @ z2n / n


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051, eps: float = BN_EPS) -> Tensor:
    """Barlow Twins (Zbontar et al. 2021, Eq. 1): ``Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²``, C from
    :func:`cross_correlation`.

    As in the paper the loss is a plain sum over the d diagonal and d(d-1) off-diagonal entries: it is *not* divided
    by d (or otherwise rescaled, as some implementations do), so its magnitude grows with the embedding dimension.
    Symmetric in the two views (``C(z2, z1) = C(z1, z2)ᵀ``).
    """
    c = cross_correlation(z1, z2, eps)
    on_diag = (1.0 - torch.diagonal(c)).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_terms(z1: Tensor, z2: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """The three unweighted VICReg terms (Bardes et al. 2022, Eqs. 1-5): (invariance, variance, covariance).

    * invariance ``s(Z, Z')``: the mean squared error over all N·d entries (``F.mse_loss``, as in the paper's
      Algorithm 1; Eq. 5 writes the squared distance summed over the d dimensions, i.e. d times this - λ = 25 is
      the coefficient of the per-entry mean);
    * variance ``v(Z) + v(Z')`` with ``v(Z) = (1/d) Σ_j max(0, γ - sqrt(Var(z^j) + ε))`` (Eq. 1; unbiased
      variance over the batch), summed over the two branches as in Eq. 6;
    * covariance ``c(Z) + c(Z')`` with ``c(Z) = (1/d) Σ_{i≠j} Cov(Z)_ij²`` (Eq. 4; ``Cov`` with the 1/(N-1)
      estimator, Eq. 3), summed over the two branches.
    """
    _check_pair("vicreg_terms", z1, z2)
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for z in (z1, z2):
        std = torch.sqrt(z.var(0) + eps)
        variance = variance + F.relu(gamma - std).mean()
        zc = z - z.mean(0)
        cov = zc.T @ zc / (n - 1)
        covariance = covariance + _off_diagonal(cov).pow(2).sum() / d
    return invariance, variance, covariance


def vicreg_loss(z1: Tensor, z2: Tensor, inv_coeff: float = 25.0, var_coeff: float = 25.0, cov_coeff: float = 1.0,
                gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg (Bardes et al. 2022, Eq. 6): ``λ s(Z, Z') + μ [v(Z) + v(Z')] + ν [c(Z) + c(Z')]``, terms as in
    :func:`vicreg_terms`.  Symmetric in the two views."""
    inv, var, cov = vicreg_terms(z1, z2, gamma, eps)
    return inv_coeff * inv + var_coeff * var + cov_coeff * cov


def _check_non_negative(obj: Objective, keys: tuple[str, ...]) -> None:
    for key in keys:
        if not getattr(obj, key) >= 0:
            raise ValueError(f"objective {obj.name}: {key} must be >= 0, got {getattr(obj, key)!r}")


@dataclass
class BarlowTwins(Objective):
    """Barlow Twins (Zbontar et al. 2021): two views, 3-layer projector, redundancy-reduction loss
    (:func:`barlow_twins_loss`) on the cross-correlation of the batch-normalised embeddings.

    * ``lambd`` λ = 0.0051, the authors' default (their released training script; the paper's implementation
      details state λ = 5·10⁻³ and its λ ablation shows a flat optimum around that value; tuned for d = 8192).
      The off-diagonal sum has d(d-1) terms, so at a smaller d the redundancy term weighs relatively less against
      the d invariance terms; λ is kept at the paper's value and can be raised through ``objective_args``.
    * Projector: three linear layers, the first two followed by BatchNorm and ReLU (implementation details), i.e.
      :class:`~bilevel_ssl.models.MLPHead` with ``layers=3``; the normalisation of the embeddings along the batch
      is part of the loss (affine-free BatchNorm, see :func:`cross_correlation`).  The paper uses 8192-8192-8192
      on ResNet-50's 2048-d features; the default here is 2048-2048-2048: an 8192-wide projector has ~134M
      parameters on top of a backbone of a few hundred thousand (conv4) to 11M (ResNet-18) parameters, and the
      8192 x 8192 correlation matrix would be estimated from batches of 32-256 images.  The paper's ablation of
      the projector dimensionality shows accuracy still rising with width at 8192, so 2048 trades some accuracy
      for a ~16x cheaper head; 2048 is also the width commonly used for CIFAR-scale reproductions.
    * Loss not rescaled (the paper's Eq. 1 sum; no division by d or constant factor); only the learning rate
      interacts with this overall scale.
    """

    lambd: float = 0.0051
    proj_hidden: int = 2048
    proj_dim: int = 2048

    name: ClassVar[str] = "barlow_twins"
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ("proj_hidden", "proj_dim")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative(self, ("lambd",))

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({"projector": MLPHead(feature_dim, self.proj_hidden, self.proj_dim, layers=3)})

    def loss(self, student: Outputs, teacher: Outputs | None = None) -> Tensor:
        return barlow_twins_loss(student[0]["z"], student[1]["z"], self.lambd)


@dataclass
class VICReg(Objective):
    """VICReg (Bardes et al. 2022): two views, 3-layer expander, variance-invariance-covariance loss
    (:func:`vicreg_loss`).

    * Coefficients λ = 25 (invariance), μ = 25 (variance), ν = 1 (covariance), γ = 1, ε = 1e-4: the paper's
      defaults (Sec. 3 for γ and ε, Sec. 4 implementation details for λ, μ, ν).  Variance and covariance terms
      are applied to each branch and summed (Eq. 6); some implementations average the two branches' variance
      terms instead (a factor 1/2 on μ) - not done here.
    * Plain SGD at this library's default lr (0.3) diverged within 5 steps (loss inf / nan) in 96-image MNIST-M
      smoke runs (batch 32, conv4 width 16) with both a 32-d and the default 2048-d expander: λ = μ = 25 and a
      covariance term quartic in z make the loss large and steep; lr 0.05 trained.  The paper uses LARS.
    * Expander: three linear layers, the first two followed by BatchNorm and ReLU (implementation details), i.e.
      :class:`~bilevel_ssl.models.MLPHead` with ``layers=3``.  The paper uses 8192-8192-8192 on ResNet-50; the
      default here is 2048-2048-2048 for the same reasons as Barlow Twins (an 8192-wide expander dwarfs a small
      backbone, and its 8192 x 8192 covariance is estimated from batches of 32-256 images); the paper reports
      accuracy growing with the expander width, so 2048 trades some accuracy for a ~16x cheaper head.
    """

    inv_coeff: float = 25.0
    var_coeff: float = 25.0
    cov_coeff: float = 1.0
    gamma: float = 1.0
    eps: float = 1e-4
    proj_hidden: int = 2048
    proj_dim: int = 2048

    name: ClassVar[str] = "vicreg"
    n_views: ClassVar[int] = 2
    positive: ClassVar[tuple[str, ...]] = ("gamma", "eps", "proj_hidden", "proj_dim")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative(self, ("inv_coeff", "var_coeff", "cov_coeff"))  # 0 = the paper's term ablations

    def heads(self, feature_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({"projector": MLPHead(feature_dim, self.proj_hidden, self.proj_dim, layers=3)})

    def loss(self, student: Outputs, teacher: Outputs | None = None) -> Tensor:
        return vicreg_loss(student[0]["z"], student[1]["z"], self.inv_coeff, self.var_coeff, self.cov_coeff,
                           self.gamma, self.eps)
