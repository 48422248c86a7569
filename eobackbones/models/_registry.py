"""Model registry: names -> entrypoints, ``arch.tag`` -> pretrained cfgs.

Default tag rule: ``create_model(arch, pretrained=True)`` uses the first tag listed for ``arch`` in
``weights_manifest.yaml`` that has a Hub source; if no tag has one, the first tag listed (whose
loading then explains how to obtain the weights manually).
"""
import difflib
import fnmatch
import re
import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..cfg import PretrainedCfg
from ..errors import UnknownModelError
from ..hub.manifest import load_manifest
from ..sensors import get_sensor, list_sensors

__all__ = [
    'register_model', 'unregister_model', 'register_arch_cfg', 'register_pretrained', 'unregister_pretrained',
    'split_model_name_tag', 'list_models', 'list_pretrained', 'is_model', 'model_entrypoint', 'get_pretrained_cfg',
    'get_arch_cfg', 'list_tags', 'default_tag', 'on_register', 'known_modalities',
]

_model_entrypoints: Dict[str, Callable] = {}
_model_to_module: Dict[str, str] = {}
_arch_cfgs: Dict[str, PretrainedCfg] = {}  # tag-less cfg per architecture (input spec without weights)
_pretrained_cfgs: Dict[str, 'OrderedDict[str, PretrainedCfg]'] = {}  # arch -> tag -> cfg
_manifest_loaded = False
_listeners: List[Callable[[str, Callable], None]] = []


def _ensure_manifest() -> None:
    """Read weights_manifest.yaml once (lazily: listing entrypoints needs no YAML)."""
    global _manifest_loaded
    if not _manifest_loaded:
        _manifest_loaded = True
        archs, weights = load_manifest()
        for cfg in archs:
            _arch_cfgs.setdefault(cfg.architecture, cfg)
        for cfg in weights:
            register_pretrained(cfg)


def on_register(fn: Callable[[str, Callable], None]) -> None:
    """Call ``fn(name, entrypoint)`` for every registered model, now and later (e.g. to mirror them into timm)."""
    _listeners.append(fn)
    for name, entry in list(_model_entrypoints.items()):
        fn(name, entry)


def register_model(fn: Callable) -> Callable:
    """Decorator: register an entrypoint under its function name."""
    name = fn.__name__
    mod = sys.modules[fn.__module__]
    _model_entrypoints[name] = fn
    _model_to_module[name] = fn.__module__.split('.')[-1]
    if hasattr(mod, '__all__') and name not in mod.__all__:
        mod.__all__.append(name)
    for listener in _listeners:
        listener(name, fn)
    return fn


def unregister_model(name: str) -> None:
    """Remove an entrypoint, its architecture cfg and its weights cfgs from the registry (e.g. a test-only model)."""
    _model_entrypoints.pop(name, None)
    _model_to_module.pop(name, None)
    _arch_cfgs.pop(name, None)
    _pretrained_cfgs.pop(name, None)


def register_arch_cfg(cfg: PretrainedCfg) -> None:
    """Register the weight-less default cfg (input spec, notes) of an architecture (the manifest's
    ``architectures:`` section does this for the package's own models; tests and users may add theirs)."""
    _arch_cfgs[cfg.architecture] = cfg


def register_pretrained(cfg: PretrainedCfg) -> None:
    """Register weights as ``arch.tag`` (the manifest does this; tests and users may add their own)."""
    if not cfg.tag:
        raise UnknownModelError(f'pretrained cfg for {cfg.architecture!r} needs a tag')
    _pretrained_cfgs.setdefault(cfg.architecture, OrderedDict())[cfg.tag] = cfg


def unregister_pretrained(name: str) -> None:
    arch, tag = split_model_name_tag(name)
    _pretrained_cfgs.get(arch, {}).pop(tag, None)


def split_model_name_tag(name: str) -> Tuple[str, str]:
    arch, _, tag = name.partition('.')
    return arch, tag


def _natural_key(s: str) -> List[Union[int, str]]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', s)]


def _spec_of(name: str) -> Optional[PretrainedCfg]:
    arch, tag = split_model_name_tag(name)
    if tag:
        return _pretrained_cfgs.get(arch, {}).get(tag)
    return get_pretrained_cfg(arch, quiet=True)


def list_models(
        pattern: Union[str, Sequence[str]] = '*',
        exclude: Optional[Union[str, Sequence[str]]] = None,
        pretrained: bool = False,
        modality: Optional[str] = None,
        sensor: Optional[str] = None,
) -> List[str]:
    """List architectures (or ``arch.tag`` with sources when ``pretrained=True``), fnmatch + natural sort.

    Args:
        pattern: fnmatch pattern(s) to include.
        exclude: fnmatch pattern(s) to drop.
        pretrained: list ``arch.tag`` names that have weights (Hub or manual) instead of architectures.
        modality: keep models whose input spec has this modality (``s1``, ``s2``), or that take any bands.
        sensor: keep models whose input spec uses this sensor (``sentinel2``), or that take any sensor.
    """
    _ensure_manifest()
    if pretrained:
        names = [f'{a}.{t}' for a, tags in _pretrained_cfgs.items() if a in _model_entrypoints for t in tags]
    else:
        names = list(_model_entrypoints)
    pats = [pattern] if isinstance(pattern, str) else list(pattern)
    names = [n for n in names if any(fnmatch.fnmatch(n, p) or fnmatch.fnmatch(n.split('.')[0], p) for p in pats)]
    if exclude:
        exs = [exclude] if isinstance(exclude, str) else list(exclude)
        names = [n for n in names if not any(fnmatch.fnmatch(n, e) for e in exs)]
    if modality or sensor:
        kept = []
        for n in names:
            cfg = _spec_of(n)
            spec = cfg.input_spec if cfg else None
            if spec is None:
                continue
            if modality and not (modality in spec.modality_names or spec.any_bands):
                continue
            if sensor and not (sensor in spec.sensors or spec.any_bands):
                continue
            kept.append(n)
        names = kept
    return sorted(names, key=_natural_key)


def list_pretrained(pattern: str = '*', exclude: Optional[str] = None) -> List[str]:
    return list_models(pattern, exclude=exclude, pretrained=True)


def list_tags(arch: str) -> List[str]:
    _ensure_manifest()
    return list(_pretrained_cfgs.get(arch, {}))


def is_model(name: str) -> bool:
    arch, tag = split_model_name_tag(name)
    if arch not in _model_entrypoints:
        return False
    return not tag or tag in list_tags(arch)


def _unknown(name: str) -> UnknownModelError:
    candidates = list(_model_entrypoints) + [f'{a}.{t}' for a, ts in _pretrained_cfgs.items() for t in ts]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f'; did you mean: {", ".join(close)}?' if close else '; see `eobackbones list`'
    return UnknownModelError(f'unknown model {name!r}{hint}')


def model_entrypoint(name: str) -> Callable:
    arch, _ = split_model_name_tag(name)
    if arch not in _model_entrypoints:
        raise _unknown(name)
    return _model_entrypoints[arch]


def get_arch_cfg(arch: str) -> Optional[PretrainedCfg]:
    _ensure_manifest()
    return _arch_cfgs.get(arch)


def default_tag(arch: str) -> Optional[str]:
    tags = _pretrained_cfgs.get(arch, {})
    for tag, cfg in tags.items():
        if cfg.has_weights:
            return tag
    return next(iter(tags), None)


def get_pretrained_cfg(name: str, quiet: bool = False) -> Optional[PretrainedCfg]:
    """Cfg for ``arch.tag``; for a bare ``arch`` the default tag's cfg, else the weight-less arch cfg."""
    _ensure_manifest()
    arch, tag = split_model_name_tag(name)
    if arch not in _model_entrypoints:
        if quiet:
            return None
        raise _unknown(name)
    tags = _pretrained_cfgs.get(arch, {})
    if tag:
        if tag not in tags:
            if quiet:
                return None
            have = ', '.join(f'{arch}.{t}' for t in tags) or 'none'
            raise UnknownModelError(f'no weights tagged {tag!r} for {arch}; available: {have}')
        return tags[tag]
    dt = default_tag(arch)
    return tags[dt] if dt else _arch_cfgs.get(arch)


def known_modalities() -> List[str]:
    """Modality names of every registered model's spec and of every catalogue sensor (``s1``, ``s2``, ``dem`` ...)."""
    _ensure_manifest()
    names = {m.name for cfg in list(_arch_cfgs.values()) + [c for t in _pretrained_cfgs.values() for c in t.values()]
             if cfg.input_spec is not None for m in cfg.input_spec.modalities}
    names |= {get_sensor(s).modality for s in list_sensors()}
    return sorted(names)
