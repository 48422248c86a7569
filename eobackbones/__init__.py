"""eobackbones: pretrained Earth-observation backbones behind one timm-style registry."""
__version__ = '0.1.0'

from .errors import *  # noqa: F401,F403
from .models import (
    EOModelMixin, PretrainedCfg, create_model, get_pretrained_cfg, is_model, list_models, list_pretrained,
    register_model, register_pretrained)
from .spec import InputSpec, ModalitySpec
from .transforms import example_input
from .optimize import optimize_for_inference
from . import sensors, transforms
