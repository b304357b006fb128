"""Generative SSL: MAE, masked autoencoders (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The ViT encoder (:class:`bilevel_ssl.vit.ViT`, backbone ``vit_tiny``) sees a random ``1 − mask_ratio`` subset of
the patches of each image; a lightweight Transformer decoder receives the encoded visible tokens plus a shared,
learned mask token at every masked position (all with fixed 2-D sin-cos positional embeddings) and predicts the
pixels of every patch; the loss is the mean squared error on the **masked patches only** (§3 "Reconstruction
target": "we compute the loss only on masked patches, similar to BERT").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from ..vit import init_mae_weights, patchify, sincos_pos_embed_2d, transformer_blocks, unpatchify  # noqa: F401
from . import Objective, Outputs


def mae_target(x: Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """The reconstruction target ``(B, N, p²·C)``: the patchified images, with ``norm_pix`` each patch normalised
    by its own mean and standard deviation over its p²·C values (MAE §3 / Table 1(c), "pixels w/ per-patch
    normalization"; as MAE's code: unbiased variance, ``(t − mean) / sqrt(var + 1e-6)``)."""
    target = patchify(x, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    return target


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE's loss (§3): per-patch mean squared error, averaged over the masked patches only.

    ``pred``, ``target`` (B, N, D); ``mask`` (B, N), 1 = masked (counted), 0 = visible (ignored).
    ``Σ_{b,n} mask_bn · mean_d (pred − target)²_bnd / Σ_{b,n} mask_bn``.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"mae_loss: pred and target must be (B, N, D) of equal shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mae_loss: mask must be (B, N) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """MAE's decoder (§3 "MAE decoder", App. A.1): a linear map from the encoder width to ``dim``, a shared learned
    mask token inserted at the masked positions (un-shuffled with ``ids_restore``), fixed sin-cos positional
    embeddings, ``depth`` pre-norm Transformer blocks, LayerNorm, and a linear pixel predictor to ``p²·C`` values
    per patch.  The class token is decoded with the others and dropped from the prediction.  Initialised as MAE
    (Xavier Linear layers, mask token N(0, 0.02²))."""

    def __init__(self, encoder_dim: int, dim: int, depth: int, heads: int, patch_size: int, in_channels: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"MAE decoder: decoder_dim={dim} must be a multiple of 4 (2-D sin-cos embedding)")
        if dim % heads:
            raise ValueError(f"MAE decoder: decoder_dim={dim} must be divisible by decoder_heads={heads}")
        self.dim, self.patch_size, self.in_channels = dim, patch_size, in_channels
        self.embed = nn.Linear(int(encoder_dim), dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = transformer_blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_channels)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """``latent`` (B, 1 + K, encoder_dim) from ``ViT.forward_masked``, ``ids_restore`` (B, N), ``grid`` =
        (rows, cols) with rows·cols = N.  Returns the pixel prediction (B, N, p²·C) in patch order."""
        x = self.embed(latent)
        b, n = ids_restore.shape
        k = x.shape[1] - 1
        if grid[0] * grid[1] != n or not 0 < k <= n:
            raise ValueError(f"MAE decoder: {k} visible tokens, {n} patches and grid {grid} do not fit")
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, n - k, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(b, n, self.dim))
        patches = patches + sincos_pos_embed_2d(self.dim, grid, x.device, x.dtype)
        x = torch.cat([x[:, :1], patches], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]


@dataclass
class MAE(Objective):
    """MAE (He et al. 2022).  Hyper-parameters:

    * ``mask_ratio = 0.75`` - the paper's default (§4, Fig. 5: 75% is best for both fine-tuning and linear probing).
    * ``decoder_dim = 64``, ``decoder_depth = 2``, ``decoder_heads = 4`` - **deviation for the tiny scale**.  The
      paper's default decoder is 8 blocks of width 512 (Table 1(a)(b)), "lightweight" next to ViT-L (1024 wide,
      24 blocks).  We keep its proportions loosely for the 128-wide, 4-block tiny ViT: half the encoder width and a
      shallow decoder.  Table 1(a): fine-tuning accuracy is nearly flat in decoder depth, linear probing gains
      with depth; 2 blocks is a CPU compromise - raise ``decoder_depth`` when linear-probe numbers matter.
    * ``norm_pix_loss = True`` - per-patch normalised pixel targets, the paper's best variant (§4, Table 1(c)) and
      what its released pre-training uses for the reported results.

    Patch size is the backbone's (``vit_tiny``'s ``patch_size``), not an objective option.

    Views: ``n_views = 1``.  MAE pre-trains with random-resized-crop + horizontal flip only (App. A.1); here the
    trainer's augmentation preset is used as is (e.g. ``mnistm``: crop + colour jitter + grayscale, no flip).
    Colour jitter only changes which images are reconstructed, not the objective; for a closer MAE recipe use a
    crop-only preset.

    Decoder construction: :meth:`heads` receives only ``feature_dim``.  The encoder width is that number (the
    feature is the class token), and the patch geometry the pixel predictor needs (``patch_size``,
    ``in_channels``) rides on it: a ViT's ``feature_dim`` is a :class:`bilevel_ssl.vit.TokenDim`, an ``int``
    carrying those two attributes.  They can also be passed explicitly (``heads(128, patch_size=4,
    in_channels=3)``).  All parameters are created eagerly, so the optimizer, the EMA/functional machinery and
    checkpoints see them.  The ``projector`` is the identity: ``z = h`` = class token of the visible-patch encoding.

    Masks: :meth:`outputs` draws the per-patch noise with ``torch.rand`` from torch's global CPU RNG (saved and
    restored by the trainer's checkpoints, so a resumed run draws the same masks), one independent mask per image.
    """

    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True

    name: ClassVar[str] = "mae"
    n_views: ClassVar[int] = 1
    positive: ClassVar[tuple[str, ...]] = ("decoder_dim", "decoder_depth", "decoder_heads")
    requires_backbone: ClassVar[tuple[str, ...]] = ("vit_tiny",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective {self.name}: mask_ratio must be in (0, 1), got {self.mask_ratio!r}")
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise ValueError(f"objective {self.name}: decoder_dim must be a multiple of 4 and of decoder_heads, "
                             f"got decoder_dim={self.decoder_dim}, decoder_heads={self.decoder_heads}")

    def heads(self, feature_dim: int, *, patch_size: int | None = None, in_channels: int | None = None
              ) -> nn.ModuleDict:
        patch_size = patch_size if patch_size is not None else getattr(feature_dim, "patch_size", None)
        in_channels = in_channels if in_channels is not None else getattr(feature_dim, "in_channels", None)
        if patch_size is None or in_channels is None:
            raise ValueError(f"objective {self.name}: needs a ViT backbone (vit_tiny), whose feature_dim carries "
                             f"patch_size and in_channels; got feature_dim={feature_dim!r} (or pass patch_size= and "
                             f"in_channels= explicitly)")
        decoder = MAEDecoder(int(feature_dim), self.decoder_dim, self.decoder_depth, self.decoder_heads,
                             patch_size, in_channels)
        return nn.ModuleDict({"projector": nn.Identity(), "decoder": decoder})

    def outputs(self, net: nn.Module, x: Tensor, n_views: int) -> Outputs:
        """Mask, encode the visible patches, decode all patches.  Per view: ``pred`` (B, N, p²·C), ``target``
        (B, N, p²·C), ``mask`` (B, N) (1 = masked), ``h`` (class token), ``z`` (= projector(h))."""
        backbone = net.backbone
        p = backbone.patch_size
        b, _, hgt, wid = x.shape
        grid = (hgt // p, wid // p)
        noise = torch.rand(b, grid[0] * grid[1]).to(x.device)  # global CPU RNG: device-independent, checkpointed
        latent, mask, ids_restore = backbone.forward_masked(x, self.mask_ratio, noise)
        pred = net.heads["decoder"](latent, ids_restore, grid)
        with torch.no_grad():
            target = mae_target(x, p, self.norm_pix_loss)
        h = latent[:, 0]
        out = {"pred": pred, "target": target, "mask": mask, "h": h, "z": net.heads["projector"](h)}
        parts = {k: v.chunk(n_views) for k, v in out.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n_views)]

    def loss(self, student: Outputs, teacher: Outputs | None = None) -> Tensor:
        losses = [mae_loss(o["pred"], o["target"], o["mask"]) for o in student]
        return sum(losses) / len(losses)
