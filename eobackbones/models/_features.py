"""Multi-scale features for every backbone: ``features_only=True`` and ``forward_intermediates``."""
from typing import Any, Dict, List, Sequence, Union

import torch
from torch import nn
from timm.models._features import FeatureInfo, feature_take_indices

__all__ = ['FeatureInfo', 'feature_take_indices', 'FeatureGetter']


class FeatureGetter(nn.Module):
    """Wraps a backbone so ``forward`` returns the list of NCHW maps at ``out_indices``.

    Uses the backbone's own ``forward_intermediates`` (no hooks); extra keyword arguments
    (``wavelengths=...``) pass through.
    """

    def __init__(self, model: nn.Module, out_indices: Union[int, Sequence[int]] = None):
        super().__init__()
        num = len(model.feature_info)
        if out_indices is None:
            out_indices = tuple(range(num))
        take, _ = feature_take_indices(num, out_indices)
        self.out_indices = tuple(take)
        self.model = model
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.input_spec = getattr(model, 'input_spec', None)
        self.pretrained_cfg = getattr(model, 'pretrained_cfg', None)

    def forward(self, x: Any, **kwargs: Any) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True, **kwargs)

    def save_pretrained(self, save_dir, **kwargs):
        return self.model.save_pretrained(save_dir, **kwargs)
