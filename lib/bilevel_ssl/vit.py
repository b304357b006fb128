"""A tiny Vision Transformer for 28-32 px images: MAE's encoder (He et al. 2022) at CPU scale.

Architecture (ViT, Dosovitskiy et al. 2021, as used by MAE, He et al. 2022 §3 and App. A.1):

* patch embedding: a ``patch_size`` x ``patch_size`` stride-``patch_size`` convolution (a linear map of each
  non-overlapping patch), tokens in row-major patch order;
* a learnable class token prepended; MAE App. A.1 appends this "auxiliary dummy token" so that linear probing
  and fine-tuning can read it as the class token;
* **fixed 2-D sine-cosine positional embeddings** (MAE App. A.1: "Our MAE adds positional embeddings (the
  sine-cosine version) to both the encoder and decoder inputs"); the class token gets the zero embedding, as in
  MAE's code.  Being fixed, they are computed for whatever grid the input has, so inputs of any size divisible by
  ``patch_size`` are accepted (``image_size`` only fixes the nominal grid, :attr:`ViT.grid`);
* ``depth`` pre-norm Transformer blocks, built from :class:`torch.nn.TransformerEncoderLayer` (``batch_first``,
  ``norm_first=True``, GELU, no dropout, LayerNorm eps 1e-6 as in MAE/timm), MLP width ``mlp_ratio * dim``
  (4, ViT/MAE), then a final LayerNorm (MAE App. A.1: "The encoder ends with LN").

Features for the evaluators, ``forward(x) -> (B, dim)``: the **class token after the final LayerNorm**.  This is
MAE's linear-probing choice (App. A.1/A.2; their ``main_linprobe.py`` reads the class token, whereas fine-tuning
defaults to global average pooling; MAE notes both work similarly).  ``forward_masked`` is MAE's encoder pass on a
random subset of patches (§3 "MAE encoder", random masking by sorting per-sample noise).

Initialisation as MAE's code: patch projection and all Linear layers (attention and MLP) Xavier-uniform with
zero bias, class token N(0, 0.02²), LayerNorms (1, 0).

Tiny defaults (dim 128, depth 4, heads 4, patch 4 on 28 px = 7x7 = 49 patches) are ours, for CPU runs; ViT-Tiny
proper is dim 192, depth 12, heads 3.

``feature_dim`` is a :class:`TokenDim`: an ``int`` (= ``dim``) that also carries the patch geometry
(``patch_size``, ``in_channels``), so an objective's ``heads(feature_dim)`` - which receives only the feature
dimension - can build MAE's decoder (its pixel predictor outputs ``patch_size² · in_channels`` values per patch).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["TokenDim", "ViT", "patchify", "unpatchify", "sincos_pos_embed_2d", "random_masking", "n_keep",
           "transformer_blocks", "init_mae_weights"]


class TokenDim(int):
    """An ``int`` (the token/feature dimension) carrying the patch geometry of the backbone it came from."""

    patch_size: int
    in_channels: int

    def __new__(cls, value: int, *, patch_size: int, in_channels: int):
        obj = super().__new__(cls, value)
        obj.patch_size = int(patch_size)
        obj.in_channels = int(in_channels)
        return obj

    def __getnewargs_ex__(self):  # pickling / deepcopy keep the geometry
        return (int(self),), {"patch_size": self.patch_size, "in_channels": self.in_channels}

    def __repr__(self) -> str:
        return f"TokenDim({int(self)}, patch_size={self.patch_size}, in_channels={self.in_channels})"


# ---------------------------------------------------------------------------------------------------- geometry
def _check_divisible(h: int, w: int, patch_size: int, what: str = "input") -> tuple[int, int]:
    if h % patch_size or w % patch_size:
        raise ValueError(f"ViT: {what} size {h}x{w} is not divisible by patch_size={patch_size}; "
                         f"image_size must be a multiple of patch_size")
    return h // patch_size, w // patch_size


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W) -> (B, N, p²·C)``: non-overlapping patches in row-major order, each flattened as
    (row-in-patch, column-in-patch, channel) - MAE's ``patchify`` layout (channel last)."""
    b, c, h, w = x.shape
    gh, gw = _check_divisible(h, w, patch_size)
    p = patch_size
    x = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, p(row), p(col), c
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int] | None = None) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p²·C) -> (B, C, gh·p, gw·p)``; ``grid`` = (gh, gw), default square."""
    b, n, d = patches.shape
    p = patch_size
    if d % (p * p):
        raise ValueError(f"unpatchify: patch vector length {d} is not a multiple of patch_size²={p * p}")
    c = d // (p * p)
    if grid is None:
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"unpatchify: {n} patches is not a square grid; pass grid=(rows, cols)")
        grid = (g, g)
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"unpatchify: grid {gh}x{gw} does not hold {n} patches")
    x = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)  # b, c, gh, p, gw, p
    return x.reshape(b, c, gh * p, gw * p)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], device=None, dtype=torch.float32) -> Tensor:
    """Fixed 2-D sine-cosine embedding ``(gh·gw, dim)`` (MAE App. A.1; Vaswani et al. 2017 per axis).

    The first ``dim/2`` channels encode the column index, the last ``dim/2`` the row index; each half is
    ``[sin(pos·ω_k), cos(pos·ω_k)]`` with ``ω_k = 10000^(-k/(dim/4))``, k = 0..dim/4-1.  ``dim`` must be a
    multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be a multiple of 4, got {dim}")
    gh, gw = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")

    def axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).to(device=device, dtype=dtype)


def n_keep(n: int, mask_ratio: float) -> int:
    """Patches kept visible out of ``n``: ``round(n·(1 − mask_ratio))``, at least 1, and at most ``n − 1`` when
    ``mask_ratio > 0`` (so a positive ratio always masks something and MAE's loss is defined).

    MAE's code truncates (``int``); rounding avoids floating-point truncation surprises (``10·(1 − 0.9)`` is
    0.9999..., which ``int`` turns into 0) and gives the same count at MAE's settings (e.g. 49 → 12 at 0.75).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio: must be in [0, 1), got {mask_ratio!r}")
    k = max(1, round(n * (1.0 - mask_ratio)))
    return min(k, n - 1) if mask_ratio > 0 and n > 1 else min(k, n)


def random_masking(tokens: Tensor, mask_ratio: float, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking (He et al. 2022 §3; their ``random_masking``): sort the noise, keep the
    patches with the :func:`n_keep` smallest noise values.

    ``tokens`` (B, N, D), ``noise`` (B, N).  Returns ``kept`` (B, K, D) in shuffled (ascending-noise) order,
    ``mask`` (B, N) with 0 = kept, 1 = masked, in the original patch order, and ``ids_restore`` (B, N), the inverse
    permutation: ``cat([kept, masked])`` gathered with ``ids_restore`` is back in patch order.
    """
    b, n, d = tokens.shape
    if noise.shape != (b, n):
        raise ValueError(f"random_masking: noise must be (B, N) = {(b, n)}, got {tuple(noise.shape)}")
    k = n_keep(n, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_kept = ids_shuffle[:, :k]
    kept = torch.gather(tokens, 1, ids_kept[..., None].expand(b, k, d))
    mask = torch.ones(b, n, device=tokens.device, dtype=tokens.dtype)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


# ------------------------------------------------------------------------------------------------------ blocks
def transformer_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    """``depth`` pre-norm Transformer encoder blocks (``nn.TransformerEncoderLayer``: batch_first, norm_first,
    GELU, no dropout, LayerNorm eps 1e-6), each built separately."""
    if dim % heads:
        raise ValueError(f"ViT: dim={dim} must be divisible by heads={heads}")
    return nn.ModuleList(
        nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                   layer_norm_eps=1e-6, batch_first=True, norm_first=True)
        for _ in range(depth))


def init_mae_weights(module: nn.Module) -> None:
    """MAE's ``_init_weights``: Linear Xavier-uniform / zero bias, LayerNorm (1, 0); the attention's packed
    q/k/v projection (``in_proj_weight``) Xavier-uniform over the whole (3d, d) matrix, as timm's ``qkv`` Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)


class ViT(nn.Module):
    """Tiny ViT encoder; ``forward(x) -> (B, dim)`` = class token after the final LayerNorm.

    Args: ``in_channels``, ``image_size`` (nominal side, must be divisible by ``patch_size``), ``patch_size``,
    ``dim`` (token width, multiple of 4 for the sin-cos embedding, divisible by ``heads``), ``depth`` (blocks),
    ``heads``, ``mlp_ratio`` (MLP hidden width / dim).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 28, patch_size: int = 4, dim: int = 128,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        for key, val in (("in_channels", in_channels), ("image_size", image_size), ("patch_size", patch_size),
                         ("dim", dim), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)):
            if not val > 0:
                raise ValueError(f"ViT: {key} must be > 0, got {val!r}")
        if image_size % patch_size:
            raise ValueError(f"ViT: image_size={image_size} is not divisible by patch_size={patch_size}")
        if dim % 4:
            raise ValueError(f"ViT: dim={dim} must be a multiple of 4 (2-D sine-cosine positional embedding)")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.dim = dim
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = transformer_blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_dim = TokenDim(dim, patch_size=patch_size, in_channels=in_channels)
        self.spec = {"name": "vit_tiny", "in_channels": in_channels, "image_size": image_size,
                     "patch_size": patch_size, "dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio}
        # MAE init: the patch projection like a Linear (Xavier on the flattened kernel), class token N(0, .02²)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        init_mae_weights(self.blocks)
        init_mae_weights(self.norm)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens plus positional embedding, ``(B, N, dim)``, and the grid (rows, cols)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ViT: expected (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        grid = _check_divisible(x.shape[2], x.shape[3], self.patch_size)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + sincos_pos_embed_2d(self.dim, grid, tokens.device, tokens.dtype), grid

    def _encode(self, tokens: Tensor) -> Tensor:
        """Prepend the class token (its positional embedding is zero), run the blocks and the final LayerNorm."""
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """All tokens after the final LayerNorm, ``(B, 1 + N, dim)`` (class token first)."""
        return self._encode(self._embed(x)[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_tokens(x)[:, 0]

    def forward_masked(self, x: Tensor, mask_ratio: float, noise: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """MAE's encoder pass on the visible patches only.

        ``noise`` (B, N): per-patch sort keys (lowest kept); None draws ``torch.rand`` from torch's global RNG on
        the CPU (moved to ``x.device``, so the masks do not depend on the device).  Returns ``latent``
        (B, 1 + K, dim) (class token first, after the final LayerNorm), ``mask`` (B, N) (1 = masked) and
        ``ids_restore`` (B, N) - see :func:`random_masking`.
        """
        tokens, _ = self._embed(x)
        if noise is None:
            noise = torch.rand(tokens.shape[0], tokens.shape[1]).to(x.device)
        kept, mask, ids_restore = random_masking(tokens, mask_ratio, noise.to(x.device))
        return self._encode(kept), mask, ids_restore
