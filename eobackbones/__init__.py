"""eobackbones: pretrained Earth-observation backbones behind one timm-style registry.

The public names below load on first use (PEP 562), so ``import eobackbones.hub`` or the CLI's ``--help`` do not
import torch models; ``eobackbones.create_model`` (or any registry call) loads the registry and every family.
"""
import importlib
import importlib.abc
import importlib.util
import sys
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


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Post-import hook: once timm is imported, our architectures appear in its registry as ``eob_<arch>``.

    ``import eobackbones`` stays light (no torch, no families); registering needs the families, so it happens when
    both are loaded: right away if timm is already imported, else just after timm finishes importing. When our own
    models import timm, they register themselves at the end of ``eobackbones.models``.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != 'timm':
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec('timm')  # the real one (this finder is no longer on the path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            # when our own code imports timm (mid-import of an eobackbones module), importing the families now
            # would be circular; eobackbones.models registers itself once it is imported
            busy = any(getattr(getattr(m, '__spec__', None), '_initializing', False)
                       for n, m in list(sys.modules.items()) if n.startswith('eobackbones.'))
            if not busy and 'eobackbones.models' not in sys.modules:
                importlib.import_module('eobackbones.models')
        spec.loader.exec_module = exec_then_register
        return spec


if 'timm' in sys.modules:
    importlib.import_module('.models', __name__)
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
