"""Task heads over backbone features (pooled vectors or ``forward_intermediates`` maps)."""
from .classifier import ClassifierHead  # noqa: F401
from .swin_unet import PatchExpand, SwinUNetDecoder  # noqa: F401
