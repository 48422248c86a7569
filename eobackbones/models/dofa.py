"""DOFA: Dynamic One-For-All, a wavelength-conditioned ViT for any band set.

Paper: "Neural Plasticity-Inspired Multimodal Foundation Model for Earth Observation",
Xiong et al. 2024, https://arxiv.org/abs/2403.15356
Origin: https://github.com/zhu-xlab/DOFA (MIT); weights re-released by torchgeo (MIT,
https://huggingface.co/torchgeo/dofa). This is an independent implementation whose state-dict
keys match theirs.

One ViT; its patch embedding is generated per call by a hypernetwork from each input channel's
centre wavelength (``eobackbones.layers.DynamicPatchEmbed``). Wavelengths are bound at construction
(``wavelengths=`` in micrometres or ``bands=`` names from the sensor catalogue; default: the nine
Satlas Sentinel-2 bands B04, B03, B02, B05, B06, B07, B08, B11, B12) and can be overridden per call
with ``model(x, wavelengths=[...])``.

Weight history: DOFA weights released before Sept 2024 reshape the generated kernel with
``view(D, C, k, k)`` (``kernel_layout='legacy'``), later ones with ``view(C, k, k, D).permute(3, 0, 1, 2)``
(``'permute'``). Sentinel-1 bands were fed with a placeholder wavelength (3.75 for v1 / torchgeo
weights, 5.405 for DOFA v2): the manifest records it per weight as ``sar_wavelength_um``.
"""
import dataclasses
import logging
import math
from functools import partial
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from ..cfg import PretrainedCfg
from ..errors import CheckpointFormatError, InvalidInputError, UnknownBandError
from ..hub.weights import ConverterOption, ConvertTarget, register_converter
from ..layers import DynamicPatchEmbed, ViTPyramid, resample_abs_pos_embed, sincos_2d_pos_embed
from ..sensors import Band, get_sensor, resolve_bands
from ..spec import InputSpec, ModalitySpec, check_image
from ._base import EOModelMixin
from ._builder import build_model_with_cfg
from ._features import feature_take_indices
from ._registry import register_model

__all__ = ['DOFA', 'DEFAULT_BANDS']

_logger = logging.getLogger(__name__)

DEFAULT_BANDS = ('B04', 'B03', 'B02', 'B05', 'B06', 'B07', 'B08', 'B11', 'B12')

# blocks feeding the 4 pyramid levels (strides patch/4, patch/2, patch, 2 * patch)
_FEATURE_BLOCKS = {12: (3, 5, 7, 11), 24: (5, 11, 17, 23), 32: (7, 15, 23, 31)}


_MAX_WAVELENGTH_UM = 100.0


def _as_wavelengths(wavelengths: Any, what: str = 'wavelengths') -> Tuple[float, ...]:
    """Validate wavelengths (micrometres) -> tuple of floats. One-line errors."""
    if isinstance(wavelengths, torch.Tensor):
        if wavelengths.ndim != 1:
            raise InvalidInputError(f'{what} must be 1-D (one per channel), got shape {tuple(wavelengths.shape)}')
        vals = wavelengths.detach().float().cpu().tolist()
    elif isinstance(wavelengths, (str, bytes)) or not hasattr(wavelengths, '__len__'):
        raise InvalidInputError(f'{what} must be a sequence of floats in micrometres, got {type(wavelengths).__name__}')
    else:
        try:
            vals = [float(w) for w in wavelengths]
        except (TypeError, ValueError):
            raise InvalidInputError(f'{what} must be numbers in micrometres, got {list(wavelengths)!r}') from None
    if not vals:
        raise InvalidInputError(f'{what} must hold at least one wavelength')
    bad = [w for w in vals if not (math.isfinite(w) and w > 0)]
    if bad:
        raise InvalidInputError(f'{what} must be positive finite micrometres, got {bad[:4]} in {vals[:8]}')
    big = [w for w in vals if w > _MAX_WAVELENGTH_UM]
    if big:
        # the commonest unit mistake: nanometres (665) instead of micrometres (0.665)
        raise InvalidInputError(
            f'{what} must be in micrometres (DOFA was trained on 0.4-15 um and SAR placeholders < 10); got {big[:4]}: '
            f'if these are nanometres divide by 1000; for Sentinel-1 pass bands=["VV", "VH"]')
    return tuple(vals)


def _resolve_bands(bands: Sequence[str], sar_wavelength_um: float) -> Tuple[List[Band], Tuple[float, ...]]:
    """Band names -> catalogue bands and the wavelengths DOFA is fed (SAR: the weights' convention)."""
    if isinstance(bands, str):
        raise UnknownBandError(f'bands must be a sequence of band names, got the string {bands!r}')
    if not bands:
        raise UnknownBandError('bands must name at least one band')
    resolved = resolve_bands(list(bands))
    waves = tuple(float(sar_wavelength_um) if get_sensor(b.sensor).kind == 'sar' else b.wavelength_um
                  for b in resolved)
    return resolved, waves


def _bound_modality(base: Optional[ModalitySpec], bands: Optional[List[Band]], waves: Tuple[float, ...],
                    sar_wavelength_um: float) -> ModalitySpec:
    """The input modality of a DOFA instance bound to ``bands`` (or bare wavelengths).

    Normalisation follows the band names: the weights' statistics (``base``, from the manifest: its default bands
    and its ``band_stats`` table) give each bound band its value; a band without published statistics leaves the
    spec without normalisation, saying so (nothing invented).
    """
    if not bands:
        names = tuple(f'c{i}_{w:g}um' for i, w in enumerate(waves))
        return ModalitySpec(
            name='image', sensor='any', bands=names, wavelengths_um=waves, unit='unknown',
            notes='bound to bare wavelengths (no band names), so no published DOFA pretraining statistics apply; '
                  'normalise the data yourself (e.g. dataset z-score)')
    sensors = sorted({b.sensor for b in bands})
    one = len(sensors) == 1
    names = tuple(b.name if one else b.qualified_name for b in bands)
    quals = tuple(b.qualified_name for b in bands)
    base = base or ModalitySpec(name='image', sensor='any', bands=names)
    mod = base.with_bands(names, wavelengths_um=waves, qualified=quals)
    notes = ['any band set works through `wavelengths=` / `bands=`']
    if not mod.normalization:
        known = {base.qualified(b) for b in base.bands if base.normalization} | set(base.band_stats or {})
        lacking = [q for q in quals if q not in known]
        what = ', '.join(lacking) if known else 'any band (no published weights for this architecture)'
        notes.append(f'no published DOFA pretraining statistics for {what}, so no meanstd step; normalise the data '
                     f'yourself (e.g. dataset z-score)')
    elif 'satlas_8bit' in mod.unit:
        notes.append('values are the Satlas 8-bit product (0-255); no published mapping from reflectance or dB to '
                     'that scale is known, so other data needs its own normalisation')
    if any(get_sensor(b.sensor).kind == 'sar' for b in bands):
        notes.append(f'SAR bands are fed with wavelength {sar_wavelength_um:g} (the convention of these weights), '
                     f'not the physical C-band wavelength')
    return dataclasses.replace(
        mod, name='image', sensor=sensors[0] if one else 'any', notes='; '.join(notes),
        gsd_m=10.0 if one and sensors[0] in ('sentinel1', 'sentinel2') else None)


class DOFA(EOModelMixin, nn.Module):
    """Wavelength-conditioned Vision Transformer (DOFA).

    ``forward_features`` returns the un-normed tokens ``(B, 1 + N, D)`` (class token first);
    ``forward_head`` pools (mean of the patch tokens by default, as DOFA) and applies ``fc_norm``
    (not part of any published checkpoint: identity-affine LayerNorm at load), then the head.
    ``features_only`` / ``forward_intermediates`` give a 4-level pyramid (strides patch/4 .. 2*patch)
    built without parameters from 4 blocks, so dense heads work on pretrained weights.

    Token API (used by the MAE objective and anyone building on DOFA): :meth:`embed_tokens` (patch embedding +
    positions + class token) and :meth:`apply_block` (one block, gradient checkpointing aware).
    """
    # a user's bands= replaces saved / weight-required wavelengths= and vice versa (see merge_model_args)
    arg_groups = (('bands', 'wavelengths'),)

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            dynamic_embed_dim: int = 128,
            num_classes: int = 0,
            global_pool: Literal['avg', 'token', ''] = 'avg',
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            wavelengths: Optional[Sequence[float]] = None,
            bands: Optional[Sequence[str]] = None,
            kernel_layout: Literal['permute', 'legacy'] = 'permute',
            sar_wavelength_um: float = 3.75,
            feature_blocks: Optional[Sequence[int]] = None,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            img_size: native (square) input size; sizes that are multiples of ``patch_size`` work at run time.
            patch_size: patch size (16; 14 for huge).
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias: ViT shape.
            dynamic_embed_dim: width of the wavelength hypernetwork (128 in every DOFA checkpoint).
            num_classes: classifier outputs (0: no head).
            global_pool: ``avg`` (mean of patch tokens, DOFA), ``token`` (class token) or ``''``.
            drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: regularisation (0 in DOFA).
            wavelengths: centre wavelengths in micrometres of the input channels, bound as a buffer.
            bands: band names from the sensor catalogue (``B04``, ``VV``, ``enmap:B48``); SAR bands map to
                ``sar_wavelength_um``. Default (neither given): the 9 Satlas Sentinel-2 bands.
            kernel_layout: how the generated kernel is reshaped: ``permute`` or ``legacy`` (set by the weights).
            sar_wavelength_um: value fed for SAR bands (3.75: DOFA v1 / torchgeo weights).
            feature_blocks: the 4 blocks feeding the pyramid; default by depth (12: 3, 5, 7, 11;
                24: 5, 11, 17, 23; 32: 7, 15, 23, 31).

        Raises:
            InvalidInputError: bad wavelengths, or wavelengths that contradict the bands.
            UnknownBandError: a band name the catalogue does not know.
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if global_pool not in ('avg', 'token', ''):
            raise ValueError(f'global_pool must be "avg", "token" or "", got {global_pool!r}')
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = 1
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.sar_wavelength_um = float(sar_wavelength_um)
        self.grad_checkpointing = False
        self._spec_base: Optional[ModalitySpec] = None  # the weights' modality spec (statistics), set by the builder
        self._bind(wavelengths, bands)

        self.patch_embed = DynamicPatchEmbed(dynamic_embed_dim, patch_size, embed_dim, kernel_layout, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        # fixed (never trained) 2-D sin-cos table, stored in every DOFA checkpoint
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + 1, embed_dim, **dd),
                                      requires_grad=False)
        self.register_buffer('bound_wavelengths', torch.tensor(self._waves_key, dtype=torch.float32, device=device),
                             persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer, **dd)
            for i in range(depth)])
        self.fc_norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        # parameter-free (bilinear x4 / x2, identity, 2x2 max-pool), so it works on any pretrained weights
        self.pyramid = ViTPyramid(embed_dim, 'interpolate', **dd)

        if feature_blocks is None:
            feature_blocks = _FEATURE_BLOCKS.get(
                depth, tuple(max(0, round(depth * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)))
        if len(feature_blocks) != 4 or not all(0 <= b < depth for b in feature_blocks):
            raise ValueError(f'feature_blocks must be 4 block indices in [0, {depth}), got {feature_blocks}')
        self.feature_blocks = tuple(int(b) for b in feature_blocks)
        self.feature_info = self.pyramid.feature_info(patch_size, [f'blocks.{b}' for b in self.feature_blocks])
        self.init_weights()

    # ------------------------------------------------------------------ wavelengths
    def _bind(self, wavelengths: Optional[Sequence[float]], bands: Optional[Sequence[str]]) -> None:
        resolved = None
        if bands is not None:
            resolved, waves = _resolve_bands(bands, self.sar_wavelength_um)
            if wavelengths is not None:
                given = _as_wavelengths(wavelengths)
                if len(given) != len(resolved) or any(abs(a - b) > 1e-9 for a, b in zip(given, waves)):
                    raise InvalidInputError(
                        f'bands={list(bands)} mean wavelengths {list(waves)} um but wavelengths={list(given)} was also '
                        f'given; pass one of them')
        elif wavelengths is not None:
            waves = _as_wavelengths(wavelengths)
        else:
            resolved, waves = _resolve_bands(DEFAULT_BANDS, self.sar_wavelength_um)
        self._bands = resolved
        self._waves_key = waves

    def set_wavelengths(self, wavelengths: Optional[Sequence[float]] = None,
                        bands: Optional[Sequence[str]] = None) -> None:
        """Re-bind the default wavelengths (and the instance's ``input_spec``), as the constructor does."""
        self._bind(wavelengths, bands)
        self.init_non_persistent_buffers()
        self.input_spec = self.bound_input_spec()

    @property
    def wavelengths_um(self) -> Tuple[float, ...]:
        """The bound wavelengths (micrometres) fed to the hypernetwork when ``forward`` gets none."""
        return self._waves_key

    def bound_input_spec(self, base: Optional[ModalitySpec] = None) -> InputSpec:
        """The input spec of the bands / wavelengths bound now; ``base`` (the weights' modality spec from the
        manifest, remembered from the last call) supplies the normalisation statistics by band name."""
        if base is not None:
            self._spec_base = base
        mod = _bound_modality(self._spec_base, self._bands, self._waves_key, self.sar_wavelength_um)
        size = (self.img_size, self.img_size)
        mod = dataclasses.replace(mod, image_size=size, size_multiple=self.patch_size, fixed_size=False, any_bands=True)
        return InputSpec((mod,), image_size=size, any_bands=True, size_multiple=self.patch_size)

    def init_non_persistent_buffers(self) -> None:
        self.bound_wavelengths = torch.tensor(self._waves_key, dtype=torch.float32, device=self.pos_embed.device)

    # ------------------------------------------------------------------ init / timm helpers
    def init_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_pos_embed(self.embed_dim, self.grid_size, 1, device=self.pos_embed.device))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token', 'patch_embed.weight_generator.weight_tokens',
                'patch_embed.weight_generator.bias_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^cls_token|^pos_embed|^patch_embed',
                    blocks=[(r'^blocks\.(\d+)', None), (r'^fc_norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', 'token', ''):
                raise ValueError(f'global_pool must be "avg", "token" or "", got {global_pool!r}')
            self.global_pool = global_pool
        dev = self.cls_token.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=dev) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ forward
    def _check(self, x: torch.Tensor, wavelengths: Any) -> Tuple[torch.Tensor, Tuple[float, ...]]:
        check_image(x, 'DOFA input', dtype=self._param_dtype(), size_multiple=self.patch_size)
        if wavelengths is None:
            waves, key = self.bound_wavelengths, self._waves_key
        else:
            key = _as_wavelengths(wavelengths)
            waves = torch.tensor(key, dtype=torch.float32, device=x.device)
        if len(key) != x.shape[1]:
            raise InvalidInputError(
                f'{len(key)} wavelengths for an input with {x.shape[1]} channels; pass wavelengths= (micrometres) '
                f'or bands= with one entry per channel')
        return waves, key

    def _pos_embed(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if grid != self.grid_size:
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid_size), num_prefix_tokens=1)
        x = x + pos[:, 1:]
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def embed_tokens(self, x: torch.Tensor, wavelengths: Optional[Sequence[float]] = None,
                     ) -> Tuple[torch.Tensor, Tuple[int, int], torch.Tensor]:
        """(B, C, H, W) -> (tokens (B, 1 + N, D) with positions and the class token first, the (h, w) patch grid,
        the wavelengths used (C,)). Checks the input and the wavelengths."""
        waves, key = self._check(x, wavelengths)
        x = self.patch_embed(x, waves, key)  # (B, D, h, w)
        grid = (x.shape[-2], x.shape[-1])
        return self._pos_embed(x.flatten(2).transpose(1, 2), grid), grid, waves

    def apply_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One transformer block (checkpointed when gradient checkpointing is on)."""
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features(self, x: torch.Tensor, wavelengths: Optional[Sequence[float]] = None) -> torch.Tensor:
        """(B, C, H, W) -> un-normed tokens (B, 1 + N, D), class token first."""
        x, _, _ = self.embed_tokens(x, wavelengths)
        for blk in self.blocks:
            x = self.apply_block(blk, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, wavelengths: Optional[Sequence[float]] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, wavelengths))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            wavelengths: Optional[Sequence[float]] = None,
            pyramid: bool = True,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Intermediate feature maps.

        Args:
            x: (B, C, H, W) input.
            indices: with ``pyramid=True`` indices into ``feature_info`` (the 4 levels), else block indices;
                None: all, int: the last n.
            norm: apply ``fc_norm`` to the tokens before reshaping.
            stop_early: stop after the last block needed.
            output_fmt: ``NCHW`` or ``NLC`` (flattened maps).
            intermediates_only: return only the list.
            wavelengths: per-call override of the bound wavelengths.
            pyramid: True: maps resampled to strides (patch/4, patch/2, patch, 2*patch) by bilinear x4, x2,
                identity, 2x2 max-pool; False: every block at the patch stride (timm ViT semantics).

        Returns:
            List of maps, or (final tokens, list) when not ``intermediates_only``.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f'output_fmt must be "NCHW" or "NLC", got {output_fmt!r}')
        if pyramid:
            take, _ = feature_take_indices(len(self.feature_blocks), indices)
            want = {}
            for lvl in take:
                want.setdefault(self.feature_blocks[lvl], []).append(lvl)
        else:
            take, _ = feature_take_indices(len(self.blocks), indices)
            want = {b: [b] for b in take}
        last = max(want)
        x, (gh, gw), _ = self.embed_tokens(x, wavelengths)
        out: Dict[int, torch.Tensor] = {}
        blocks = self.blocks if not stop_early else self.blocks[:last + 1]
        for i, blk in enumerate(blocks):
            x = self.apply_block(blk, x)
            if i in want:
                t = self.fc_norm(x) if norm else x
                fmap = t[:, self.num_prefix_tokens:].reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
                for key in want[i]:
                    out[key] = self.pyramid.forward_level(fmap, key) if pyramid else fmap.contiguous()
        feats = [out[k] for k in take]
        if output_fmt == 'NLC':
            feats = [f.flatten(2).transpose(1, 2) for f in feats]
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last pyramid level in ``indices`` (and the head)."""
        take, _ = feature_take_indices(len(self.feature_blocks), indices)
        last = max(self.feature_blocks[i] for i in take)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.fc_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take


# ---------------------------------------------------------------------- checkpoints
# Keys of the author MAE files that are not part of the encoder (MAE mask token, the pretraining norm,
# the distillation projector, an MAE decoder): dropped by name; anything else unknown fails the load.
_DROP_KEYS = ('mask_token',)
_DROP_PREFIXES = ('norm.', 'projector.', 'decoder_')


def _unwrap(raw: Any, what: str) -> Dict[str, torch.Tensor]:
    if isinstance(raw, dict) and 'model' in raw and isinstance(raw['model'], dict):
        raw = raw['model']
    elif isinstance(raw, dict) and 'state_dict' in raw and isinstance(raw['state_dict'], dict):
        raw = raw['state_dict']
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f'{what}: expected a state dict (optionally under "model"), got {type(raw).__name__}')
    if raw and all(k.startswith('module.') for k in raw):
        raw = {k[len('module.'):]: v for k, v in raw.items()}
    return raw


# (embed_dim, depth, patch_size) -> architecture, to recognise a checkpoint
_SHAPES = {(384, 12, 16): 'dofa_small', (768, 12, 16): 'dofa_base', (1024, 24, 16): 'dofa_large',
           (1280, 32, 14): 'dofa_huge'}


def _targets(raw: Any, options: Dict[str, Any]) -> List[ConvertTarget]:
    """The architecture a checkpoint is (from its shapes, or ``arch=``) with the kernel layout and SAR convention."""
    sd = _unwrap(raw, 'DOFA checkpoint')
    arch = options['arch']
    if arch is None:
        try:
            dim = sd['cls_token'].shape[-1]
            depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
            patch = int(round((sd['patch_embed.weight_generator.fc_weight.weight'].shape[0] / dim) ** 0.5))
        except (KeyError, AttributeError, IndexError):
            raise CheckpointFormatError('not a DOFA checkpoint (no cls_token / blocks / patch_embed keys); '
                                        'pass --option arch=NAME to force an architecture') from None
        if (dim, depth, patch) not in _SHAPES:
            raise CheckpointFormatError(f'no DOFA architecture has width {dim}, depth {depth}, patch {patch}; known: '
                                        f'{", ".join(f"{v} {k}" for k, v in _SHAPES.items())}')
        arch = _SHAPES[(dim, depth, patch)]
    return [ConvertTarget(arch, model_args=dict(kernel_layout=options['layout'],
                                                sar_wavelength_um=options['sar_wavelength_um']))]


@register_converter(
    'dofa', allow_missing=('fc_norm.*',), archs=tuple(_SHAPES.values()), targets=_targets,
    options={'arch': ConverterOption(str, None, 'architecture (default: read from the checkpoint\'s shapes)'),
             'layout': ConverterOption(str, 'permute', 'kernel layout of the weights: permute (since Sept 2024) or '
                                       'legacy (view(D, C, k, k), before)', choices=('permute', 'legacy')),
             'sar_wavelength_um': ConverterOption(float, 3.75, 'wavelength the weights fed SAR bands (3.75: v1 / '
                                                  'torchgeo, 5.405: DOFA v2)')},
    description='keys kept as they are (torchgeo and zhu-xlab use the same names); dropped: the MAE `mask_token`, '
                'pretraining `norm`, distillation `projector` and `decoder_*` by name; `fc_norm` is not in the '
                'original weights (identity-affine LayerNorm); an all-zero `pos_embed` is replaced by the fixed '
                'sin-cos table DOFA was trained with')
def _convert_dofa(raw: Any, cfg: Optional[PretrainedCfg]) -> Dict[str, torch.Tensor]:
    """torchgeo / zhu-xlab DOFA checkpoint -> our keys (identical names; MAE extras dropped by name)."""
    what = cfg.name if cfg is not None else 'DOFA checkpoint'
    sd = _unwrap(raw, what)
    out = {k: v for k, v in sd.items() if k not in _DROP_KEYS and not k.startswith(_DROP_PREFIXES)}
    pos = out.get('pos_embed')
    if isinstance(pos, torch.Tensor) and pos.ndim == 3 and not pos.any():
        # DOFA's pos_embed is fixed, never trained: a zero table only comes from a model that was never
        # initialised (torchgeo builds zeros); the sin-cos table is exactly what pretraining used.
        grid = int(round((pos.shape[1] - 1) ** 0.5))
        _logger.warning('%s: pos_embed is all zeros; using the fixed 2-D sin-cos table DOFA was trained with', what)
        out['pos_embed'] = sincos_2d_pos_embed(pos.shape[-1], grid, 1, dtype=pos.dtype)
    return out


# ---------------------------------------------------------------------- create / entrypoints


def _spec_fn(model: DOFA, cfg: Optional[PretrainedCfg]) -> InputSpec:
    """The bound bands' spec; the weights' manifest spec supplies the statistics (looked up by band name)."""
    return model.bound_input_spec(cfg.input_spec.modality() if cfg is not None and cfg.input_spec else None)


def _create_dofa(variant: str, pretrained: bool = False, default_args: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> DOFA:
    # timm's channel count (torchgeo's ClassificationTask passes in_chans=) cannot say which bands: it is checked
    # against the bound bands, never used to choose them
    in_chans = kwargs.pop('in_chans', None)
    model = build_model_with_cfg(DOFA, variant, pretrained, spec_fn=_spec_fn, default_args=default_args, **kwargs)
    bound = model.input_spec.modality().bands if model.input_spec is not None else ()
    if in_chans is not None and int(in_chans) != len(bound):
        raise InvalidInputError(f'{variant}: in_chans={in_chans}, but DOFA is bound to {len(bound)} bands '
                                f'{list(bound)}; name the input channels with bands= (or wavelengths=)')
    return model


@register_model
def dofa_small(pretrained: bool = False, **kwargs: Any) -> DOFA:
    """DOFA ViT-S/16 (no published weights)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_dofa('dofa_small', pretrained, model_args, **kwargs)


@register_model
def dofa_base(pretrained: bool = False, **kwargs: Any) -> DOFA:
    """DOFA ViT-B/16."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_dofa('dofa_base', pretrained, model_args, **kwargs)


@register_model
def dofa_large(pretrained: bool = False, **kwargs: Any) -> DOFA:
    """DOFA ViT-L/16."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_dofa('dofa_large', pretrained, model_args, **kwargs)


@register_model
def dofa_huge(pretrained: bool = False, **kwargs: Any) -> DOFA:
    """DOFA ViT-H/14 (no published weights; pyramid reductions 3.5, 7, 14, 28)."""
    model_args = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
    return _create_dofa('dofa_huge', pretrained, model_args, **kwargs)
