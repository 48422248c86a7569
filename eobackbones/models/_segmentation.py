"""Segmentation models: any backbone's multi-scale features + a dense decoder, saved and loaded like any model.

``create_segmentation_model('dofa_base', num_classes=3, decoder='upernet', bands=[...])`` builds the backbone with
``create_model`` (its weights through the one loading path), prunes it to the levels the decoder reads (as
``features_only``) and puts a decoder from :mod:`eobackbones.heads` on the maps ``forward_intermediates`` returns.
Everything goes through the model contract, so every family plugs in, dict inputs and extra call keywords
(``wavelengths=``, a diffusion ``timestep=``) included. ``save_pretrained`` writes one directory (backbone + decoder,
``task: segmentation``) that ``create_model('local-dir:...')`` / ``hf-hub:`` rebuild through ``build_model_with_cfg``.
"""
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..cfg import PretrainedCfg
from ..errors import InvalidInputError
from ..heads import FPNHead, LinearSegHead, SwinUNetDecoder, UNetHead, UPerNetHead
from ._base import EOModelMixin
from ._builder import build_model_with_cfg
from ._features import feature_take_indices, seg_feature_index
from ._multi import _prefix
from ._registry import model_entrypoint

__all__ = ['SegmentationModel', 'build_segmentation_from_dir', 'segmentation_builder', 'DECODERS', 'SEGMENTATION_TASK']

DECODERS = {'fpn': FPNHead, 'upernet': UPerNetHead, 'unet': UNetHead, 'linear': LinearSegHead,
            'swinunet': SwinUNetDecoder}
SEGMENTATION_TASK = 'segmentation'


def _input_size(x: Any) -> Tuple[int, int]:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[-2:])
    if isinstance(x, Mapping):
        sizes = [tuple(v.shape[-2:]) for v in x.values() if isinstance(v, torch.Tensor) and v.ndim == 4]
        if sizes:  # modalities on different grids: predict on the finest one
            return max(s[0] for s in sizes), max(s[1] for s in sizes)
    raise InvalidInputError(f'cannot tell the output size from a {type(x).__name__} input; pass output_size=(H, W)')


def _build_decoder(name: str, in_chs: List[int], reductions: List[float], num_classes: int, spec: Any,
                   kwargs: Dict[str, Any]) -> nn.Module:
    if name == 'swinunet':
        if [float(r) for r in reductions] != [4.0, 8.0, 16.0, 32.0]:
            raise ValueError(f'decoder="swinunet" needs 4 levels at strides 4, 8, 16, 32, got {reductions}')
        kwargs = dict(kwargs)
        if 'img_size' not in kwargs and spec is not None:
            kwargs['img_size'] = spec.image_size[0]
        return SwinUNetDecoder(in_chs, num_classes, **kwargs)
    return DECODERS[name](in_chs, reductions, num_classes, **kwargs)


class SegmentationModel(EOModelMixin, nn.Module):
    """Backbone features -> decoder -> logits at the input resolution.

    The backbone is pruned to the levels the decoder reads (``prune_intermediate_layers``: later blocks, final norms,
    pooling and projection heads go), so backward reaches every trainable parameter (DDP without
    ``find_unused_parameters``).

    Args:
        backbone: a model built by ``create_model``.
        decoder: ``'fpn'``, ``'upernet'``, ``'unet'``, ``'linear'`` or ``'swinunet'``.
        num_classes: output classes.
        out_indices: the ``feature_info`` levels the decoder reads (default: all; ``linear``: the one level
            :func:`seg_feature_index` names).
        decoder_kwargs: constructor arguments of the decoder.
    """
    classifier_prefix = 'decoder'

    def __init__(self, backbone: nn.Module, decoder: str = 'fpn', num_classes: int = 2,
                 out_indices: Optional[Sequence[int]] = None, decoder_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f'decoder must be one of {list(DECODERS)}, got {decoder!r}')
        infos = [dict(fi) for fi in backbone.feature_info]
        if decoder == 'linear' and out_indices is None:
            # the linear head reads one map: keep only that level, so no pruned-away parameter goes without gradient
            out_indices = [seg_feature_index(backbone)]
        take, _ = feature_take_indices(len(infos), out_indices)
        self.out_indices = tuple(int(i) for i in take)
        backbone.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        self.backbone = backbone
        self.feature_info = [infos[i] for i in self.out_indices]
        self.decoder_name = decoder
        self.decoder_kwargs = dict(decoder_kwargs or {})
        self.num_classes = num_classes
        self.decoder = _build_decoder(decoder, [fi['num_chs'] for fi in self.feature_info],
                                      [fi['reduction'] for fi in self.feature_info], num_classes,
                                      getattr(backbone, 'input_spec', None), self.decoder_kwargs)

    @property
    def input_spec(self):
        return getattr(self.backbone, 'input_spec', None)

    @input_spec.setter
    def input_spec(self, spec) -> None:
        self.backbone.input_spec = spec

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The backbone's matcher under ``backbone.``; the decoder, unmatched, is the head (timm's last group)."""
        gm = self.backbone.group_matcher(coarse)
        b = gm['blocks']
        blocks = [(_prefix(p, 'backbone'), s) for p, s in ([(b, None)] if isinstance(b, str) else b)]
        return dict(stem=_prefix(gm['stem'], 'backbone'), blocks=blocks)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'backbone.' + n for n in self.backbone.no_weight_decay()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x: Any, **kwargs: Any) -> List[torch.Tensor]:
        """The NCHW maps the decoder reads (extra keywords such as ``wavelengths=`` go to the backbone)."""
        return self.backbone.forward_intermediates(x, indices=list(self.out_indices), stop_early=True,
                                                   intermediates_only=True, **kwargs)

    def forward(self, x: Any, output_size: Optional[Tuple[int, int]] = None, **kwargs: Any) -> torch.Tensor:
        """Logits (B, num_classes, H, W) at the input size (dict inputs: the largest modality grid) or ``output_size``."""
        size = tuple(output_size) if output_size is not None else _input_size(x)
        logits = self.decoder(self.forward_features(x, **kwargs))
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode='bilinear', align_corners=False)
        return logits

    def config_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        conf = super().config_dict(*args, **kwargs)
        # timm cannot build a segmentation model: name none of its architectures
        conf.update(architecture='eob_segmentation', task=SEGMENTATION_TASK, segmentation=dict(
            backbone=self.pretrained_cfg.architecture, decoder=self.decoder_name, num_classes=self.num_classes,
            out_indices=list(self.out_indices), decoder_kwargs=self.decoder_kwargs))
        return conf


def segmentation_builder(arch: str, backbone_cfg: Optional[PretrainedCfg], decoder: str, num_classes: int,
                          out_indices: Optional[Sequence[int]], decoder_kwargs: Optional[Dict[str, Any]]):
    """A constructor for ``build_model_with_cfg``: the backbone (no weights: the directory's follow) + decoder."""
    def build(**backbone_args: Any) -> SegmentationModel:
        backbone = model_entrypoint(arch)(pretrained=False, pretrained_cfg=backbone_cfg, **backbone_args)
        return SegmentationModel(backbone, decoder, num_classes, out_indices, decoder_kwargs)
    return build


def build_segmentation_from_dir(arch: str, cfg: PretrainedCfg, seg: Mapping[str, Any], **kwargs: Any) -> SegmentationModel:
    """Rebuild a saved segmentation model through the one loading path (``create_model`` calls this)."""
    num_classes = kwargs.pop('num_classes', seg['num_classes'])
    builder = segmentation_builder(arch, dataclasses.replace(cfg, source=None), seg['decoder'], num_classes,
                                    seg.get('out_indices'), seg.get('decoder_kwargs'))
    cfg = dataclasses.replace(cfg, num_classes=int(seg['num_classes']))
    return build_model_with_cfg(builder, arch, True, pretrained_cfg=cfg, spec_fn=lambda m, c: m.backbone.input_spec,
                                **kwargs)
