"""The registry API and every model family (each registers its entrypoints and converters on import)."""
from ._base import EOBackbone, EOModelMixin
from ._builder import build_model_with_cfg, load_state_dict_strict
from ._factory import (
    ResolvedModel, convert_checkpoint, create_model, create_segmentation_model, parse_model_name, resolve_model)
from ._segmentation import SegmentationModel
from ._features import FeatureGetter, seg_feature_index
from ._multi import MultiEncoder
from ._registry import (
    get_arch_cfg, get_pretrained_cfg, is_model, list_models, list_pretrained, list_tags, model_entrypoint,
    known_modalities, register_arch_cfg, register_model, register_pretrained, split_model_name_tag, unregister_model,
    unregister_pretrained)
from ..cfg import DirSource, HubSource, ManualSource, PretrainedCfg, Provenance
from ..hub.weights import register_converter

# families: each file registers its own entrypoints and converters
from . import dofa  # noqa: F401
from . import dualsimclr  # noqa: F401
from . import fusion_vit  # noqa: F401
from . import sslswin  # noqa: F401
from . import diffusion_unet  # noqa: F401

# every architecture (and any registered later) is also timm's `eob_<arch>`
from ._registry import on_register as _on_register  # noqa: E402
from ._timm import register_in_timm as _register_in_timm  # noqa: E402
_on_register(_register_in_timm)
