"""``weights_manifest.yaml``: the single source of truth for weight facts, read into typed cfgs.

Layout::

    version: 1
    specs:                       # reusable input specs, referenced by name
      <spec_name>: {modalities: [...], image_size: [H, W], ...}
    architectures:               # every registered architecture: its default input spec and notes
      <arch>:
        input_spec: <spec_name> | {inline spec}
        notes: <text>                               # e.g. "no published weights"
        feature_kwargs: {...}                       # forward keywords for probes / benchmarks (optional)
        seg_feature_index: <int>                    # feature_info index of the segmentation probe (optional)
    weights:
      <arch>.<tag>:
        source: {hf_repo, revision (40 hex), filename, sha256 | sha256_prefix, size}
                | {manual: <url or id>, filename?}
        format: safetensors | torch
        converter: <family converter name>        # required for format: torch
        license: <SPDX id>                        # NOASSERTION where upstream states none
        paper: <arXiv id / DOI / URL>
        provenance: <who trained it on what, where the file comes from>
        input_spec: <spec_name> | {inline spec}   # default: the architecture's
        model_args: {...}                          # constructor arguments the weights require
        num_classes: 0
        fingerprint: {input: <recipe>, mean: .., std: .., atol: ..}   # optional
        feature_kwargs / seg_feature_index          # default: the architecture's
        notes: <text>

A new weight of an existing architecture is a YAML-only change.
"""
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from ..cfg import HubSource, ManualSource, PretrainedCfg
from ..errors import ManifestError
from ..spec import InputSpec

__all__ = ['load_manifest', 'parse_manifest', 'parse_entry', 'parse_arch_entry', 'SPDX_IDS', 'manifest_path']

# the licences our weights use; extend when a new one appears (SPDX identifiers only)
SPDX_IDS = {
    'MIT', 'Apache-2.0', 'BSD-2-Clause', 'BSD-3-Clause', 'CC-BY-4.0', 'CC-BY-SA-4.0', 'CC-BY-NC-4.0',
    'CC-BY-NC-SA-4.0', 'CC0-1.0', 'CDLA-Permissive-1.0', 'CDLA-Permissive-2.0', 'GPL-3.0-only', 'NOASSERTION',
}
_ENTRY_KEYS = {
    'source', 'format', 'converter', 'license', 'paper', 'provenance', 'input_spec', 'model_args',
    'num_classes', 'fingerprint', 'notes', 'feature_kwargs', 'seg_feature_index',
}
_ARCH_KEYS = {'input_spec', 'notes', 'license', 'paper', 'feature_kwargs', 'seg_feature_index'}
_REQUIRED = ('source', 'format', 'license', 'paper', 'provenance')
_NAME = re.compile(r'^[a-z0-9_]+\.[a-z0-9_]+$')
_ARCH = re.compile(r'^[a-z0-9_]+$')


def manifest_path() -> Path:
    return Path(str(resources.files('eobackbones').joinpath('weights_manifest.yaml')))


def _parse_source(name: str, raw: Any) -> Union[HubSource, ManualSource]:
    if not isinstance(raw, dict):
        raise ManifestError(f'{name}: source must be a mapping, got {raw!r}')
    if 'manual' in raw:
        extra = set(raw) - {'manual', 'filename', 'sha256'}
        if extra:
            raise ManifestError(f'{name}: manual source has unknown keys {sorted(extra)}')
        return ManualSource(**raw)
    extra = set(raw) - {'hf_repo', 'revision', 'filename', 'sha256', 'sha256_prefix', 'size'}
    missing = {'hf_repo', 'revision', 'filename'} - set(raw)
    if extra or missing:
        raise ManifestError(f'{name}: hub source needs hf_repo, revision, filename; missing {sorted(missing)}, unknown {sorted(extra)}')
    return HubSource(**{k: (str(v) if k in ('revision', 'sha256', 'sha256_prefix') else v) for k, v in raw.items()})


def _parse_spec(name: str, spec_raw: Any, specs: Optional[Mapping[str, Any]]) -> InputSpec:
    if isinstance(spec_raw, str):
        if not specs or spec_raw not in specs:
            raise ManifestError(f'{name}: input_spec {spec_raw!r} is not defined under "specs"')
        spec_raw = specs[spec_raw]
    try:
        return InputSpec.from_dict(spec_raw)
    except (TypeError, ManifestError) as e:
        raise ManifestError(f'{name}: bad input_spec: {e}') from None


def _check_feature_keys(name: str, raw: Mapping[str, Any]) -> None:
    fk = raw.get('feature_kwargs')
    if fk is not None and not isinstance(fk, dict):
        raise ManifestError(f'{name}: feature_kwargs must be a mapping, got {fk!r}')
    si = raw.get('seg_feature_index')
    if si is not None and not isinstance(si, int):
        raise ManifestError(f'{name}: seg_feature_index must be an integer, got {si!r}')


def parse_arch_entry(name: str, raw: Mapping[str, Any], specs: Optional[Mapping[str, Any]] = None) -> PretrainedCfg:
    """Validate an ``architectures:`` entry: the weight-less default cfg of an architecture."""
    if not _ARCH.match(name):
        raise ManifestError(f'{name!r}: architecture names are lowercase letters, digits and "_"')
    if not isinstance(raw, dict):
        raise ManifestError(f'{name}: entry must be a mapping')
    unknown = set(raw) - _ARCH_KEYS
    if unknown or 'input_spec' not in raw:
        raise ManifestError(f'{name}: architecture entries need input_spec; unknown keys {sorted(unknown)}')
    _check_feature_keys(name, raw)
    return PretrainedCfg(
        architecture=name, input_spec=_parse_spec(name, raw['input_spec'], specs), notes=raw.get('notes', ''),
        license=raw.get('license'), paper=raw.get('paper'), feature_kwargs=dict(raw.get('feature_kwargs') or {}),
        seg_feature_index=raw.get('seg_feature_index'))


def parse_entry(name: str, raw: Dict[str, Any], specs: Optional[Dict[str, Any]] = None,
                arch_cfg: Optional[PretrainedCfg] = None) -> PretrainedCfg:
    """Validate one ``weights:`` entry and turn it into a :class:`PretrainedCfg`.

    ``arch_cfg`` (the architecture's entry) supplies ``input_spec``, ``feature_kwargs`` and ``seg_feature_index``
    when the weights do not state their own.
    """
    if not _NAME.match(name):
        raise ManifestError(f'{name!r}: entry names are "arch.tag" in lowercase letters, digits and "_"')
    if not isinstance(raw, dict):
        raise ManifestError(f'{name}: entry must be a mapping')
    unknown = set(raw) - _ENTRY_KEYS
    missing = [k for k in _REQUIRED if k not in raw]
    if 'input_spec' not in raw and (arch_cfg is None or arch_cfg.input_spec is None):
        missing.append('input_spec')
    if unknown or missing:
        raise ManifestError(f'{name}: missing keys {missing}, unknown keys {sorted(unknown)}')
    if raw['license'] not in SPDX_IDS:
        raise ManifestError(f'{name}: license {raw["license"]!r} is not a known SPDX id ({", ".join(sorted(SPDX_IDS))})')
    for k in ('paper', 'provenance'):
        if not isinstance(raw[k], str) or not raw[k].strip():
            raise ManifestError(f'{name}: {k} must be a non-empty string')
    spec = _parse_spec(name, raw['input_spec'], specs) if 'input_spec' in raw else arch_cfg.input_spec
    fp = raw.get('fingerprint')
    if fp is not None and not (isinstance(fp, dict) and {'mean', 'std'} <= set(fp)):
        raise ManifestError(f'{name}: fingerprint must be a mapping with at least mean and std')
    _check_feature_keys(name, raw)
    arch, tag = name.split('.', 1)
    inherit = arch_cfg or PretrainedCfg(arch)
    return PretrainedCfg(
        architecture=arch, tag=tag, source=_parse_source(name, raw['source']), format=raw['format'],
        converter=raw.get('converter'), license=raw['license'], paper=raw['paper'], provenance=raw['provenance'],
        input_spec=spec, model_args=dict(raw.get('model_args') or {}), fingerprint=fp,
        num_classes=int(raw.get('num_classes', 0)), notes=raw.get('notes', ''),
        feature_kwargs=dict(raw['feature_kwargs']) if 'feature_kwargs' in raw else dict(inherit.feature_kwargs),
        seg_feature_index=raw.get('seg_feature_index', inherit.seg_feature_index))


def parse_manifest(data: Dict[str, Any]) -> Tuple[List[PretrainedCfg], List[PretrainedCfg]]:
    """(architecture cfgs, weight cfgs) of a parsed manifest."""
    if not isinstance(data, dict) or data.get('version') != 1:
        raise ManifestError('weights manifest must be a mapping with "version: 1"')
    extra = set(data) - {'version', 'specs', 'architectures', 'weights'}
    if extra:
        raise ManifestError(f'weights manifest has unknown top-level keys {sorted(extra)}')
    specs = data.get('specs') or {}
    archs = {n: parse_arch_entry(n, e, specs) for n, e in (data.get('architectures') or {}).items()}
    weights = [parse_entry(n, e, specs, archs.get(n.split('.', 1)[0])) for n, e in (data.get('weights') or {}).items()]
    return list(archs.values()), weights


def load_manifest(path: Optional[Union[str, Path]] = None) -> Tuple[List[PretrainedCfg], List[PretrainedCfg]]:
    """(architecture cfgs, weight cfgs) of ``weights_manifest.yaml`` (or ``path``)."""
    path = Path(path) if path else manifest_path()
    with open(path, encoding='utf-8') as f:
        return parse_manifest(yaml.safe_load(f))


def raw_manifest(path: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    path = Path(path) if path else manifest_path()
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)
