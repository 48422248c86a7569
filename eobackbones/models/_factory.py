"""``create_model``: the one door to every model."""
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from ..errors import ManifestError, UnknownModelError
from ..spec import InputSpec
from ._base import CONFIG_FORMAT, CONFIG_NAME, WEIGHTS_NAME
from ._registry import (
    _ensure_manifest, default_tag, get_arch_cfg, get_pretrained_cfg, model_entrypoint, split_model_name_tag)

__all__ = ['create_model', 'parse_model_name', 'read_model_dir']

_PREFIXES = ('hf-hub:', 'local-dir:')


def parse_model_name(name: str):
    """Split a name into (source, rest): ``('registry', 'arch.tag')``, ``('hf-hub', 'org/repo@rev')``, ..."""
    for p in _PREFIXES:
        if name.startswith(p):
            return p[:-1], name[len(p):]
    if '/' in name or ':' in name:
        raise UnknownModelError(
            f'{name!r} is not a registered model name; a source needs a prefix: '
            f'"hf-hub:org/repo[@revision]" or "local-dir:/path/to/dir"')
    return 'registry', name


def create_model(
        model_name: str,
        pretrained: Union[bool, str] = False,
        **kwargs: Any,
) -> nn.Module:
    """Create a model by name.

    Args:
        model_name: ``arch``, ``arch.tag``, ``hf-hub:org/repo[@revision]`` or ``local-dir:/path``.
        pretrained: False (random init), True (the tag in the name, else the default tag) or a tag.
        **kwargs: model arguments (``num_classes``, ``wavelengths``, ``bands``, ``features_only``,
            ``out_indices`` ...); ``None`` values are dropped so callers can pass optional settings through.

    Raises:
        UnknownModelError: unknown name or tag (with close matches), or a URI without a known prefix.
        WeightsNotFoundError / ChecksumMismatchError / CheckpointFormatError: see the loader.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source, rest = parse_model_name(model_name)
    if source != 'registry':
        return _create_from_dir(source, rest, pretrained, **kwargs)

    arch, tag = split_model_name_tag(rest)
    entry = model_entrypoint(arch)  # raises with close matches
    _ensure_manifest()
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
    return entry(pretrained=bool(pretrained), pretrained_cfg=cfg, **kwargs)


def read_model_dir(model_name: str) -> Tuple[Dict[str, Any], Path, str]:
    """``config.json`` (parsed), the weights path and a display name of a ``hf-hub:`` / ``local-dir:`` source."""
    from ..errors import WeightsNotFoundError
    from ..hub.download import hub_file
    source, rest = parse_model_name(model_name)
    if source == 'local-dir':
        root = Path(os.path.expanduser(rest))
        conf_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
        for p in (conf_path, weights_path):
            if not p.is_file():
                raise WeightsNotFoundError(f'local-dir:{root}: expected {p.name} (written by save_pretrained), not found')
        where = f'local-dir:{root}'
    elif source == 'hf-hub':
        repo, _, rev = rest.partition('@')
        conf_path = hub_file(repo, CONFIG_NAME, rev or None)
        weights_path = hub_file(repo, WEIGHTS_NAME, rev or None)
        where = f'hf-hub:{rest}'
    else:
        raise UnknownModelError(f'{model_name!r} is not a "hf-hub:" or "local-dir:" source')
    conf = json.loads(Path(conf_path).read_text(encoding='utf-8'))
    if conf.get('format') != CONFIG_FORMAT or 'architecture' not in conf:
        raise ManifestError(f'{where}: config.json is not an eobackbones config (format {conf.get("format")!r})')
    return conf, Path(weights_path), where


def _create_from_dir(source: str, rest: str, pretrained: Union[bool, str], **kwargs: Any) -> nn.Module:
    """Load a directory written by ``save_pretrained`` (locally or from a Hub repository)."""
    # a directory source is its weights: pretrained is not meaningful here
    conf, weights_path, where = read_model_dir(f'{source}:{rest}')
    from safetensors.torch import load_file
    import torch
    from ._builder import _materialize, load_state_dict_strict
    args = dict(conf.get('model_args') or {})
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', None)
    args.update(kwargs)
    with torch.device('meta'):  # the weights follow: no random init (as the builder does for pretrained=True)
        model = create_model(conf['architecture'], pretrained=False, **args)
    state_dict = load_file(str(weights_path))
    allow: Tuple[str, ...] = ()
    if 'num_classes' in kwargs:
        # the saved head may not fit the requested one (model_args need not record num_classes): compare tensors
        prefix = model.classifier_prefix + '.'
        own = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}
        saved = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith(prefix)}
        if own != saved:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
            allow = (prefix + '*',)
    load_state_dict_strict(model, state_dict, allow, source=where, assign=True)
    _materialize(model)  # a fresh head when num_classes changed, non-persistent buffers
    if conf.get('input_spec'):
        model.input_spec = InputSpec.from_dict(conf['input_spec'])
    # the weights come from the directory: keep the tag it records (provenance), not the manifest's source
    tag = split_model_name_tag(conf.get('weights') or '')[1]
    model.pretrained_cfg = dataclasses.replace(
        model.pretrained_cfg, tag=tag, source=None, format='safetensors', converter=None,
        provenance=f'loaded from {where}', input_spec=model.input_spec)
    if features_only:
        from ._features import FeatureGetter
        model = FeatureGetter(model, out_indices)
    return model
