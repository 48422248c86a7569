"""A 4-level feature pyramid from the single-stride maps of a plain ViT.

Plain ViTs keep one stride (the patch size) in every block. Dense heads (FPN, UPerNet, Mask2Former) want
strides patch/4, patch/2, patch and 2 * patch, so four blocks' token maps are rescaled, one per level:

* ``learned`` (the ViTBaseline of Chen et al., arXiv:2304.11381, after the ViTDet / BEiT recipe):
  level 0 = ConvTranspose2d(2, 2) -> GroupNorm(32) -> GELU -> ConvTranspose2d(2, 2); level 1 =
  ConvTranspose2d(2, 2); level 2 = identity; level 3 = MaxPool2d(2, 2).
* ``interpolate`` (parameter-free, so it works on pretrained weights without training anything): bilinear
  x4 and x2 (``align_corners=False``), identity, 2x2 max-pool. Bit-identical to what DOFA used before this
  layer existed.

Levels are computed one at a time (:meth:`ViTPyramid.forward_level`), so a model's
``forward_intermediates(indices=..., stop_early=True)`` computes only the levels it is asked for.
"""
from typing import Dict, List, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['ViTPyramid', 'PyramidMode']

PyramidMode = Literal['learned', 'interpolate']


def _reduction(patch_size: int, scale: float) -> Union[int, float]:
    r = patch_size / scale
    return int(r) if float(r).is_integer() else r


class ViTPyramid(nn.Module):
    """Rescale 4 ViT token maps ``(B, D, h, w)`` to strides patch/4, patch/2, patch, 2 * patch.

    Args:
        embed_dim: channels of the maps (kept at every level).
        mode: ``learned`` (transposed convolutions, the reference ViTBaseline) or ``interpolate``
            (parameter-free).
        scales: resize factor of each level; ``learned`` supports only the default ``(4, 2, 1, 0.5)``.
            In ``interpolate`` mode factors above 1 are bilinear upsampling, below 1 max-pooling by
            ``round(1 / factor)``.
        num_groups: GroupNorm groups of the learned x4 path (32, as the reference).
        eps: GroupNorm epsilon (1e-5, PyTorch's default, as the reference).
    """

    def __init__(
            self,
            embed_dim: int,
            mode: PyramidMode = 'interpolate',
            scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
            num_groups: int = 32,
            eps: float = 1e-5,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if mode not in ('learned', 'interpolate'):
            raise ValueError(f'pyramid mode must be "learned" or "interpolate", got {mode!r}')
        scales = tuple(float(s) for s in scales)
        if any(s <= 0 for s in scales):
            raise ValueError(f'pyramid scales must be positive, got {scales}')
        if mode == 'learned' and scales != (4.0, 2.0, 1.0, 0.5):
            raise ValueError(f'the learned pyramid has scales (4, 2, 1, 0.5), got {scales}')
        self.mode = mode
        self.embed_dim = embed_dim
        self.scales = scales
        if mode == 'learned':
            self.up4 = nn.Sequential(
                nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2, **dd),
                nn.GroupNorm(num_groups, embed_dim, eps=eps, **dd),
                nn.GELU(),
                nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2, **dd),
            )
            self.up2 = nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2, **dd)
            self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    @property
    def num_levels(self) -> int:
        return len(self.scales)

    def reductions(self, patch_size: int) -> List[Union[int, float]]:
        """Stride of each level for a ViT with this patch size."""
        return [_reduction(patch_size, s) for s in self.scales]

    def feature_info(self, patch_size: int, modules: Sequence[str]) -> List[Dict[str, object]]:
        """timm ``feature_info`` entries, one per level; ``modules`` names the block feeding each level."""
        if len(modules) != self.num_levels:
            raise ValueError(f'{self.num_levels} pyramid levels need {self.num_levels} module names, got {len(modules)}')
        return [dict(num_chs=self.embed_dim, reduction=r, module=m)
                for r, m in zip(self.reductions(patch_size), modules)]

    def forward_level(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """One level from the ``(B, D, h, w)`` map of its block."""
        if self.mode == 'learned':
            if level == 0:
                return self.up4(x)
            if level == 1:
                return self.up2(x)
            if level == 3:
                return self.down2(x)
            return x.contiguous()
        scale = self.scales[level]
        if scale > 1:
            return F.interpolate(x, scale_factor=scale, mode='bilinear', align_corners=False)
        if scale < 1:
            return F.max_pool2d(x, kernel_size=int(round(1 / scale)))
        return x.contiguous()

    def forward(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """All levels from the 4 blocks' maps (in level order)."""
        if len(maps) != self.num_levels:
            raise ValueError(f'expected {self.num_levels} maps, got {len(maps)}')
        return [self.forward_level(m, i) for i, m in enumerate(maps)]

    def extra_repr(self) -> str:
        return f'{self.embed_dim}, mode={self.mode!r}, scales={self.scales}'
