"""Where eobackbones keeps files, and whether it may use the network.

Hugging Face paths come from ``huggingface_hub.constants`` (which reads ``HF_HOME`` / ``HF_HUB_CACHE`` once, at
import); everything is looked up at call time so a process can be re-pointed (tests, notebooks).

Cache layout (``EOBACKBONES_HOME``, default ``$HF_HOME/eobackbones``)::

    converted/<arch>/<tag>-<digest16>.safetensors   upstream checkpoints, converted once (+ .sha256 record)
    verified/<digest>.json                           marks a Hub file as hash-checked (size + mtime stamp)
    manual/<arch>.<tag>/                             weights published outside the Hub, installed by
                                                     ``eobackbones convert`` (save_pretrained layout)
    features/                                        the probe's feature cache
"""
import os
from pathlib import Path

from huggingface_hub import constants as hf_constants

__all__ = ['hf_home', 'hf_hub_cache', 'hub_endpoint', 'cache_home', 'is_offline', 'env_true']

_TRUE = {'1', 'true', 'yes', 'on'}


def env_true(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() in _TRUE


def hf_home() -> Path:
    return Path(hf_constants.HF_HOME)


def hf_hub_cache() -> Path:
    return Path(hf_constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    return os.environ.get('HF_ENDPOINT') or hf_constants.ENDPOINT


def cache_home() -> Path:
    """``EOBACKBONES_HOME``, else ``$HF_HOME/eobackbones``."""
    env = os.environ.get('EOBACKBONES_HOME')
    return Path(os.path.expanduser(env)) if env else hf_home() / 'eobackbones'


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``EOBACKBONES_OFFLINE``, read at call time (so a process can switch modes)."""
    return env_true('HF_HUB_OFFLINE') or env_true('EOBACKBONES_OFFLINE') or bool(hf_constants.HF_HUB_OFFLINE)
