"""Shared building blocks, one concept per file, re-exported flat (as ``timm.layers``)."""
from .pos_embed import grid_of, resample_abs_pos_embed, sincos_1d, sincos_2d_pos_embed
from .wavelength_embed import (
    DynamicPatchEmbed, KernelLayout, ResidualMlp, WavelengthHypernetwork, WavelengthWeightGenerator, compute_dtype)
from .vit_pyramid import PyramidMode, ViTPyramid
from .timestep import SR3NoiseLevelEncoding, openai_timestep_embedding, sr3_noise_level_encoding
