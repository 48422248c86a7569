"""Model families register themselves on import; the helpers re-exported here are the registry API."""
from ._base import EOModelMixin
from ._builder import build_model_with_cfg, register_converter
from ._factory import create_model
from ._features import FeatureGetter
from ._pretrained import HubSource, ManualSource, PretrainedCfg
from ._registry import (
    get_pretrained_cfg, is_model, list_models, list_pretrained, list_tags, model_entrypoint, register_arch_cfg,
    register_model, register_pretrained, split_model_name_tag, unregister_pretrained)

# families (import order = nothing; each registers its own entrypoints)
from . import sslrs  # noqa: F401
from . import dofa  # noqa: F401
