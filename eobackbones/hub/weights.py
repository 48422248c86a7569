"""From a weights source to a verified state dict in our keys: converters, the conversion cache, saved directories.

Families register their converters here (a downward import); the registration carries what the
``eobackbones convert`` command needs (which architectures a checkpoint yields, whether the weights are
installable into the cache, the family's options), so the CLI and the loader know no family.

Conversion cache: ``converted/<arch>/<tag>-<digest16>.safetensors`` with a ``.sha256`` record beside it, written
atomically under a file lock (concurrent processes see nothing or a complete file) and re-checked on every load.
"""
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from filelock import FileLock
from huggingface_hub import try_to_load_from_cache

from .. import env
from ..cfg import DirSource, FileSource, HubSource, ManualSource, PretrainedCfg, Provenance
from ..errors import (
    ChecksumMismatchError, CheckpointFormatError, ManifestError, UnknownModelError, WeightsNotFoundError, first_line)
from .download import (
    check_recorded, download_source, hub_file, manual_dir, manual_message, read_safetensors, read_torch_checkpoint,
    recorded_sha256, record_sha256, verify_file, write_safetensors)

__all__ = [
    'Converter', 'ConverterOption', 'ConvertTarget', 'register_converter', 'get_converter', 'list_converters',
    'converted_path', 'prefetch', 'load_weights', 'read_model_dir', 'CONFIG_NAME', 'WEIGHTS_NAME', 'CONFIG_FORMATS',
    'verify_cached', 'parse_dir_uri', 'converter_for',
]

_logger = logging.getLogger(__name__)

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CONFIG_FORMATS = ('eobackbones/1', 'eobackbones/2')  # the first one wrote no checksum and no provenance


# ----------------------------------------------------------------------------------------------- converters


@dataclass(frozen=True)
class ConverterOption:
    """A family option of ``eobackbones convert`` (``--option name=value``), validated at parse time."""
    type: Callable[[str], Any] = str
    default: Any = None
    help: str = ''
    choices: Optional[Tuple[Any, ...]] = None

    def parse(self, name: str, raw: str) -> Any:
        try:
            v = self.type(raw)
        except (TypeError, ValueError):
            raise ValueError(f'--option {name}={raw!r}: expected {getattr(self.type, "__name__", self.type)}') from None
        if self.choices is not None and v not in self.choices:
            raise ValueError(f'--option {name}={raw!r}: expected one of {list(self.choices)}')
        return v


@dataclass(frozen=True)
class ConvertTarget:
    """One model a checkpoint yields: ``arch`` (optionally a manifest ``tag`` whose facts it takes) + its args."""
    arch: str
    tag: str = ''
    model_args: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Converter:
    """Maps an upstream checkpoint to our keys.

    ``fn(raw, cfg) -> state_dict``: drops what it knows to be unused (optimiser state, decoders, schedule buffers)
    *by name*; anything else it does not know stays and fails the strict load. ``allow_missing`` lists fnmatch
    patterns of our keys the upstream file legitimately lacks.

    For ``eobackbones convert``: ``targets(raw, options) -> [ConvertTarget]`` says which models a given checkpoint
    yields (default: one per ``archs`` entry); ``installable``: the weights exist only outside the Hub, so without
    ``--out`` they are installed where ``create_model(..., pretrained=True)`` finds them; ``options``: the family's
    ``--option`` names; ``reader(path, what) -> raw`` reads the file (default: ``torch.load(weights_only=True)``
    with ``safe_globals``); ``description``: what the converter keeps and drops, for the model card.
    """
    name: str
    fn: Callable[[Any, PretrainedCfg], Dict[str, torch.Tensor]]
    allow_missing: Tuple[str, ...] = ()
    archs: Tuple[str, ...] = ()
    installable: bool = False
    options: Mapping[str, ConverterOption] = field(default_factory=dict)
    targets: Optional[Callable[[Any, Dict[str, Any]], List[ConvertTarget]]] = None
    reader: Optional[Callable[[Path, str], Any]] = None
    safe_globals: Tuple[Any, ...] = ()
    description: str = ''

    def read(self, path: Path, what: str) -> Any:
        if self.reader is not None:
            return self.reader(Path(path), what)
        if Path(path).suffix == '.safetensors':
            return read_safetensors(Path(path), what)
        return read_torch_checkpoint(Path(path), what, self.safe_globals)

    def parse_options(self, raw: Mapping[str, str]) -> Dict[str, Any]:
        unknown = sorted(set(raw) - set(self.options))
        if unknown:
            known = ', '.join(self.options) or 'none'
            raise ValueError(f'convert {self.name}: unknown options {unknown}; known: {known}')
        out = {k: o.default for k, o in self.options.items()}
        out.update({k: self.options[k].parse(k, v) for k, v in raw.items()})
        return out

    def resolve_targets(self, raw: Any, options: Dict[str, Any]) -> List[ConvertTarget]:
        if self.targets is not None:
            return list(self.targets(raw, options))
        return [ConvertTarget(a) for a in self.archs]


_converters: Dict[str, Converter] = {}


def register_converter(
        name: str,
        allow_missing: Sequence[str] = (),
        archs: Sequence[str] = (),
        installable: bool = False,
        options: Optional[Mapping[str, ConverterOption]] = None,
        targets: Optional[Callable[[Any, Dict[str, Any]], List[ConvertTarget]]] = None,
        reader: Optional[Callable[[Path, str], Any]] = None,
        safe_globals: Sequence[Any] = (),
        description: str = '',
) -> Callable:
    """Decorator registering ``fn(raw, cfg) -> state_dict`` as converter ``name`` (see :class:`Converter`)."""
    def deco(fn):
        _converters[name] = Converter(
            name, fn, tuple(allow_missing), tuple(archs), installable, dict(options or {}), targets, reader,
            tuple(safe_globals), description)
        return fn
    return deco


def get_converter(name: str) -> Converter:
    if name not in _converters:
        raise CheckpointFormatError(f'unknown converter {name!r}; known: {", ".join(sorted(_converters)) or "none"}')
    return _converters[name]


def converter_for(arch: str) -> Optional[Converter]:
    """The converter that builds ``arch`` (the one whose ``archs`` list it), or None."""
    hits = [c for c in _converters.values() if arch in c.archs]
    return hits[0] if hits else None


def list_converters(command_only: bool = True) -> List[str]:
    """Converter names (with ``command_only``: those ``eobackbones convert`` offers, i.e. that name architectures)."""
    return sorted(n for n, c in _converters.items() if c.archs or c.targets or not command_only)


# ----------------------------------------------------------------------------------------------- conversion cache


def converted_path(cfg: PretrainedCfg) -> Path:
    return env.cache_home() / 'converted' / cfg.architecture / f'{cfg.tag}-{cfg.source.digest[:16]}.safetensors'


def _fix_converted(cfg: PretrainedCfg) -> str:
    return f'delete it and load {cfg.name} again (it is rebuilt from the verified source file)'


def _convert_to_cache(cfg: PretrainedCfg) -> Path:
    out = converted_path(cfg)
    if out.is_file() and recorded_sha256(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + '.lock'):
        if out.is_file() and recorded_sha256(out):  # another process finished it while we waited
            return out
        src_path = download_source(cfg)
        conv = get_converter(cfg.converter)
        raw = conv.read(src_path, cfg.name)
        state_dict = conv.fn(raw, cfg)
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointFormatError(f'{cfg.name}: converter {cfg.converter} left non-tensor entries: {bad[:5]}')
        digest = write_safetensors(state_dict, out, {
            'eobackbones': 'converted', 'name': cfg.name, 'converter': cfg.converter,
            'source': cfg.source.describe(), 'source_sha256': cfg.source.digest})
        record_sha256(out, digest)
    return out


def prefetch(cfg: PretrainedCfg) -> Path:
    """Make ``cfg``'s weights available offline; returns the file the loader will read."""
    if cfg.converter:  # torch checkpoints always, safetensors in upstream key names too
        return _convert_to_cache(cfg)
    return download_source(cfg)


# ----------------------------------------------------------------------------------------------- saved directories


def parse_dir_uri(uri: str) -> Tuple[str, str, Optional[str]]:
    """``local-dir:/p`` -> ('local-dir', '/p', None); ``hf-hub:org/repo@rev`` -> ('hf-hub', 'org/repo', 'rev')."""
    kind, _, rest = uri.partition(':')
    if kind == 'local-dir':
        return kind, str(Path(os.path.expanduser(rest)).resolve()), None
    if kind == 'hf-hub':
        repo, _, rev = rest.partition('@')
        return kind, repo, rev or None
    raise UnknownModelError(f'{uri!r} is not a "hf-hub:" or "local-dir:" source')


def read_model_dir(uri: str) -> Tuple[Dict[str, Any], Callable[[], Path], str]:
    """``config.json`` (parsed and checked), a function fetching the weights file, and the canonical URI.

    Raises:
        WeightsNotFoundError: no ``config.json`` / weights file.
        ManifestError: ``config.json`` unreadable or not an eobackbones config (one line with the path).
    """
    kind, where, rev = parse_dir_uri(uri)
    if kind == 'local-dir':
        root = Path(where)
        conf_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
        for p in (conf_path, weights_path):
            if not p.is_file():
                raise WeightsNotFoundError(f'local-dir:{root}: expected {p.name} (written by save_pretrained), not found')
        canonical = f'local-dir:{root}'
        fetch = lambda: weights_path  # noqa: E731
    else:
        conf_path = hub_file(where, CONFIG_NAME, rev)
        canonical = f'hf-hub:{where}' + (f'@{rev}' if rev else '')
        fetch = lambda: hub_file(where, WEIGHTS_NAME, rev)  # noqa: E731
    try:
        conf = json.loads(Path(conf_path).read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f'{canonical}: {conf_path} is not valid JSON ({first_line(e)}); re-save the model '
                            f'with save_pretrained') from None
    fmt = conf.get('format') if isinstance(conf, dict) else None
    if fmt not in CONFIG_FORMATS or not isinstance(conf.get('architecture'), str):
        raise ManifestError(f'{canonical}: {CONFIG_NAME} is not an eobackbones config (format {fmt!r}; expected one '
                            f'of {list(CONFIG_FORMATS)} with an "architecture")')
    return conf, fetch, canonical


def _dir_state_dict(cfg: PretrainedCfg) -> Tuple[Dict[str, torch.Tensor], Provenance]:
    src: DirSource = cfg.source
    conf, fetch, canonical = read_model_dir(src.uri)
    path = fetch()
    expected = src.sha256 or conf.get('weights_sha256')
    if expected is None:
        _logger.warning('%s: config.json records no checksum of %s (written by an older version); loading unverified',
                        canonical, WEIGHTS_NAME)
    sd = read_safetensors(path, canonical, expected, fix='the directory is damaged: re-save or re-download it')
    origin = Provenance.from_dict(conf['provenance']) if conf.get('provenance') else None
    digest = check_recorded(path, expected, canonical, 'the directory is damaged: re-save or re-download it')
    return sd, Provenance('directory', source=canonical, sha256=digest, origin=origin)


def _file_state_dict(cfg: PretrainedCfg) -> Tuple[Dict[str, torch.Tensor], Tuple[str, ...], Provenance]:
    """A local checkpoint: through the cfg's (or the architecture's) converter, else as our own keys."""
    path = Path(os.path.expanduser(cfg.source.path))
    if not path.is_file():
        raise WeightsNotFoundError(f'{cfg.architecture}: checkpoint file {path} does not exist')
    conv = get_converter(cfg.converter) if cfg.converter else converter_for(cfg.architecture)
    sd = None
    if conv is not None:
        # an upstream checkpoint goes through the converter; one in our own keys (a fine-tuned state_dict,
        # a timm-style .safetensors) is refused by it and then read as is (the strict load checks every key)
        try:
            sd, allow = conv.fn(conv.read(path, path.name), cfg), conv.allow_missing
        except CheckpointFormatError as e:
            _logger.info('%s: not an upstream checkpoint for converter %s (%s); reading it as eobackbones keys',
                         path.name, conv.name, first_line(e))
    if sd is None:
        raw = read_safetensors(path, path.name) if path.suffix == '.safetensors' else \
            read_torch_checkpoint(path, path.name)
        for key in ('state_dict', 'model'):  # the usual wrappers of a training checkpoint
            if isinstance(raw, dict) and isinstance(raw.get(key), dict):
                raw = raw[key]
        if not isinstance(raw, dict):
            raise CheckpointFormatError(f'{path.name}: expected a state dict, got {type(raw).__name__}')
        sd, allow = raw, ()
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(f'{path.name}: non-tensor entries {bad[:5]}')
    return sd, allow, Provenance('file', source=str(path), sha256=check_recorded(path, None, path.name, ''),
                                 note='loaded with pretrained_cfg_overlay=dict(file=...) / checkpoint_path=')


def load_weights(cfg: PretrainedCfg) -> Tuple[Dict[str, torch.Tensor], Tuple[str, ...], Provenance]:
    """The state dict of ``cfg``'s weights in our keys, the key patterns allowed to be missing, and the provenance.

    Every byte read is checked: Hub files against the manifest's sha256, converted cache entries and saved
    directories against the sha256 recorded when they were written.
    """
    if cfg is None or not cfg.has_source:
        raise WeightsNotFoundError(f'{cfg.name if cfg else "model"}: no weights source')
    src = cfg.source
    if isinstance(src, DirSource):
        sd, prov = _dir_state_dict(cfg)
        return sd, (), prov
    if isinstance(src, ManualSource):
        d = manual_dir(cfg)
        if not (d / WEIGHTS_NAME).is_file():
            raise WeightsNotFoundError(manual_message(cfg))
        sd, prov = _dir_state_dict(dataclasses.replace(cfg, source=DirSource(f'local-dir:{d}')))
        return sd, (), prov.origin or prov
    if isinstance(src, FileSource):
        return _file_state_dict(cfg)
    assert isinstance(src, HubSource)
    path = prefetch(cfg)
    if cfg.converter:
        sd = read_safetensors(path, cfg.name, recorded_sha256(path), fix=_fix_converted(cfg))
        allow = get_converter(cfg.converter).allow_missing
    else:
        sd = read_safetensors(path, cfg.name)  # verified against the manifest by download_source
        allow = ()
    marker = env.cache_home() / 'verified' / f'{src.digest}.json'
    try:
        digest = json.loads(marker.read_text())['sha256']
    except (OSError, ValueError, KeyError):
        digest = src.digest
    return sd, allow, Provenance('manifest', name=cfg.name, source=src.describe(), sha256=digest)


def verify_cached(cfg: PretrainedCfg) -> Tuple[str, str]:
    """Re-hash every cached file of ``cfg`` (never downloads). Returns (status, detail); status ``corrupt`` for
    a damaged source, converted file or installed directory."""
    src = cfg.source
    if isinstance(src, ManualSource):
        d = manual_dir(cfg)
        if not (d / WEIGHTS_NAME).is_file():
            return 'manual', manual_message(cfg)
        try:
            conf, _, _ = read_model_dir(f'local-dir:{d}')
            check_recorded(d / WEIGHTS_NAME, conf.get('weights_sha256'), cfg.name, 'run `eobackbones convert` again',
                           force=True)
        except (ChecksumMismatchError, ManifestError) as e:
            return 'corrupt', first_line(e)
        return 'ok', f'installed {d}'
    if not isinstance(src, HubSource):
        return 'missing', 'no weights source'
    out = []
    conv = converted_path(cfg) if cfg.converter else None
    if conv is not None and conv.is_file():
        rec = recorded_sha256(conv)
        if rec is None:
            return 'corrupt', f'{conv} has no checksum record; {_fix_converted(cfg)}'
        try:
            check_recorded(conv, rec, cfg.name, _fix_converted(cfg), force=True)
        except ChecksumMismatchError as e:
            return 'corrupt', first_line(e)
        out.append(f'converted {conv}')
    cached = try_to_load_from_cache(src.hf_repo, src.filename, cache_dir=str(env.hf_hub_cache()), revision=src.revision)
    if isinstance(cached, str):
        try:
            digest = verify_file(Path(cached), src, cfg.name)
        except ChecksumMismatchError as e:
            return 'corrupt', first_line(e)
        out.insert(0, f'sha256 {digest[:16]}... {cached}')
    elif not out:
        return 'missing', f'{src.describe()} not cached'
    else:
        out.append('(source file no longer cached)')
    return 'ok', '; '.join(out)

