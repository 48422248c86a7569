"""``create_model``: the one door to every model, and the one name resolver behind it."""
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._io import sha256_file
from ..cfg import DirSource, FileSource, HubSource, PretrainedCfg, Provenance
from ..errors import CheckpointFormatError, ManifestError, UnknownModelError
from ..hub.weights import ConvertTarget, get_converter, manual_dir, read_model_dir
from ..spec import InputSpec
from ._base import TIMM_PREFIX
from ._builder import _materialize, load_state_dict_strict
from ._segmentation import (
    DECODERS, SEGMENTATION_TASK, SegmentationModel, build_segmentation_from_dir, segmentation_builder)
from ._registry import (
    _ensure_manifest, default_tag, get_arch_cfg, get_pretrained_cfg, list_tags, model_entrypoint, split_model_name_tag)

__all__ = ['create_model', 'create_segmentation_model', 'parse_model_name', 'resolve_model', 'ResolvedModel',
           'convert_checkpoint']

_logger = logging.getLogger(__name__)
_PREFIXES = ('hf-hub:', 'local-dir:')


def parse_model_name(name: str) -> Tuple[str, str]:
    """Split a name into (source, rest): ``('registry', 'arch.tag')``, ``('hf-hub', 'org/repo@rev')``, ..."""
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f'a model name is a non-empty string, got {name!r}')
    for p in _PREFIXES:
        if name.startswith(p):
            return p[:-1], name[len(p):]
    if '/' in name or ':' in name:
        raise UnknownModelError(
            f'{name!r} is not a registered model name; a source needs a prefix: '
            f'"hf-hub:org/repo[@revision]" or "local-dir:/path/to/dir"')
    return 'registry', name


@dataclass(frozen=True)
class ResolvedModel:
    """What a model name means: the architecture, the cfg to build it with, and whether weights are loaded.

    ``name`` is what reports show (``arch.tag``, ``arch``, ``local-dir:/path``, ``hf-hub:org/repo@rev``).
    """
    arch: str
    cfg: Optional[PretrainedCfg]
    pretrained: bool
    name: str
    segmentation: Optional[Dict[str, Any]] = None  # a saved segmentation model: backbone, decoder, classes ...

    @property
    def weights(self) -> str:
        """The weights' name in reports: the tag name or directory, or ``random-init``."""
        return self.name if self.pretrained else 'random-init'


def _arch_of_config(conf: Dict[str, Any]) -> str:
    arch = conf['architecture']
    return arch[len(TIMM_PREFIX):] if conf.get('format') != 'eobackbones/1' and arch.startswith(TIMM_PREFIX) else arch


def _dir_cfg(uri: str) -> Tuple[str, PretrainedCfg, Optional[Dict[str, Any]]]:
    """The cfg of a ``save_pretrained`` directory: its architecture's defaults + what it recorded about itself
    (and, for a segmentation model, its ``segmentation`` section; the architecture is then the backbone's)."""
    conf, _, canonical = read_model_dir(uri)
    seg = conf.get('segmentation') if conf.get('task') == SEGMENTATION_TASK else None
    if conf.get('task', SEGMENTATION_TASK) == SEGMENTATION_TASK and seg is not None and not isinstance(seg, dict):
        raise ManifestError(f'{canonical}: config.json has a bad segmentation section')
    arch = seg['backbone'] if seg else _arch_of_config(conf)
    model_entrypoint(arch)  # unknown architecture: close matches
    base = get_pretrained_cfg(arch) or PretrainedCfg(arch)
    try:
        spec = InputSpec.from_dict(conf['input_spec']) if conf.get('input_spec') else base.input_spec
    except (ManifestError, TypeError) as e:
        raise ManifestError(f'{canonical}: config.json has a bad input_spec: {e}') from None
    num_classes = conf.get('num_classes', (conf.get('model_args') or {}).get('num_classes', 0))
    cfg = dataclasses.replace(
        base, tag='', source=DirSource(canonical, conf.get('weights_sha256')), format='safetensors', converter=None,
        model_args=dict(conf.get('model_args') or {}), input_spec=spec, num_classes=int(num_classes or 0),
        license=conf.get('license', base.license), paper=conf.get('paper', base.paper))
    return arch, cfg, seg


def resolve_model(name: str, pretrained: Union[bool, str, None] = False) -> ResolvedModel:
    """The one name resolver (used by ``create_model``, the probe, ``eobackbones info`` and the benchmarks).

    Args:
        name: ``arch``, ``arch.tag``, ``hf-hub:org/repo[@revision]`` or ``local-dir:/path``.
        pretrained: False (random init), True (the tag in the name, else the architecture's default tag), a tag,
            or ``'none'``. A directory source always holds its own weights.

    Raises:
        UnknownModelError: unknown name or tag (with close matches), a URI without a known prefix, conflicting
            tags, or ``pretrained=True`` for an architecture without published weights.
    """
    source, rest = parse_model_name(name)
    if source != 'registry':
        arch, cfg, seg = _dir_cfg(name)
        return ResolvedModel(arch, cfg, True, cfg.source.uri, seg)
    arch, tag = split_model_name_tag(rest)
    model_entrypoint(arch)  # raises with close matches
    _ensure_manifest()
    if isinstance(pretrained, str) and pretrained.lower() == 'none':
        pretrained = False
    if isinstance(pretrained, str):
        if tag and tag != pretrained:
            raise UnknownModelError(f'conflicting tags: name {rest!r} and pretrained={pretrained!r}')
        tag, pretrained = pretrained, True
    if pretrained and not tag:
        tag = default_tag(arch)
        if tag is None:
            note = getattr(get_arch_cfg(arch), 'notes', '') or ''
            raise UnknownModelError(
                f'no pretrained weights exist for {arch}{": " + note if note else ""}; use pretrained=False for random init')
    cfg = get_pretrained_cfg(f'{arch}.{tag}' if tag else arch)
    return ResolvedModel(arch, cfg, bool(pretrained), cfg.name if cfg is not None and pretrained else arch)


def create_model(
        model_name: str,
        pretrained: Union[bool, str] = False,
        **kwargs: Any,
) -> nn.Module:
    """Create a model by name.

    Args:
        model_name: ``arch``, ``arch.tag``, ``hf-hub:org/repo[@revision]`` or ``local-dir:/path`` (a directory
            written by ``save_pretrained``; it always loads its own weights, verified by the sha256 it recorded).
        pretrained: False (random init), True (the tag in the name, else the default tag) or a tag.
        **kwargs: model arguments (``num_classes``, ``wavelengths``, ``bands``, ``features_only``,
            ``out_indices`` ...); ``None`` values are dropped so callers can pass optional settings through.
            As in timm, ``pretrained_cfg_overlay=dict(file=PATH)`` (with ``pretrained=True``) or
            ``checkpoint_path=PATH`` load a local checkpoint instead, through the family's converter (an upstream
            file) or as our own keys, strictly.

    Raises:
        UnknownModelError: unknown name or tag (with close matches), or a URI without a known prefix.
        WeightsNotFoundError / ChecksumMismatchError / CheckpointFormatError: see the loader.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.pop('pretrained_cfg', None)
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    path = kwargs.pop('checkpoint_path', None)
    unknown = sorted(set(overlay) - {'file'})
    if unknown:
        raise ValueError(f'pretrained_cfg_overlay: only "file" is supported (a local checkpoint), got {unknown}')
    if overlay.get('file') and not pretrained:
        raise ValueError('pretrained_cfg_overlay=dict(file=...) loads weights: pass pretrained=True as well')
    path = path or overlay.get('file')
    if path is not None:
        r = resolve_model(model_name, False)
        cfg = dataclasses.replace(r.cfg or PretrainedCfg(r.arch), source=FileSource(str(path)))
        return model_entrypoint(r.arch)(pretrained=True, pretrained_cfg=cfg, **kwargs)
    r = resolve_model(model_name, pretrained)
    if r.segmentation is not None:
        return build_segmentation_from_dir(r.arch, r.cfg, r.segmentation, **kwargs)
    return model_entrypoint(r.arch)(pretrained=r.pretrained, pretrained_cfg=r.cfg, **kwargs)


def create_segmentation_model(
        backbone: str,
        num_classes: int,
        decoder: str = 'fpn',
        pretrained: Union[bool, str] = False,
        out_indices: Optional[Sequence[int]] = None,
        decoder_kwargs: Optional[Dict[str, Any]] = None,
        **backbone_kwargs: Any,
) -> SegmentationModel:
    """A segmentation model: a backbone by name + a decoder, logits at the input resolution.

    ``save_pretrained`` writes one directory that ``create_model('local-dir:...')`` / ``hf-hub:`` load back.

    Args:
        backbone: a registered name (``'dofa_base'``, ``'dualsimclr_resnet18'``) or a ``local-dir:`` / ``hf-hub:``
            backbone directory.
        num_classes: output classes.
        decoder: ``'fpn'``, ``'upernet'``, ``'unet'``, ``'linear'``, or ``'swinunet'`` (SSL-Swin backbones only).
        pretrained: backbone weights (as ``create_model``).
        out_indices: ``feature_info`` levels the decoder reads (default: all).
        decoder_kwargs: decoder constructor arguments (``channels=`` ...).
        **backbone_kwargs: backbone arguments (``bands=``, ``wavelengths=``, ``missing=``, ``img_size=`` ...).

    Raises:
        ValueError: unknown decoder, ``swinunet`` on a backbone that is not an SSL-Swin model, or ``features_only``.
    """
    if decoder not in DECODERS:
        raise ValueError(f'decoder must be one of {list(DECODERS)}, got {decoder!r}')
    if backbone_kwargs.get('features_only'):
        raise ValueError('create_segmentation_model builds the backbone itself; drop features_only=')
    r = resolve_model(backbone, pretrained)
    if r.segmentation is not None:
        raise ValueError(f'{backbone} is a segmentation model already; load it with create_model')
    if decoder == 'swinunet' and not r.arch.startswith('sslswin'):
        raise ValueError(f'decoder="swinunet" is the SSL-Swin models\' decoder (sslswin_tiny, sslswin_tiny_s1, '
                         f'sslswin_tiny_s2); {r.arch} takes "fpn", "upernet", "unet" or "linear"')
    bb = create_model(backbone, pretrained=pretrained, **backbone_kwargs)
    model = SegmentationModel(bb, decoder, num_classes, out_indices, decoder_kwargs)
    model.pretrained_cfg = bb.pretrained_cfg
    model.model_args = dict(bb.model_args)
    model._builder = (segmentation_builder(r.arch, bb.pretrained_cfg, decoder, num_classes, out_indices, decoder_kwargs),
                      dict(bb.model_args))
    prov = bb.provenance
    # the backbone's weights; the decoder is new (changes after this show as training)
    model.mark_weights(prov if prov.kind == 'none' else dataclasses.replace(prov, note='new segmentation decoder'))
    return model


# ----------------------------------------------------------------------------------------------- convert


def convert_checkpoint(
        converter: str,
        checkpoint: Union[str, Path],
        out_dir: Optional[Union[str, Path]] = None,
        options: Optional[Dict[str, str]] = None,
) -> List[Path]:
    """``eobackbones convert``: an upstream checkpoint -> ``save_pretrained`` directories (weights, config, card).

    The converter's registration says which architectures the file yields and how. Without ``out_dir``,
    weights that exist only outside the Hub (``installable``) are installed into the cache, where
    ``create_model(NAME, pretrained=True)`` finds them. Every directory is written atomically: a failure leaves
    nothing half-written.

    Raises:
        CheckpointFormatError: unreadable file, unknown / missing keys, shape mismatches.
        ValueError: unknown or malformed options, or no ``out_dir`` for a converter that installs nothing.
    """
    conv = get_converter(converter)
    if not (conv.archs or conv.targets):
        raise UnknownModelError(f'converter {converter!r} is not a convert command')
    opts = conv.parse_options(options or {})
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f'checkpoint {checkpoint} does not exist')
    if out_dir is None and not conv.installable:
        raise ValueError(f'convert {converter} needs --out DIR (its published weights load from the Hub directly)')
    raw = conv.read(checkpoint, checkpoint.name)
    sha = sha256_file(checkpoint)
    # every target is converted and strictly loaded before anything is written: a bad key leaves no output behind
    ready = []
    for t in conv.resolve_targets(raw, opts):
        t = t if isinstance(t, ConvertTarget) else ConvertTarget(*t)
        tag = t.tag or _published_tag(t.arch, sha)
        cfg = get_pretrained_cfg(f'{t.arch}.{tag}' if tag else t.arch)
        if cfg is None:
            raise UnknownModelError(f'converter {converter} names unknown architecture {t.arch!r}')
        cfg = dataclasses.replace(cfg, model_args=dict(cfg.model_args, **t.model_args))
        with torch.device('meta'):
            model = model_entrypoint(t.arch)(pretrained=False, pretrained_cfg=cfg)
        sd = conv.fn(raw, cfg)
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointFormatError(f'{checkpoint.name}: converter {converter} left non-tensor entries: {bad[:5]}')
        load_state_dict_strict(model, sd, conv.allow_missing, source=f'{checkpoint.name} -> {t.arch}', assign=True)
        _materialize(model)
        model.eval()
        if cfg.tag:  # the file is (or is installed as) published weights: say which
            prov = Provenance('manifest', name=cfg.name, sha256=sha,
                              source=f'{cfg.source.describe() if cfg.source else "manifest"} (file {checkpoint.name})')
        else:
            prov = Provenance('file', source=checkpoint.name, sha256=sha,
                              note=f'converted with `eobackbones convert {converter}`')
        model.mark_weights(prov)
        ready.append((model, (Path(out_dir) / cfg.name) if out_dir is not None else manual_dir(cfg)))
    written = []
    for model, dest in ready:
        model.save_pretrained(dest, conversion=conv.description)
        written.append(dest)
        _logger.info('wrote %s', dest)
    return written


def _published_tag(arch: str, sha: str) -> str:
    """The manifest tag whose published checksum this file has (so a converted official file says so), or ''."""
    for tag in list_tags(arch):
        src = get_pretrained_cfg(f'{arch}.{tag}').source
        if isinstance(src, HubSource) and sha.startswith(src.digest):
            return tag
    return ''
