"""Weights loader: pinned Hub download -> verification -> conversion -> safetensors cache.

Cache layout (``EOBACKBONES_HOME``, default ``$HF_HOME/eobackbones``)::

    converted/<arch>/<tag>-<digest16>.safetensors   upstream torch checkpoints, converted once
    verified/<digest>.json                           marks a Hub safetensors file as hash-checked
    manual/<arch>.<tag>/                             weights published outside the Hub, installed by
                                                     ``eobackbones convert`` (save_pretrained layout)

Original files stay in the Hugging Face cache (``HF_HUB_CACHE``), managed by ``huggingface_hub``.
Every write goes to a temporary file in the same directory and is renamed into place under a file
lock, so concurrent processes see either nothing or a complete file.
"""
import hashlib
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import ChecksumMismatchError, CheckpointFormatError, WeightsNotFoundError
from ..models._pretrained import HubSource, ManualSource, PretrainedCfg

__all__ = [
    'cache_home', 'is_offline', 'hub_file', 'download_source', 'sha256_file', 'verify_file',
    'converted_path', 'manual_dir', 'load_pretrained_state_dict', 'prefetch', 'verify_cached', 'read_torch_checkpoint',
]

_logger = logging.getLogger(__name__)
_TRUE = {'1', 'true', 'yes', 'on'}


def _env_true(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() in _TRUE


def is_offline() -> bool:
    """Read at call time, so a process can switch modes (tests, notebooks)."""
    return _env_true('HF_HUB_OFFLINE') or _env_true('EOBACKBONES_OFFLINE')


def _hf_home() -> Path:
    return Path(os.path.expanduser(os.environ.get('HF_HOME') or '~/.cache/huggingface'))


def _hf_cache() -> Path:
    env = os.environ.get('HF_HUB_CACHE')
    return Path(os.path.expanduser(env)) if env else _hf_home() / 'hub'


def cache_home() -> Path:
    env = os.environ.get('EOBACKBONES_HOME')
    return Path(os.path.expanduser(env)) if env else _hf_home() / 'eobackbones'


def _download(repo: str, filename: str, revision: Optional[str], what: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    from .. import __version__
    offline = is_offline()
    where = f'{repo}@{revision or "main"} file {filename}'
    try:
        path = hf_hub_download(
            repo, filename, revision=revision, cache_dir=str(_hf_cache()), local_files_only=offline,
            endpoint=os.environ.get('HF_ENDPOINT') or None, library_name='eobackbones', library_version=__version__)
    except RepositoryNotFoundError:
        raise WeightsNotFoundError(f'{what}: repository {repo} not found on the Hub (or it is private)') from None
    except RevisionNotFoundError:
        raise WeightsNotFoundError(f'{what}: revision {revision} not found in {repo}') from None
    except LocalEntryNotFoundError:
        reason = 'offline mode is on (HF_HUB_OFFLINE / EOBACKBONES_OFFLINE)' if offline else 'the Hub is unreachable'
        raise WeightsNotFoundError(
            f'{what}: {where} is not in the local cache and {reason}; '
            f'prefetch it on a connected machine with `eobackbones download {what}` and copy {_hf_cache()}') from None
    except EntryNotFoundError:
        raise WeightsNotFoundError(f'{what}: {where} does not exist on the Hub') from None
    except Exception as e:  # interrupted transfer (httpx), consistency check, other HTTP errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsNotFoundError(f'{what}: download of {where} failed ({first}); run the same command again to resume') from None
    return Path(path)


def hub_file(repo: str, filename: str, revision: Optional[str] = None) -> Path:
    """One file of a Hub repository (used for ``hf-hub:`` model directories)."""
    return _download(repo, filename, revision, f'hf-hub:{repo}')


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_file(path: Path, src: HubSource, what: str) -> str:
    """Check size and sha256 (or its published prefix). Returns the full sha256.

    Raises:
        ChecksumMismatchError: naming expected and actual values.
    """
    size = path.stat().st_size
    if src.size is not None and size != src.size:
        raise ChecksumMismatchError(f'{what}: {src.filename} has {size} bytes, the manifest expects {src.size}')
    digest = sha256_file(path)
    if not digest.startswith(src.digest):
        raise ChecksumMismatchError(
            f'{what}: {src.filename} sha256 {digest[:len(src.digest)]}... does not match the manifest {src.digest}')
    return digest


def _drop_from_hf_cache(path: Path) -> None:
    """Remove a snapshot entry and the blob it points to (a corrupt file must not stay cached)."""
    blob = path.resolve()
    for p in (path, blob):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _marker(digest: str) -> Path:
    return cache_home() / 'verified' / f'{digest}.json'


def download_source(cfg: PretrainedCfg, force_verify: bool = False) -> Path:
    """Download (or find in the cache) the source file of ``cfg`` and verify it."""
    src = cfg.source
    if isinstance(src, ManualSource) or src is None:
        raise WeightsNotFoundError(_manual_message(cfg))
    path = _download(src.hf_repo, src.filename, src.revision, cfg.name)
    marker = _marker(src.digest)
    stat = path.resolve().stat()
    stamp = {'path': str(path.resolve()), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
    if not force_verify and marker.is_file():
        try:
            if json.loads(marker.read_text()).get('stamp') == stamp:
                return path
        except ValueError:
            pass
    try:
        digest = verify_file(path, src, cfg.name)
    except ChecksumMismatchError as e:
        _drop_from_hf_cache(path)
        raise ChecksumMismatchError(f'{e}; the file was removed from the cache') from None
    _atomic_write_text(marker, json.dumps({'sha256': digest, 'stamp': stamp}))
    return path


def manual_dir(cfg: PretrainedCfg) -> Path:
    """Where ``eobackbones convert`` installs weights that are published outside the Hub."""
    return cache_home() / 'manual' / cfg.name


def _manual_message(cfg: PretrainedCfg) -> str:
    src = cfg.source
    where = src.manual if isinstance(src, ManualSource) else 'no source'
    family = (cfg.converter or '').split('.')[0] or '<family>'
    return (f'{cfg.name}: weights are published only outside the Hub ({where}); download the file and run '
            f'`eobackbones convert {family} --checkpoint FILE` (installs them into {manual_dir(cfg).parent})')


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


def converted_path(cfg: PretrainedCfg) -> Path:
    return cache_home() / 'converted' / cfg.architecture / f'{cfg.tag}-{cfg.source.digest[:16]}.safetensors'


def read_torch_checkpoint(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickles."""
    try:
        return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointFormatError(
            f'{what}: refused to load {path.name}: it contains pickled objects other than tensors '
            f'(weights_only load: {first})') from None
    except (RuntimeError, zipfile.BadZipFile, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(f'{what}: {path.name} is not a readable torch checkpoint ({first})') from None


def _save_safetensors(state_dict: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file
    seen, out = set(), {}
    for k, v in state_dict.items():
        v = v.detach().contiguous()
        if v.data_ptr() in seen and v.numel():
            v = v.clone()  # safetensors refuses shared storage
        seen.add(v.data_ptr())
        out[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        save_file(out, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _convert_to_cache(cfg: PretrainedCfg) -> Path:
    from filelock import FileLock
    from ..models._builder import get_converter
    out = converted_path(cfg)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + '.lock'):
        if out.is_file():  # another process finished it while we waited
            return out
        src_path = download_source(cfg)
        conv = get_converter(cfg.converter)
        if cfg.format == 'torch':
            raw = read_torch_checkpoint(src_path, cfg.name)
        else:  # upstream safetensors in upstream key names
            from safetensors.torch import load_file
            raw = load_file(str(src_path))
        state_dict = conv.fn(raw, cfg)
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointFormatError(f'{cfg.name}: converter {cfg.converter} left non-tensor entries: {bad[:5]}')
        _save_safetensors(state_dict, out, {
            'eobackbones': 'converted', 'name': cfg.name, 'converter': cfg.converter,
            'source': cfg.source.describe(), 'source_sha256': cfg.source.digest})
    return out


def prefetch(cfg: PretrainedCfg) -> Path:
    """Make ``cfg``'s weights available offline; returns the file the loader will read."""
    if cfg.converter:  # torch checkpoints always, safetensors in upstream key names too
        return _convert_to_cache(cfg)
    return download_source(cfg)


def load_pretrained_state_dict(cfg: PretrainedCfg) -> Tuple[Dict[str, torch.Tensor], Tuple[str, ...]]:
    """The state dict of ``cfg`` in our keys, plus the key patterns the converter allows to be missing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from ..models._builder import get_converter
    if cfg is None or not cfg.has_source:
        raise WeightsNotFoundError(f'{cfg.name if cfg else "model"}: no weights source in the manifest')
    if not cfg.has_weights:
        path = manual_dir(cfg) / 'model.safetensors'  # installed by `eobackbones convert`, already our keys
        if not path.is_file():
            raise WeightsNotFoundError(_manual_message(cfg))
        allow: Tuple[str, ...] = ()
    else:
        path = prefetch(cfg)
        allow = get_converter(cfg.converter).allow_missing if cfg.converter else ()
    try:
        return load_file(str(path)), allow
    except (SafetensorError, OSError) as e:
        raise CheckpointFormatError(f'{cfg.name}: cached weights {path} are unreadable ({e}); '
                                    f'delete the file and load again') from None


def verify_cached(cfg: PretrainedCfg) -> Tuple[str, str]:
    """Re-hash the cached source file of ``cfg`` (never downloads). Returns (status, detail)."""
    from huggingface_hub import try_to_load_from_cache
    src = cfg.source
    if not isinstance(src, HubSource):
        installed = manual_dir(cfg) / 'model.safetensors'
        return ('ok', f'installed {installed}') if installed.is_file() else ('manual', _manual_message(cfg))
    cached = try_to_load_from_cache(src.hf_repo, src.filename, cache_dir=str(_hf_cache()), revision=src.revision)
    conv = converted_path(cfg) if cfg.converter else None
    if not isinstance(cached, str):
        if conv is not None and conv.is_file():
            return 'ok', f'converted {conv} (source file no longer cached)'
        return 'missing', f'{src.describe()} not cached'
    try:
        digest = verify_file(Path(cached), src, cfg.name)
    except ChecksumMismatchError as e:
        return 'corrupt', str(e)
    return 'ok', f'sha256 {digest[:16]}... {cached}'
