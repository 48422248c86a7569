"""Wavelength-conditioned patch embedding (DOFA, Xiong et al. 2024, arXiv:2403.15356).

A hypernetwork turns the centre wavelength of every input channel into that channel's slice of
the patch-embedding kernel, so one network takes any band set. Module and parameter names follow
zhu-xlab/DOFA (and torchgeo's port) so their state dicts load unchanged:
``fclayer.w{1,2}``, ``weight_generator.{transformer_encoder.layers.0.*, fc_weight, fc_bias,
weight_tokens, bias_token}``.
"""
import contextlib
from collections import OrderedDict
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .pos_embed import sincos_1d

__all__ = ['ResidualMlp', 'WavelengthWeightGenerator', 'WavelengthHypernetwork', 'DynamicPatchEmbed', 'KernelLayout',
           'compute_dtype']

KernelLayout = Literal['permute', 'legacy']


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype ops run in on ``device``: the autocast dtype when autocast is on, else ``dtype``."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError):  # device type without autocast support
        pass
    return dtype


class ResidualMlp(nn.Module):
    """``x + relu(w2(relu(w1(x))))`` (DOFA's ``FCResLayer``)."""

    def __init__(self, dim: int = 128, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.w1 = nn.Linear(dim, dim, **dd)
        self.w2 = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.w2(F.relu(self.w1(x))))


class WavelengthWeightGenerator(nn.Module):
    """One post-norm transformer layer over ``[weight tokens, wavelength tokens, bias token]``.

    Args:
        dim: token width (DOFA: 128).
        weight_dim: output width per wavelength token (``k * k * embed_dim`` for a patch kernel).
        bias_dim: width of the bias read from the bias token; None: no bias token.
        num_weight_tokens: learned tokens prepended to the sequence (DOFA: 128).
        num_heads, ffn_dim: of the transformer layer (DOFA: 4, 2048, GELU, no dropout).
    """

    def __init__(
            self,
            dim: int = 128,
            weight_dim: int = 16 * 16 * 768,
            bias_dim: Optional[int] = 768,
            num_weight_tokens: int = 128,
            num_heads: int = 4,
            ffn_dim: int = 2048,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_weight_tokens = num_weight_tokens
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=ffn_dim, dropout=0.0, activation='gelu',
            norm_first=False, batch_first=False, **dd)
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.fc_weight = nn.Linear(dim, weight_dim, **dd)
        self.weight_tokens = nn.Parameter(torch.empty(num_weight_tokens, dim, **dd))
        if bias_dim:
            self.fc_bias = nn.Linear(dim, bias_dim, **dd)
            self.bias_token = nn.Parameter(torch.empty(1, dim, **dd))
        else:
            self.fc_bias = self.bias_token = None
        self.init_weights()

    def init_weights(self) -> None:
        for m in (self.fc_weight, self.fc_bias):
            if m is not None:
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.01)
        for p in (self.weight_tokens, self.bias_token):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    def forward(self, waves: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(C, dim) wavelength tokens -> ((C, weight_dim) weights, (bias_dim,) bias or None)."""
        parts = [self.weight_tokens, waves] + ([self.bias_token] if self.bias_token is not None else [])
        out = self.transformer_encoder(torch.cat(parts, dim=0))  # unbatched (S, dim)
        n = self.num_weight_tokens
        weights = self.fc_weight(out[n:n + waves.shape[0]] + waves)
        bias = self.fc_bias(out[-1]) if self.fc_bias is not None else None
        return weights, bias


class WavelengthHypernetwork(nn.Module):
    """Wavelengths (micrometres) -> generated weights: ``sincos(nm) -> fclayer -> weight_generator``.

    The one generation path of DOFA's patch embedding and of the MAE decoder's reconstruction head (subclasses
    keep the parameter names ``fclayer.*`` / ``weight_generator.*`` of the DOFA checkpoints). It always runs in
    its parameters' dtype (float32) with autocast disabled: the generated weights must not depend on the
    autocast state of the caller.

    Args:
        dynamic_embed_dim: width of the wavelength tokens (DOFA: 128).
        weight_dim: generated values per wavelength.
        bias_dim: width of the generated bias (None: no bias token).
    """
    keep_fp32 = True  # stays float32 under eobackbones.optimize_for_inference

    def __init__(self, dynamic_embed_dim: int = 128, weight_dim: int = 16 * 16 * 768, bias_dim: Optional[int] = 768,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dynamic_embed_dim = dynamic_embed_dim
        self.weight_generator = WavelengthWeightGenerator(dynamic_embed_dim, weight_dim, bias_dim, **dd)
        self.fclayer = ResidualMlp(dynamic_embed_dim, **dd)

    def init_hypernetwork(self) -> None:
        """DOFA's init: xavier-uniform weights and 0.01 biases for every linear layer; tokens N(0, 0.02)."""
        for m in list(self.weight_generator.modules()) + list(self.fclayer.modules()):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.01)
        self.weight_generator.init_weights()

    def generate_weights(self, wavelengths_um: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(C,) wavelengths in micrometres -> ((C, weight_dim) weights, (bias_dim,) bias or None), parameters' dtype."""
        p = self.fclayer.w1.weight
        # fp32 hypernetwork under autocast; devices without autocast (meta: shape-only builds) need no guard
        no_autocast = (torch.autocast(device_type=p.device.type, enabled=False)
                       if torch.amp.is_autocast_available(p.device.type) else contextlib.nullcontext())
        with no_autocast:
            waves = sincos_1d(wavelengths_um.to(device=p.device, dtype=torch.float32) * 1000, self.dynamic_embed_dim)
            return self.weight_generator(self.fclayer(waves.to(p.dtype)))


class DynamicPatchEmbed(WavelengthHypernetwork):
    """Patch embedding whose kernel is generated from the channels' wavelengths.

    ``conv2d(x, kernel, bias, stride=k, padding=1)``: the padding of 1 with stride ``k`` is DOFA's
    and is kept for fidelity (for ``H % k == 0`` and ``k > 2`` the grid is still ``H / k``).

    In eval mode the generated kernel is cached per (wavelengths, compute dtype, device) and
    invalidated when any hypernetwork parameter changes (tensor version counter); in training mode,
    or when gradients are needed for the hypernetwork, it is recomputed every call. The
    hypernetwork always runs in its parameters' dtype (float32) with autocast disabled.

    Args:
        dynamic_embed_dim: width of the wavelength tokens (DOFA: 128).
        patch_size: kernel size and stride ``k``.
        embed_dim: output channels ``D``.
        kernel_layout: ``permute`` (weights since Sept 2024: ``view(C, k, k, D).permute(3, 0, 1, 2)``)
            or ``legacy`` (earlier weights: ``view(D, C, k, k)``). Chosen by the weights' manifest entry.
        scaler: factor on kernel and bias (DOFA: 0.01).
        cache_size: number of cached kernels in eval mode.
    """
    def __init__(
            self,
            dynamic_embed_dim: int = 128,
            patch_size: int = 16,
            embed_dim: int = 768,
            kernel_layout: KernelLayout = 'permute',
            scaler: float = 0.01,
            cache_size: int = 4,
            device=None,
            dtype=None,
    ) -> None:
        if kernel_layout not in ('permute', 'legacy'):
            raise ValueError(f'kernel_layout must be "permute" or "legacy", got {kernel_layout!r}')
        super().__init__(dynamic_embed_dim, patch_size * patch_size * embed_dim, embed_dim, device=device, dtype=dtype)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.kernel_layout = kernel_layout
        self.scaler = scaler
        self.cache_size = cache_size
        self.init_weights()
        self._cache: 'OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]' = OrderedDict()

    def init_weights(self) -> None:
        self.init_hypernetwork()

    def clear_cache(self) -> None:
        self._cache.clear()

    def train(self, mode: bool = True) -> 'DynamicPatchEmbed':
        self._cache.clear()
        return super().train(mode)

    def generate(self, wavelengths_um: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel (D, C, k, k) and bias (D,) for wavelengths in micrometres, in the parameters' dtype."""
        k, d = self.patch_size, self.embed_dim
        weight, bias = self.generate_weights(wavelengths_um)  # (C, k * k * D), (D,)
        c = weight.shape[0]
        if self.kernel_layout == 'permute':
            kernel = weight.view(c, k, k, d).permute(3, 0, 1, 2)
        else:
            kernel = weight.view(d, c, k, k)  # NOTE pre-Sept-2024 DOFA weights were trained with this
        return kernel * self.scaler, bias * self.scaler

    def _state_key(self) -> tuple:
        # inference tensors (made under inference_mode) have no version counter and cannot change outside it
        return tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in self.parameters())

    def kernel(
            self,
            wavelengths_um: torch.Tensor,
            waves_key: Tuple[float, ...],
            dtype: torch.dtype,
            device: torch.device,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias in ``dtype`` on ``device``, from the cache when allowed."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if self.training or needs_grad:
            w, b = self.generate(wavelengths_um)
            return w.to(dtype), b.to(dtype)
        key = (waves_key, dtype, str(device), torch.is_inference_mode_enabled(), self._state_key())
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        w, b = self.generate(wavelengths_um)
        hit = (w.to(dtype).contiguous(), b.to(dtype))
        self._cache[key] = hit
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return hit

    def forward(
            self,
            x: torch.Tensor,
            wavelengths_um: torch.Tensor,
            waves_key: Optional[Tuple[float, ...]] = None,
    ) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H / k, W / k)."""
        if waves_key is None:
            waves_key = tuple(float(v) for v in wavelengths_um.detach().cpu().tolist())
        dtype = compute_dtype(x.device, x.dtype)
        weight, bias = self.kernel(wavelengths_um, waves_key, dtype, x.device)
        return F.conv2d(x, weight, bias, stride=self.patch_size, padding=1)
