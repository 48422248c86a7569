"""A tiny CNN family registered only inside the tests (never in the package).

It exercises the registry, builder, loader and contract without the cost of a real backbone, and has an
"upstream" checkpoint format (keys under ``module.``, optimiser state beside them) with its converter.
"""

import torch
from torch import nn

from eobackbones.cfg import PretrainedCfg
from eobackbones.hub.manifest import raw_manifest
from eobackbones.hub.weights import register_converter
from eobackbones.models import EOModelMixin, build_model_with_cfg, register_arch_cfg, register_model
from eobackbones.models._features import feature_take_indices
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
        self.check_input(x)
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
        self.check_input(x)
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

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        take, max_i = feature_take_indices(3, indices)
        self.stages = self.stages[:max(0, max_i)]
        if prune_head:
            self.reset_classifier(0)
        return take


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
from eobackbones.models.dofa import DOFA, _create_dofa  # noqa: E402

TINY_DOFA = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)

# the weights' facts of the real DOFA entry (Satlas statistics) straight from the manifest: the tiny model is
# bound and normalised exactly as dofa_base
_satlas = dict(raw_manifest()['specs']['dofa_satlas_s2'], image_size=[32, 32], size_multiple=8)
register_arch_cfg(PretrainedCfg('test_dofa', input_spec=InputSpec.from_dict(_satlas)))


@register_model
def test_dofa(pretrained: bool = False, **kwargs) -> DOFA:
    """Tiny DOFA (patch 8, dim 64, depth 2) for tests."""
    return _create_dofa('test_dofa', pretrained, **dict(TINY_DOFA, **kwargs))


# ---------------------------------------------------------------- a tiny three-modality model with a conditioning input
# It exercises the generic multimodal contract without any family code: dict input (s2, s1, dem), missing-modality
# policy `subset`, an optional conditioning vector `context=` and a call argument `timestep=`.
from eobackbones.spec import CallArg, ConditionSpec  # noqa: E402

TRI_SPEC = InputSpec(
    modalities=(
        ModalitySpec('s2', 'sentinel2', ('B04', 'B03', 'B02'), unit='reflectance_1e4',
                     normalization=({'op': 'clip', 'min': 0, 'max': 10000},
                                    {'op': 'meanstd', 'mean': [800.0, 700.0, 500.0], 'std': [500.0, 400.0, 400.0]})),
        ModalitySpec('s1', 'sentinel1', ('VV', 'VH'), unit='dB',
                     normalization=({'op': 'minmax', 'min': -25.0, 'max': 0.0, 'out': [-1.0, 1.0]},)),
        ModalitySpec('dem', 'dem', ('DEM',), unit='m', normalization=({'op': 'scale', 'factor': 0.001},)),
    ),
    image_size=(32, 32), input_format='dict', missing_modality='subset', same_size=True,
    conditions=(ConditionSpec('context', ('elevation_mean', 'season'), unit='m, 0..1',
                              normalization=({'op': 'minmax', 'min': [0.0, 0.0], 'max': [3000.0, 1.0], 'out': [-1, 1]},),
                              required=False),),
    call_args=(CallArg('timestep', 1, 'scales the features (stands in for a diffusion timestep)'),))


class TriModal(EOModelMixin, nn.Module):
    """One small conv encoder per modality; present modalities averaged; an optional context added."""

    def __init__(self, width: int = 8, num_classes: int = 0, in_chans=None):
        super().__init__()
        in_chans = in_chans or {'s2': 3, 's1': 2, 'dem': 1}
        self.modalities = tuple(in_chans)
        self.stems = nn.ModuleDict({m: nn.Conv2d(c, width, 3, stride=4, padding=1) for m, c in in_chans.items()})
        self.stage = nn.Sequential(nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.ReLU())
        self.context = nn.Linear(2, width)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = width * 2
        self.feature_info = [dict(num_chs=width, reduction=4, module='stems'),
                             dict(num_chs=width * 2, reduction=8, module='stage')]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def _levels(self, x, context=None, timestep=None, stop=1):
        kw = self.check_input(x, context=context, timestep=timestep)
        present = {m: v for m, v in x.items() if v is not None}
        a = torch.stack([self.stems[m](v) for m, v in present.items()]).mean(0)
        if kw.get('context') is not None:
            a = a + self.context(kw['context'])[..., None, None]
        a = torch.relu(a) * float(kw['timestep'])
        return [a] if stop == 0 else [a, self.stage(a)]

    def forward_features(self, x, context=None, timestep=None):
        return self._levels(x, context, timestep)[-1]

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x, context=None, timestep=None):
        return self.forward_head(self.forward_features(x, context, timestep))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt='NCHW',
                              intermediates_only=False, context=None, timestep=None):
        take, max_i = feature_take_indices(2, indices)
        maps = self._levels(x, context, timestep, stop=max_i if stop_early else 1)
        out = [maps[i] for i in take]
        return out if intermediates_only else (maps[-1], out)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        take, max_i = feature_take_indices(2, indices)
        if max_i < 1:
            self.stage = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

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
        return dict(stem=r'^stems', blocks=[(r'^stage', (0,)), (r'^context', (1,))])


register_arch_cfg(PretrainedCfg('test_trimodal', input_spec=TRI_SPEC, notes='test model'))


@register_model
def test_trimodal(pretrained: bool = False, **kwargs) -> TriModal:
    """A tiny three-modality model with a conditioning input (tests only)."""
    return build_model_with_cfg(TriModal, 'test_trimodal', pretrained, **kwargs)


# ---------------------------------------------------------------- tiny diffusion UNet encoders (the real family, small widths)
# Five levels (reductions 1 .. 16) like the real SR3 / CM models, a few hundred k parameters; the spec, feature kwargs
# and segmentation level are the real architectures' manifest entries at 32 px.
from eobackbones.hub.manifest import parse_arch_entry  # noqa: E402
from eobackbones.models.diffusion_unet import DiffusionEncoder, _create_diffusion  # noqa: E402

TINY_DIFFUSION = {
    'test_diffusion_sr3': ('diffusion_sr3_s2s1', dict(
        unet_type='sr3', modalities=(('s2', 4), ('s1', 2)),
        unet_args=dict(in_channel=6, out_channel=6, inner_channel=32, channel_mults=(1, 1, 2, 2, 2), attn_res=(16,),
                       res_blocks=1, dropout=0.0, image_size=128))),
    'test_diffusion_cm_cond': ('diffusion_cm_s2s1_cond', dict(
        unet_type='openai', modalities=(('s2', 4), ('s1', 2)),
        unet_args=dict(in_channels=6, out_channels=6, model_channels=32, channel_mult=(1, 1, 2, 2, 2), num_res_blocks=2,
                       attention_resolutions=(8, 16), num_heads=4, use_spatial_transformer=True, context_dim=32),
        context_embedder_args=dict(input_size=12, embedding_size=32, dropout_p=0.2, depth=3))),
}


def _tiny_diffusion_cfg(name: str, real: str) -> PretrainedCfg:
    raw = raw_manifest()
    entry = dict(raw['architectures'][real])
    entry['input_spec'] = dict(raw['specs'][entry['input_spec']], image_size=[32, 32])
    return parse_arch_entry(name, entry)


for _name, (_real, _) in TINY_DIFFUSION.items():
    register_arch_cfg(_tiny_diffusion_cfg(_name, _real))


@register_model
def test_diffusion_sr3(pretrained: bool = False, **kwargs) -> DiffusionEncoder:
    """Tiny SR3 diffusion UNet encoder (inner width 32, 1 res block per level) for tests."""
    return _create_diffusion('test_diffusion_sr3', pretrained, TINY_DIFFUSION['test_diffusion_sr3'][1], **kwargs)


@register_model
def test_diffusion_cm_cond(pretrained: bool = False, **kwargs) -> DiffusionEncoder:
    """Tiny conditional CM diffusion UNet encoder (width 32, context 12 -> 32) for tests."""
    return _create_diffusion('test_diffusion_cm_cond', pretrained, TINY_DIFFUSION['test_diffusion_cm_cond'][1], **kwargs)
