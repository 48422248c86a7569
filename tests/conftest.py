"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubserver import LocalHub  # tests/ is on sys.path (pytest's default "prepend" import mode)

# ---------------------------------------------------------------------------
# Local Hugging Face Hub
# ---------------------------------------------------------------------------

HF_ETAG_TIMEOUT = 5
HF_DOWNLOAD_TIMEOUT = 5


def isolate_hf_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path, eob_home: Path) -> None:
    """Point huggingface_hub and eobackbones at `endpoint` and fresh cache dirs.

    huggingface_hub reads its environment once, into `huggingface_hub.constants`,
    at import time; so the constants used by in-process calls are patched too,
    while the environment variables cover subprocesses and later imports.
    """
    from huggingface_hub import constants

    hub_cache = hf_home / "hub"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_SHARED_BLOBS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_ETAG_TIMEOUT": str(HF_ETAG_TIMEOUT),
        "HF_HUB_DOWNLOAD_TIMEOUT": str(HF_DOWNLOAD_TIMEOUT),
        "EOBACKBONES_HOME": str(eob_home),
        # httpx honours proxy variables; loopback traffic must never go through one.
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "EOBACKBONES_OFFLINE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
    ):
        monkeypatch.delenv(name, raising=False)

    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_SHARED_BLOBS": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
        "HF_HUB_ETAG_TIMEOUT": HF_ETAG_TIMEOUT,
        "HF_HUB_DOWNLOAD_TIMEOUT": HF_DOWNLOAD_TIMEOUT,
    }
    for name, value in patched.items():
        if hasattr(constants, name):  # tolerate constants renamed or removed across versions
            monkeypatch.setattr(constants, name, value)


def reset_hf_http_session() -> None:
    """Drop huggingface_hub's shared HTTP client (and its pooled connections)."""
    from huggingface_hub.utils import close_session

    close_session()


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """A running `LocalHub` that huggingface_hub and eobackbones are pointed at."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    eob_home = tmp_path_factory.mktemp("eobackbones_home")
    with LocalHub() as hub:
        isolate_hf_environment(monkeypatch, hub.endpoint, hf_home, eob_home)
        # The shared client was built with the previous environment (e.g. proxies).
        reset_hf_http_session()
        yield hub
    reset_hf_http_session()


@pytest.fixture
def no_retry_sleep(monkeypatch):
    """Skip huggingface_hub's pauses between retries (1 s per resumed download, 1+2+4+8+8 s of HEAD backoff)."""
    import time

    from huggingface_hub import file_download as _fd
    from huggingface_hub.utils import _http as _hf_http

    class _Time:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(_seconds):
            pass

    monkeypatch.setattr(_fd, "time", _Time())
    monkeypatch.setattr(_hf_http, "time", _Time())




# ---------------------------------------------------------------------------
# Test-only models and weights entries
# ---------------------------------------------------------------------------

import tiny_models  # noqa: E402,F401  (registers test_tiny_cnn for the whole session)


@pytest.fixture
def register_weights():
    """Register manifest entries for the duration of one test: ``register_weights(name, entry_dict)``."""
    from eobackbones.hub.manifest import parse_entry
    from eobackbones.models import register_pretrained, unregister_pretrained
    from eobackbones.models._registry import _ensure_manifest

    _ensure_manifest()
    added = []

    def _register(name, entry, specs=None):
        cfg = parse_entry(name, entry, specs)
        register_pretrained(cfg)
        added.append(name)
        return cfg

    yield _register
    for name in added:
        unregister_pretrained(name)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small models: on 2 shared cores a descheduled OpenMP thread stalls tiny
    ops, and threads gain them nothing (use with ``pytestmark = pytest.mark.usefixtures('one_thread')``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
