"""Masked-autoencoder pretraining objective for DOFA (He et al. 2021; Xiong et al. 2024, arXiv:2403.15356).

The encoder is a :class:`eobackbones.models.dofa.DOFA`; it sees 25 % of the patches (mask ratio 0.75).
A light ViT decoder fills in mask tokens, and a *wavelength-conditioned* linear head, whose weights a
hypernetwork generates from the wavelengths of the input channels (as DOFA's patch embedding does),
reconstructs every input band of every patch. Loss: mean squared error on the masked patches against
per-patch normalised pixels (``norm_pix_loss``). Independent implementation following the DOFA paper.
"""
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import Block

from ..layers import WavelengthHypernetwork, sincos_2d_pos_embed
from ..models.dofa import DOFA

__all__ = ['DynamicDecoderHead', 'DOFAMAE', 'random_masking', 'patchify']


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C * p * p), channel-major inside a patch."""
    b, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def random_masking(
        x: torch.Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``1 - mask_ratio`` of the tokens of every sample.

    Returns:
        kept tokens (B, L_keep, D), mask (B, L) with 1 = removed, ids_restore (B, L).
    """
    b, n, d = x.shape
    keep = max(1, int(round(n * (1 - mask_ratio))))
    noise = torch.rand(b, n, device=x.device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = x.gather(1, ids_keep[..., None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class DynamicDecoderHead(WavelengthHypernetwork):
    """Decoder tokens (B, L, Dd) -> pixels (B, L, C * p * p) with per-wavelength generated weights.

    The same hypernetwork path as DOFA's patch embedding (:class:`~eobackbones.layers.WavelengthHypernetwork`),
    generating a (p * p * Dd) projection per wavelength instead of a kernel, without a bias.
    """

    def __init__(self, decoder_dim: int, patch_size: int, dynamic_embed_dim: int = 128, scaler: float = 0.01) -> None:
        super().__init__(dynamic_embed_dim, patch_size * patch_size * decoder_dim, bias_dim=None)
        self.patch_size = patch_size
        self.decoder_dim = decoder_dim
        self.scaler = scaler
        self.init_hypernetwork()

    def forward(self, x: torch.Tensor, wavelengths_um: torch.Tensor) -> torch.Tensor:
        c = wavelengths_um.shape[0]
        weight, _ = self.generate_weights(wavelengths_um)  # (C, p * p * Dd)
        weight = weight.reshape(c * self.patch_size ** 2, self.decoder_dim) * self.scaler
        return F.linear(x, weight.to(x.dtype))


class DOFAMAE(nn.Module):
    """DOFA encoder + MAE decoder with a wavelength-conditioned reconstruction head.

    Args:
        encoder: the DOFA backbone (its ``head`` / ``fc_norm`` are unused here).
        decoder_dim, decoder_depth, decoder_heads: decoder ViT shape (MAE: 512, 8, 16).
        mask_ratio: fraction of patches removed (0.75).
        norm_pix_loss: normalise every target patch to zero mean, unit variance.
    """

    def __init__(
            self,
            encoder: DOFA,
            decoder_dim: int = 512,
            decoder_depth: int = 8,
            decoder_heads: int = 16,
            mask_ratio: float = 0.75,
            norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f'mask_ratio must be in (0, 1), got {mask_ratio}')
        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.norm = norm_layer(encoder.embed_dim)
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = DynamicDecoderHead(decoder_dim, self.patch_size, encoder.patch_embed.dynamic_embed_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(
            self, x: torch.Tensor, wavelengths: Optional[Sequence[float]], generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Tuple[int, int]]:
        enc = self.encoder
        tokens, grid, waves = enc.embed_tokens(x, wavelengths)  # (B, 1 + L, D)
        kept, mask, ids_restore = random_masking(tokens[:, 1:], self.mask_ratio, generator)
        h = torch.cat([tokens[:, :1], kept], dim=1)
        for blk in enc.blocks:
            h = enc.apply_block(blk, h)
        return self.norm(h), mask, ids_restore, waves, grid

    def forward_decoder(self, h: torch.Tensor, ids_restore: torch.Tensor, waves: torch.Tensor,
                        grid: Tuple[int, int]) -> torch.Tensor:
        h = self.decoder_embed(h)
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n + 1 - h.shape[1], -1)
        seq = torch.cat([h[:, 1:], fill], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, h.shape[-1]))
        seq = torch.cat([h[:, :1], seq], dim=1)
        seq = seq + sincos_2d_pos_embed(h.shape[-1], grid, 1, dtype=seq.dtype, device=seq.device)
        for blk in self.decoder_blocks:
            seq = blk(seq)
        return self.decoder_pred(self.decoder_norm(seq)[:, 1:], waves)  # (B, L, C * p * p)

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
            self,
            imgs: torch.Tensor,
            wavelengths: Optional[Sequence[float]] = None,
            generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, prediction (B, L, C * p * p), mask (B, L) with 1 = reconstructed patch)."""
        h, mask, ids_restore, waves, grid = self.forward_encoder(imgs, wavelengths, generator)
        pred = self.forward_decoder(h, ids_restore, waves, grid)
        return self.loss(imgs, pred, mask), pred, mask
