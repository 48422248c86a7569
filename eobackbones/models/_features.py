"""Multi-scale features for every backbone: ``features_only=True`` and ``forward_intermediates``."""
import math
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn
from timm.models._features import FeatureInfo, feature_take_indices

from ..errors import InvalidInputError

__all__ = ['FeatureInfo', 'feature_take_indices', 'FeatureGetter', 'seg_feature_index']


class FeatureGetter(nn.Module):
    """Wraps a backbone so ``forward`` returns the list of NCHW maps at ``out_indices``.

    Uses the backbone's own ``forward_intermediates`` (no hooks); extra keyword arguments (``wavelengths=``,
    conditioning inputs) pass through. With ``prune`` (default, as timm) the backbone's
    ``prune_intermediate_layers`` removes what these maps do not need (later blocks, final norms, pooling and
    projection heads), so every parameter left gets a gradient (DDP without ``find_unused_parameters``).
    """

    def __init__(self, model: nn.Module, out_indices: Optional[Union[int, Sequence[int]]] = None, prune: bool = True,
                 norm: bool = False):
        super().__init__()
        num = len(model.feature_info)
        take, _ = feature_take_indices(num, out_indices)
        self.out_indices = tuple(int(i) for i in take)
        if prune and hasattr(model, 'prune_intermediate_layers'):
            model.prune_intermediate_layers(list(self.out_indices), prune_norm=not norm, prune_head=True)
        self.norm = norm
        self.model = model
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)

    @property
    def input_spec(self):
        return getattr(self.model, 'input_spec', None)

    @property
    def pretrained_cfg(self):
        return getattr(self.model, 'pretrained_cfg', None)

    @property
    def provenance(self):
        return self.model.provenance

    def forward(self, x: Any, **kwargs: Any) -> List[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=list(self.out_indices), norm=self.norm, stop_early=True, intermediates_only=True, **kwargs)

    def save_pretrained(self, save_dir: Union[str, Path], **kwargs: Any) -> Path:
        """Saves the (pruned) backbone; the directory loads back as a ``features_only`` model."""
        inner = self.model
        args = inner.model_args
        inner.model_args = dict(args, features_only=True, out_indices=list(self.out_indices))
        try:
            return inner.save_pretrained(save_dir, **kwargs)
        finally:
            inner.model_args = args


def seg_feature_index(model: nn.Module) -> int:
    """Index into ``feature_info`` of the map a single-level segmentation head reads (the probe's, ``decoder='linear'``):
    the cfg's ``seg_feature_index`` when the family states one (e.g. a diffusion decoder level), else the last map at
    reduction 16, else the closest to 16."""
    info = getattr(model, 'feature_info', None)
    if not info:
        raise InvalidInputError(f'{type(model).__name__} has no feature_info; segmentation needs feature maps')
    cfg = getattr(model, 'pretrained_cfg', None)
    if cfg is not None and getattr(cfg, 'seg_feature_index', None) is not None:
        return int(cfg.seg_feature_index) % len(info)
    red = [float(f['reduction']) for f in info]
    exact = [i for i, r in enumerate(red) if r == 16]
    return exact[-1] if exact else min(range(len(red)), key=lambda i: (abs(math.log2(red[i] / 16)), -i))
