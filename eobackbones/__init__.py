"""eobackbones: pretrained Earth-observation backbones behind one timm-style registry.

The public names below load on first use (PEP 562), so ``import eobackbones.hub`` or the CLI's ``--help`` do not
import torch models; ``eobackbones.create_model`` (or any registry call) loads the registry and every family.
"""
import importlib
from typing import Any, List

from .errors import *  # noqa: F401,F403
from .version import __version__

# public name -> submodule that defines it
_LAZY = {
    'create_model': 'models', 'resolve_model': 'models', 'list_models': 'models', 'list_pretrained': 'models',
    'get_pretrained_cfg': 'models', 'is_model': 'models', 'register_model': 'models', 'register_pretrained': 'models',
    'unregister_model': 'models', 'convert_checkpoint': 'models', 'EOModelMixin': 'models', 'EOBackbone': 'models',
    'MultiEncoder': 'models', 'create_segmentation_model': 'models', 'SegmentationModel': 'models',
    'PretrainedCfg': 'cfg', 'Provenance': 'cfg',
    'InputSpec': 'spec', 'ModalitySpec': 'spec', 'ConditionSpec': 'spec', 'CallArg': 'spec',
    'example_input': 'transforms', 'example_call': 'transforms',
    'optimize_for_inference': 'optimize',
}
_SUBMODULES = ('sensors', 'transforms', 'models', 'layers', 'hub', 'heads', 'pretrain', 'eval', 'data', 'bench',
               'optimize', 'spec', 'cfg', 'env')


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
