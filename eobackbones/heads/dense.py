"""Dense (per-pixel) decoders over a backbone's multi-scale features.

Every decoder is built from two lists read off the backbone's ``feature_info`` -- ``in_channels`` and
``reductions`` (the stride of each map relative to the input) -- and maps the list of NCHW features that
``forward_intermediates`` / ``features_only=True`` returns to class logits at the resolution of the finest
map it uses (``output_reduction``). :class:`~eobackbones.heads.segmentation.SegmentationModel` upsamples
them to the input size.

Reductions are only used to order the levels (finest first; levels that share a reduction keep their
order, the later one being the deeper): maps are resized to each other's *actual* sizes, so non-integer
reductions (DOFA-huge's pyramid at 3.5 / 7 / 14 / 28) and equal reductions (a plain ViT's blocks, all at
stride 16) work as well as a ResNet's 4 / 8 / 16 / 32.

Decoders:
    - :class:`FPNHead`: a light semantic FPN (Lin et al. 2017, arXiv:1612.03144; the semantic branch of
      Kirillov et al. 2019, arXiv:1901.02446): 1x1 laterals, top-down sum, a 3x3 conv per level, all levels
      resized to the finest and summed, 1x1 classifier.
    - :class:`UPerNetHead`: a light UPerNet (Xiao et al. 2018, arXiv:1807.10221): a pyramid pooling module
      (PSPNet, arXiv:1612.01105) on the coarsest level, FPN top-down fusion, all levels concatenated at the
      finest resolution, 3x3 fusion conv, 1x1 classifier.
    - :class:`UNetHead`: a UNet-style decoder (Ronneberger et al. 2015, arXiv:1505.04597): from the coarsest
      map upwards, resize, concatenate the skip map, two 3x3 convs; then x2 stages without skip until the
      stride is below 2, 1x1 classifier.
    - :class:`LinearSegHead`: a 1x1 conv on one level (the linear segmentation probe), optionally on
      features standardised with fixed per-channel statistics.

Normalisation defaults to GroupNorm: decoders are trained from scratch, often with a handful of images per
step, and GroupNorm's output does not depend on the batch, so small batches and data-parallel runs need
no synchronised statistics (``norm_layer='batchnorm2d'`` gives the classic variants).
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import ConvNormAct, LayerType

from ..errors import InvalidInputError

__all__ = ['DenseHead', 'FPNHead', 'UPerNetHead', 'UNetHead', 'LinearSegHead']


def _conv_norm_act(
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        norm_layer: LayerType,
        act_layer: LayerType,
) -> ConvNormAct:
    norm_kwargs = None
    if isinstance(norm_layer, str) and norm_layer.lower().replace('_', '') == 'groupnorm':
        # largest group count <= 32 that divides the width with >= 2 channels per group (a 1x1 map, as the
        # PPM's global pooling gives, has no variance within a 1-channel group)
        norm_kwargs = dict(num_groups=max([g for g in range(1, 33) if out_chs % g == 0 and out_chs // g >= 2] or [1]))
    return ConvNormAct(in_chs, out_chs, kernel_size, norm_layer=norm_layer, act_layer=act_layer,
                       norm_kwargs=norm_kwargs)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


class DenseHead(nn.Module):
    """Shared validation and level ordering of the dense decoders.

    Args:
        in_channels: channels of each input map (``[fi['num_chs'] for fi in feature_info]``).
        reductions: stride of each map relative to the input (``fi['reduction']``); any positive number.
        num_classes: output classes.
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[float], num_classes: int):
        super().__init__()
        in_channels, reductions = list(in_channels), list(reductions)
        if not in_channels or len(in_channels) != len(reductions):
            raise ValueError(f'in_channels and reductions must be non-empty lists of the same length, got '
                             f'{in_channels} and {reductions}')
        if any(int(c) != c or c <= 0 for c in in_channels):
            raise ValueError(f'in_channels must be positive integers, got {in_channels}')
        if any(not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0) for r in reductions):
            raise ValueError(f'reductions must be positive numbers, got {reductions}')
        if num_classes <= 0:
            raise ValueError(f'num_classes must be positive, got {num_classes}')
        self.in_channels: Tuple[int, ...] = tuple(int(c) for c in in_channels)
        self.reductions: Tuple[float, ...] = tuple(reductions)
        self.num_classes = num_classes
        # finest first; ties keep the given order (the later of two equal-stride maps is the deeper)
        self.order: Tuple[int, ...] = tuple(sorted(range(len(reductions)), key=lambda i: (reductions[i], i)))
        self.output_reduction: float = min(reductions)

    def _check(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if isinstance(features, torch.Tensor) or len(features) != len(self.in_channels):
            got = 'a single tensor' if isinstance(features, torch.Tensor) else f'{len(features)} maps'
            raise InvalidInputError(f'{type(self).__name__}: expected {len(self.in_channels)} feature maps with '
                                    f'channels {list(self.in_channels)}, got {got}')
        shapes = [tuple(f.shape) for f in features]
        if any(f.ndim != 4 for f in features) or [s[1] for s in shapes] != list(self.in_channels) \
                or len({s[0] for s in shapes}) != 1:
            raise InvalidInputError(f'{type(self).__name__}: expected NCHW maps with channels {list(self.in_channels)} '
                                    f'and one batch size, got shapes {shapes}')
        return list(features)


class FPNHead(DenseHead):
    """Light semantic FPN: laterals, top-down sum, per-level 3x3 conv, sum at the finest level, classifier.

    Args:
        in_channels, reductions, num_classes: see :class:`DenseHead`.
        channels: width of every FPN level.
        norm_layer, act_layer: of the 3x3 convs (timm layer names or classes).
        dropout: before the classifier.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            reductions: Sequence[float],
            num_classes: int,
            channels: int = 128,
            norm_layer: LayerType = 'groupnorm',
            act_layer: LayerType = 'relu',
            dropout: float = 0.1,
    ):
        super().__init__(in_channels, reductions, num_classes)
        self.channels = channels
        self.lateral = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in self.in_channels])
        self.smooth = nn.ModuleList([
            _conv_norm_act(channels, channels, 3, norm_layer, act_layer) for _ in self.in_channels])
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """NCHW maps (the order of ``in_channels``) -> logits (B, K, H_f, W_f) at the finest map's size."""
        feats = self._check(features)
        out: List[Optional[torch.Tensor]] = [None] * len(feats)
        top = None
        for i in reversed(self.order):  # coarsest first
            lat = self.lateral[i](feats[i])
            top = lat if top is None else lat + _resize(top, lat.shape[-2:])
            out[i] = self.smooth[i](top)
        size = feats[self.order[0]].shape[-2:]
        x = sum(_resize(o, size) for o in out)
        return self.cls(self.drop(x))


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling: average pools to ``pool_scales`` grids, 1x1 conv each, resize, concat, 3x3 conv."""

    def __init__(self, in_chs: int, channels: int, pool_scales: Sequence[int], norm_layer: LayerType,
                 act_layer: LayerType):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_norm_act(in_chs, channels, 1, norm_layer, act_layer))
            for s in self.pool_scales])
        self.bottleneck = _conv_norm_act(in_chs + len(self.pool_scales) * channels, channels, 3, norm_layer, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return self.bottleneck(torch.cat([x] + [_resize(stage(x), size) for stage in self.stages], dim=1))


class UPerNetHead(DenseHead):
    """Light UPerNet: PPM on the coarsest level, FPN top-down fusion, concatenation at the finest level.

    Args:
        in_channels, reductions, num_classes: see :class:`DenseHead`.
        channels: width of the PPM and FPN levels (UPerNet uses 512; 128 keeps it light).
        pool_scales: PPM grid sizes.
        norm_layer, act_layer: of every conv but the classifier. With ``batchnorm2d``, the 1x1 pooled PPM
            branch needs more than one sample per batch in training.
        dropout: before the classifier.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            reductions: Sequence[float],
            num_classes: int,
            channels: int = 128,
            pool_scales: Sequence[int] = (1, 2, 3, 6),
            norm_layer: LayerType = 'groupnorm',
            act_layer: LayerType = 'relu',
            dropout: float = 0.1,
    ):
        super().__init__(in_channels, reductions, num_classes)
        self.channels = channels
        top = self.order[-1]
        self.top_index = top
        self.ppm = PyramidPoolingModule(self.in_channels[top], channels, pool_scales, norm_layer, act_layer)
        # the coarsest level's lateral is the PPM; the others get a 1x1 lateral and a 3x3 FPN conv
        self.lateral = nn.ModuleList([
            nn.Identity() if i == top else _conv_norm_act(c, channels, 1, norm_layer, act_layer)
            for i, c in enumerate(self.in_channels)])
        self.fpn = nn.ModuleList([
            nn.Identity() if i == top else _conv_norm_act(channels, channels, 3, norm_layer, act_layer)
            for i in range(len(self.in_channels))])
        self.fuse = _conv_norm_act(len(self.in_channels) * channels, channels, 3, norm_layer, act_layer)
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """NCHW maps (the order of ``in_channels``) -> logits (B, K, H_f, W_f) at the finest map's size."""
        feats = self._check(features)
        out: List[Optional[torch.Tensor]] = [None] * len(feats)
        top = self.ppm(feats[self.top_index])
        out[self.top_index] = top
        for i in reversed(self.order[:-1]):  # next-coarsest first
            top = self.lateral[i](feats[i]) + _resize(top, feats[i].shape[-2:])
            out[i] = self.fpn[i](top)
        size = feats[self.order[0]].shape[-2:]
        x = self.fuse(torch.cat([_resize(out[i], size) for i in self.order], dim=1))
        return self.cls(self.drop(x))


class _UNetBlock(nn.Module):
    def __init__(self, in_chs: int, skip_chs: int, out_chs: int, norm_layer: LayerType, act_layer: LayerType):
        super().__init__()
        self.conv1 = _conv_norm_act(in_chs + skip_chs, out_chs, 3, norm_layer, act_layer)
        self.conv2 = _conv_norm_act(out_chs, out_chs, 3, norm_layer, act_layer)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if skip is not None:
            x = torch.cat([_resize(x, skip.shape[-2:]), skip], dim=1)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode='bilinear', align_corners=False)
        return self.conv2(self.conv1(x))


class UNetHead(DenseHead):
    """UNet-style decoder: skip blocks from the coarsest map to the finest, then x2 blocks without skip.

    Args:
        in_channels, reductions, num_classes: see :class:`DenseHead`.
        decoder_channels: output width of each block, coarsest first (one per level after the coarsest, then
            one per extra x2 block); default ``max(16, 256 / 2**k)`` for block ``k``.
        extra_upsample: x2 blocks without skip after the finest level; None: ``floor(log2(min reduction))``
            (stride 4 -> 2 blocks, logits at full resolution; 3.5 -> 1 block, logits at stride 1.75).
        norm_layer, act_layer: of the 3x3 convs.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            reductions: Sequence[float],
            num_classes: int,
            decoder_channels: Optional[Sequence[int]] = None,
            extra_upsample: Optional[int] = None,
            norm_layer: LayerType = 'groupnorm',
            act_layer: LayerType = 'relu',
    ):
        super().__init__(in_channels, reductions, num_classes)
        if extra_upsample is None:
            extra_upsample = max(0, int(math.floor(math.log2(self.output_reduction))))
        if extra_upsample < 0:
            raise ValueError(f'extra_upsample must be >= 0, got {extra_upsample}')
        n_blocks = len(self.in_channels) - 1 + extra_upsample
        if decoder_channels is None:
            decoder_channels = [max(16, 256 // 2 ** k) for k in range(n_blocks)]
        decoder_channels = list(decoder_channels)
        if len(decoder_channels) != n_blocks:
            raise ValueError(f'decoder_channels needs {n_blocks} entries ({len(self.in_channels) - 1} skip blocks + '
                             f'{extra_upsample} x2 blocks), got {decoder_channels}')
        self.extra_upsample = extra_upsample
        self.output_reduction = self.output_reduction / 2 ** extra_upsample
        coarse_to_fine = list(reversed(self.order))
        self.skip_index = tuple(coarse_to_fine[1:]) + (None,) * extra_upsample
        chs = self.in_channels[coarse_to_fine[0]]
        blocks = []
        for skip, out_chs in zip(self.skip_index, decoder_channels):
            blocks.append(_UNetBlock(chs, 0 if skip is None else self.in_channels[skip], out_chs, norm_layer, act_layer))
            chs = out_chs
        self.blocks = nn.ModuleList(blocks)
        self.cls = nn.Conv2d(chs, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """NCHW maps (the order of ``in_channels``) -> logits at ``output_reduction``."""
        feats = self._check(features)
        x = feats[self.order[-1]]
        for block, skip in zip(self.blocks, self.skip_index):
            x = block(x, None if skip is None else feats[skip])
        return self.cls(x)


class LinearSegHead(DenseHead):
    """1x1 conv on one level: the linear segmentation probe's head (logits at that level's resolution).

    Features can be standardised per channel with fixed statistics (the probe's train-split mean / std,
    set by :meth:`set_feature_stats`; identity by default), kept as buffers so a saved head is complete.

    Args:
        in_channels, reductions, num_classes: see :class:`DenseHead` (all levels of the backbone, so the
            head plugs into a :class:`SegmentationModel` like the others).
        level: which map the conv reads (an index into ``in_channels``; negative counts from the end).
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[float], num_classes: int, level: int = -1):
        super().__init__(in_channels, reductions, num_classes)
        n = len(self.in_channels)
        if not -n <= level < n:
            raise ValueError(f'level must index one of the {n} levels, got {level}')
        self.level = level % n
        chs = self.in_channels[self.level]
        self.output_reduction = self.reductions[self.level]
        self.register_buffer('feat_mean', torch.zeros(1, chs, 1, 1))
        self.register_buffer('feat_std', torch.ones(1, chs, 1, 1))
        self.conv = nn.Conv2d(chs, num_classes, 1)

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Standardise the level's features with per-channel ``mean`` and ``std`` (C values each)."""
        chs = self.in_channels[self.level]
        mean, std = torch.as_tensor(mean).float().reshape(-1), torch.as_tensor(std).float().reshape(-1)
        if mean.numel() != chs or std.numel() != chs:
            raise InvalidInputError(f'expected {chs} means and stds, got {mean.numel()} and {std.numel()}')
        self.feat_mean.copy_(mean.view(1, -1, 1, 1))
        self.feat_std.copy_(std.clamp_min(eps).view(1, -1, 1, 1))

    def forward(self, features: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """All levels (a list) or the level's map alone (a tensor) -> logits (B, K, h, w) at that level."""
        if isinstance(features, torch.Tensor):
            x = features
            if x.ndim != 4 or x.shape[1] != self.in_channels[self.level]:
                raise InvalidInputError(f'LinearSegHead: expected a (B, {self.in_channels[self.level]}, h, w) map, '
                                        f'got {tuple(x.shape)}')
        else:
            x = self._check(features)[self.level]
        return self.conv((x - self.feat_mean) / self.feat_std)
