"""Pretraining objectives."""
from .dofa_mae import DOFAMAE, DynamicDecoderHead, patchify, random_masking
from .fusion_mae import FusionMAE, FusionMAEOutput, ModalityCombinationSampler, SpatialDecoder, generate_masks
from .contrastive import CrossModalInfoNCE, DualSimCLRLoss, SwinPairLoss, info_nce, pair_embeddings  # noqa: F401
from .ddpm import DDPMObjective, GaussianDiffusion  # noqa: F401
