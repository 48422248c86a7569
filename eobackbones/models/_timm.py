"""Our architectures in timm's registry, as ``eob_<arch>``: ``timm.create_model('eob_dofa_base')`` and
``timm.create_model('local-dir:<a save_pretrained directory>', pretrained=True)`` build eobackbones models.

Every entrypoint registered with eobackbones (now or later) is mirrored. The wrapper translates timm's calling
convention (``pretrained_cfg`` / ``pretrained_cfg_overlay`` / ``cache_dir`` / ``pretrained_model_args``) into ours:
a timm cfg pointing at a local directory or Hub repository loads that directory through eobackbones' own loader
(verified checksums, provenance); ``pretrained=True`` alone takes the default weights tag.
"""
import logging
from typing import Any, Callable, Mapping, Optional

from timm.models import is_model as timm_is_model, register_model as timm_register_model
from torch import nn

from ._base import TIMM_PREFIX
from ._factory import create_model

__all__ = ['register_in_timm']

_logger = logging.getLogger(__name__)


def _timm_entry(name: str, create: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Optional[Mapping] = None,
              **kwargs: Any) -> nn.Module:
        kwargs.pop('cache_dir', None)
        kwargs.pop('pretrained_model_args', None)
        cfg = pretrained_cfg if isinstance(pretrained_cfg, Mapping) else (
            pretrained_cfg.__dict__ if pretrained_cfg is not None and hasattr(pretrained_cfg, 'source') else {})
        source = cfg.get('source') if cfg else None
        if pretrained and source == 'local-dir' and cfg.get('file'):
            return create(f'local-dir:{cfg["file"]}', **kwargs)
        if pretrained and source == 'hf-hub' and cfg.get('hf_hub_id'):
            return create(f'hf-hub:{cfg["hf_hub_id"]}', **kwargs)
        tag = pretrained_cfg if isinstance(pretrained_cfg, str) else None
        return create(name, pretrained=(tag or True) if pretrained else False,
                      pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
    entry.__name__ = entry.__qualname__ = TIMM_PREFIX + name
    return entry


def register_in_timm(name: str, fn: Callable[..., nn.Module]) -> None:
    """Mirror one eobackbones entrypoint into timm's registry as ``eob_<name>`` (idempotent)."""
    if timm_is_model(TIMM_PREFIX + name):
        return
    entry = _timm_entry(name, create_model)
    entry.__doc__ = fn.__doc__
    entry.__module__ = __name__
    timm_register_model(entry)
