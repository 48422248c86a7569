"""Fusion-token ViT for incomplete multimodal remote-sensing inputs.

Paper: "A Novel Approach to Incomplete Multimodal Learning for Remote Sensing Data Fusion"
(earlier "Incomplete Multimodal Learning for Remote Sensing Data Fusion"), Chen, Zhao, Bruzzone,
https://arxiv.org/abs/2304.11381
Origin: Yusin2Chen/incomplete_multimodal_fusion @ 283ac12d043ca079698cfaee0b5356e83431dbe3.
There is no licence upstream: this is an independent implementation from a description, checked against
reference outputs of the upstream code (the parity vectors ``chen_fusionvit_tiny_*``); no upstream code was
read or copied.

One ViT over several modalities (S1, S2, DEM, ...). Every modality has its own patch embedding; a learned
*fusion token* per patch position joins the sequence. Each layer first gathers, per position, that position's
modality tokens into its fusion token (a small attention over the "slots" of that position, Block_Fusion),
then runs self-attention under the Zorro rule: modality tokens see only their own modality, fusion tokens see
everything. So the modality tokens never depend on other modalities, and any non-empty subset of the
modalities runs (missing-modality policy ``subset``): an absent modality simply has no tokens and no slot.

Numbers and the upstream outputs they equal (all fp32, checked in ``tests/test_fusion_vit.py``):

* ``forward_features(x)`` -> ``(B, 1 + N, D)``: token 0 is the pooled FUSION return token (upstream
  ``return_tokens[:, -1]``), tokens ``1:`` are the final-normed fusion tokens (upstream "fusion tokens",
  row-major over the patch grid). The pooled token is computed here, where the whole final-normed sequence
  (modality tokens included) is still at hand, and carried as a prefix token (timm's class-token layout), so
  ``forward_head(forward_features(x), pre_logits=True)`` (and ``forward(x)`` with no head) is exactly the
  upstream FUSION return token under any dtype cast, ``torch.compile`` or DDP.
* ``forward_tokens(x)`` -> per-modality final-normed tokens, fusion tokens and every return token.
* ``forward_intermediates(x)`` / ``features_only=True`` -> the 4-level pyramid of the upstream downstream
  backbone ``ViTBaseline`` (fusion tokens after blocks 2, 5, 8, 11, final-normed, then up x4 / up x2 /
  identity / max-pool).

Architectures: ``fusionvit_tiny`` (the reference encoder: width 192, 12 layers, 3 heads), ``fusionvit_small``,
``fusionvit_base``; no published weights. Default input (manifest spec ``fusionvit_s1_s2_dem``): the reference's
channel counts (SAR 1, RGB 3, DEM 1) bound to Sentinel-1 VV, Sentinel-2 B04/B03/B02 and a DEM; other bands through
``bands=`` (pretrained filters mapped by name per modality) or ``modalities=``. Upstream checkpoints (both
layouts) load through the ``fusionvit`` converter: ``eobackbones convert fusionvit --checkpoint FILE --out DIR``
or ``create_model('fusionvit_tiny', checkpoint_path=FILE)``.
"""
import argparse
import dataclasses
import inspect
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed
from torch.utils.checkpoint import checkpoint

from ..cfg import FileSource, PretrainedCfg
from ..errors import CheckpointFormatError, InvalidInputError, MissingModalityError, UnknownBandError
from ..hub.download import read_torch_checkpoint
from ..hub.weights import ConverterOption, ConvertTarget, get_converter, register_converter
from ..layers import PyramidMode, ViTPyramid
from ..sensors import get_sensor, resolve_bands
from ..spec import InputSpec, ModalitySpec
from ._base import EOModelMixin
from ._builder import build_model_with_cfg, load_state_dict_strict, merge_model_args
from ._features import feature_take_indices
from ._registry import get_arch_cfg, get_pretrained_cfg, register_model

__all__ = [
    'FusionViT', 'FusionViTTokens', 'ChenCheckpoint', 'zorro_attention', 'convert_chen_state_dict',
    'read_chen_checkpoint', 'fusionvit_from_chen', 'fusionvit_input_spec', 'sincos_table']

_logger = logging.getLogger(__name__)

# the reference (DFC2023) setting: SAR 1 channel, RGB 3 channels, DEM 1 channel
DEFAULT_MODALITIES = (('s1', 1), ('s2', 3), ('dem', 1))
_DEFAULT_FEATURE_BLOCKS = {12: (2, 5, 8, 11)}

Modalities = Mapping[str, Union[int, Sequence[str]]]


def _layer_norm(dim: int, eps: float, **dd: Any) -> nn.LayerNorm:
    # upstream: LayerNorm with a learned scale and a zero bias buffer (dropped by the converter)
    return nn.LayerNorm(dim, eps=eps, bias=False, **dd)


def sincos_table(dim: int, grid: Tuple[int, int], device: Optional[torch.device] = None) -> torch.Tensor:
    """The fixed position table of the reference, ``(1, h * w, dim)`` row-major.

    Channels ``[sin(row * w_k), cos(row * w_k), sin(col * w_k), cos(col * w_k)]`` with
    ``w_k = 1 / 10000 ** (k / (dim / 4))``, computed in float32 (bit-identical to the upstream table).
    """
    if dim % 4:
        raise ValueError(f'the 2-D sin-cos table needs a width divisible by 4, got {dim}')
    q = dim // 4
    omega = torch.arange(q, dtype=torch.float32, device=device) / q
    omega = 1.0 / (10000 ** omega)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32, device=device),
                                torch.arange(grid[1], dtype=torch.float32, device=device), indexing='ij')
    r = rows.reshape(-1, 1) * omega
    c = cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).unsqueeze(0)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def zorro_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Masked self-attention under the Zorro rule, without a dense mask.

    The sequence is ``[modality 0 (lengths[0] tokens), ..., modality M-1, fusion tokens]``. A modality token
    attends to its own modality only, a fusion token to every token. Computed as one attention per modality
    (one call over all of them when that needs no copy) plus one fusion-to-all call, all with fused SDPA
    kernels; no ``(L, L)`` mask is built. Every row has at least one allowed key, so this equals the
    reference's masked softmax (disallowed logits set to ``-finfo.max``).

    Args:
        q, k, v: ``(B, H, L, dh)``.
        lengths: token counts of the modality segments (zeros allowed); the remaining tokens are fusion tokens.

    Returns:
        ``(B, H, L, dh)``.
    """
    n_enc = sum(lengths)
    seg = [n for n in lengths if n > 0]
    sizes = [n_enc, q.shape[2] - n_enc]
    # split, not slicing: views whose backward is one concatenation, not a zero-filled tensor per slice
    (qm, qf), (km, _), (vm, _) = (t.split(sizes, dim=2) for t in (q, k, v))
    outs = []
    if len(seg) > 1 and len(set(seg)) == 1 and q.shape[0] == 1:
        # one call over the M modality blocks; with a batch of one, (M, H, n, dh) is a view (no copy)
        m, n = len(seg), seg[0]

        def batched(t: torch.Tensor) -> torch.Tensor:  # (1, H, M * n, dh) -> (M, H, n, dh)
            return t.unflatten(2, (m, n)).transpose(1, 2).flatten(0, 1)

        outs.append(_sdpa(batched(qm), batched(km), batched(vm)).unflatten(0, (1, m)).transpose(1, 2).flatten(2, 3))
    elif seg:  # one call per modality on views (batching them would copy q, k and v)
        parts = [t.split(list(lengths), dim=2) for t in (qm, km, vm)]
        outs += [_sdpa(qs, ks, vs) for qs, ks, vs, n in zip(*parts, lengths) if n]
    if sizes[1]:
        outs.append(_sdpa(qf, k, v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# ---------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head attention with its own bias-less LayerNorm on the query input (the upstream ``Attention``).

    ``q = to_q(norm(x))``; keys and values come from ``to_kv`` (first half keys, second half values) applied
    to ``norm(x)``, or to an explicit context, which is *not* normed. No projection has a bias.
    """

    def __init__(self, dim: int, num_heads: int = 8, dim_head: int = 64, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        inner = num_heads * dim_head
        self.num_heads = num_heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.norm = _layer_norm(dim, eps, **dd)
        self.to_q = nn.Linear(dim, inner, bias=False, **dd)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False, **dd)
        self.to_out = nn.Linear(inner, dim, bias=False, **dd)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(..., L, H * dh)`` -> ``(..., H, L, dh)``."""
        return t.unflatten(-1, (self.num_heads, self.dim_head)).transpose(-3, -2)

    def kv(self, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def forward_zorro(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """Self-attention over ``[modality segments, fusion tokens]`` under the Zorro rule."""
        h = self.norm(x)
        k, v = self.kv(h)
        o = zorro_attention(self.heads(self.to_q(h)), k, v, lengths)
        return self.to_out(o.transpose(-3, -2).flatten(-2))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Plain (unmasked) attention of ``x`` over ``context`` (or over itself)."""
        h = self.norm(x)
        k, v = self.kv(h if context is None else context)
        o = _sdpa(self.heads(self.to_q(h)), k, v)
        return self.to_out(o.transpose(-3, -2).flatten(-2))


class GegluMlp(nn.Module):
    """Bias-less LayerNorm, then ``Linear(D, 2 * hidden)`` -> ``a * GELU(g)`` (a first, gate last) -> ``Linear``."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = _layer_norm(dim, eps, **dd)
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=False, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.fc1(self.norm(x)).chunk(2, dim=-1)
        return self.fc2(a * self.act(g))


class FusionBlock(nn.Module):
    """Block_Fusion: per patch position, the fusion token attends to that position's modality slots and itself.

    Each position is its own short sequence ``[slot_0, ..., slot_{M-1}, fusion]``; the slots carry no position
    information, and a hidden token's slot holds the learned mask embedding of its position. Only the fusion
    slot's output is kept (upstream discards the updated modality slots), so only its query is computed:
    ``f = fusion + Attn(LN1(slots))[fusion]``, then ``f = f + FF(LN2(f))``.
    """

    def __init__(self, dim: int, num_heads: int, dim_head: int, mlp_hidden: int, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = _layer_norm(dim, eps, **dd)
        self.attn = Attention(dim, num_heads, dim_head, eps, **dd)
        self.norm2 = _layer_norm(dim, eps, **dd)
        self.mlp = GegluMlp(dim, mlp_hidden, eps, **dd)

    def forward(self, x: torch.Tensor, slots: Sequence['_Slot'], mask_embedding: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, D) = [modality tokens, N fusion tokens] -> the new fusion tokens (B, N, D).

        LayerNorms and projections are per token, so they run once over the sequence's tokens (and the mask
        embedding when a slot needs it); the slots are then gathered as key / value rows, never as token copies.
        """
        attn = self.attn
        b, n = x.shape[0], mask_embedding.shape[1]
        n_enc = x.shape[1] - n
        fusion = x[:, n_enc:]
        h = attn.norm(self.norm1(x))
        kv = attn.to_kv(h)  # (B, L, 2 * inner)
        q = attn.to_q(h[:, n_enc:]) * attn.scale  # (B, N, inner)
        if all(s.index is None for s in slots):  # every slot fully visible: the sequence is (S, N) slots
            kvs = kv.unflatten(1, (len(slots) + 1, n))  # (B, S, N, 2 * inner)
        else:
            kv_mask = None
            grids = []
            for s in slots:
                rows = kv[:, s.offset:s.offset + s.length]
                if s.index is None:
                    grids.append(rows)
                    continue
                if kv_mask is None:
                    kv_mask = attn.to_kv(attn.norm(self.norm1(mask_embedding))).expand(b, -1, -1)
                grids.append(kv_mask.index_copy(1, s.index, rows) if s.length else kv_mask)
            grids.append(kv[:, n_enc:])
            kvs = torch.stack(grids, dim=1)
        k, v = kvs.unflatten(-1, (2, attn.num_heads, attn.dim_head)).unbind(3)  # (B, S, N, H, dh)
        w = (q.unflatten(-1, (attn.num_heads, attn.dim_head)).unsqueeze(1) * k).sum(-1).softmax(dim=1)
        o = (w.unsqueeze(-1) * v).sum(1).flatten(-2)  # (B, N, inner): tiny per-position attention
        f = fusion + attn.to_out(o)
        return f + self.mlp(self.norm2(f))


class ZorroBlock(nn.Module):
    """Pre-norm transformer block over the whole sequence with the Zorro attention rule."""

    def __init__(self, dim: int, num_heads: int, dim_head: int, mlp_hidden: int, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = _layer_norm(dim, eps, **dd)
        self.attn = Attention(dim, num_heads, dim_head, eps, **dd)
        self.norm2 = _layer_norm(dim, eps, **dd)
        self.mlp = GegluMlp(dim, mlp_hidden, eps, **dd)

    def forward(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        x = x + self.attn.forward_zorro(self.norm1(x), lengths)
        return x + self.mlp(self.norm2(x))


class _Slot(NamedTuple):
    offset: int  # start of the modality's tokens in the sequence
    length: int  # visible tokens in the sequence
    index: Optional[torch.Tensor]  # visible patch positions (ascending); None: every position visible


class FusionViTLayer(nn.Module):
    """One layer: Block_Fusion (``fuse``) on the fusion tokens, then the Zorro block on the whole sequence."""

    def __init__(self, dim: int, num_heads: int, dim_head: int, mlp_hidden: int, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.fuse = FusionBlock(dim, num_heads, dim_head, mlp_hidden, eps, device=device, dtype=dtype)
        self.block = ZorroBlock(dim, num_heads, dim_head, mlp_hidden, eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, lengths: Tuple[int, ...], slots: Tuple[_Slot, ...],
                mask_embedding: torch.Tensor) -> torch.Tensor:
        n_enc = sum(lengths)
        fusion = self.fuse(x, slots, mask_embedding)
        return self.block(torch.cat([x[:, :n_enc], fusion], dim=1), lengths)


class FusionViTTokens(NamedTuple):
    """Everything the encoder computes for one input (see :meth:`FusionViT.forward_tokens`).

    Attributes:
        fusion: final-normed fusion tokens ``(B, N, D)``, row-major over the patch grid.
        modalities: modality -> its final-normed visible tokens ``(B, n_m, D)`` (ascending patch position).
        return_tokens: ``(B, T, D)`` pooled return tokens, one per participating modality then FUSION.
        return_types: the names of the rows of ``return_tokens`` (modality names, then ``'fusion'``).
        visible: modality -> visible patch positions (``None``: all).
        intermediates: block index -> fusion tokens after that block, before the final norm ``(B, N, D)``.
        grid: the patch grid ``(h, w)``.
    """
    fusion: torch.Tensor
    modalities: Dict[str, torch.Tensor]
    return_tokens: torch.Tensor
    return_types: Tuple[str, ...]
    visible: Dict[str, Optional[torch.Tensor]]
    intermediates: Dict[int, torch.Tensor]
    grid: Tuple[int, int]

    def return_token(self, name: str) -> torch.Tensor:
        """One pooled return token ``(B, D)`` by type name (``'fusion'`` or a modality)."""
        return self.return_tokens[:, self.return_types.index(name)]


def _parse_modalities(modalities: Optional[Modalities]) -> Tuple[Dict[str, int], Dict[str, Optional[Tuple[str, ...]]]]:
    if modalities is None:
        modalities = OrderedDict(DEFAULT_MODALITIES)
    if not isinstance(modalities, Mapping) or not modalities:
        raise ValueError(f'modalities must be a non-empty mapping name -> channels or band names, got {modalities!r}')
    chans, bands = OrderedDict(), OrderedDict()
    for name, spec in modalities.items():
        if not isinstance(name, str) or not name or name == 'fusion':
            raise ValueError(f'modality names must be non-empty strings other than "fusion", got {name!r}')
        if isinstance(spec, bool) or not isinstance(spec, (int, list, tuple)):
            raise ValueError(f'modality {name!r}: give a channel count or a list of band names, got {spec!r}')
        if isinstance(spec, int):
            if spec < 1:
                raise ValueError(f'modality {name!r}: channel count must be >= 1, got {spec}')
            chans[name], bands[name] = spec, None
        else:
            if not spec or not all(isinstance(b, str) for b in spec):
                raise ValueError(f'modality {name!r}: band names must be a non-empty list of strings, got {spec!r}')
            chans[name], bands[name] = len(spec), tuple(spec)
    return chans, bands


class FusionViT(EOModelMixin, nn.Module):
    """Fusion-token ViT (Chen, Zhao, Bruzzone) with any non-empty subset of its modalities as input.

    Input: ``dict[str, Tensor]`` keyed by modality, each ``(B, C_m, H, W)`` with ``H, W`` multiples of the patch
    size and the same for every modality. A modality that is absent (or ``None``) has no tokens and no
    Block_Fusion slot (the upstream inference path). Optional ``masks={m: (N,) bool}`` (True = hidden, shared by
    the batch) hide tokens: hidden positions are left out of the sequence and their Block_Fusion slot holds the
    learned per-position mask embedding; a modality given in ``masks`` but not in the input must be fully hidden
    and keeps its slot (the upstream pretraining model's way to express a missing modality).
    """

    # trained only through other paths: the mask embedding fills hidden tokens' slots (pretraining, the
    # fine-tuning sampler's masks), the pyramid serves forward_intermediates / features_only
    forward_unused_params: Tuple[str, ...] = ('mask_embedding', 'pyramid.*')

    def __init__(
            self,
            modalities: Optional[Modalities] = None,
            img_size: Union[int, Tuple[int, int]] = 256,
            patch_size: int = 16,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            dim_head: int = 64,
            mlp_ratio: float = 4.0,
            num_classes: int = 0,
            global_pool: Literal['token', 'avg', ''] = 'token',
            drop_rate: float = 0.0,
            pyramid: PyramidMode = 'learned',
            feature_blocks: Optional[Sequence[int]] = None,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            modalities: ordered mapping modality -> channel count or band names (default: the reference
                ``{'s1': 1, 's2': 3, 'dem': 1}``). The order fixes the sequence order and the return tokens.
            img_size: native input size; the position table, fusion tokens and mask embedding are defined on its
                patch grid and resampled (bicubic) for other sizes that are multiples of ``patch_size``.
            patch_size: patch size (16).
            embed_dim, depth, num_heads, dim_head: transformer shape (tiny: 192, 12, 3, 64).
            mlp_ratio: GEGLU hidden width is ``int(embed_dim * mlp_ratio * 2 / 3)`` (512 for tiny).
            num_classes: classifier outputs (0: no head).
            global_pool: ``token`` (the pooled FUSION return token, the reference's fused vector), ``avg`` (mean
                of the final-normed fusion tokens) or ``''`` (no pooling).
            drop_rate: dropout before the head.
            pyramid: ``learned`` (the reference ViTBaseline: transposed convolutions) or ``interpolate``
                (parameter-free).
            feature_blocks: the 4 layers feeding the pyramid (default 2, 5, 8, 11 for depth 12).
            norm_eps: epsilon of every LayerNorm of the encoder (1e-5, as the reference).
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f'global_pool must be "token", "avg" or "", got {global_pool!r}')
        self.modalities, self.bands = _parse_modalities(modalities)
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img[0] % patch_size or img[1] % patch_size:
            raise ValueError(f'img_size {img} must be a multiple of patch_size {patch_size}')
        self.img_size = img
        self.patch_size = patch_size
        self.grid_size = (img[0] // patch_size, img[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = 1
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.return_types = tuple(self.modalities) + ('fusion',)
        mlp_hidden = int(embed_dim * mlp_ratio * 2 / 3)

        self.patch_embed = nn.ModuleDict({
            m: PatchEmbed(None, patch_size, c, embed_dim, bias=True, strict_img_size=False, **dd)
            for m, c in self.modalities.items()})
        self.fusion_tokens = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim, **dd))
        self.mask_embedding = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim, **dd))
        self.return_tokens = nn.Parameter(torch.zeros(1, len(self.return_types), embed_dim, **dd))
        self.register_buffer('pos_embed', sincos_table(embed_dim, self.grid_size, device=device), persistent=False)
        self.blocks = nn.ModuleList([
            FusionViTLayer(embed_dim, num_heads, dim_head, mlp_hidden, norm_eps, **dd) for _ in range(depth)])
        self.norm = _layer_norm(embed_dim, norm_eps, **dd)
        self.attn_pool = Attention(embed_dim, num_heads, dim_head, norm_eps, **dd)
        self.pool_mlp = Mlp(embed_dim, 4 * embed_dim, act_layer=nn.GELU, **dd)
        self.pyramid = ViTPyramid(embed_dim, pyramid, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        if feature_blocks is None:
            feature_blocks = _DEFAULT_FEATURE_BLOCKS.get(
                depth, tuple(max(0, round(depth * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)))
        if len(feature_blocks) != 4 or not all(0 <= b < depth for b in feature_blocks):
            raise ValueError(f'feature_blocks must be 4 layer indices in [0, {depth}), got {feature_blocks}')
        self.feature_blocks = tuple(int(b) for b in feature_blocks)
        self.feature_info = self.pyramid.feature_info(patch_size, [f'blocks.{b}' for b in self.feature_blocks])
        self.init_weights()
        # the builder replaces it with the weights' spec made true for this instance (band names, statistics)
        self.input_spec = self.bound_input_spec()

    # ------------------------------------------------------------------ init / timm helpers
    def init_weights(self) -> None:
        """timm ViT initialisation (the reference publishes no weights to start from)."""
        for p in (self.fusion_tokens, self.mask_embedding, self.return_tokens):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for pe in self.patch_embed.values():
            w = pe.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def init_non_persistent_buffers(self) -> None:
        self.pos_embed = sincos_table(self.embed_dim, self.grid_size, device=self.fusion_tokens.device)

    def bound_input_spec(self) -> InputSpec:
        """The input spec of this instance (its modalities, band names where given, native size)."""
        mods = {m: list(self.bands[m]) if self.bands[m] else c for m, c in self.modalities.items()}
        return fusionvit_input_spec(mods, self.img_size, self.patch_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'fusion_tokens', 'mask_embedding', 'return_tokens'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^fusion_tokens|^mask_embedding|^patch_embed',
                    blocks=[(r'^blocks\.(\d+)', None),
                            (r'^norm|^return_tokens|^attn_pool|^pool_mlp|^pyramid', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f'global_pool must be "token", "avg" or "", got {global_pool!r}')
            self.global_pool = global_pool
        dev = self.fusion_tokens.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=dev) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ inputs
    def _check(self, x: Any, masks: Optional[Mapping[str, Any]]) -> Tuple[
            Dict[str, torch.Tensor], Dict[str, Optional[torch.Tensor]], Tuple[int, int]]:
        """Validate the input dict (through the input spec) and the masks -> (present images in model order,
        visible positions, grid)."""
        names = list(self.modalities)
        present = self.input_spec.split(x, dtype=self._param_dtype())
        images = {m: present[m] for m in names if m in present}
        size = tuple(next(iter(images.values())).shape[-2:])
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        visible = {m: None for m in images}
        if masks:
            n = grid[0] * grid[1]
            bad = [k for k in masks if k not in self.modalities]
            if bad:
                raise InvalidInputError(f'masks for unknown modalities {bad}; this model takes {names}')
            for m in names:
                if m not in masks or masks[m] is None:
                    continue
                hidden = torch.as_tensor(masks[m])
                if hidden.ndim == 2:
                    if not (hidden == hidden[:1]).all():
                        raise InvalidInputError(
                            f'masks[{m!r}]: one mask per batch (identical rows), got rows that differ')
                    hidden = hidden[0]
                if hidden.shape != (n,):
                    raise InvalidInputError(f'masks[{m!r}]: expected ({n},) for a {grid[0]}x{grid[1]} patch grid, '
                                            f'got {tuple(hidden.shape)}')
                hidden = hidden.bool()
                if m not in images:
                    if not hidden.all():
                        raise MissingModalityError(f'masks[{m!r}] marks tokens visible but the input has no {m}')
                    visible[m] = hidden.new_zeros(0, dtype=torch.long).to(self.fusion_tokens.device)
                elif not hidden.all() and not hidden.any():
                    visible[m] = None
                else:
                    visible[m] = torch.nonzero(~hidden).flatten().to(self.fusion_tokens.device)
        visible = {m: visible[m] for m in names if m in visible}  # model order
        return images, visible, grid

    def _grid_tables(self, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position table, fusion tokens, mask embedding), each (1, N, D), on the input's patch grid."""
        pos, fus, mask = self.pos_embed, self.fusion_tokens, self.mask_embedding
        if grid != self.grid_size:
            new, old = list(grid), list(self.grid_size)
            pos, fus, mask = (resample_abs_pos_embed(t, new, old, num_prefix_tokens=0) for t in (pos, fus, mask))
        return pos, fus, mask

    # ------------------------------------------------------------------ encoder
    def _layer(self, layer: nn.Module, x: torch.Tensor, lengths: Tuple[int, ...], slots: Tuple[_Slot, ...],
               mask: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint(layer, x, lengths, slots, mask, use_reentrant=False)
        return layer(x, lengths, slots, mask)

    def _encode(
            self,
            x: Mapping[str, torch.Tensor],
            masks: Optional[Mapping[str, Any]] = None,
            collect: Sequence[int] = (),
            stop_after: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Tuple[int, ...], Dict[str, Optional[torch.Tensor]], Dict[int, torch.Tensor],
               Tuple[int, int]]:
        """-> (sequence after the last run layer, modality lengths, visible, {layer: fusion tokens}, grid)."""
        images, visible, grid = self._check(x, masks)
        pos, fus, mask = self._grid_tables(grid)
        n = grid[0] * grid[1]
        parts, lengths, slots, offset = [], [], [], 0
        for m, idx in visible.items():
            if m in images:
                t = self.patch_embed[m](images[m]) + pos  # (B, N, D)
                if idx is not None:
                    t = t[:, idx]
                parts.append(t)
            length = n if idx is None else idx.numel()
            lengths.append(length)
            slots.append(_Slot(offset, length, idx))
            offset += length
        b = next(iter(images.values())).shape[0]
        parts.append((fus + pos).expand(b, -1, -1))
        seq = torch.cat(parts, dim=1)
        lengths, slots = tuple(lengths), tuple(slots)
        last = len(self.blocks) - 1 if stop_after is None else stop_after
        collected = {}
        want = set(collect)
        for i, layer in enumerate(self.blocks[:last + 1]):
            seq = self._layer(layer, seq, lengths, slots, mask)
            if i in want:
                collected[i] = seq[:, offset:]
        return seq, lengths, visible, collected, grid

    def _pool(self, seq: torch.Tensor, lengths: Tuple[int, ...], run: Sequence[str],
              types: Sequence[int]) -> torch.Tensor:
        """Return-token pooling over the final-normed sequence, then ``r + Mlp(norm(r))`` (no residual before).

        ``run`` names the sequence's modality segments (lengths ``lengths``); ``types`` are rows of
        ``return_tokens``: a modality row attends to that modality's tokens, the last row (FUSION) to every
        token. A modality row whose modality has no token in the sequence gets a uniform average over *all*
        tokens: upstream masks such a row entirely, every logit is ``-finfo.max`` and the softmax is uniform.
        """
        attn = self.attn_pool
        q = attn.heads(attn.to_q(attn.norm(self.return_tokens)))  # (1, H, T, dh)
        k, v = attn.kv(seq)  # (B, H, L, dh)
        b = seq.shape[0]
        segments, start = {}, 0
        for m, length in zip(run, lengths):
            segments[m] = (start, length)
            start += length
        outs = []
        for t in types:
            qt = q[:, :, t:t + 1].expand(b, -1, -1, -1)
            name = self.return_types[t]
            if name == 'fusion':
                outs.append(_sdpa(qt, k, v))
            elif segments.get(name, (0, 0))[1] == 0:
                outs.append(v.mean(dim=2, keepdim=True))
            else:
                a, length = segments[name]
                outs.append(_sdpa(qt, k[:, :, a:a + length], v[:, :, a:a + length]))
        o = torch.cat(outs, dim=2).transpose(1, 2).flatten(-2)  # (B, T, inner)
        r = attn.to_out(o)
        return r + self.pool_mlp(self.norm(r))

    def forward_tokens(
            self,
            x: Mapping[str, torch.Tensor],
            masks: Optional[Mapping[str, Any]] = None,
            intermediates: Sequence[int] = (),
    ) -> FusionViTTokens:
        """Per-modality tokens, fusion tokens and return tokens (the upstream pretraining encoder's outputs).

        Args:
            x: modality -> ``(B, C, H, W)``; any non-empty subset of the model's modalities.
            masks: optional modality -> ``(N,)`` bool (True = hidden; ``(B, N)`` with identical rows is accepted).
            intermediates: layer indices whose (pre-norm) fusion tokens to return as well.

        Returns:
            :class:`FusionViTTokens`. ``return_tokens`` has one row per participating modality (present in
            ``x`` or listed in ``masks``) in model order, then FUSION. These equal upstream ``return_tokens``
            (all modalities participate there); a fully hidden modality's row is the upstream quirk (uniform
            pooling over all tokens).
        """
        seq, lengths, visible, collected, grid = self._encode(x, masks, intermediates)
        seq = self.norm(seq)
        run = list(visible)
        n_enc = sum(lengths)
        mods, start = {}, 0
        for m, length in zip(run, lengths):
            if m in x and x[m] is not None:
                mods[m] = seq[:, start:start + length]
            start += length
        types = [self.return_types.index(m) for m in run] + [len(self.return_types) - 1]
        ret = self._pool(seq, lengths, run, types)
        return FusionViTTokens(seq[:, n_enc:], mods, ret, tuple(run) + ('fusion',), visible, collected, grid)

    def _fusion_features(self, seq: torch.Tensor, lengths: Tuple[int, ...], run: Sequence[str]) -> torch.Tensor:
        seq = self.norm(seq)
        pooled = self._pool(seq, lengths, run, [len(self.return_types) - 1])
        return torch.cat([pooled, seq[:, sum(lengths):]], dim=1)

    def forward_features(self, x: Mapping[str, torch.Tensor],
                         masks: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
        """dict of ``(B, C_m, H, W)`` -> ``(B, 1 + N, D)``: the pooled FUSION return token, then the final-normed
        fusion tokens (row-major)."""
        seq, lengths, visible, _, _ = self._encode(x, masks)
        return self._fusion_features(seq, lengths, list(visible))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Mapping[str, torch.Tensor], masks: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, masks))

    def forward_intermediates(
            self,
            x: Mapping[str, torch.Tensor],
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            masks: Optional[Mapping[str, Any]] = None,
            pyramid: bool = True,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Intermediate fusion-token maps.

        Args:
            x: modality -> ``(B, C, H, W)``.
            indices: with ``pyramid=True`` indices into ``feature_info`` (the 4 levels), else layer indices;
                None: all, int: the last n.
            norm: with ``pyramid=False``, apply the final norm to the fusion tokens before reshaping (timm's
                meaning). The pyramid levels are always final-normed (the reference ViTBaseline's definition of
                its features), whatever ``norm`` says.
            stop_early: run only the layers up to the last one needed.
            output_fmt: ``NCHW`` or ``NLC``.
            intermediates_only: return only the list.
            masks: optional hidden-token masks, as in :meth:`forward_tokens`.
            pyramid: True: the 4 levels of :class:`ViTPyramid` (strides patch/4, patch/2, patch, 2 * patch);
                False: the layers' fusion tokens at the patch stride.

        Returns:
            List of maps, or (``forward_features``-layout tokens at the last run layer, list).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f'output_fmt must be "NCHW" or "NLC", got {output_fmt!r}')
        norm = pyramid or norm
        if pyramid:
            take, _ = feature_take_indices(len(self.feature_blocks), indices)
            want: Dict[int, List[int]] = {}
            for lvl in take:
                want.setdefault(self.feature_blocks[lvl], []).append(lvl)
        else:
            take, _ = feature_take_indices(len(self.blocks), indices)
            want = {b: [b] for b in take}
        last = max(want) if stop_early else len(self.blocks) - 1
        seq, lengths, visible, collected, (gh, gw) = self._encode(x, masks, tuple(want), stop_after=last)
        out: Dict[int, torch.Tensor] = {}
        for i, keys in want.items():
            t = self.norm(collected[i]) if norm else collected[i]
            fmap = t.transpose(1, 2).reshape(t.shape[0], -1, gh, gw)
            for key in keys:
                out[key] = self.pyramid.forward_level(fmap, key) if pyramid else fmap
        feats = [out[k] for k in take]
        if output_fmt == 'NLC':
            feats = [f.flatten(2).transpose(1, 2) for f in feats]
        if intermediates_only:
            return feats
        return self._fusion_features(seq, lengths, list(visible)), feats

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the layers after the last pyramid level in ``indices`` (and the head). The final norm stays
        whatever ``prune_norm`` says: every pyramid level is final-normed."""
        take, _ = feature_take_indices(len(self.feature_blocks), indices)
        last = max(self.feature_blocks[i] for i in take)
        self.blocks = self.blocks[:last + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take


# ---------------------------------------------------------------------- input spec
def fusionvit_input_spec(
        modalities: Optional[Modalities] = None,
        img_size: Union[int, Tuple[int, int]] = 256,
        patch_size: int = 16,
) -> InputSpec:
    """Input spec of a FusionViT: one modality per configured name, policy ``subset``.

    Band names resolve through the sensor catalogue where they can (sensor and wavelengths then come from it);
    bare channel counts give placeholder names ``c0, c1, ...`` and sensor ``unknown`` (the modality key alone
    does not say which sensor: upstream's ``s1`` / ``s2`` are SAR / RGB of whatever mission). No normalisation
    step: no weights are published, so the statistics are whatever the user pretrains with.
    """
    chans, bands = _parse_modalities(modalities)
    img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    mods = []
    for m, c in chans.items():
        names, waves, sensor, notes = bands[m], None, 'unknown', []
        if names is None:
            names = tuple(f'c{i}' for i in range(c))
            notes.append('bands given as a channel count, not by name')
        else:
            try:
                resolved = resolve_bands(list(names))
            except UnknownBandError:
                notes.append('band names not in the sensor catalogue')
            else:
                sensors = {b.sensor for b in resolved}
                if len(sensors) == 1:
                    sensor = sensors.pop()
                    if get_sensor(sensor).kind in ('optical', 'sar', 'hyperspectral'):
                        waves = tuple(b.wavelength_um for b in resolved)
        notes.append('no published weights: normalise as you pretrain (e.g. dataset z-score)')
        mods.append(ModalitySpec(name=m, sensor=sensor, bands=tuple(names), wavelengths_um=waves,
                                 notes='; '.join(notes)))
    return InputSpec(tuple(mods), image_size=img, input_format='dict', size_multiple=patch_size,
                     missing_modality='subset')


# ---------------------------------------------------------------------- checkpoints
@dataclass
class ChenCheckpoint:
    """An upstream checkpoint split by destination (see :func:`convert_chen_state_dict`).

    Attributes:
        encoder: :class:`FusionViT` keys (``pyramid.*`` only for the ViTBaseline layout).
        objective: keys of the pretraining objective (``eobackbones.pretrain.FusionMAE``) beside its
            ``encoder.``: ``decoders.<m>.*`` and ``contrast_tokens.<m>``; empty for the ViTBaseline layout.
        layout: ``pretrain`` (MultiMAE, with or without decoders) or ``vitbaseline`` (downstream backbone).
        model_args: :class:`FusionViT` constructor arguments read from the shapes.
        objective_args: decoder arguments read from the shapes (empty without decoders).
        dropped: upstream keys dropped by name (zero LayerNorm ``beta`` buffers, the fixed sin-cos tables after
            checking them, the decoders' unused position tables and other modalities' task embeddings).
    """
    encoder: Dict[str, torch.Tensor]
    objective: Dict[str, torch.Tensor]
    layout: str
    model_args: Dict[str, Any]
    objective_args: Dict[str, Any] = field(default_factory=dict)
    dropped: List[str] = field(default_factory=list)

    @property
    def modalities(self) -> Dict[str, int]:
        return dict(self.model_args['modalities'])


_INNER_RENAME = {
    'norm1.gamma': 'norm1.weight', 'norm2.gamma': 'norm2.weight', 'attn.norm.gamma': 'attn.norm.weight',
    'attn.to_q.weight': 'attn.to_q.weight', 'attn.to_kv.weight': 'attn.to_kv.weight',
    'attn.to_out.weight': 'attn.to_out.weight',
    'mlp.0.gamma': 'mlp.norm.weight', 'mlp.1.weight': 'mlp.fc1.weight', 'mlp.3.weight': 'mlp.fc2.weight',
}
_TOP_RENAME = {
    'return_tokens': 'return_tokens', 'fusion_tokens': 'fusion_tokens', 'mask_embedding': 'mask_embedding',
    'norm.gamma': 'norm.weight', 'attn_pool.norm.gamma': 'attn_pool.norm.weight',
    'attn_pool.to_q.weight': 'attn_pool.to_q.weight', 'attn_pool.to_kv.weight': 'attn_pool.to_kv.weight',
    'attn_pool.to_out.weight': 'attn_pool.to_out.weight',
    'mlp.fc1.weight': 'pool_mlp.fc1.weight', 'mlp.fc1.bias': 'pool_mlp.fc1.bias',
    'mlp.fc2.weight': 'pool_mlp.fc2.weight', 'mlp.fc2.bias': 'pool_mlp.fc2.bias',
    'up1.0.weight': 'pyramid.up4.0.weight', 'up1.0.bias': 'pyramid.up4.0.bias',
    'up1.1.weight': 'pyramid.up4.1.weight', 'up1.1.bias': 'pyramid.up4.1.bias',
    'up1.3.weight': 'pyramid.up4.3.weight', 'up1.3.bias': 'pyramid.up4.3.bias',
    'up2.weight': 'pyramid.up2.weight', 'up2.bias': 'pyramid.up2.bias',
}
_DIM_HEAD = 64  # upstream default; the checkpoint holds only heads * dim_head


def _fmt(keys: Sequence[str], n: int = 6) -> str:
    keys = sorted(keys)
    return ', '.join(keys[:n]) + (f' (+{len(keys) - n} more)' if len(keys) > n else '')


def convert_chen_state_dict(
        state_dict: Mapping[str, torch.Tensor], what: str = 'checkpoint') -> ChenCheckpoint:
    """Upstream (Yusin2Chen/incomplete_multimodal_fusion) state dict -> our keys, strictly and by name.

    Both upstream layouts: the pretraining ``MultiMAE`` (with or without ``output_adapters.*`` decoders and the
    contrastive ``return_token_<m>``) and the downstream ``ViTBaseline`` (with the ``up1`` / ``up2`` pyramid).
    Modalities and channel counts come from ``input_adapters.<m>.proj.weight`` (in checkpoint order), the patch
    grid from the fusion tokens, depth and widths from the block keys. LayerNorm ``*.beta`` zero buffers are
    checked to be zero and dropped (our LayerNorms have no bias); the fixed sin-cos ``pos_emb`` tables are
    checked against ours and dropped.

    Raises:
        CheckpointFormatError: unknown keys, a non-zero ``beta``, a position table that is not the reference
            table, mixed layouts, or shapes that do not fit together.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(f'{what}: non-tensor entries {_fmt(bad)}')
    mods = [k.split('.')[1] for k in sd if k.startswith('input_adapters.') and k.endswith('.proj.weight')]
    if not mods or 'fusion_tokens' not in sd:
        raise CheckpointFormatError(f'{what}: not a fusion-token ViT checkpoint (no input_adapters.<m>.proj.weight '
                                    f'or fusion_tokens); first keys: {_fmt(list(sd)[:6])}')
    w0 = sd[f'input_adapters.{mods[0]}.proj.weight']
    dim, patch = w0.shape[0], w0.shape[-1]
    n = sd['fusion_tokens'].shape[1]
    side = math.isqrt(n)
    grid = (side, side)
    pe = sd.get(f'input_adapters.{mods[0]}.pos_emb')
    if pe is not None and pe.ndim == 4:
        grid = (pe.shape[2], pe.shape[3])
    if grid[0] * grid[1] != n:
        raise CheckpointFormatError(f'{what}: {n} fusion tokens do not fill a {grid[0]}x{grid[1]} patch grid')
    has_up = any(k.startswith(('up1.', 'up2.')) for k in sd)
    has_pre = any(k.startswith(('output_adapters.', 'return_token_')) for k in sd)
    if has_up and has_pre:
        raise CheckpointFormatError(f'{what}: holds both the ViTBaseline pyramid (up1/up2) and pretraining heads '
                                    f'(output_adapters / return_token_*): not an upstream layout')
    table = sincos_table(dim, grid).transpose(1, 2).reshape(1, dim, grid[0], grid[1])
    enc, obj, dropped, unknown = {}, {}, [], []
    for k, v in sd.items():
        parts = k.split('.')
        if k.endswith('.beta') and k[:-len('beta')] + 'gamma' in sd:
            if v.any():
                raise CheckpointFormatError(f'{what}: {k} is not zero (max |beta| {v.abs().max().item():.3g}); '
                                            f'upstream registers it as a zero buffer and our LayerNorm has no bias')
            dropped.append(k)
        elif k in _TOP_RENAME:
            enc[_TOP_RENAME[k]] = v
        elif parts[0] == 'input_adapters' and len(parts) == 3 and parts[2] == 'pos_emb':
            if tuple(v.shape) != tuple(table.shape) or not torch.allclose(v.float(), table, rtol=0, atol=1e-5):
                raise CheckpointFormatError(f'{what}: {k} {tuple(v.shape)} is not the fixed sin-cos table of a '
                                            f'{grid[0]}x{grid[1]} grid of width {dim}')
            dropped.append(k)
        elif parts[0] == 'input_adapters' and len(parts) == 4 and parts[2] == 'proj' and parts[1] != 'fusion':
            enc[f'patch_embed.{parts[1]}.proj.{parts[3]}'] = v
        elif parts[0] in ('fus_blocks', 'blocks') and len(parts) > 2 and parts[1].isdigit() \
                and '.'.join(parts[2:]) in _INNER_RENAME:
            sub = 'fuse' if parts[0] == 'fus_blocks' else 'block'
            enc[f'blocks.{parts[1]}.{sub}.{_INNER_RENAME[".".join(parts[2:])]}'] = v
        elif parts[0].startswith('return_token_') and len(parts) == 1 and parts[0][13:] in mods:
            obj[f'contrast_tokens.{parts[0][13:]}'] = v
        elif parts[0] == 'output_adapters' and len(parts) >= 3 and parts[1] in mods:
            m, rest = parts[1], parts[2:]
            if rest == ['pos_emb']:
                dropped.append(k)  # built but never used by the upstream decoder
            elif rest[0] == 'task_embeddings' and len(rest) == 2 and rest[1] in mods:
                if rest[1] == m:
                    obj[f'decoders.{m}.task_embedding'] = v
                else:
                    dropped.append(k)  # the decoder of m adds only its own task embedding
            elif rest[0] in ('proj_context', 'out_proj') and len(rest) == 2:
                obj[f'decoders.{m}.{rest[0]}.{rest[1]}'] = v
            elif rest[0] == 'decoder_transformer' and len(rest) >= 3 and rest[1].isdigit():
                obj[f'decoders.{m}.blocks.{".".join(rest[1:])}'] = v
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointFormatError(f'{what}: {len(unknown)} unknown keys: {_fmt(unknown)}')
    depth = 1 + max((int(k.split('.')[1]) for k in enc if k.startswith('blocks.')), default=-1)
    inner = enc['blocks.0.block.attn.to_q.weight'].shape[0] if depth else dim
    hidden = enc['blocks.0.block.mlp.fc2.weight'].shape[1] if depth else int(dim * 8 / 3)
    if inner % _DIM_HEAD:
        raise CheckpointFormatError(f'{what}: attention width {inner} is not a multiple of dim_head {_DIM_HEAD}')
    mlp_ratio = 4.0
    if hidden != int(dim * mlp_ratio * 2 / 3):
        raise CheckpointFormatError(f'{what}: GEGLU width {hidden} is not int({dim} * 4 * 2 / 3)')
    modalities = OrderedDict((m, int(sd[f'input_adapters.{m}.proj.weight'].shape[1])) for m in mods)
    model_args = dict(modalities=dict(modalities), img_size=[grid[0] * patch, grid[1] * patch], patch_size=patch,
                      embed_dim=dim, depth=depth, num_heads=inner // _DIM_HEAD, dim_head=_DIM_HEAD,
                      pyramid='learned' if has_up else 'interpolate')
    objective_args = {}
    dec = [m for m in mods if f'decoders.{m}.proj_context.weight' in obj]
    if dec:
        m = dec[0]
        ddim = obj[f'decoders.{m}.proj_context.weight'].shape[0]
        ddepth = 1 + max(int(k.split('.')[3]) for k in obj if k.startswith(f'decoders.{m}.blocks.'))
        objective_args = dict(decoder_dim=ddim, decoder_depth=ddepth, decoder_heads=8)
        for m in dec:
            out = obj[f'decoders.{m}.out_proj.weight'].shape[0]
            if out != modalities[m] * patch * patch:
                raise CheckpointFormatError(f'{what}: decoder {m} predicts {out} values per patch, expected '
                                            f'{modalities[m]} x {patch} x {patch}')
    return ChenCheckpoint(enc, obj, 'vitbaseline' if has_up else 'pretrain', model_args, objective_args, dropped)


def fusionvit_from_chen(checkpoint: Union[ChenCheckpoint, Mapping[str, torch.Tensor]]) -> FusionViT:
    """A :class:`FusionViT` holding an upstream checkpoint's encoder (built on ``meta``, loaded strictly).

    A ViTBaseline file brings its learned pyramid; a pretraining file has none, so the model gets the
    parameter-free pyramid instead of randomly initialised transposed convolutions. The registered path
    (``create_model(arch, checkpoint_path=FILE)``, ``eobackbones convert fusionvit``) does the same through the
    builder; this is the bare-model shortcut the pretraining objective uses.
    """
    ck = checkpoint if isinstance(checkpoint, ChenCheckpoint) else convert_chen_state_dict(checkpoint)
    args = dict(ck.model_args)
    with torch.device('meta'):
        model = FusionViT(**args)
    load_state_dict_strict(model, ck.encoder, source=f'upstream {ck.layout} checkpoint', assign=True)
    model.init_non_persistent_buffers()
    model.model_args = args
    return model


# the authors' training script pickles its argparse arguments next to the weights
_SAFE_GLOBALS = (argparse.Namespace,)


def _state_dict_of(raw: Any, what: str) -> Dict[str, torch.Tensor]:
    """The state dict of an upstream training checkpoint (``{"model": state_dict, "optimizer", "epoch",
    "scaler", "args"}``) or of a bare state dict."""
    if isinstance(raw, Mapping) and isinstance(raw.get('model'), Mapping):
        raw = raw['model']
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointFormatError(f'{what}: expected a state dict of tensors (optionally under "model"), '
                                    f'got {type(raw).__name__}')
    return dict(raw)


def _is_upstream(raw: Any) -> bool:
    sd = raw.get('model', raw) if isinstance(raw, Mapping) else None
    return isinstance(sd, Mapping) and any(
        isinstance(k, str) and k.startswith(('input_adapters.', 'module.input_adapters.')) for k in sd)


def read_chen_checkpoint(path: Union[str, Path], what: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The state dict of an upstream training checkpoint (or a bare state dict file).

    The authors' script saves ``{"model": state_dict, "optimizer", "epoch", "scaler", "args": Namespace}``.
    It is opened with ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allow-listed (the
    package's one checkpoint reader), and only ``model`` is kept. Any other pickled object is refused.

    Raises:
        CheckpointFormatError: unreadable file, a pickled object other than tensors, containers and the
            Namespace, or no state dict inside.
    """
    path = Path(path)
    what = what or path.name
    return _state_dict_of(read_torch_checkpoint(path, what, _SAFE_GLOBALS), what)


# (embed_dim, depth, num_heads) -> architecture, to recognise a checkpoint (tiny = the reference encoder)
_SHAPES = {(192, 12, 3): 'fusionvit_tiny', (384, 12, 6): 'fusionvit_small', (768, 12, 12): 'fusionvit_base'}
_SHAPE_ARGS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'dim_head')


def _describe(args: Mapping[str, Any]) -> str:
    return ', '.join(f'{k}={args[k]}' for k in _SHAPE_ARGS if k in args)


def _targets(raw: Any, options: Dict[str, Any]) -> List[ConvertTarget]:
    """The architecture an upstream checkpoint is (from its shapes, or ``arch=``) with the file's modalities,
    image size and pyramid (learned for a ViTBaseline file; parameter-free for a pretraining file, which has none)."""
    ck = convert_chen_state_dict(_state_dict_of(raw, 'checkpoint'))
    a = ck.model_args
    arch = options['arch'] or _SHAPES.get((a['embed_dim'], a['depth'], a['num_heads']))
    if arch is None:
        raise CheckpointFormatError(
            f'no fusionvit architecture has {_describe(a)} (known: '
            f'{"; ".join(f"{v} {k}" for k, v in _SHAPES.items())}); pass --option arch=NAME to build one with the '
            f'file\'s shape')
    return [ConvertTarget(arch, model_args=dict(a))]


@register_converter(
    'fusionvit', archs=tuple(_SHAPES.values()), targets=_targets, safe_globals=_SAFE_GLOBALS,
    options={'arch': ConverterOption(str, None, 'architecture (default: read from the checkpoint\'s shapes); the '
                                     'file\'s own depth and widths are kept', choices=tuple(_SHAPES.values()))},
    description='upstream Yusin2Chen/incomplete_multimodal_fusion encoder (pretraining MultiMAE or downstream '
                'ViTBaseline layout) renamed to ours; modalities and channel counts read from the patch embeddings; '
                'dropped by name: the zero LayerNorm `beta` buffers (checked to be zero), the fixed sin-cos `pos_emb` '
                'tables (checked against ours), the pretraining decoders `output_adapters.*` and contrastive tokens '
                '`return_token_<m>` (eobackbones.pretrain.FusionMAE.from_chen_checkpoint reads those); a pretraining '
                'file has no learned pyramid, so it is built with the parameter-free one (pyramid="interpolate")')
def _convert_fusionvit(raw: Any, cfg: Optional[PretrainedCfg]) -> Dict[str, torch.Tensor]:
    """Upstream checkpoint -> our encoder keys (strict: unknown keys fail; pretraining heads dropped by name)."""
    what = cfg.name if cfg is not None else 'fusion-token ViT checkpoint'
    ck = convert_chen_state_dict(_state_dict_of(raw, what), what)
    want = (cfg.model_args if cfg is not None else {}).get('pyramid', 'learned')
    if want != ck.model_args['pyramid']:
        raise CheckpointFormatError(_pyramid_message(what, ck.layout, ck.model_args['pyramid']))
    return ck.encoder


def _pyramid_message(what: str, layout: str, pyramid: str) -> str:
    if layout == 'pretrain':
        return (f'{what}: an upstream pretraining checkpoint has no learned pyramid weights (up1 / up2); build the '
                f'model with pyramid="interpolate" (the parameter-free pyramid), or leave pyramid= out')
    return (f'{what}: an upstream ViTBaseline checkpoint holds learned pyramid weights (up1 / up2); build the model '
            f'with pyramid="learned" (the default) so they load, or leave pyramid= out')


# ---------------------------------------------------------------------- create / entrypoints
def _file_cfg(variant: str, cfg: PretrainedCfg, default_args: Mapping[str, Any],
              user: Mapping[str, Any]) -> PretrainedCfg:
    """``checkpoint_path=`` an upstream file: its modalities, image size and pyramid become the weights'
    ``model_args`` (the user's arguments still override), and an encoder of another shape, or a pyramid the file
    cannot fill, is refused in one line before anything is built. Other files (our own keys) pass unchanged."""
    path = Path(os.path.expanduser(cfg.source.path))
    if not path.is_file():
        return cfg  # the loader names the missing file
    conv = get_converter('fusionvit')
    try:
        raw = conv.read(path, path.name)
    except CheckpointFormatError:
        return cfg  # the loader reads it as our own keys, or reports why it cannot
    if not _is_upstream(raw):
        return cfg
    ck = convert_chen_state_dict(_state_dict_of(raw, path.name), path.name)
    built = merge_model_args(FusionViT, merge_model_args(FusionViT, dict(_INIT_DEFAULTS), dict(default_args)),
                             dict(cfg.model_args))
    built = merge_model_args(FusionViT, built, dict(user))
    diff = [k for k in _SHAPE_ARGS if built.get(k) != ck.model_args[k]]
    if diff:
        arch = _SHAPES.get(tuple(ck.model_args[k] for k in ('embed_dim', 'depth', 'num_heads')))
        hint = f"create_model('{arch}', checkpoint_path=...)" if arch else \
            ', '.join(f'{k}={ck.model_args[k]}' for k in diff)
        raise CheckpointFormatError(f'{path.name} holds an encoder with {_describe(ck.model_args)}; {variant} is '
                                    f'built with {", ".join(f"{k}={built.get(k)}" for k in diff)}: use {hint}')
    if 'pyramid' in user and user['pyramid'] != ck.model_args['pyramid']:
        raise CheckpointFormatError(_pyramid_message(path.name, ck.layout, ck.model_args['pyramid']))
    file_args = {k: ck.model_args[k] for k in ('modalities', 'img_size', 'pyramid')}
    return dataclasses.replace(cfg, model_args=dict(cfg.model_args, **file_args))


_INIT_DEFAULTS = {k: p.default for k, p in inspect.signature(FusionViT.__init__).parameters.items()
                  if p.default is not inspect.Parameter.empty}


def _builder(spec: Optional[InputSpec]) -> Callable[..., FusionViT]:
    """FusionViT's constructor with the band-adaptation hooks for the modalities of ``spec`` (the weights'):
    each modality's patch embedding indexes its input bands (``create_model(..., bands={'s2': [...]})``)."""
    names = spec.modality_names if spec is not None else tuple(m for m, _ in DEFAULT_MODALITIES)

    def build(**kwargs: Any) -> FusionViT:
        return FusionViT(**kwargs)
    build.input_convs = {m: ((f'patch_embed.{m}.proj.weight', 1),) for m in names}
    build.args_for_channels = lambda counts, args: dict(modalities={m: int(counts[m]) for m in names if m in counts})
    return build


def _spec_fn(model: FusionViT, cfg: Optional[PretrainedCfg]) -> InputSpec:
    """The weights' (or architecture's) spec made true for this instance.

    A modality keeps the cfg's description (sensor, band names, statistics) when the instance takes the same bands:
    the same band names, or the same channel count where no names were given. Channel counts given explicitly
    (``modalities={'s1': 2}``, or an upstream checkpoint's) say nothing about which bands they are, so they never
    inherit the architecture's default binding: those modalities get placeholder names and sensor ``unknown``.
    """
    bound = model.bound_input_spec()
    spec = cfg.input_spec if cfg is not None else None
    if spec is None or spec.modality_names != bound.modality_names:
        return bound
    arch = get_arch_cfg(cfg.architecture)
    counts_only = 'modalities' in model.model_args and arch is not None and spec == arch.input_spec
    mods = []
    for m in spec.modalities:
        names = model.bands[m.name]
        keep = tuple(names) == tuple(m.bands) if names is not None else (
            not counts_only and m.in_chans == model.modalities[m.name])
        mods.append(dataclasses.replace(m, image_size=model.img_size) if keep else bound.modality(m.name))
    return dataclasses.replace(spec, modalities=tuple(mods), image_size=model.img_size, size_multiple=model.patch_size)


def _create_fusionvit(variant: str, pretrained: bool = False, default_args: Optional[Dict[str, Any]] = None,
                      **kwargs: Any) -> FusionViT:
    cfg = kwargs.pop('pretrained_cfg', None) or get_pretrained_cfg(variant)
    if pretrained and cfg is not None and isinstance(cfg.source, FileSource):
        cfg = _file_cfg(variant, cfg, default_args or {}, {k: v for k, v in kwargs.items() if v is not None})
    return build_model_with_cfg(_builder(cfg.input_spec if cfg is not None else None), variant, pretrained,
                                pretrained_cfg=cfg, spec_fn=_spec_fn, default_args=default_args, **kwargs)


@register_model
def fusionvit_tiny(pretrained: bool = False, **kwargs: Any) -> FusionViT:
    """Fusion-token ViT-Ti/16 (the reference encoder: width 192, 12 layers, 3 heads; no published weights)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, dim_head=64)
    return _create_fusionvit('fusionvit_tiny', pretrained, model_args, **kwargs)


@register_model
def fusionvit_small(pretrained: bool = False, **kwargs: Any) -> FusionViT:
    """Fusion-token ViT-S/16 (width 384, 12 layers, 6 heads; no published weights)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, dim_head=64)
    return _create_fusionvit('fusionvit_small', pretrained, model_args, **kwargs)


@register_model
def fusionvit_base(pretrained: bool = False, **kwargs: Any) -> FusionViT:
    """Fusion-token ViT-B/16 (width 768, 12 layers, 12 heads; no published weights)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, dim_head=64)
    return _create_fusionvit('fusionvit_base', pretrained, model_args, **kwargs)
