"""A tiny CNN family registered only inside the tests (never in the package).

It exercises the registry, builder, loader and contract without the cost of a real backbone, and has an
"upstream" checkpoint format (keys under ``module.``, optimiser state beside them) with its converter.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from eobackbones.models import EOModelMixin, PretrainedCfg, build_model_with_cfg, register_model
from eobackbones.models._builder import register_converter
from eobackbones.models._features import feature_take_indices
from eobackbones.models._registry import register_arch_cfg
from eobackbones.spec import InputSpec, ModalitySpec

TINY_SPEC = InputSpec(
    modalities=(ModalitySpec(
        name='s2', sensor='sentinel2', bands=('B04', 'B03', 'B02'), wavelengths_um=(0.665, 0.56, 0.49),
        unit='reflectance_1e4', normalization=({'op': 'clip', 'min': 0, 'max': 10000},
                                               {'op': 'meanstd', 'mean': [1000.0] * 3, 'std': [500.0] * 3})),),
    image_size=(32, 32))


class TinyCNN(EOModelMixin, nn.Module):
    def __init__(self, in_chans: int = 3, num_classes: int = 0, width: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1), nn.BatchNorm2d(width * 4), nn.ReLU()),
        ])
        self.num_features = self.head_hidden_size = width * 4
        self.feature_info = [dict(num_chs=width, reduction=2, module='stem'),
                             dict(num_chs=width * 2, reduction=4, module='stages.0'),
                             dict(num_chs=width * 4, reduction=8, module='stages.1')]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt='NCHW',
                              intermediates_only=False):
        take, max_i = feature_take_indices(3, indices)
        out = []
        x = self.stem(x)
        if 0 in take:
            out.append(x)
        for i, stage in enumerate(self.stages, start=1):
            if stop_early and i > max_i:
                break
            x = stage(x)
            if i in take:
                out.append(x)
        return out if intermediates_only else (x, out)

    def forward_features(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True):
        pass

    def no_weight_decay(self):
        return set()

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)')


@register_converter('test_tiny.upstream')
def _convert_upstream(raw, cfg):
    """Upstream layout: {'model': {'module.<key>': ...}, 'optimizer': ...}."""
    sd = raw['model']
    return {k[len('module.'):]: v for k, v in sd.items()}


@register_converter('test_tiny.prefixed')
def _convert_prefixed(raw, cfg):
    """Upstream safetensors layout: flat ``module.<key>`` tensors."""
    return {k[len('module.'):]: v for k, v in raw.items()}


def upstream_checkpoint(model: nn.Module) -> dict:
    return {'model': {'module.' + k: v.clone() for k, v in model.state_dict().items()},
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]}, 'epoch': 3}


register_arch_cfg(PretrainedCfg('test_tiny_cnn', input_spec=TINY_SPEC, notes='test model'))


@register_model
def test_tiny_cnn(pretrained: bool = False, **kwargs) -> TinyCNN:
    """A tiny 3-stage CNN (tests only)."""
    return build_model_with_cfg(TinyCNN, 'test_tiny_cnn', pretrained, **kwargs)


# ---------------------------------------------------------------- a tiny DOFA (the real family, small dims)
from eobackbones.models.dofa import DEFAULT_BANDS, DOFA, _create_dofa, dofa_input_spec  # noqa: E402
from eobackbones.sensors import band_wavelengths, resolve_bands  # noqa: E402

TINY_DOFA = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)

register_arch_cfg(PretrainedCfg('test_dofa', input_spec=dofa_input_spec(
    resolve_bands(list(DEFAULT_BANDS)), band_wavelengths(list(DEFAULT_BANDS)), TINY_DOFA['patch_size'],
    TINY_DOFA['img_size'])))


@register_model
def test_dofa(pretrained: bool = False, **kwargs) -> DOFA:
    """Tiny DOFA (patch 8, dim 64, depth 2) for tests."""
    return _create_dofa('test_dofa', pretrained, **dict(TINY_DOFA, **kwargs))
