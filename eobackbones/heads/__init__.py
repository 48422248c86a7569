"""Task heads over backbone features: classifiers over pooled vectors, dense decoders over feature pyramids,
and the segmentation model that joins a backbone and a decoder."""
from .classifier import ClassificationHead, ClassifierHead  # noqa: F401
from .dense import DenseHead, FPNHead, LinearSegHead, UNetHead, UPerNetHead  # noqa: F401
from .swin_unet import PatchExpand, SwinUNetDecoder  # noqa: F401
from .segmentation import (  # noqa: F401
    DECODERS, SegmentationModel, create_segmentation_model, load_segmentation_model)
