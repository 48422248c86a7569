"""Multimodal diffusion UNet encoders: a DDPM's denoising UNet as a frozen Sentinel-1 + Sentinel-2 backbone.

Paper:
    Lontke, Mommert, Borth, "Multi-Modal Diffusion for Self-Supervised Pretraining", IGARSS 2024. A DDPM is
    trained on ben-ge with Sentinel-2 [B04, B03, B02, B08] and Sentinel-1 [2 bands] stacked as one 6-channel
    image, optionally conditioned on climate zone, ERA-5 weather and season; the frozen UNet's internal
    features (at a small timestep, after ``q_sample`` noising) then feed linear / segmentation heads.

Origin (all MIT):
    - https://github.com/AlexanderLontke/ssl-ddpm-rs @ 36effed705f6545dc40bf2a001103b7148337915 (configs,
      the SR3 UNet ``p_theta_models/ddpm_cd_model/sr3_modules/unet.py``, the OpenAI-style ``UNetModel``
      ``p_theta_models/openaimodel``, ``custom_embedders/mlp_embedder.py``, the feature extractor);
    - https://github.com/AlexanderLontke/lit-diffusion @ a34f40c1823d73b3199a4242f6dcdd3d8fb81a91 (``LitDDPM``:
      schedule buffers, ``q_sample``, ``ContextAdapterPThetaModel``);
    - https://github.com/nicikess/remote-sensing-core (ben-ge preprocessing transforms).
    This is an independent implementation whose module names reproduce the upstream state-dict keys.

Architectures (upstream configs), registered as:
    - ``diffusion_sr3_s2s1``: :class:`SR3UNet` (``backbones/s2_s1.yaml``): SR3 UNet of ddpm-cd, 6 -> 6 channels,
      inner 128, mults [1, 2, 4, 8, 8], 2 res blocks, self-attention at 16 px (of 128), GroupNorm 32, dropout 0.2,
      noise-level MLP on the *integer* timestep. 391 M parameters.
    - ``diffusion_cm_s2s1_cond``: :class:`CMUNet` (``backbones/conditional/s1_s2_conditional.yaml``): OpenAI /
      latent-diffusion ``UNetModel``, model channels 256, mults [1, 1, 2, 3, 4], 2 res blocks, ResBlock up/down,
      spatial transformers (depth 1, 4 heads) at downsampling 8 and 16 cross-attending to one context token from
      :class:`MLPEmbedder` (12 scalars -> 256). 547 M parameters.
    - ``diffusion_cm_s2s1``: the unconditional variant (``s1_s2_unconditional.yaml``): plain attention blocks, no
      embedder.
    Each is a :class:`DiffusionEncoder` (timm contract) holding ``unet`` (+ ``context_embedder``) and the linear
    beta schedule (1e-4 .. 0.02, 1000 steps) as non-persistent buffers. Their input specs (bands, normalisation,
    the 12 conditioning scalars, ``timestep`` / ``noise_seed``) are in ``weights_manifest.yaml``.

Weights: none were published (the configs point at the authors' cluster). ``eobackbones convert ddpm --checkpoint
epoch=19.ckpt --out DIR`` converts the authors' Lightning checkpoints (LitDDPM ``state_dict``; the release is read
from the keys) into a ``save_pretrained`` directory for ``create_model('local-dir:DIR/<arch>')``;
``examples/pretrain_diffusion.py`` pretrains your own.
"""
import dataclasses
import logging
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cfg import PretrainedCfg
from ..errors import CheckpointFormatError, InvalidInputError, MissingModalityError, WeightsNotFoundError
from ..hub.weights import ConverterOption, ConvertTarget, register_converter
from ..layers import SR3NoiseLevelEncoding, openai_timestep_embedding
from ..spec import CallArg, ConditionSpec, InputSpec
from ._base import EOModelMixin
from ._builder import adapt_spec, build_model_with_cfg
from ._features import feature_take_indices
from ._registry import register_model

__all__ = [
    'SR3UNet', 'CMUNet', 'MLPEmbedder', 'DiffusionEncoder', 'diffusion_schedule', 'convert_lontke_state_dict',
    'detect_release', 'read_lightning_checkpoint', 'RELEASE_ARCHS', 'CONTEXT_NAMES', 'SCHEDULE_BUFFERS',
]

_logger = logging.getLogger(__name__)

# The 12 conditioning scalars in the order upstream concatenates them (ContextAdapterPThetaModel context_keys
# [climate_zone, era_5, season_s1, season_s2]; ERA-5 columns as in ben-ge_era-5.csv / the scaler config).
CONTEXT_NAMES = (
    'climate_zone',
    'era5_atmpressure_level', 'era5_temperature_s2', 'era5_temperature_s1', 'era5_wind_u_s2', 'era5_wind_u_s1',
    'era5_wind_v_s2', 'era5_wind_v_s1', 'era5_relhumidity_s2', 'era5_relhumidity_s1',
    'season_s1', 'season_s2',
)
# upstream keyword -> slice of the 12-vector
CONTEXT_GROUPS = (('climate_zone', 1), ('era_5', 9), ('season_s1', 1), ('season_s2', 1))
# LitDiffusionBase registers these (1000,) buffers in every checkpoint; they are recomputed, dropped by name
SCHEDULE_BUFFERS = (
    'alphas', 'sqrt_alphas_cumprod', 'sqrt_one_minus_alphas_cumprod', 'posterior_mean_coef1', 'posterior_mean_coef2',
    'posterior_variance', 'posterior_log_variance_clipped', 'sqrt_recip_alphas_cumprod', 'sqrt_recip_m1_alphas_cumprod',
)


def _run(module: nn.Module, use_ckpt: bool, *args: Any) -> torch.Tensor:
    if use_ckpt and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def _check_size(x: torch.Tensor, multiple: int, what: str) -> None:
    if x.ndim != 4:
        raise InvalidInputError(f'{what}: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}')
    if x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise InvalidInputError(
            f'{what}: H and W must be multiples of {multiple} (the UNet downsamples {int(math.log2(multiple))} times), '
            f'got {x.shape[-2]}x{x.shape[-1]}; DiffusionEncoder pads for you')


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (OpenAI's ``GroupNorm32``; a no-op cast in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


# ================================================================== SR3 blocks (ddpm-cd / ssl-ddpm-rs)

class SR3Block(nn.Module):
    """GroupNorm -> Swish -> (Dropout) -> 3x3 conv; keys ``block.0`` (norm) and ``block.3`` (conv)."""

    def __init__(self, dim: int, dim_out: int, groups: int = 32, dropout: float = 0.):
        super().__init__()
        self.block = nn.Sequential(
            GroupNorm32(groups, dim), nn.SiLU(), nn.Dropout(dropout) if dropout else nn.Identity(),
            nn.Conv2d(dim, dim_out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class SR3FeatureWiseAffine(nn.Module):
    """Adds a linear projection of the noise embedding per channel (SR3 ``use_affine_level=False``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.noise_func = nn.Sequential(nn.Linear(in_channels, out_channels))

    def forward(self, x: torch.Tensor, noise_embed: torch.Tensor) -> torch.Tensor:
        return x + self.noise_func(noise_embed).view(x.shape[0], -1, 1, 1)


class SR3ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, emb_dim: int, dropout: float = 0., norm_groups: int = 32):
        super().__init__()
        self.noise_func = SR3FeatureWiseAffine(emb_dim, dim_out)
        self.block1 = SR3Block(dim, dim_out, groups=norm_groups)
        self.block2 = SR3Block(dim_out, dim_out, groups=norm_groups, dropout=dropout)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.noise_func(self.block1(x), emb)
        return self.block2(h) + self.res_conv(x)


class SR3SelfAttention(nn.Module):
    """Spatial self-attention; scale ``1 / sqrt(C)`` with C the *full* channel count, as upstream."""

    def __init__(self, in_channel: int, n_head: int = 1, norm_groups: int = 32):
        super().__init__()
        self.n_head = n_head
        self.norm = GroupNorm32(norm_groups, in_channel)
        self.qkv = nn.Conv2d(in_channel, in_channel * 3, 1, bias=False)
        self.out = nn.Conv2d(in_channel, in_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        nh, hd = self.n_head, c // self.n_head
        # upstream views qkv as (B, heads, 3 * head_dim, H, W): q, k, v are interleaved per head
        q, k, v = self.qkv(self.norm(x)).view(b, nh, hd * 3, h * w).chunk(3, dim=2)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))  # (B, nh, HW, hd)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))
        return self.out(out.transpose(-1, -2).reshape(b, c, h, w)) + x


class SR3ResBlockWithAttn(nn.Module):
    def __init__(self, dim: int, dim_out: int, emb_dim: int, norm_groups: int = 32, dropout: float = 0.,
                 with_attn: bool = False):
        super().__init__()
        self.with_attn = with_attn
        self.res_block = SR3ResnetBlock(dim, dim_out, emb_dim, dropout=dropout, norm_groups=norm_groups)
        if with_attn:
            self.attn = SR3SelfAttention(dim_out, norm_groups=norm_groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res_block(x, emb)
        return self.attn(x) if self.with_attn else x


class SR3Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(x)


class SR3Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class SR3UNet(nn.Module):
    """The SR3 UNet of ssl-ddpm-rs (from ddpm-cd), parameter names as upstream (``noise_level_mlp.1``, ``downs.N``...).

    ``forward(x_t, t) -> eps`` takes the **integer** timestep (the noise-level MLP encodes ``t`` itself, not
    SR3's continuous noise level). ``forward(x_t, t, feat_need=True)`` returns upstream's ``(fe, fm, fd)``:
    the input-conv and every ``downs`` output, the two middle-block outputs, and every decoder res-block
    output in *reversed* order.

    Multi-scale features (``feature_levels``): per decoder level, the output of its **first** res block,
    which is what upstream's segmentation configs take (``fd[14, 11, 8, 5, 2]`` at the default size).
    """
    feature_block = 0

    def __init__(
            self,
            in_channel: int = 6,
            out_channel: int = 6,
            inner_channel: int = 128,
            norm_groups: int = 32,
            channel_mults: Sequence[int] = (1, 2, 4, 8, 8),
            attn_res: Sequence[int] = (16,),
            res_blocks: int = 2,
            dropout: float = 0.2,
            image_size: int = 128,
    ):
        """
        Args:
            in_channel, out_channel: input / predicted-noise channels.
            inner_channel: width of the first level (and of the noise embedding).
            norm_groups: GroupNorm groups.
            channel_mults: width multiplier per level; ``len - 1`` downsamplings.
            attn_res: resolutions (for an ``image_size`` input) whose blocks get self-attention. Attention is
                bound to the *level*, so other input sizes keep it at the same depth.
            res_blocks: res blocks per encoder level (decoder levels have one more).
            dropout: dropout in the second conv block of every res block (train mode only).
            image_size: the size ``attn_res`` refers to.
        """
        super().__init__()
        self.in_channel = in_channel
        self.inner_channel = inner_channel
        self.num_levels = len(channel_mults)
        self.size_multiple = 2 ** (self.num_levels - 1)
        self.grad_checkpointing = False
        emb_dim = inner_channel
        self.noise_level_mlp = nn.Sequential(
            SR3NoiseLevelEncoding(inner_channel), nn.Linear(inner_channel, inner_channel * 4), nn.SiLU(),
            nn.Linear(inner_channel * 4, inner_channel))
        self.init_conv = nn.Conv2d(in_channel, inner_channel, kernel_size=3, padding=1)

        pre, feat_channels, now_res = inner_channel, [inner_channel], image_size
        downs = []
        for ind, mult in enumerate(channel_mults):
            use_attn = now_res in attn_res
            ch = inner_channel * mult
            for _ in range(res_blocks):
                downs.append(SR3ResBlockWithAttn(pre, ch, emb_dim, norm_groups, dropout, with_attn=use_attn))
                feat_channels.append(ch)
                pre = ch
            if ind != self.num_levels - 1:
                downs.append(SR3Downsample(pre))
                feat_channels.append(pre)
                now_res //= 2
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList([
            SR3ResBlockWithAttn(pre, pre, emb_dim, norm_groups, dropout, with_attn=True),
            SR3ResBlockWithAttn(pre, pre, emb_dim, norm_groups, dropout, with_attn=False)])
        self.num_features = pre

        ups, levels = [], {}
        for ind in reversed(range(self.num_levels)):
            use_attn = now_res in attn_res
            ch = inner_channel * channel_mults[ind]
            for i in range(res_blocks + 1):
                if i == self.feature_block:
                    levels[ind] = (len(ups), ch)
                ups.append(SR3ResBlockWithAttn(pre + feat_channels.pop(), ch, emb_dim, norm_groups, dropout,
                                               with_attn=use_attn))
                pre = ch
            if ind > 0:
                ups.append(SR3Upsample(pre))
                now_res *= 2
        self.ups = nn.ModuleList(ups)
        self.final_conv = SR3Block(pre, out_channel, groups=norm_groups)
        # level (0 = full resolution) -> (position in ups, channels), shallow to deep
        self._levels = {lvl: levels[lvl] for lvl in sorted(levels)}
        self._pos_to_level = {pos: lvl for lvl, (pos, _) in self._levels.items()}

    @property
    def feature_levels(self) -> List[Dict[str, Any]]:
        """One entry per resolution, shallow to deep: channels, reduction and the module producing the map."""
        return [dict(num_chs=ch, reduction=2 ** lvl, module=f'ups.{pos}') for lvl, (pos, ch) in self._levels.items()]

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.noise_level_mlp(t)

    def forward_encoder(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                        ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Input conv, encoder and the first middle block; returns (classification map ``fm[0]``, skips)."""
        ck = self.grad_checkpointing
        h = self.init_conv(x)
        feats = [h]
        for layer in self.downs:
            h = _run(layer, ck, h, emb)
            feats.append(h)
        return _run(self.mid[0], ck, h, emb), feats

    def forward_decoder(
            self,
            h: torch.Tensor,
            feats: List[torch.Tensor],
            emb: torch.Tensor,
            context: Optional[torch.Tensor] = None,
            stop_level: Optional[int] = None,
            record: Optional[Dict[str, List[torch.Tensor]]] = None,
    ) -> Tuple[Optional[torch.Tensor], Dict[int, torch.Tensor]]:
        """Second middle block and decoder from the classification map.

        Returns:
            (eps, or None when stopped at ``stop_level`` or pruned; {level: feature map}).
        """
        ck = self.grad_checkpointing
        feats = list(feats)
        h = _run(self.mid[1], ck, h, emb)
        if record is not None:
            record['mid'].append(h)
        maps = {}
        for i, layer in enumerate(self.ups):
            if isinstance(layer, SR3ResBlockWithAttn):
                h = _run(layer, ck, torch.cat((h, feats.pop()), dim=1), emb)
                if record is not None:
                    record['dec'].append(h)
                lvl = self._pos_to_level.get(i)
                if lvl is not None:
                    maps[lvl] = h
                    if lvl == stop_level:
                        return None, maps
            else:
                h = _run(layer, ck, h, emb)
        if isinstance(self.final_conv, nn.Identity):
            return None, maps  # pruned
        return self.final_conv(h), maps

    def forward(self, x: torch.Tensor, time: torch.Tensor, context: Optional[torch.Tensor] = None,
                feat_need: bool = False) -> Union[torch.Tensor, Tuple[List[torch.Tensor], ...]]:
        """Upstream ``UNet.forward``: ``eps``, or ``(fe, fm, fd)`` with ``feat_need=True`` (``fd`` reversed)."""
        if context is not None:
            raise InvalidInputError('the SR3 UNet is unconditional; context must be None')
        _check_size(x, self.size_multiple, type(self).__name__)
        emb = self.embed_time(time)
        h, feats = self.forward_encoder(x, emb)
        record = {'mid': [h], 'dec': []} if feat_need else None
        out, _ = self.forward_decoder(h, feats, emb, record=record)
        if feat_need:
            return feats, record['mid'], record['dec'][::-1]
        if out is None:
            raise RuntimeError('the decoder was pruned (prune_intermediate_layers); the noise prediction is unavailable')
        return out


# ================================================================== OpenAI / latent-diffusion UNet blocks

class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding to res blocks and the context to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 upsampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode='nearest')
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key ``op``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1) if use_conv \
            else nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """OpenAI residual block with additive (or scale-shift) timestep conditioning, optional up/down sampling."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if self.out_channels == channels \
            else nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention of the unconditional UNet (1-D convs ``qkv`` / ``proj_out``).

    Heads are split *after* q, k, v (``qkv.chunk(3)`` then per-head views), the order of OpenAI's
    ``QKVAttention`` that upstream's comment ("split qkv before split heads") names.
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        n, nh = x.shape[-1], self.num_heads
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, nh, c // nh, n).transpose(-1, -2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, n)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention over ``context`` (self-attention when ``context`` is None); latent-diffusion names."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.):
        super().__init__()
        inner = dim_head * heads
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0., context_dim: Optional[int] = None):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) -> 1x1 conv -> transformer blocks over the pixels -> 1x1 conv, residual."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.,
                 context_dim: Optional[int] = None):
        super().__init__()
        inner = n_heads * d_head
        self.norm = GroupNorm32(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, n_heads, d_head, dropout=dropout, context_dim=context_dim)
            for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.transformer_blocks:
            y = block(y, context=context)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        return self.proj_out(y) + x


class MLPEmbedder(nn.Module):
    """Context embedder of ssl-ddpm-rs: (Linear -> ReLU -> Dropout) x (depth - 1), Linear -> Dropout.

    Keys ``layers.0``, ``layers.3``, ``layers.6`` for depth 3. Dropout is active in train mode.
    """

    def __init__(self, input_size: int = 12, embedding_size: int = 256, dropout_p: float = 0.2, depth: int = 3):
        super().__init__()
        if depth < 2:
            raise ValueError(f'MLPEmbedder needs depth >= 2, got {depth}')
        self.input_size = input_size
        self.embedding_size = embedding_size
        layers = [nn.Linear(input_size, embedding_size), nn.ReLU(), nn.Dropout(dropout_p)]
        for _ in range(depth - 2):
            layers += [nn.Linear(embedding_size, embedding_size), nn.ReLU(), nn.Dropout(dropout_p)]
        layers += [nn.Linear(embedding_size, embedding_size), nn.Dropout(dropout_p)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CMUNet(nn.Module):
    """OpenAI / latent-diffusion ``UNetModel`` as ssl-ddpm-rs configures it (names as upstream).

    ``forward(x_t, t, context)`` -> eps, with integer timesteps and ``context`` the **embedded** context token(s)
    ``(B, N, context_dim)`` (a ``(B, context_dim)`` tensor is taken as one token), exactly upstream's
    ``UNetModel.forward``. ``feat_need=True`` returns upstream's ``(encoder, bottleneck, decoder)`` feature lists
    (decoder reversed, ``bottleneck = [middle input, middle output]``).

    Multi-scale features (``feature_levels``): per decoder level, the output of its second res block (the
    last one before the level's upsampling block), upstream's segmentation choice ``dec[13, 10, 7, 4, 1]``.
    """

    def __init__(
            self,
            in_channels: int = 6,
            model_channels: int = 256,
            out_channels: int = 6,
            num_res_blocks: int = 2,
            attention_resolutions: Sequence[int] = (32, 16, 8),
            dropout: float = 0.,
            channel_mult: Sequence[int] = (1, 1, 2, 3, 4),
            conv_resample: bool = True,
            num_heads: int = 4,
            num_head_channels: int = -1,
            use_scale_shift_norm: bool = False,
            resblock_updown: bool = True,
            use_spatial_transformer: bool = True,
            transformer_depth: int = 1,
            context_dim: Optional[int] = 256,
    ):
        """
        Args:
            in_channels, out_channels: input / predicted-noise channels.
            model_channels: width of the first level; the timestep MLP is 4x this.
            num_res_blocks: res blocks per encoder level (decoder levels have one more).
            attention_resolutions: downsampling factors (1, 2, 4 ...) whose blocks get attention.
            dropout: res-block dropout.
            channel_mult: width multiplier per level.
            conv_resample: learned up/down convs (when not ``resblock_updown``).
            num_heads, num_head_channels: attention heads (or a fixed head width when ``num_head_channels > 0``).
            use_scale_shift_norm: FiLM-style timestep conditioning (upstream configs: False, additive).
            resblock_updown: down/upsample with res blocks.
            use_spatial_transformer: cross-attention transformers (conditional) instead of attention blocks.
            transformer_depth: transformer blocks per spatial transformer.
            context_dim: width of the context tokens (conditional only).
        """
        super().__init__()
        if use_spatial_transformer != (context_dim is not None):
            raise ValueError('use_spatial_transformer and context_dim go together (conditional model), '
                             f'got use_spatial_transformer={use_spatial_transformer}, context_dim={context_dim}')
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.num_levels = len(channel_mult)
        self.size_multiple = 2 ** (self.num_levels - 1)
        self.grad_checkpointing = False
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attn(ch: int) -> nn.Module:
            heads, d_head = (num_heads, ch // num_heads) if num_head_channels == -1 \
                else (ch // num_head_channels, num_head_channels)
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, d_head, depth=transformer_depth, context_dim=context_dim)
            return AttentionBlock(ch, num_heads=heads)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_dim, dropout, out_channels=mult * model_channels,
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != self.num_levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    ResBlock(ch, emb_dim, dropout, out_channels=ch, use_scale_shift_norm=use_scale_shift_norm, down=True)
                    if resblock_updown else Downsample(ch, conv_resample, out_channels=ch)))
                chans.append(ch)
                ds *= 2
        self.num_features = ch
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm), attn(ch),
            ResBlock(ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm))

        self.output_blocks = nn.ModuleList([])
        levels = {}
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, dropout, out_channels=model_channels * mult,
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if i == max(num_res_blocks - 1, 0):
                    levels[level] = (len(self.output_blocks), ch)
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, emb_dim, dropout, out_channels=ch, use_scale_shift_norm=use_scale_shift_norm, up=True)
                        if resblock_updown else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))
        self._levels = {lvl: levels[lvl] for lvl in sorted(levels)}
        self._pos_to_level = {pos: lvl for lvl, (pos, _) in self._levels.items()}
        self._zero_init()

    def _zero_init(self) -> None:
        # upstream zero-initialises the last conv of every res block, attention / transformer output projections
        # and the output conv (zero_module), so an untrained UNet starts as the identity on its skip paths
        zero = [m.out_layers[-1] for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, (AttentionBlock, SpatialTransformer))]
        zero.append(self.out[-1])
        with torch.no_grad():
            for m in zero:
                for p in m.parameters():
                    p.zero_()

    @property
    def feature_levels(self) -> List[Dict[str, Any]]:
        """One entry per resolution, shallow to deep: channels, reduction and the module producing the map."""
        return [dict(num_chs=ch, reduction=2 ** lvl, module=f'output_blocks.{pos}')
                for lvl, (pos, ch) in self._levels.items()]

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(openai_timestep_embedding(t, self.model_channels))

    def _context(self, context: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.context_dim is None:
            if context is not None:
                raise InvalidInputError('this UNet is unconditional; context must be None')
            return None
        if context is None:
            raise MissingModalityError(
                f'the conditional UNet needs context: embedded context tokens (B, N, {self.context_dim}) '
                '(DiffusionEncoder.embed_context turns the 12 scalars into one)')
        if context.ndim == 2:
            context = context.unsqueeze(1)
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise InvalidInputError(f'context: expected (B, N, {self.context_dim}) tokens, got {tuple(context.shape)}')
        return context

    def forward_encoder(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                        ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Input blocks; returns (encoder output = middle-block input = classification map, skips)."""
        ck = self.grad_checkpointing
        hs, h = [], x
        for module in self.input_blocks:
            h = _run(module, ck, h, emb, context)
            hs.append(h)
        return h, hs

    def forward_decoder(
            self,
            h: torch.Tensor,
            hs: List[torch.Tensor],
            emb: torch.Tensor,
            context: Optional[torch.Tensor] = None,
            stop_level: Optional[int] = None,
            record: Optional[Dict[str, List[torch.Tensor]]] = None,
    ) -> Tuple[Optional[torch.Tensor], Dict[int, torch.Tensor]]:
        """Middle block and output blocks from the encoder output; see :meth:`SR3UNet.forward_decoder`."""
        ck = self.grad_checkpointing
        hs = list(hs)
        h = _run(self.middle_block, ck, h, emb, context)
        if record is not None:
            record['mid'].append(h)
        maps = {}
        for i, module in enumerate(self.output_blocks):
            h = _run(module, ck, torch.cat([h, hs.pop()], dim=1), emb, context)
            if record is not None:
                record['dec'].append(h)
            lvl = self._pos_to_level.get(i)
            if lvl is not None:
                maps[lvl] = h
                if lvl == stop_level:
                    return None, maps
        if isinstance(self.out, nn.Identity):
            return None, maps  # pruned
        return self.out(h), maps

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                feat_need: bool = False) -> Union[torch.Tensor, Tuple[List[torch.Tensor], ...]]:
        """Upstream ``UNetModel.forward``: eps, or ``(encoder, bottleneck, decoder)`` features with ``feat_need``."""
        _check_size(x, self.size_multiple, type(self).__name__)
        context = self._context(context)
        emb = self.embed_time(timesteps)
        h, hs = self.forward_encoder(x, emb, context)
        record = {'mid': [h], 'dec': []} if feat_need else None
        out, _ = self.forward_decoder(h, hs, emb, context, record=record)
        if feat_need:
            return hs, record['mid'], record['dec'][::-1]
        if out is None:
            raise RuntimeError('the decoder was pruned (prune_intermediate_layers); the noise prediction is unavailable')
        return out


# ================================================================== diffusion schedule

def diffusion_schedule(
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        device: Optional[torch.device] = None,
) -> Dict[str, torch.Tensor]:
    """Linear beta schedule and the cached terms of lit-diffusion's ``LitDiffusionBase``, bit for bit.

    Betas come from a float64 ``linspace`` cast once to float32; everything after is float32 arithmetic in
    upstream's order. Keys: ``betas``, ``alphas_cumprod`` and the 9 :data:`SCHEDULE_BUFFERS`.
    """
    import numpy as np
    betas = torch.tensor(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64), dtype=torch.float32,
                         device=device)
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, dim=0)
    acp_prev = acp.roll(shifts=1, dims=0)
    acp_prev[0] = 1.0
    post_var = (1.0 - acp_prev) / (1.0 - acp) * betas
    return dict(
        betas=betas,
        alphas_cumprod=acp,
        alphas=alphas,
        sqrt_alphas_cumprod=torch.sqrt(acp),
        sqrt_one_minus_alphas_cumprod=torch.sqrt(1 - acp),
        posterior_mean_coef1=torch.sqrt(acp_prev) * betas / (1.0 - acp),
        posterior_mean_coef2=torch.sqrt(alphas) * (1.0 - acp_prev) / (1.0 - acp),
        posterior_variance=post_var,
        posterior_log_variance_clipped=torch.log(torch.clamp(post_var, min=1e-20)),
        sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / acp),
        sqrt_recip_m1_alphas_cumprod=torch.sqrt(1.0 / acp - 1.0),
    )


def _extract(buf: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return buf.gather(0, t.to(buf.device)).reshape(-1, *([1] * (ndim - 1)))


# ================================================================== the backbone

_UNETS = {'sr3': SR3UNet, 'openai': CMUNet}


def _tensor_shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


class DiffusionEncoder(EOModelMixin, nn.Module):
    """A DDPM denoising UNet as a backbone (timm contract), with the diffusion schedule it was trained with.

    Input: ``{'s2': (B, 4, H, W), 's1': (B, 2, H, W)}`` (stacked S2 then S1, upstream's order) or the stacked
    ``(B, 6, H, W)`` tensor; the conditional model also needs ``context=`` the 12 normalised scalars
    (:data:`CONTEXT_NAMES`, ``(B, 12)`` or upstream's ``{'climate_zone': (B, 1), 'era_5': (B, 9), 'season_s1':
    (B, 1), 'season_s2': (B, 1)}``).

    Features as upstream's ``FeatureExtractor``: the input is noised to timestep ``t`` (default 1) with
    ``q_sample(x0, t, noise)`` and run through the UNet. Upstream draws fresh noise on every call; here the noise
    comes from a ``torch.Generator`` seeded per call with ``noise_seed`` (default 0), drawn on the CPU (so the
    features do not depend on the device) with one ``(C, H, W)`` pattern shared by every sample of the batch
    (so a sample's features do not depend on its batch or position). ``timestep`` / ``noise_seed`` are call
    arguments with the constructor's defaults.

    - ``forward_features`` -> the classification map upstream takes (``middle[0]``): the SR3 first middle
      block's output, or the CM encoder output (the middle block's input); 1024 x 8 x 8 at 128 px. Only the
      encoder (and the SR3 middle block) run.
    - ``forward_head(pre_logits=True)`` pools it: ``global_pool='avg'`` (default) or ``'flatten'`` (upstream's
      vector, 65,536-d at 128 px; its width is fixed by ``img_size``).
    - ``forward_intermediates`` / ``feature_info``: the decoder maps upstream's segmentation configs take, one per
      resolution, shallow to deep (reductions 1, 2, 4, 8, 16); ``stop_early`` runs the decoder only down to the
      shallowest level asked.
    - Sizes: inputs are zero-padded (symmetrically; 0 is mid-range after the [-1, 1] scaling) to a multiple of the
      UNet's total downsampling (16), and every map is cropped back to the cells that cover the input. For a
      120 px ben-ge patch this is upstream's 4 px padding to 128 exactly.
    - The raw denoiser is ``model.unet(x_t, t, context=None) -> eps`` (integer ``t``; for the conditional model
      ``context`` is the *embedded* token, :meth:`embed_context`); :meth:`denoise` takes the 12 raw scalars.
    - With a classifier (``num_classes > 0``) the decoder, which the classification path does not use, is frozen
      (``requires_grad=False``); ``num_classes=0`` (pretraining, segmentation) keeps every parameter trainable.
    - Inputs are validated by the ``input_spec`` (:meth:`check_call`): keys, channels, dtype, finite values, the
      context's shape; ``timestep`` / ``noise_seed`` default to its call arguments.
    """

    # the stacked S2+S1 input conv and the noise-prediction conv index the bands (both UNet types' keys):
    # create_model(..., pretrained=True, bands={'s2': [...], 's1': [...]}) maps them by band name
    input_convs = {m: (('unet.init_conv.weight', 1), ('unet.input_blocks.0.0.weight', 1),
                       ('unet.final_conv.block.3.weight', 0, 'out'), ('unet.final_conv.block.3.bias', 0, 'out'),
                       ('unet.out.2.weight', 0, 'out'), ('unet.out.2.bias', 0, 'out')) for m in ('s2', 's1')}

    @staticmethod
    def args_for_channels(counts: Dict[str, int], args: Dict[str, Any]) -> Dict[str, Any]:
        mods = tuple((m, counts.get(m, c)) for m, c in args.get('modalities', (('s2', 4), ('s1', 2))))
        n = sum(c for _, c in mods)
        keys = ('in_channel', 'out_channel') if args.get('unet_type', 'sr3') == 'sr3' else ('in_channels', 'out_channels')
        return dict(modalities=mods, unet_args=dict(args.get('unet_args') or {}, **{k: n for k in keys}))

    def __init__(
            self,
            unet_type: str = 'sr3',
            unet_args: Optional[Dict[str, Any]] = None,
            context_embedder_args: Optional[Dict[str, Any]] = None,
            modalities: Sequence[Sequence[Any]] = (('s2', 4), ('s1', 2)),
            num_classes: int = 0,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            img_size: int = 128,
            timestep: int = 1,
            noise_seed: int = 0,
            num_timesteps: int = 1000,
            beta_start: float = 1e-4,
            beta_end: float = 0.02,
    ):
        """
        Args:
            unet_type: ``sr3`` (:class:`SR3UNet`) or ``openai`` (:class:`CMUNet`).
            unet_args: constructor arguments of the UNet.
            context_embedder_args: :class:`MLPEmbedder` arguments; given for the conditional model only.
            modalities: (name, channels) in stacking order; channels sum to the UNet's input channels.
            num_classes: classifier outputs (0: ``forward`` returns the pooled feature).
            global_pool: ``avg``, ``flatten`` or ``''`` (no pooling).
            drop_rate: dropout before the classifier.
            img_size: input size the ``flatten`` width refers to.
            timestep: default diffusion timestep of the features.
            noise_seed: default seed of the feature noise.
            num_timesteps, beta_start, beta_end: the linear beta schedule.
        """
        super().__init__()
        if unet_type not in _UNETS:
            raise ValueError(f'unet_type must be one of {list(_UNETS)}, got {unet_type!r}')
        self.unet_type = unet_type
        self.unet = _UNETS[unet_type](**(unet_args or {}))
        conditional = getattr(self.unet, 'context_dim', None) is not None
        if conditional != (context_embedder_args is not None):
            raise ValueError('a conditional UNet (spatial transformers) needs context_embedder_args and an '
                             'unconditional one takes none')
        self.context_embedder = MLPEmbedder(**context_embedder_args) if conditional else None
        if conditional and self.context_embedder.embedding_size != self.unet.context_dim:
            raise ValueError(f'context embedding {self.context_embedder.embedding_size} != UNet context_dim '
                             f'{self.unet.context_dim}')
        self.modalities = tuple((str(m), int(c)) for m, c in modalities)
        self.in_chans = sum(c for _, c in self.modalities)
        unet_in = self.unet.in_channel if unet_type == 'sr3' else self.unet.in_channels
        if self.in_chans != unet_in:
            raise ValueError(f'modalities have {self.in_chans} channels, the UNet takes {unet_in}')
        self.size_multiple = self.unet.size_multiple
        self.img_size = img_size
        self.default_timestep = int(timestep)
        self.default_noise_seed = int(noise_seed)
        self.num_timesteps = int(num_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.num_features = self.unet.num_features
        self.feature_info = [dict(f, module=f'unet.{f["module"]}') for f in self.unet.feature_levels]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self._set_head(num_classes, global_pool)
        self._pruned_level: Optional[int] = None
        for name, t in diffusion_schedule(self.num_timesteps, self.beta_start, self.beta_end).items():
            self.register_buffer(name, t, persistent=False)

    # ------------------------------------------------------------------ setup helpers
    def init_non_persistent_buffers(self) -> None:
        """Recompute the schedule (after a ``meta`` build and an ``assign`` load)."""
        dev = next(self.parameters()).device
        for name, t in diffusion_schedule(self.num_timesteps, self.beta_start, self.beta_end, device=dev).items():
            setattr(self, name, t)

    def _pooled_width(self, global_pool: str) -> int:
        if global_pool == 'flatten':
            top, _, h, w = self._pad_info(self.img_size, self.img_size)
            r = self.size_multiple
            cells = (-(-(top + h) // r) - top // r)
            return self.num_features * cells * cells
        return self.num_features

    def _set_head(self, num_classes: int, global_pool: str) -> None:
        if global_pool not in ('avg', 'flatten', ''):
            raise ValueError(f'global_pool must be "avg", "flatten" or "", got {global_pool!r}')
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.head_hidden_size = self._pooled_width(global_pool)
        if num_classes > 0 and global_pool == '':
            raise ValueError('a classifier needs pooled features: global_pool "avg" or "flatten"')
        dev = next(self.unet.parameters()).device
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=dev) if num_classes > 0 else nn.Identity()
        self._sync_decoder_grad()

    def _decoder_modules(self) -> List[nn.Module]:
        """The UNet parts after the classification map (second middle block / middle block, decoder, output)."""
        u = self.unet
        return [u.mid[1], u.ups, u.final_conv] if self.unet_type == 'sr3' else [u.middle_block, u.output_blocks, u.out]

    def _sync_decoder_grad(self) -> None:
        # With a classifier the decoder is off the forward path: frozen, so every trainable parameter gets a
        # gradient (DDP without find_unused_parameters). ``requires_grad_(True)`` on them undoes it.
        for m in self._decoder_modules():
            m.requires_grad_(self.num_classes == 0)

    @property
    def conditional(self) -> bool:
        return self.context_embedder is not None

    # ------------------------------------------------------------------ inputs
    def stack_input(self, x: Union[torch.Tensor, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Validate the input and return the stacked ``(B, C, H, W)`` tensor (modalities in stacking order).

        Raises:
            MissingModalityError: a modality of the dict is missing.
            InvalidInputError: wrong type, channel count, or mismatching sizes.
        """
        names = [m for m, _ in self.modalities]
        if isinstance(x, Mapping):
            unknown = [k for k in x if k not in names]
            if unknown:
                raise InvalidInputError(f'unknown modality keys {unknown}; expected {names}')
            absent = [m for m in names if x.get(m) is None]
            if absent:
                raise MissingModalityError(f'missing modality {", ".join(map(repr, absent))}: this diffusion UNet '
                                           f'stacks {names} and needs all of them, got {[k for k in x if x[k] is not None]}')
            parts = []
            for m, c in self.modalities:
                v = x[m]
                if not isinstance(v, torch.Tensor) or v.ndim != 4 or v.shape[1] != c:
                    raise InvalidInputError(f'modality {m!r}: expected a (B, {c}, H, W) tensor, got {_tensor_shape(v)}')
                parts.append(v)
            if len({(p.shape[0], *p.shape[2:]) for p in parts}) != 1:
                raise InvalidInputError('modalities must share batch size and H, W, got '
                                        + ', '.join(f'{m} {tuple(p.shape)}' for (m, _), p in zip(self.modalities, parts)))
            return torch.cat(parts, dim=1)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InvalidInputError(
                f'expected a dict {{{", ".join(f"{m!r}: (B, {c}, H, W)" for m, c in self.modalities)}}} or the '
                f'stacked (B, {self.in_chans}, H, W) tensor, got {_tensor_shape(x)}')
        return x

    def _context_vector(self, context: Any, batch: Optional[int] = None) -> torch.Tensor:
        """``context`` as the (B, 12) vector: a tensor, or upstream's keyword groups concatenated in their order."""
        if isinstance(context, Mapping):
            missing = [k for k, _ in CONTEXT_GROUPS if context.get(k) is None]
            if missing:
                raise MissingModalityError(f'context dict misses {missing}; expected keys {[k for k, _ in CONTEXT_GROUPS]}')
            first = context[CONTEXT_GROUPS[0][0]]
            batch = batch if batch is not None else (first.shape[0] if isinstance(first, torch.Tensor) and first.ndim else None)
            parts = []
            for k, n in CONTEXT_GROUPS:
                v = context[k]
                v = v.reshape(v.shape[0], -1) if isinstance(v, torch.Tensor) and v.ndim >= 1 else v
                if not isinstance(v, torch.Tensor) or v.shape != (batch, n):
                    raise InvalidInputError(f'context[{k!r}]: expected ({batch}, {n}), got {_tensor_shape(v)}')
                parts.append(v)
            context = torch.cat(parts, dim=1)
        n = self.context_embedder.input_size
        rows = batch if batch is not None else 'B'
        if not isinstance(context, torch.Tensor) or context.ndim != 2 or context.shape[1] != n or (
                batch is not None and context.shape[0] != batch):
            raise InvalidInputError(f'context: expected ({rows}, {n}) normalised scalars {list(CONTEXT_NAMES)}, '
                                    f'got {_tensor_shape(context)}')
        return context

    def embed_context(self, context: Any, batch: Optional[int] = None) -> Optional[torch.Tensor]:
        """The 12 raw (normalised) scalars -> the UNet's context token ``(B, 1, 256)`` (None when unconditional).

        Raises:
            MissingModalityError: conditional model without ``context``.
            InvalidInputError: context for an unconditional model, or a wrongly shaped one.
        """
        if not self.conditional:
            if context is not None:
                raise InvalidInputError('this diffusion UNet is unconditional; context must be None')
            return None
        if context is None:
            raise MissingModalityError(
                'the conditional diffusion UNet needs context=(B, 12): min-max scaled [-1, 1] scalars '
                + ', '.join(CONTEXT_NAMES))
        vec = self._context_vector(context, batch)
        p = self.context_embedder.layers[0].weight
        return self.context_embedder(vec.to(p.device).unsqueeze(1))

    def check_call(self, x: Any, context: Any = None, timestep: Any = None, noise_seed: Any = None,
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Any, Any]:
        """Validate a call; returns ``(stacked x0, context vector or None, timestep, noise_seed)``.

        With an ``input_spec`` (models built by ``create_model``) the spec checks everything in one place: modality
        keys, channels, sizes, dtype, finite values, the context's shape and rows, unknown keywords; ``timestep``
        and ``noise_seed`` default to the spec's call arguments (the constructor's values). A stacked
        ``(B, C, H, W)`` tensor is split into its modalities first (S2 then S1).

        Raises:
            InvalidInputError / MissingModalityError: one line naming what was expected and what was given.
        """
        if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] == self.in_chans:
            parts, c0 = {}, 0
            for m, c in self.modalities:
                parts[m], c0 = x[:, c0:c0 + c], c0 + c
            x = parts
        elif not isinstance(x, Mapping):
            self.stack_input(x)  # raises the one-line error naming the dict and the stacked form
        if context is not None:
            if not self.conditional:
                raise InvalidInputError('this diffusion UNet is unconditional; context must be None')
            context = self._context_vector(context)
        if self.input_spec is None:  # built directly, not through create_model: the model's own checks
            x0 = self.stack_input(x)
            if self.conditional and context is None:
                self.embed_context(None)  # raises, naming the 12 values
            if context is not None:
                context = self._context_vector(context, x0.shape[0])
            return x0, context, timestep, noise_seed
        given = dict(context=context, timestep=timestep, noise_seed=noise_seed)
        kw = self.check_input(x, **{k: v for k, v in given.items() if v is not None})
        return self.stack_input(x), kw.get('context'), kw.get('timestep'), kw.get('noise_seed')

    def _pad_info(self, h: int, w: int) -> Tuple[int, int, int, int]:
        m = self.size_multiple
        ph, pw = -(-h // m) * m - h, -(-w // m) * m - w
        return ph // 2, pw // 2, h, w

    def pad_input(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
        """Zero-pad H, W symmetrically to a multiple of ``size_multiple``; returns (padded, (top, left, H, W))."""
        top, left, h, w = info = self._pad_info(x.shape[-2], x.shape[-1])
        m = self.size_multiple
        bottom, right = -(-h // m) * m - h - top, -(-w // m) * m - w - left
        if top or left or bottom or right:
            x = F.pad(x, (left, right, top, bottom))
        return x, info

    @staticmethod
    def _crop(x: torch.Tensor, info: Tuple[int, int, int, int], r: int) -> torch.Tensor:
        top, left, h, w = info
        y0, x0, y1, x1 = top // r, left // r, -(-(top + h) // r), -(-(left + w) // r)
        if (y0, x0) == (0, 0) and (y1, x1) == tuple(x.shape[-2:]):
            return x
        return x[..., y0:y1, x0:x1]

    def timesteps(self, timestep: Any, batch: int, device: torch.device) -> torch.Tensor:
        """``timestep`` (None -> default, int, or (B,) tensor) -> (B,) int64 timesteps, range-checked."""
        t = self.default_timestep if timestep is None else timestep
        if isinstance(t, torch.Tensor):
            if t.is_floating_point() or t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
                raise InvalidInputError(f'timestep: expected an int or a ({batch},) integer tensor, got '
                                        f'{t.dtype} {tuple(t.shape)}')
            t = t.to(device=device, dtype=torch.long).reshape(-1).expand(batch)
        elif isinstance(t, int) and not isinstance(t, bool):
            t = torch.full((batch,), t, dtype=torch.long, device=device)
        else:
            raise InvalidInputError(f'timestep: expected an int or a ({batch},) integer tensor, got {type(t).__name__}')
        if not t.is_meta and (bool((t < 0).any()) or bool((t >= self.num_timesteps).any())):
            raise InvalidInputError(f'timestep must be in [0, {self.num_timesteps - 1}], got {t.tolist()}')
        return t

    def feature_noise(self, shape: Sequence[int], noise_seed: Optional[int], device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
        """The per-call noise: one ``(C, H, W)`` standard-normal draw (CPU generator seeded with ``noise_seed``)
        broadcast over the batch."""
        seed = self.default_noise_seed if noise_seed is None else noise_seed
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InvalidInputError(f'noise_seed must be an int, got {type(seed).__name__}')
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32)
        return noise.to(device=device, dtype=dtype).expand(*shape)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise`` (lit-diffusion ``q_sample``)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim).to(x0.dtype) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim).to(x0.dtype) * noise)

    def feature_input(self, x: Any, context: Any = None, timestep: Any = None, noise_seed: Optional[int] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Tuple[int, int, int, int]]:
        """What the feature path feeds the UNet: ``(x_t, t, context token or None, padding info)``.

        ``x_t = q_sample(pad(stack(x)), t, noise)`` with the per-call seeded noise (see the class docstring);
        the call is validated first (:meth:`check_call`).
        """
        x0, context, timestep, noise_seed = self.check_call(x, context, timestep, noise_seed)
        ctx = self.embed_context(context, x0.shape[0])
        x0, info = self.pad_input(x0)
        t = self.timesteps(timestep, x0.shape[0], x0.device)
        x_t = self.q_sample(x0, t, self.feature_noise(x0.shape, noise_seed, x0.device, x0.dtype))
        return x_t, t, ctx, info

    # ------------------------------------------------------------------ denoiser
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, context: Any = None) -> torch.Tensor:
        """eps prediction on a given ``x_t`` (sizes as the UNet takes them); ``context``: the 12 raw scalars."""
        return self.unet(x_t, t, context=self.embed_context(context, x_t.shape[0]))

    # ------------------------------------------------------------------ timm contract
    def forward_features(self, x: Any, context: Any = None, timestep: Any = None,
                         noise_seed: Optional[int] = None) -> torch.Tensor:
        """Noise to ``timestep``, run the encoder (+ SR3's first middle block); the unpooled classification map."""
        x_t, t, ctx, info = self.feature_input(x, context, timestep, noise_seed)
        emb = self.unet.embed_time(t)
        h, _ = self.unet.forward_encoder(x_t, emb, ctx)
        return self._crop(h, info, self.size_multiple)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        elif self.global_pool == 'flatten':
            x = x.flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Any, context: Any = None, timestep: Any = None, noise_seed: Optional[int] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, context=context, timestep=timestep, noise_seed=noise_seed))

    def forward_intermediates(
            self,
            x: Any,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            context: Any = None,
            timestep: Any = None,
            noise_seed: Optional[int] = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Decoder maps at ``feature_info`` (shallow to deep; ``indices`` as timm: None all, int last n).

        The decoder runs deep to shallow, so ``stop_early`` stops after the *shallowest* level asked; without it
        the whole UNet runs, output conv included (as upstream's ``feat_need=True`` did). Nothing after the
        shallowest level changes the returned values, so pass ``stop_early=True`` unless you want the full
        forward (e.g. hooks on later modules). The classification map (``forward_features``) is the final
        output. ``norm`` has no effect.

        Returns:
            The maps in ``indices`` order (cropped to the input), or ``(classification map, maps)``.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt must be "NCHW", got {output_fmt!r}')
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if self._pruned_level is not None and min(take) < self._pruned_level:
            raise ValueError(f'levels {sorted(i for i in take if i < self._pruned_level)} were pruned')
        x_t, t, ctx, info = self.feature_input(x, context, timestep, noise_seed)
        emb = self.unet.embed_time(t)
        h, skips = self.unet.forward_encoder(x_t, emb, ctx)
        _, maps = self.unet.forward_decoder(h, skips, emb, ctx, stop_level=min(take) if stop_early else None)
        inter = [self._crop(maps[i], info, 2 ** i) for i in take]
        if intermediates_only:
            return inter
        return self._crop(h, info, self.size_multiple), inter

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the decoder after the shallowest level in ``indices`` (and the output conv: no more eps)."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        lvl = min(take)
        pos = self.unet._levels[lvl][0]
        if self.unet_type == 'sr3':
            self.unet.ups = self.unet.ups[:pos + 1]
            self.unet.final_conv = nn.Identity()
        else:
            self.unet.output_blocks = self.unet.output_blocks[:pos + 1]
            self.unet.out = nn.Identity()
        self._pruned_level = lvl
        if prune_head:
            self.reset_classifier(0, self.global_pool)
        return take

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self._set_head(num_classes, self.global_pool if global_pool is None else global_pool)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.unet.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # ordinal order of the keys = depth order (timm's layer decay): stem, encoder, middle, decoder, output
        if self.unet_type == 'sr3':
            return dict(stem=r"^unet\.(?:init_conv|noise_level_mlp)|^context_embedder", blocks=r'^unet\.downs\.(\d+)',
                        middle=r'^unet\.mid\.(\d+)', decoder=r'^unet\.ups\.(\d+)', out=r'^unet\.final_conv')
        return dict(stem=r"^unet\.(?:time_embed|input_blocks\.0\.)|^context_embedder",
                    blocks=r'^unet\.input_blocks\.(\d+)', middle=r'^unet\.middle_block\.(\d+)',
                    decoder=r'^unet\.output_blocks\.(\d+)', out=r'^unet\.out\.')


# ================================================================== converter

# release -> (upstream prefix -> our prefix), longest prefix first
_PREFIXES = {
    'sr3': (('p_theta_model.', 'unet.'),),
    'cm_conditional': (('p_theta_model._p_theta_model.', 'unet.'), ('p_theta_model.context_embedder.', 'context_embedder.')),
    'cm_unconditional': (('p_theta_model.', 'unet.'),),
}
# release -> the registered architecture a checkpoint of it converts to
RELEASE_ARCHS = {'sr3': 'diffusion_sr3_s2s1', 'cm_conditional': 'diffusion_cm_s2s1_cond',
                 'cm_unconditional': 'diffusion_cm_s2s1'}
# one key only each release's UNet has (the input conv)
_RELEASE_KEYS = (('cm_conditional', 'p_theta_model._p_theta_model.input_blocks.0.0.weight'),
                 ('sr3', 'p_theta_model.init_conv.weight'),
                 ('cm_unconditional', 'p_theta_model.input_blocks.0.0.weight'))


def detect_release(state_dict: Mapping[str, Any], what: str = 'checkpoint') -> str:
    """Which upstream model a LitDDPM ``state_dict`` holds: ``sr3``, ``cm_conditional`` or ``cm_unconditional``.

    Raises:
        CheckpointFormatError: none of the three input-conv keys is there.
    """
    for release, key in _RELEASE_KEYS:
        if key in state_dict:
            return release
    raise CheckpointFormatError(
        f'{what}: not a LitDDPM checkpoint of the Lontke et al. diffusion UNets (none of '
        f'{[k for _, k in _RELEASE_KEYS]}; first keys {list(state_dict)[:4]})')


def convert_lontke_state_dict(state_dict: Mapping[str, torch.Tensor], arch: str) -> Dict[str, torch.Tensor]:
    """LitDDPM ``state_dict`` (ssl-ddpm-rs) -> :class:`DiffusionEncoder` keys.

    Drops the 9 schedule buffers by name (recomputed), maps ``p_theta_model.`` (SR3, unconditional CM) or
    ``p_theta_model._p_theta_model.`` / ``p_theta_model.context_embedder.`` (conditional CM) to ``unet.`` /
    ``context_embedder.``. Any other key is kept as it is, so a strict load fails on it (e.g. EMA weights).

    Args:
        state_dict: the checkpoint's ``state_dict`` (see :func:`read_lightning_checkpoint`).
        arch: the release, ``sr3``, ``cm_conditional`` or ``cm_unconditional`` (see :func:`detect_release`).

    Raises:
        CheckpointFormatError: unknown ``arch``, or no key of the expected layout at all.
    """
    if arch not in _PREFIXES:
        raise CheckpointFormatError(f'unknown Lontke release {arch!r}; known: {list(_PREFIXES)}')
    prefixes = _PREFIXES[arch]
    if not any(k.startswith(p) for k in state_dict for p, _ in prefixes):
        raise CheckpointFormatError(
            f'not a LitDDPM checkpoint of {arch}: no key starts with {[p for p, _ in prefixes]} '
            f'(first keys {list(state_dict)[:4]})')
    out = {}
    for k, v in state_dict.items():
        if k in SCHEDULE_BUFFERS:
            continue
        for p, ours in prefixes:
            if k.startswith(p):
                out[ours + k[len(p):]] = v
                break
        else:
            out[k] = v
    return out


class _Opaque:
    """Inert stand-in for a pickled object that is not a tensor (hyper-parameters, metric objects, ...).

    Construction and state restoring only store their arguments; no foreign code runs.
    """
    __slots__ = ('args', 'state')

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.state = args, kwargs or None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f'<opaque {type(self).__qualname__}>'


def read_lightning_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of a PyTorch Lightning ``.ckpt``, read with ``torch.load(weights_only=True)``.

    Lightning pickles more than tensors next to the weights: ``save_hyperparameters`` stores the constructor
    arguments (for LitDDPM: the torchmetrics objects of ``training_metrics`` / ``validation_metrics``, config
    dicts), callbacks store their state, and user code can add anything (argparse namespaces, custom classes).
    ``weights_only=True`` refuses such globals. This reader first lists them statically
    (``torch.serialization.get_unsafe_globals_in_checkpoint``, which runs nothing), then loads with
    ``weights_only=True`` while each of them is bound to an inert placeholder class (:class:`_Opaque`), so
    torch's restricted unpickler builds placeholders instead of running their code. Only the tensors of
    ``state_dict`` are returned (memory-mapped from the file: the rest, e.g. the optimizer state, is never read);
    modules torch blocks outright (``os``, ``sys``, ...) still fail the load.

    Raises:
        WeightsNotFoundError: no file at ``path``.
        CheckpointFormatError: not a zip-format torch checkpoint, unreadable, or no ``state_dict`` of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f'{path}: no such checkpoint file')
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointFormatError(f'{path.name}: not a readable torch (zip) checkpoint ({str(e).strip()[:120]})') from None
    stubs = [(type(name.rsplit('.', 1)[-1], (_Opaque,), {'__slots__': ()}), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stubs):
            # memory-mapped: only the tensors the state dict keeps are ever read (a Lightning file also holds the
            # optimizer's moments, twice the weights' size)
            raw = torch.load(str(path), map_location='cpu', weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(f'{path.name}: refused or unreadable checkpoint ({first[:200]})') from None
    sd = raw.get('state_dict') if isinstance(raw, Mapping) else None
    if not isinstance(sd, Mapping) or not sd:
        keys = list(raw)[:8] if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointFormatError(f'{path.name}: expected a Lightning checkpoint with a "state_dict", got {keys}')
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(f'{path.name}: state_dict holds non-tensor entries: {bad[:5]}')
    if unsafe:
        _logger.info('%s: ignored %d non-tensor pickled globals outside state_dict: %s', path.name, len(unsafe),
                     ', '.join(sorted(unsafe)[:8]))
    return dict(sd)


def _read_ddpm(path: Path, what: str) -> Dict[str, torch.Tensor]:
    return read_lightning_checkpoint(path)


def _ddpm_targets(raw: Mapping[str, torch.Tensor], options: Dict[str, Any]) -> List[ConvertTarget]:
    """The architecture of a checkpoint: from its release (keys), or ``arch=`` (checked against the release)."""
    release = detect_release(raw)
    arch = options.get('arch') or RELEASE_ARCHS[release]
    other = {a: r for r, a in RELEASE_ARCHS.items()}.get(arch)
    if other is not None and other != release:
        raise CheckpointFormatError(f'the checkpoint holds the {release} release ({RELEASE_ARCHS[release]}); '
                                    f'--option arch={arch} is the {other} release')
    return [ConvertTarget(arch)]


@register_converter(
    'ddpm', archs=tuple(RELEASE_ARCHS.values()), targets=_ddpm_targets, reader=_read_ddpm,
    options={'arch': ConverterOption(str, None, 'architecture to build (default: from the checkpoint\'s release: '
                                                + ', '.join(f'{r} -> {a}' for r, a in RELEASE_ARCHS.items()) + ')')},
    description='Lightning checkpoint (LitDDPM, ssl-ddpm-rs) read with weights_only=True, pickled non-tensor objects '
                'outside `state_dict` bound to inert placeholders; kept: every UNet weight (`p_theta_model.` / '
                '`p_theta_model._p_theta_model.` -> `unet.`) and the context embedder (`p_theta_model.context_embedder.`'
                ' -> `context_embedder.`); dropped by name: the 9 diffusion schedule buffers (recomputed bit for bit), '
                'optimizer / scheduler / loop / callback state and hyper-parameters')
def _convert_ddpm(raw: Mapping[str, torch.Tensor], cfg: PretrainedCfg) -> Dict[str, torch.Tensor]:
    """LitDDPM ``state_dict`` -> the keys of ``cfg``'s architecture (release from the keys, checked)."""
    release = detect_release(raw, cfg.name)
    want = {a: r for r, a in RELEASE_ARCHS.items()}.get(cfg.architecture)
    if want is not None and want != release:
        raise CheckpointFormatError(f'{cfg.name}: the checkpoint is the {release} release, this model needs the {want} one')
    return convert_lontke_state_dict(raw, release)


# ================================================================== create / entrypoints

def _spec_fn(model: DiffusionEncoder, cfg: Optional[PretrainedCfg]) -> Optional[InputSpec]:
    """The weights' spec made true for the instance: channel counts, the context it takes (none when unconditional)
    and its own ``timestep`` / ``noise_seed`` defaults as the call arguments' defaults."""
    spec = cfg.input_spec if cfg is not None else None
    if spec is None:
        return None
    spec = adapt_spec(spec, {m: c for m, c in model.modalities if m in spec.modality_names})
    conds = tuple(c for c in spec.conditions if c.name != 'context')
    if model.conditional:
        ctx = next((c for c in spec.conditions if c.name == 'context'), None)
        n = model.context_embedder.input_size
        if ctx is None or ctx.size != n:
            names = CONTEXT_NAMES if n == len(CONTEXT_NAMES) else tuple(f'c{i}' for i in range(n))
            ctx = ConditionSpec('context', names, notes=f'{n} conditioning values; no normalisation is known for '
                                                        f'this instance: normalise them as its weights saw them')
        conds += (ctx,)
    defaults = {'timestep': model.default_timestep, 'noise_seed': model.default_noise_seed}
    args = tuple(dataclasses.replace(a, default=defaults[a.name]) if a.name in defaults else a for a in spec.call_args)
    args += tuple(CallArg(k, v) for k, v in defaults.items() if k not in {a.name for a in args})
    return dataclasses.replace(spec, conditions=conds, call_args=args)


def _create_diffusion(variant: str, pretrained: bool = False, default_args: Optional[Dict[str, Any]] = None,
                      **kwargs: Any) -> DiffusionEncoder:
    return build_model_with_cfg(DiffusionEncoder, variant, pretrained, spec_fn=_spec_fn, default_args=default_args,
                                **kwargs)


@register_model
def diffusion_sr3_s2s1(pretrained: bool = False, **kwargs: Any) -> DiffusionEncoder:
    """SR3 diffusion UNet encoder, S2 [B04, B03, B02, B08] + S1 [VH, VV] (Lontke et al. 2024; 391 M)."""
    model_args = dict(
        unet_type='sr3', modalities=(('s2', 4), ('s1', 2)),
        unet_args=dict(in_channel=6, out_channel=6, inner_channel=128, norm_groups=32, channel_mults=(1, 2, 4, 8, 8),
                       attn_res=(16,), res_blocks=2, dropout=0.2, image_size=128))
    return _create_diffusion('diffusion_sr3_s2s1', pretrained, model_args, **kwargs)


@register_model
def diffusion_cm_s2s1_cond(pretrained: bool = False, **kwargs: Any) -> DiffusionEncoder:
    """Conditional "CM" diffusion UNet encoder, S2 + S1 with 12 climate / weather / season scalars (547 M)."""
    model_args = dict(
        unet_type='openai', modalities=(('s2', 4), ('s1', 2)),
        unet_args=dict(in_channels=6, out_channels=6, model_channels=256, num_res_blocks=2,
                       attention_resolutions=(32, 16, 8), dropout=0.0, channel_mult=(1, 1, 2, 3, 4), num_heads=4,
                       resblock_updown=True, use_spatial_transformer=True, transformer_depth=1, context_dim=256),
        context_embedder_args=dict(input_size=12, embedding_size=256, dropout_p=0.2, depth=3))
    return _create_diffusion('diffusion_cm_s2s1_cond', pretrained, model_args, **kwargs)


@register_model
def diffusion_cm_s2s1(pretrained: bool = False, **kwargs: Any) -> DiffusionEncoder:
    """Unconditional "CM" diffusion UNet encoder, S2 + S1 (plain attention blocks)."""
    model_args = dict(
        unet_type='openai', modalities=(('s2', 4), ('s1', 2)),
        unet_args=dict(in_channels=6, out_channels=6, model_channels=256, num_res_blocks=2,
                       attention_resolutions=(32, 16, 8), dropout=0.0, channel_mult=(1, 1, 2, 3, 4), num_heads=4,
                       resblock_updown=True, use_spatial_transformer=False, context_dim=None))
    return _create_diffusion('diffusion_cm_s2s1', pretrained, model_args, **kwargs)
