"""Task heads over backbone features: classifiers over pooled vectors and dense decoders over feature pyramids.

Building blocks (the layers level): the segmentation *model* joining a backbone and one of these decoders is
``eobackbones.create_segmentation_model`` (``models/_segmentation.py``).
"""
from .classifier import ClassificationHead, ClassifierHead  # noqa: F401
from .dense import DenseHead, FPNHead, LinearSegHead, UNetHead, UPerNetHead  # noqa: F401
from .swin_unet import PatchExpand, SwinUNetDecoder  # noqa: F401
