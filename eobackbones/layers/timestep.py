"""Sinusoidal diffusion-timestep encodings, in the two layouts diffusion UNets were trained with.

The layouts are not interchangeable: a network trained with one gives wrong outputs with the other
(the order of the sine and cosine halves, and whether the integer timestep or a continuous noise level
goes in, are part of the weights' contract).

- :func:`sr3_noise_level_encoding`: ``[sin, cos]``, as the SR3 / WaveGrad ``PositionalEncoding`` used by
  ``ddpm-cd`` and by ``AlexanderLontke/ssl-ddpm-rs`` (``sr3_modules/unet.py``). ssl-ddpm-rs feeds the
  **integer** timestep ``t`` straight in, not SR3's continuous noise level.
- :func:`openai_timestep_embedding`: ``[cos, sin]`` with ``max_period = 1e4``, as OpenAI's
  guided-diffusion / improved-diffusion ``timestep_embedding`` and its latent-diffusion copy, used by the
  ``UNetModel`` of ssl-ddpm-rs (``create_sinusoidal_timestep_embedding``).

Both reproduce the upstream float32 arithmetic operation by operation, so results are bit-identical.
"""
import math

import torch
from torch import nn

__all__ = ['sr3_noise_level_encoding', 'openai_timestep_embedding', 'SR3NoiseLevelEncoding']


def sr3_noise_level_encoding(noise_level: torch.Tensor, dim: int) -> torch.Tensor:
    """SR3 / WaveGrad encoding ``[sin(t * w_k), cos(t * w_k)]`` with ``w_k = exp(-ln(1e4) * k / (dim / 2))``.

    Reproduces ``PositionalEncoding`` of ssl-ddpm-rs' SR3 UNet: for an integer (int64) ``noise_level`` the
    frequencies ``k / (dim / 2)`` come from an integer ``arange`` divided in float32, and the product with
    the integer timestep is float32.

    Args:
        noise_level: (B,) timesteps (integer) or noise levels (float).
        dim: output width (even).

    Returns:
        (B, dim) float tensor (float32 for integer input, else the input's dtype).
    """
    count = dim // 2
    step = torch.arange(count, dtype=noise_level.dtype, device=noise_level.device) / count
    encoding = noise_level.unsqueeze(1) * torch.exp(-math.log(1e4) * step.unsqueeze(0))
    return torch.cat([torch.sin(encoding), torch.cos(encoding)], dim=-1)


def openai_timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.) -> torch.Tensor:
    """OpenAI (guided-diffusion) embedding ``[cos(t * f_k), sin(t * f_k)]``, ``f_k = max_period^(-k / (dim // 2))``.

    Timesteps are cast with ``.float()`` before the product, as upstream; an odd ``dim`` gets a zero column.

    Args:
        timesteps: (B,) timesteps, integer or fractional.
        dim: output width.
        max_period: controls the lowest frequency.

    Returns:
        (B, dim) float32 tensor.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class SR3NoiseLevelEncoding(nn.Module):
    """Module form of :func:`sr3_noise_level_encoding` (no parameters; first layer of SR3's noise MLP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        return sr3_noise_level_encoding(noise_level, self.dim)

    def extra_repr(self) -> str:
        return f'dim={self.dim}'
