"""Getting weight files: pinned Hub downloads, checksums of every file we read, safe checkpoint reading.

* :func:`download_source`: ``hf_hub_download`` at the manifest's pinned commit, then size + sha256 (or the
  published prefix); a mismatching file is removed from the cache.
* :func:`read_safetensors`: reads a safetensors file after checking it against the sha256 recorded when it was
  written (converted cache entries, ``save_pretrained`` weights); a damaged file fails with one line naming it.
  Hashing costs about 0.3 s per 400 MB; it is done once per process per file (keyed by size and mtime).
* :func:`read_torch_checkpoint`: ``torch.load(weights_only=True)``: tensors and plain containers only, plus an
  explicit allow-list of harmless classes a family may pass (e.g. ``argparse.Namespace``); never arbitrary pickles.
* Unreachable endpoint: probed once per process with a short TCP connect, so a machine without network fails
  in about a second with the same message as offline mode instead of ~30 s of retries.
"""
import json
import logging
import os
import pickle
import re
import socket
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple
from urllib.parse import urlparse

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import env
from .._io import atomic_path, atomic_write_text, sha256_file
from ..cfg import HubSource, ManualSource, PretrainedCfg
from ..errors import ChecksumMismatchError, CheckpointFormatError, WeightsNotFoundError, first_line
from ..version import __version__

__all__ = [
    'hub_file', 'download_source', 'verify_file', 'manual_dir', 'manual_message', 'read_torch_checkpoint',
    'read_safetensors', 'write_safetensors', 'record_sha256', 'recorded_sha256', 'check_recorded', 'endpoint_reachable',
]

_logger = logging.getLogger(__name__)
_REACHABLE: Dict[str, bool] = {}
_VERIFIED: Dict[Tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


# ----------------------------------------------------------------------------------------------- network


def endpoint_reachable(endpoint: Optional[str] = None, timeout: float = 1.5) -> bool:
    """Can a TCP connection to the Hub endpoint (or the proxy in front of it) be opened? Probed once per process."""
    endpoint = endpoint or env.hub_endpoint()
    if endpoint in _REACHABLE:
        return _REACHABLE[endpoint]
    url = urlparse(endpoint)
    proxy = os.environ.get(f'{url.scheme}_proxy') or os.environ.get(f'{url.scheme.upper()}_PROXY')
    no_proxy = os.environ.get('no_proxy') or os.environ.get('NO_PROXY') or ''
    if proxy and not any(url.hostname and url.hostname.endswith(h.strip()) for h in no_proxy.split(',') if h.strip()):
        url = urlparse(proxy if '://' in proxy else f'http://{proxy}')
    port = url.port or (443 if url.scheme == 'https' else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _REACHABLE[endpoint] = ok
    if not ok:
        _logger.warning('%s is unreachable; using the local cache only for this process', endpoint)
    return ok


def _download(repo: str, filename: str, revision: Optional[str], what: str) -> Path:
    offline = env.is_offline()
    unreachable = not offline and not endpoint_reachable()
    where = f'{repo}@{revision or "main"} file {filename}'
    try:
        path = hf_hub_download(
            repo, filename, revision=revision, cache_dir=str(env.hf_hub_cache()), local_files_only=offline or unreachable,
            endpoint=os.environ.get('HF_ENDPOINT') or None, library_name='eobackbones', library_version=__version__)
    except RepositoryNotFoundError:
        raise WeightsNotFoundError(f'{what}: repository {repo} not found on the Hub (or it is private)') from None
    except RevisionNotFoundError:
        raise WeightsNotFoundError(f'{what}: revision {revision} not found in {repo}') from None
    except LocalEntryNotFoundError:
        reason = ('offline mode is on (HF_HUB_OFFLINE / EOBACKBONES_OFFLINE)' if offline else
                  f'the Hub ({env.hub_endpoint()}) is unreachable')
        raise WeightsNotFoundError(
            f'{what}: {where} is not in the local cache and {reason}; '
            f'prefetch it on a connected machine with `eobackbones download {what}` and copy {env.hf_hub_cache()}') from None
    except EntryNotFoundError:
        raise WeightsNotFoundError(f'{what}: {where} does not exist on the Hub') from None
    except Exception as e:  # interrupted transfer (httpx), consistency check, other HTTP errors
        raise WeightsNotFoundError(
            f'{what}: download of {where} failed ({first_line(e)}); run the same command again to resume') from None
    return Path(path)


def hub_file(repo: str, filename: str, revision: Optional[str] = None) -> Path:
    """One file of a Hub repository (used for ``hf-hub:`` model directories)."""
    return _download(repo, filename, revision, f'hf-hub:{repo}' + (f'@{revision}' if revision else ''))


# ----------------------------------------------------------------------------------------------- verification


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
        p.unlink(missing_ok=True)


def _stamp(path: Path) -> Dict[str, Any]:
    st = path.resolve().stat()
    return {'path': str(path.resolve()), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def download_source(cfg: PretrainedCfg, force_verify: bool = False) -> Path:
    """Download (or find in the cache) the source file of ``cfg`` and verify it (once per file version)."""
    src = cfg.source
    if not isinstance(src, HubSource):
        raise WeightsNotFoundError(manual_message(cfg))
    path = _download(src.hf_repo, src.filename, src.revision, cfg.name)
    marker = env.cache_home() / 'verified' / f'{src.digest}.json'
    stamp = _stamp(path)
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
    atomic_write_text(marker, json.dumps({'sha256': digest, 'stamp': stamp}))
    return path


def manual_dir(cfg: PretrainedCfg) -> Path:
    """Where ``eobackbones convert`` installs weights that are published outside the Hub."""
    return env.cache_home() / 'manual' / cfg.name


def manual_message(cfg: PretrainedCfg) -> str:
    src = cfg.source
    where = src.manual if isinstance(src, ManualSource) else 'no source'
    family = (cfg.converter or '').split('.')[0] or '<family>'
    return (f'{cfg.name}: weights are published only outside the Hub ({where}); download the file and run '
            f'`eobackbones convert {family} --checkpoint FILE` (installs them into {manual_dir(cfg).parent})')


# ----------------------------------------------------------------------------------------------- files we write


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + '.sha256')


def record_sha256(path: Path, digest: Optional[str] = None) -> str:
    """Write ``<file>.sha256`` next to a file we wrote (converted cache entries)."""
    digest = digest or sha256_file(path)
    atomic_write_text(_record_path(path), f'{digest}  {path.name}\n')
    return digest


def recorded_sha256(path: Path) -> Optional[str]:
    rec = _record_path(path)
    if not rec.is_file():
        return None
    return rec.read_text(encoding='utf-8').split()[0] if rec.read_text(encoding='utf-8').strip() else None


def check_recorded(path: Path, expected: Optional[str], what: str, fix: str, force: bool = False) -> str:
    """Verify ``path`` against ``expected`` (its recorded sha256), once per process per file version.

    Raises:
        ChecksumMismatchError: the file was changed or damaged after it was written (names file and fix).
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if not force and key in _VERIFIED and (expected is None or _VERIFIED[key] == expected):
        return _VERIFIED[key]
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise ChecksumMismatchError(
            f'{what}: {path} is damaged or was replaced (sha256 {digest[:16]}... but {expected[:16]}... was recorded '
            f'when it was written); {fix}')
    _VERIFIED[key] = digest
    return digest


def write_safetensors(state_dict: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> str:
    """Write atomically (shared storage cloned, as safetensors requires); returns the file's sha256."""
    seen, out = set(), {}
    for k, v in state_dict.items():
        v = v.detach().contiguous()
        if v.data_ptr() in seen and v.numel():
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    # the renamed file is the one just hashed (same size and mtime): loading it next does not hash it again
    st = Path(path).stat()
    _VERIFIED[(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)] = digest
    return digest


def read_safetensors(path: Path, what: str, expected_sha256: Optional[str] = None,
                     fix: str = 'delete it and load again') -> Dict[str, torch.Tensor]:
    """Load a safetensors file, checking ``expected_sha256`` first when it is known.

    Raises:
        ChecksumMismatchError: the bytes differ from what was recorded.
        CheckpointFormatError: the file is not readable as safetensors (one line with the path).
    """
    if expected_sha256 is not None:
        check_recorded(path, expected_sha256, what, fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFormatError(f'{what}: {path} is not a readable safetensors file ({first_line(e)}); {fix}') from None


# ----------------------------------------------------------------------------------------------- upstream checkpoints


def read_torch_checkpoint(path: Path, what: str, safe_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only (plus ``safe_globals``).

    Raises:
        CheckpointFormatError: the file holds other pickled objects, or is not a torch checkpoint at all.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(e))
        if found:
            raise CheckpointFormatError(
                f'{what}: refused to load {path.name}: it contains pickled objects other than tensors '
                f'({found.group(1)}), which could run code; only tensors and plain containers are read') from None
        raise CheckpointFormatError(f'{what}: {path.name} is not a torch checkpoint (its bytes do not unpickle)') from None
    except Exception as e:  # torch raises KeyError / RuntimeError / BadZipFile / EOFError ... on foreign files
        raise CheckpointFormatError(
            f'{what}: {path.name} is not a readable torch checkpoint ({type(e).__name__}: {first_line(e)})') from None
