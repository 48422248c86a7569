"""Segmentation models: any eobackbones backbone's multi-scale features + a dense decoder.

``create_segmentation_model('dofa_base', num_classes=3, decoder='upernet', bands=[...])`` builds the
backbone with :func:`eobackbones.create_model` and puts a decoder from :mod:`eobackbones.heads.dense` (or the
Swin-UNet decoder of the SSL-Swin models) on the maps its ``forward_intermediates`` returns. Everything goes
through the model contract (``forward_intermediates``, ``feature_info``, ``prune_intermediate_layers``,
``group_matcher``, ``no_weight_decay``, ``set_grad_checkpointing``, ``input_spec``), so every family plugs in,
dict inputs and extra call keywords (``wavelengths=``, a diffusion timestep) included.
"""
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError, ManifestError
from ..finetune import _matcher_owner, compile_group_matcher, unreached_parameters
from .dense import FPNHead, LinearSegHead, UNetHead, UPerNetHead
from .swin_unet import SwinUNetDecoder

__all__ = ['SegmentationModel', 'create_segmentation_model', 'load_segmentation_model', 'DECODERS']

_logger = logging.getLogger(__name__)

DECODERS = {'fpn': FPNHead, 'upernet': UPerNetHead, 'unet': UNetHead, 'linear': LinearSegHead,
            'swinunet': SwinUNetDecoder}
SEGMENTATION_TASK = 'segmentation'


def _info_dicts(feature_info: Any) -> List[Dict[str, Any]]:
    """``feature_info`` as a list of dicts (a model's list, or timm's ``FeatureInfo`` of a features_only wrapper)."""
    if hasattr(feature_info, 'get_dicts'):
        return list(feature_info.get_dicts())
    return [dict(fi) for fi in feature_info]


def _input_size(x: Any) -> Tuple[int, int]:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[-2:])
    if isinstance(x, Mapping):
        sizes = [tuple(v.shape[-2:]) for v in x.values() if isinstance(v, torch.Tensor) and v.ndim == 4]
        if sizes:
            # modalities on different grids: predict on the finest one
            return max(s[0] for s in sizes), max(s[1] for s in sizes)
    raise InvalidInputError(f'cannot tell the output size from a {type(x).__name__} input; pass output_size=(H, W)')


class SegmentationModel(nn.Module):
    """Backbone features -> decoder -> logits at the input resolution.

    Args:
        backbone: a model built by ``create_model`` (uses its ``forward_intermediates``; pruned to the levels
            used, as timm's ``features_only`` does), or a ``features_only`` module (``create_model(...,
            features_only=True)``: called as is and read through its ``feature_info``).
        decoder: ``'fpn'``, ``'upernet'``, ``'unet'``, ``'linear'``, ``'swinunet'`` or a built decoder module
            taking the list of maps.
        num_classes: output classes.
        out_indices: the ``feature_info`` levels the decoder reads (default: all); for a ``features_only``
            backbone its own ``out_indices`` apply.
        decoder_kwargs: constructor arguments of a named decoder.
        freeze_unused: after building, run one small example forward and freeze (``requires_grad=False``)
            backbone parameters it does not reach (e.g. a contrastive projection head), so that backward
            reaches every trainable parameter and DDP needs no ``find_unused_parameters``. The names are
            in ``self.unused_parameters``.

    Attributes:
        backbone, decoder, num_classes, feature_info (the levels used), input_spec / pretrained_cfg (the
        backbone's).
    """

    def __init__(
            self,
            backbone: nn.Module,
            decoder: Union[str, nn.Module] = 'fpn',
            num_classes: Optional[int] = None,
            out_indices: Optional[Sequence[int]] = None,
            decoder_kwargs: Optional[Dict[str, Any]] = None,
            freeze_unused: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.use_intermediates = callable(getattr(backbone, 'forward_intermediates', None))
        infos = _info_dicts(backbone.feature_info)
        if self.use_intermediates:
            from ..models._features import feature_take_indices
            take, _ = feature_take_indices(len(infos), out_indices)
            self.out_indices: Optional[Tuple[int, ...]] = tuple(int(i) for i in take)
            if callable(getattr(backbone, 'prune_intermediate_layers', None)):
                # drop the classifier and the blocks after the last level used, as timm's features_only does;
                # final norms stay (prune_norm is not safe on every family) and are frozen as unused below
                backbone.prune_intermediate_layers(list(self.out_indices), prune_norm=False, prune_head=True)
            infos = [infos[i] for i in self.out_indices]
        else:
            if out_indices is not None:
                raise ValueError('out_indices is set when building a features_only backbone, not here')
            self.out_indices = None
        self.feature_info = infos
        in_chs = [fi['num_chs'] for fi in infos]
        reductions = [fi['reduction'] for fi in infos]
        self.decoder_name = decoder if isinstance(decoder, str) else type(decoder).__name__
        self.decoder_kwargs = dict(decoder_kwargs or {})
        if isinstance(decoder, str):
            if decoder not in DECODERS:
                raise ValueError(f'decoder must be one of {list(DECODERS)} or a module, got {decoder!r}')
            if num_classes is None:
                raise ValueError('num_classes is required with a named decoder')
            decoder = _build_decoder(decoder, in_chs, reductions, num_classes, self.input_spec, self.decoder_kwargs)
        self.decoder = decoder
        self.num_classes = getattr(decoder, 'num_classes', num_classes)
        self.unused_parameters: Tuple[str, ...] = ()
        if freeze_unused:
            self._freeze_unused()

    # ------------------------------------------------------------------ contract pass-through
    @property
    def input_spec(self):
        return getattr(self.backbone, 'input_spec', None)

    @property
    def pretrained_cfg(self):
        return getattr(self.backbone, 'pretrained_cfg', None)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """The backbone's matcher over ``backbone.*`` names (a callable, as timm accepts); the decoder is the head."""
        prefix, owner = _matcher_owner(self.backbone)
        return compile_group_matcher(owner.group_matcher(coarse=coarse), 'backbone.' + prefix)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        try:
            prefix, owner = _matcher_owner(self.backbone)
        except ValueError:
            return set()
        nwd = getattr(owner, 'no_weight_decay', None)
        return {'backbone.' + prefix + n for n in nwd()} if callable(nwd) else set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        mods = [m for m in self.backbone.modules() if callable(getattr(m, 'set_grad_checkpointing', None))]
        if not mods:
            raise ValueError(f'{type(self.backbone).__name__} has no set_grad_checkpointing')
        mods[0].set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: Any, **kwargs: Any) -> List[torch.Tensor]:
        """The NCHW maps the decoder reads (extra keywords such as ``wavelengths=`` go to the backbone)."""
        if self.use_intermediates:
            return self.backbone.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True,
                                                       **kwargs)
        return self.backbone(x, **kwargs)

    def forward(self, x: Any, output_size: Optional[Tuple[int, int]] = None, **kwargs: Any) -> torch.Tensor:
        """Logits (B, num_classes, H, W) at the input size (dict inputs: the largest modality grid) or ``output_size``."""
        size = tuple(output_size) if output_size is not None else _input_size(x)
        logits = self.decoder(self.forward_features(x, **kwargs))
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode='bilinear', align_corners=False)
        return logits

    def _freeze_unused(self) -> None:
        spec = self.input_spec
        if spec is None:
            _logger.info('no input_spec: unused-parameter check skipped')
            return
        from ..transforms import example_call
        mult = max(1, spec.size_multiple)
        size = tuple(spec.image_size) if spec.fixed_size else (mult * -(-64 // mult),) * 2
        x, kwargs = example_call(spec, batch_size=1, image_size=size, device=next(self.parameters()).device)
        unused = unreached_parameters(self, x, **kwargs)
        params = dict(self.named_parameters())
        bad = [n for n in unused if not n.startswith('backbone.')]
        if bad:
            raise RuntimeError(f'decoder parameters not reached by the forward: {bad[:4]}')
        for n in unused:
            params[n].requires_grad_(False)
        if unused:
            _logger.info('froze %d backbone parameters the segmentation forward does not use: %s', len(unused),
                         ', '.join(unused[:6]))
        self.unused_parameters = tuple(unused)

    # ------------------------------------------------------------------ save / load
    def config_dict(self) -> Dict[str, Any]:
        """``config.json`` content: the backbone's config plus a ``segmentation`` section."""
        base = self.backbone.config_dict() if callable(getattr(self.backbone, 'config_dict', None)) else {}
        if not base or not self.use_intermediates:
            raise ValueError('save_pretrained needs a backbone built by eobackbones.create_model (not features_only)')
        if self.decoder_name not in DECODERS:
            raise ValueError(f'save_pretrained needs a named decoder ({list(DECODERS)}), got {self.decoder_name}')
        cfg = self.pretrained_cfg
        base.update(
            task=SEGMENTATION_TASK,
            finetuned_from=cfg.name if cfg is not None and cfg.tag else None,
            segmentation=dict(num_classes=self.num_classes, decoder=self.decoder_name,
                              decoder_kwargs=self.decoder_kwargs, out_indices=list(self.out_indices)))
        return base

    def save_pretrained(self, save_dir: Union[str, Path]) -> Path:
        """Write ``config.json`` and ``model.safetensors``; :func:`load_segmentation_model` reads them back."""
        from safetensors.torch import save_model
        from ..models._base import CONFIG_NAME, WEIGHTS_NAME
        save_dir = Path(save_dir)
        conf = self.config_dict()
        text = json.dumps(conf, indent=2) + '\n'  # fail before writing anything if the kwargs are not JSON data
        save_dir.mkdir(parents=True, exist_ok=True)
        tmp = save_dir / (WEIGHTS_NAME + '.tmp')
        save_model(self, str(tmp), metadata={'format': 'pt', 'architecture': conf['architecture'],
                                             'task': SEGMENTATION_TASK})
        tmp.replace(save_dir / WEIGHTS_NAME)
        (save_dir / CONFIG_NAME).write_text(text, encoding='utf-8')
        return save_dir


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


def create_segmentation_model(
        backbone: Union[str, nn.Module],
        num_classes: int,
        decoder: str = 'fpn',
        pretrained: Union[bool, str] = False,
        out_indices: Optional[Sequence[int]] = None,
        decoder_kwargs: Optional[Dict[str, Any]] = None,
        **backbone_kwargs: Any,
) -> SegmentationModel:
    """A segmentation model: backbone by name (or a built one) + a decoder, logits at the input resolution.

    Args:
        backbone: a registered name (``'dofa_base'``, ``'dualsimclr_resnet18'``, ``'hf-hub:...'``) or a model.
        num_classes: output classes.
        decoder: ``'fpn'``, ``'upernet'``, ``'unet'``, ``'linear'``, or ``'swinunet'`` (SSL-Swin backbones only).
        pretrained: backbone weights (as ``create_model``).
        out_indices: ``feature_info`` levels the decoder reads (default: all).
        decoder_kwargs: decoder constructor arguments (``channels=``, ``decoder_channels=`` ...).
        **backbone_kwargs: backbone arguments (``bands=``, ``wavelengths=``, ``missing=``, ``img_size=`` ...).

    Raises:
        ValueError: unknown decoder, or ``swinunet`` on a backbone that is not an SSL-Swin model.
    """
    if decoder not in DECODERS:
        raise ValueError(f'decoder must be one of {list(DECODERS)}, got {decoder!r}')
    if isinstance(backbone, str):
        from ..models import create_model
        if backbone_kwargs.get('features_only'):
            raise ValueError('create_segmentation_model builds the backbone itself; drop features_only=')
        model = create_model(backbone, pretrained=pretrained, **backbone_kwargs)
    else:
        if backbone_kwargs:
            raise ValueError(f'backbone keyword arguments {sorted(backbone_kwargs)} need a backbone name, not a model')
        model = backbone
    if decoder == 'swinunet':
        cfg = getattr(model, 'pretrained_cfg', None)
        arch = getattr(cfg, 'architecture', None) or type(model).__name__
        if not str(arch).startswith('sslswin'):
            raise ValueError(f'decoder="swinunet" is the SSL-Swin models\' decoder (sslswin_tiny, sslswin_tiny_s1, '
                             f'sslswin_tiny_s2); {arch} takes "fpn", "upernet" or "unet"')
    return SegmentationModel(model, decoder, num_classes, out_indices=out_indices, decoder_kwargs=decoder_kwargs)


def load_segmentation_model(name_or_dir: Union[str, Path], **kwargs: Any) -> SegmentationModel:
    """Load a directory written by :meth:`SegmentationModel.save_pretrained` (``local-dir:``/``hf-hub:`` or a path).

    Raises:
        ManifestError: the config is not a segmentation model's.
        CheckpointFormatError: the weights do not fit the rebuilt model (strict).
    """
    from safetensors.torch import load_file
    from ..models._builder import load_state_dict_strict
    from ..models._factory import read_model_dir
    from ..spec import InputSpec
    name = str(name_or_dir)
    if not name.startswith(('local-dir:', 'hf-hub:')):
        name = 'local-dir:' + name
    conf, weights_path, where = read_model_dir(name)
    seg = conf.get('segmentation')
    if conf.get('task') != SEGMENTATION_TASK or not isinstance(seg, Mapping):
        raise ManifestError(f'{where}: config.json is not a segmentation model (task {conf.get("task")!r}); '
                            f'load it with eobackbones.create_model')
    args = dict(conf.get('model_args') or {})
    args.update(kwargs)
    model = create_segmentation_model(
        conf['architecture'], seg['num_classes'], seg['decoder'], pretrained=False, out_indices=seg['out_indices'],
        decoder_kwargs=seg.get('decoder_kwargs'), **args)
    load_state_dict_strict(model, load_file(str(weights_path)), source=where)
    if conf.get('input_spec'):
        model.backbone.input_spec = InputSpec.from_dict(conf['input_spec'])
    return model
