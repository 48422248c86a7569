"""Fixed sine-cosine embeddings (1-D for scalars such as wavelengths, 2-D for patch grids).

Layout follows MAE (He et al. 2021, facebookresearch/mae ``util/pos_embed.py``), which DOFA's
checkpoints were trained with: per axis ``[sin(p * omega), cos(p * omega)]`` with
``omega_i = 1 / 10000 ** (i / (dim / 2))``; the 2-D table is ``[emb(x), emb(y)]`` over a row-major
grid, optionally preceded by an all-zero row for a class token.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from timm.layers import resample_abs_pos_embed

__all__ = ['sincos_1d', 'sincos_2d_pos_embed', 'resample_abs_pos_embed']


def sincos_1d(pos: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sine-cosine encoding of scalar positions.

    Args:
        pos: positions of any shape (flattened to ``M`` values).
        dim: output width (even); the first half holds the sines.
        dtype: output dtype; computed in ``pos``' floating dtype (float32 for integers) by default.

    Returns:
        (M, dim) tensor.
    """
    if dim % 2:
        raise ValueError(f'sin-cos embedding width must be even, got {dim}')
    pos = pos.reshape(-1)
    if not pos.is_floating_point():
        pos = pos.float()
    omega = torch.arange(dim // 2, dtype=pos.dtype, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos[:, None] * omega[None, :]  # (M, dim / 2)
    emb = torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    return emb if dtype is None else emb.to(dtype)


def sincos_2d_pos_embed(
        dim: int,
        grid_size: Union[int, Sequence[int]],
        num_prefix_tokens: int = 1,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
) -> torch.Tensor:
    """MAE's fixed 2-D table for a row-major ``(H, W)`` patch grid, computed in float64.

    Returns:
        (1, num_prefix_tokens + H * W, dim); prefix rows are zero.
    """
    if dim % 4:
        raise ValueError(f'2-D sin-cos embedding width must be a multiple of 4, got {dim}')
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64, device=device),
        torch.arange(gw, dtype=torch.float64, device=device), indexing='ij')
    # NOTE MAE encodes the column (x) coordinate in the first half
    emb = torch.cat([sincos_1d(xs, dim // 2), sincos_1d(ys, dim // 2)], dim=1)
    if num_prefix_tokens:
        emb = torch.cat([emb.new_zeros(num_prefix_tokens, dim), emb], dim=0)
    return emb.to(dtype).unsqueeze(0)


def grid_of(num_tokens: int, num_prefix_tokens: int = 1) -> Tuple[int, int]:
    """Square grid size of a pos-embed table with ``num_tokens`` rows."""
    n = num_tokens - num_prefix_tokens
    s = int(round(n ** 0.5))
    if s * s != n:
        raise ValueError(f'pos-embed with {n} patch rows is not a square grid')
    return s, s
