"""Swin-UNet segmentation decoder (Cao et al. 2021, arXiv:2105.05537), as SSLTransformerRS uses it on a Swin pair.

The decoder runs from the coarsest map upwards: patch expanding (Linear -> 2x2 pixel shuffle -> LayerNorm),
concatenation with the skip connection of the same scale and a Linear back to that scale's width, Swin
blocks; at stride 4 a final x4 patch expanding and a 1x1 conv to the classes.

It consumes ``forward_intermediates`` of any backbone with four maps at strides 4, 8, 16, 32 (NCHW). For a
pair model every level is already S1 and S2 concatenated along channels (its ``feature_info``), so the skip
connections carry both modalities, as upstream concatenates both backbones' features per scale.
NOTE: upstream takes the skip maps at each Swin stage's *input* (after patch merging); our backbones give
stage *outputs*, the common UNet / FPN convention. Same scales and widths, different tap point.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from timm.models.swin_transformer import SwinTransformerBlock

__all__ = ['PatchExpand', 'SwinUNetDecoder']


class PatchExpand(nn.Module):
    """NHWC (B, H, W, C) -> (B, s*H, s*W, C * 2 / s) for s = 2 (Swin-UNet) or (B, 4H, 4W, C) for the final x4."""

    def __init__(self, dim: int, scale: int = 2, out_dim: Optional[int] = None):
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim or (dim // 2 if scale == 2 else dim)
        self.expand = nn.Linear(dim, self.out_dim * scale * scale, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(x).reshape(B, H, W, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(B, H * s, W * s, c)
        return self.norm(x)


class _UpStage(nn.Module):
    """Skip concat -> Linear to ``dim`` -> Swin blocks (-> patch expand to the next finer scale)."""

    def __init__(self, dim: int, skip_dim: int, depth: int, num_heads: int, window_size: int,
                 resolution: Tuple[int, int], out_dim: Optional[int], mlp_ratio: float, drop_path: float):
        super().__init__()
        self.concat = nn.Linear(dim + skip_dim, dim)
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(
                dim=dim, input_resolution=resolution, num_heads=num_heads, window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2, dynamic_mask=True, mlp_ratio=mlp_ratio,
                drop_path=drop_path)
            for i in range(depth)])
        self.upsample = PatchExpand(dim, 2, out_dim) if out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.concat(torch.cat([x, skip], dim=-1))
        return self.upsample(self.blocks(x))


class SwinUNetDecoder(nn.Module):
    """Swin-UNet decoder over four NCHW maps (strides 4, 8, 16, 32) -> per-pixel logits (B, K, H, W).

    Args:
        in_chs: channels of the four maps, finest first (``[fi['num_chs'] for fi in model.feature_info]``).
        num_classes: output classes.
        img_size: input size of the backbone; sets the window grid of the decoder blocks (other sizes work,
            the shifted-window masks are computed per forward).
        depths: Swin blocks at strides 16, 8, 4 (Swin-UNet: 2 each; 0 disables attention at that scale).
        num_heads: heads at strides 16, 8, 4 (default: width // 32).
        window_size: attention window.
        mlp_ratio: block MLP ratio.
        drop_path_rate: stochastic depth of the decoder blocks.
    """

    def __init__(
            self,
            in_chs: Sequence[int],
            num_classes: int,
            img_size: int = 224,
            depths: Sequence[int] = (2, 2, 2),
            num_heads: Optional[Sequence[int]] = None,
            window_size: int = 7,
            mlp_ratio: float = 4.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        in_chs = list(in_chs)
        if len(in_chs) != 4 or len(depths) != 3:
            raise ValueError(f'expected 4 input widths and 3 depths, got {in_chs} and {list(depths)}')
        num_heads = list(num_heads) if num_heads is not None else [max(1, c // 32) for c in in_chs[2::-1]]
        self.in_chs = in_chs
        self.num_classes = num_classes
        # bottleneck (stride 32) -> stride 16 at the stride-16 skip's width
        self.up0 = PatchExpand(in_chs[3], 2, in_chs[2])
        self.stages = nn.ModuleList()
        for j, level in enumerate((2, 1, 0)):  # strides 16, 8, 4
            res = (img_size // (4 * 2 ** level),) * 2
            out_dim = in_chs[level - 1] if level > 0 else None
            self.stages.append(_UpStage(
                in_chs[level], in_chs[level], depths[j], num_heads[j], window_size, res, out_dim, mlp_ratio,
                drop_path_rate))
        self.norm_up = nn.LayerNorm(in_chs[0])
        self.up_final = PatchExpand(in_chs[0], 4)
        self.output = nn.Conv2d(in_chs[0], num_classes, kernel_size=1, bias=False)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """``features``: four NCHW maps, finest first. Returns logits (B, num_classes, 4 H_0, 4 W_0)."""
        if len(features) != 4:
            raise ValueError(f'expected 4 feature maps (strides 4..32), got {len(features)}')
        for f, c in zip(features, self.in_chs):
            if f.ndim != 4 or f.shape[1] != c:
                raise ValueError(f'expected NCHW maps with channels {self.in_chs}, got {[tuple(t.shape) for t in features]}')
        nhwc = [f.permute(0, 2, 3, 1) for f in features]
        x = self.up0(nhwc[3])
        for stage, skip in zip(self.stages, (nhwc[2], nhwc[1], nhwc[0])):
            x = stage(x, skip)
        x = self.up_final(self.norm_up(x))
        return self.output(x.permute(0, 3, 1, 2))
