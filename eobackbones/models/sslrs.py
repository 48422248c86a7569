"""SSLTransformerRS: Dual-SimCLR ResNets and self-supervised Swin-T pairs for Sentinel-1 + Sentinel-2.

Papers:
    - Scheibenreif, Mommert, Borth, "Contrastive Self-Supervised Data Fusion for Satellite Imagery",
      ISPRS Annals 2022. Dual-SimCLR: one ResNet per modality with an MLP projection head, trained with a
      cross-modal InfoNCE loss on SEN12MS.
    - Scheibenreif, Hanna, Mommert, Borth, "Self-Supervised Vision Transformers for Land-cover Segmentation
      and Classification", CVPR EarthVision 2022. A pair of Swin-T backbones trained contrastively on SEN12MS.

Origin: https://github.com/HSG-AIML/SSLTransformerRS (code; the repository states no licence, so the weights
are listed as NOASSERTION). Weights are on Google Drive only: ``eobackbones convert sslrs --checkpoint FILE
--out DIR`` turns a released file into ``save_pretrained`` directories.

Models:
    - ``dualsimclr_resnet{50,18}_s{1,2}``, ``sslswin_tiny_s{1,2}``: one encoder (tensor input). The ResNets keep
      their contrastive projection head as ``proj`` (``forward_projection``), apart from the classifier ``fc``.
    - ``dualsimclr_resnet{50,18}``, ``sslswin_tiny``: the pair, input ``{'s1': (B, 2, H, W), 's2': (B, 13, H, W)}``.
      Features are the concatenation S1 then S2 (pooled width 4096 / 1024 / 1536; every ``feature_info`` level
      has the summed channels of both encoders). Missing modality: an error by default; with
      ``missing='zeros'`` the absent encoder is skipped and its features (every level, pooled) are zeros, so
      every width stays the same and heads trained on pairs still apply.

Reuses timm's ResNet (torchvision key names) and SwinTransformer (timm's Swin reproduces the original Microsoft
implementation; the converter maps the original key layout).
"""
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.swin_transformer import SwinTransformer

from ..errors import CheckpointFormatError, InvalidInputError, MissingModalityError
from ..spec import InputSpec, ModalitySpec
from ._base import EOModelMixin
from ._builder import build_model_with_cfg, get_converter, load_state_dict_strict, register_converter
from ._features import feature_take_indices
from ._pretrained import PretrainedCfg
from ._registry import get_pretrained_cfg, register_arch_cfg, register_model

__all__ = ['SimCLRResNet', 'SSLSwin', 'SSLRSPair', 'convert_checkpoint', 'detect_release']

_logger = logging.getLogger(__name__)

MODALITIES = ('s1', 's2')
S1_BANDS = ('VV', 'VH')
S2_BANDS = ('B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B09', 'B10', 'B11', 'B12')
IN_CHANS = {'s1': len(S1_BANDS), 's2': len(S2_BANDS)}
# upstream per-sample normalisation: clip (S1 shifted to be non-negative), then each channel / (its max + 1e-5)
S1_NORM = ({'op': 'clip', 'min': -25.0, 'max': 0.0}, {'op': 'add', 'value': 25.0}, {'op': 'per_sample_max', 'eps': 1e-5})
S2_NORM = ({'op': 'clip', 'min': 0.0, 'max': 10000.0}, {'op': 'per_sample_max', 'eps': 1e-5})


def _check_tensor(x: Any, in_chans: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidInputError(f'{what}: expected a (B, {in_chans}, H, W) tensor, got {shape}')
    if x.shape[1] != in_chans:
        raise InvalidInputError(f'{what}: expected {in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})')


class SimCLRResNet(EOModelMixin, ResNet):
    """torchvision-layout ResNet encoder of one modality, with the Dual-SimCLR projection head.

    ``forward_head(pre_logits=True)`` is the global-average-pooled feature (the upstream downstream feature);
    ``forward_projection`` is the contrastive embedding ``proj(pooled)``; ``fc`` is the (timm) classifier.
    The projection head is trainable while ``num_classes == 0`` and frozen once a classifier is attached.
    """
    classifier_prefix = 'fc'

    def __init__(
            self,
            block: str = 'bottleneck',
            layers: Sequence[int] = (3, 4, 6, 3),
            in_chans: int = 13,
            num_classes: int = 0,
            proj_dim: int = 128,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        """
        Args:
            block: ``bottleneck`` (ResNet-50) or ``basic`` (ResNet-18).
            layers: blocks per stage.
            in_chans: input channels (2 for S1 [VV, VH], 13 for S2).
            num_classes: classifier outputs (0: ``forward`` returns the pooled feature).
            proj_dim: output width of the projection head ``Linear(d, d) -> ReLU -> Linear(d, proj_dim)``;
                0 builds no projection head.
            global_pool: timm pooling type.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth.
        """
        blocks = {'bottleneck': Bottleneck, 'basic': BasicBlock}
        if block not in blocks:
            raise ValueError(f'block must be one of {list(blocks)}, got {block!r}')
        super().__init__(
            block=blocks[block], layers=tuple(layers), in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.in_chans = in_chans
        d = self.num_features
        self.proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim)) if proj_dim else None
        self._sync_proj_grad()
        chs = [info['num_chs'] for info in self.feature_info[1:]]
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f'layer{i + 1}') for i, c in enumerate(chs)]

    def _sync_proj_grad(self) -> None:
        # With a classifier, ``proj`` is off the forward path: frozen, so every trainable parameter gets a
        # gradient (DDP without find_unused_parameters). ``model.proj.requires_grad_(True)`` undoes it.
        if getattr(self, 'proj', None) is not None:
            self.proj.requires_grad_(self.num_classes == 0)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self._sync_proj_grad()

    def _check(self, x: torch.Tensor) -> None:
        _check_tensor(x, self.in_chans, type(self).__name__)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return super().forward_features(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of ``layer1..layer4`` (strides 4, 8, 16, 32) as NCHW; ``norm`` has no effect (no final norm).

        Returns:
            The list of intermediates, or ``(final NCHW features, intermediates)``.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt must be "NCHW", got {output_fmt!r}')
        self._check(x)
        take_indices, max_index = feature_take_indices(4, indices)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        names = ('layer1', 'layer2', 'layer3', 'layer4')
        if stop_early:
            names = names[:max_index + 1]
        intermediates = []
        for i, n in enumerate(names):
            x = getattr(self, n)(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(4, indices)
        for n in ('layer1', 'layer2', 'layer3', 'layer4')[max_index + 1:]:
            setattr(self, n, nn.Identity())
        if max_index < 3:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.proj = None  # sized for the final features
        if prune_head or max_index < 3:
            self.reset_classifier(0, '')
        return take_indices

    def forward_projection(self, x: torch.Tensor) -> torch.Tensor:
        """Contrastive embedding ``proj(pooled)`` of width ``proj_dim`` (the upstream ``DoubleResNetSimCLR`` output)."""
        if self.proj is None:
            raise RuntimeError('this encoder has no projection head (built with proj_dim=0 or pruned)')
        return self.proj(self.forward_head(self.forward_features(x), pre_logits=True))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    def init_non_persistent_buffers(self) -> None:
        pass  # none


class SSLSwin(EOModelMixin, SwinTransformer):
    """Swin-T encoder of one modality (timm's SwinTransformer; ``forward_features`` is NHWC, ``output_fmt``)."""
    classifier_prefix = 'head'

    def __init__(
            self,
            in_chans: int = 13,
            num_classes: int = 0,
            img_size: Union[int, Sequence[int]] = 224,
            patch_size: int = 4,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
    ):
        """
        Args:
            in_chans: input channels (2 for S1 [VV, VH], 13 for S2).
            num_classes: classifier outputs (0: ``forward`` returns the pooled 768-d feature).
            img_size: input size; the windows are built for it (upstream: 224 only).
            patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio: Swin hyper-parameters.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth (0.1 upstream; inactive in eval mode).
        """
        img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=True, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.in_chans = in_chans

    def _check(self, x: torch.Tensor) -> None:
        _check_tensor(x, self.in_chans, type(self).__name__)
        want = tuple(self.patch_embed.img_size)
        if tuple(x.shape[-2:]) != want:
            raise InvalidInputError(f'{type(self).__name__}: expected {want[0]}x{want[1]} inputs (windows are built '
                                    f'for this size), got {x.shape[-2]}x{x.shape[-1]}')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """Stage outputs (strides 4, 8, 16, 32) as NCHW; see timm's ``SwinTransformer.forward_intermediates``."""
        self._check(x)
        return super().forward_intermediates(x, *args, **kwargs)

    def init_non_persistent_buffers(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, 'init_non_persistent_buffers'):
                m.init_non_persistent_buffers()


_ENCODERS = {
    'resnet50': (SimCLRResNet, dict(block='bottleneck', layers=(3, 4, 6, 3))),
    'resnet18': (SimCLRResNet, dict(block='basic', layers=(2, 2, 2, 2))),
    'swin_tiny': (SSLSwin, dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)),
}


class SSLRSPair(EOModelMixin, nn.Module):
    """An S1 encoder and an S2 encoder; features are concatenated S1 then S2.

    Input: ``{'s1': (B, 2, H, W), 's2': (B, 13, H, W)}`` (same H, W). ``forward_features`` returns the
    channel concatenation of both unpooled maps (NCHW for ResNets, NHWC for Swin, ``output_fmt``);
    ``forward_head(pre_logits=True)`` the concatenated pooled features (``num_features`` = sum of both).

    Missing modality: ``missing='error'`` (default) raises :class:`MissingModalityError` naming it;
    ``missing='zeros'`` runs only the present encoder and fills the absent encoder's features with zeros
    (same widths at every level and after pooling).

    ``forward_pooled`` / ``forward_projection`` return per-modality dicts (the contrastive embeddings); the
    ResNet projection heads are frozen while a classifier is attached (``num_classes > 0``).
    """
    classifier_prefix = 'head'

    def __init__(
            self,
            encoder: str = 'resnet50',
            num_classes: int = 0,
            missing: str = 'error',
            drop_rate: float = 0.,
            encoder_args: Optional[Dict[str, Any]] = None,
    ):
        """
        Args:
            encoder: ``resnet50``, ``resnet18`` or ``swin_tiny``.
            num_classes: outputs of the linear classifier over the concatenated pooled features (0: none).
            missing: ``error`` or ``zeros`` (see the class docstring).
            drop_rate: dropout before the classifier.
            encoder_args: extra constructor arguments of both encoders (e.g. ``drop_path_rate``).
        """
        super().__init__()
        if encoder not in _ENCODERS:
            raise ValueError(f'encoder must be one of {list(_ENCODERS)}, got {encoder!r}')
        if missing not in ('error', 'zeros'):
            raise ValueError(f'missing must be "error" or "zeros", got {missing!r}')
        cls, args = _ENCODERS[encoder]
        args = dict(args, **(encoder_args or {}))
        self.encoder = encoder
        self.missing = missing
        self.s1 = cls(in_chans=IN_CHANS['s1'], num_classes=0, **args)
        self.s2 = cls(in_chans=IN_CHANS['s2'], num_classes=0, **args)
        self.output_fmt = getattr(self.s1, 'output_fmt', 'NCHW')
        self.num_features = self.head_hidden_size = self.s1.num_features + self.s2.num_features
        self.feature_info = [
            dict(num_chs=a['num_chs'] + b['num_chs'], reduction=a['reduction'], module=f's1.{a["module"]}+s2.{b["module"]}')
            for a, b in zip(self.s1.feature_info, self.s2.feature_info)]
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._sync_proj_grad()

    def _sync_proj_grad(self) -> None:
        # as SimCLRResNet: the projection heads are frozen while a classifier is attached
        for enc in (self.s1, self.s2):
            if getattr(enc, 'proj', None) is not None:
                enc.proj.requires_grad_(self.num_classes == 0)

    @property
    def encoders(self) -> Dict[str, nn.Module]:
        return {'s1': self.s1, 's2': self.s2}

    def _split(self, x: Any) -> Dict[str, torch.Tensor]:
        """Validate the dict input; returns the present modalities."""
        if not isinstance(x, Mapping):
            raise InvalidInputError(f'expected a dict keyed by {list(MODALITIES)}, got {type(x).__name__}')
        unknown = [k for k in x if k not in MODALITIES]
        if unknown:
            raise InvalidInputError(f'unknown modality keys {unknown}; expected {list(MODALITIES)}')
        present = {k: v for k, v in x.items() if v is not None}
        absent = [m for m in MODALITIES if m not in present]
        if absent and (self.missing == 'error' or not present):
            raise MissingModalityError(
                f'missing modality {", ".join(repr(m) for m in absent)}: expected {list(MODALITIES)}, got {list(present)}'
                f'{"" if present else " (at least one is needed)"}; build with missing="zeros" to zero-fill an absent encoder')
        for m, v in present.items():
            _check_tensor(v, IN_CHANS[m], f'modality {m!r}')
        if len(present) == 2 and present['s1'].shape[-2:] != present['s2'].shape[-2:]:
            raise InvalidInputError(f's1 and s2 must have the same size, got {tuple(present["s1"].shape[-2:])} '
                                    f'and {tuple(present["s2"].shape[-2:])}')
        return present

    def _cat(self, parts: Dict[str, Optional[torch.Tensor]], dim: int) -> torch.Tensor:
        """Concatenate S1, S2 along ``dim``, zero-filling an absent one (``missing='zeros'``)."""
        ref = next(t for t in parts.values() if t is not None)
        # both encoders are the same architecture: the absent one's map has the present one's shape
        return torch.cat([parts[m] if parts.get(m) is not None else torch.zeros_like(ref) for m in MODALITIES], dim=dim)

    def forward_features(self, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        present = self._split(x)
        feats = {m: self.encoders[m].forward_features(v) for m, v in present.items()}
        return self._cat(feats, dim=-1 if self.output_fmt == 'NHWC' else 1)

    def forward_pooled(self, x: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Pooled features of each present modality (Swin: the 768-d contrastive features)."""
        present = self._split(x)
        return {m: self.encoders[m].forward_head(self.encoders[m].forward_features(v), pre_logits=True)
                for m, v in present.items()}

    def forward_projection(self, x: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Projection-head embeddings of each present modality (Dual-SimCLR ResNets only)."""
        present = self._split(x)
        if not hasattr(self.s1, 'forward_projection'):
            raise RuntimeError(f'the {self.encoder} pair has no projection head; use forward_pooled')
        return {m: self.encoders[m].forward_projection(v) for m, v in present.items()}

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2) if self.output_fmt == 'NHWC' else (2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Dict[str, torch.Tensor],
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Per level, the NCHW maps of S1 and S2 concatenated along channels (``feature_info``)."""
        present = self._split(x)
        finals, inters = {}, {}
        for m, v in present.items():
            out = self.encoders[m].forward_intermediates(
                v, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt)
            finals[m], inters[m] = out
        n = len(next(iter(inters.values())))
        intermediates = [self._cat({m: inters[m][i] for m in inters}, dim=1) for i in range(n)]
        if intermediates_only:
            return intermediates
        return self._cat(finals, dim=-1 if self.output_fmt == 'NHWC' else 1), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take = self.s1.prune_intermediate_layers(indices, prune_norm, prune_head=True)
        self.s2.prune_intermediate_layers(indices, prune_norm, prune_head=True)
        self.num_features = self.head_hidden_size = self.s1.num_features + self.s2.num_features
        self.reset_classifier(0 if prune_head else self.num_classes)
        return take

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, 'avg'):
            raise ValueError(f'{type(self).__name__} pools by averaging only, got global_pool={global_pool!r}')
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._sync_proj_grad()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.s1.set_grad_checkpointing(enable)
        self.s2.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {f'{m}.{n}' for m, enc in self.encoders.items() for n in enc.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        if self.encoder == 'swin_tiny':
            return dict(stem=r'^s[12]\.patch_embed', blocks=r'^s[12]\.layers\.(\d+)' if coarse else [
                (r'^s[12]\.layers\.(\d+)\.downsample', (0,)),
                (r'^s[12]\.layers\.(\d+)\.\w+\.(\d+)', None),
                (r'^s[12]\.norm', (99999,))])
        return dict(stem=r'^s[12]\.(conv1|bn1)', blocks=r'^s[12]\.layer(\d+)' if coarse else r'^s[12]\.layer(\d+)\.(\d+)')

    def init_non_persistent_buffers(self) -> None:
        for enc in self.encoders.values():
            enc.init_non_persistent_buffers()


# ---------------------------------------------------------------- converter

_RELEASES = ('resnet50', 'resnet18', 'swin_tiny')
_PREFIX = {'backbone1.': 's1', 'backbone2.': 's2'}
# architecture -> (release, modality or None for the pair)
_ARCHS = {
    'dualsimclr_resnet50_s1': ('resnet50', 's1'), 'dualsimclr_resnet50_s2': ('resnet50', 's2'),
    'dualsimclr_resnet50': ('resnet50', None),
    'dualsimclr_resnet18_s1': ('resnet18', 's1'), 'dualsimclr_resnet18_s2': ('resnet18', 's2'),
    'dualsimclr_resnet18': ('resnet18', None),
    'sslswin_tiny_s1': ('swin_tiny', 's1'), 'sslswin_tiny_s2': ('swin_tiny', 's2'), 'sslswin_tiny': ('swin_tiny', None),
}
_DEFAULT_TAG = 'sen12ms'


def _upstream_state_dict(raw: Any, what: str) -> Mapping[str, Any]:
    sd = raw.get('state_dict', raw) if isinstance(raw, Mapping) else None
    if not isinstance(sd, Mapping) or not any(isinstance(k, str) and k.startswith(tuple(_PREFIX)) for k in sd):
        keys = list(raw)[:6] if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointFormatError(
            f'{what}: expected an SSLTransformerRS checkpoint ({{"state_dict": {{"backbone1.*", "backbone2.*"}}}}), got keys {keys}')
    return sd


def detect_release(raw: Any, what: str = 'checkpoint') -> str:
    """Which released model a checkpoint is (``resnet50``, ``resnet18``, ``swin_tiny``), from its keys.

    The ``arch`` field, when it names one of them, must agree.

    Raises:
        CheckpointFormatError: not an SSLTransformerRS checkpoint, or ``arch`` contradicts the keys.
    """
    sd = _upstream_state_dict(raw, what)
    if 'backbone1.patch_embed.proj.weight' in sd:
        release = 'swin_tiny'
    elif 'backbone1.layer4.0.conv3.weight' in sd:
        release = 'resnet50'
    elif 'backbone1.layer4.0.conv2.weight' in sd:
        release = 'resnet18'
    else:
        raise CheckpointFormatError(f'{what}: backbone keys match neither the ResNet-50, ResNet-18 nor Swin-T release')
    arch = raw.get('arch') if isinstance(raw, Mapping) else None
    if isinstance(arch, str):
        a = arch.lower().replace('-', '')
        named = 'resnet50' if 'resnet50' in a else 'resnet18' if 'resnet18' in a else 'swin_tiny' if 'swin' in a else None
        if named is not None and named != release:
            raise CheckpointFormatError(f'{what}: "arch" says {arch!r} but the weights are the {release} release')
    return release


def _rename(key: str, release: str) -> Optional[str]:
    """Upstream key of one backbone (prefix stripped) -> ours; None for what we drop by name."""
    if release == 'swin_tiny':
        if key.endswith(('.relative_position_index', '.attn_mask')):
            return None  # recomputed by timm (non-persistent buffers)
        if key in ('head.weight', 'head.bias'):
            return None  # unused 1000-class head of the original Swin
        # original Swin merges patches at the END of stage i, timm at the start of stage i + 1
        return re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', key)
    if key.startswith(('fc.0.', 'fc.2.')):
        return 'proj.' + key[3:]  # projection head Linear-ReLU-Linear
    return key


@register_converter('sslrs')
def _convert_sslrs(raw: Any, cfg: PretrainedCfg) -> Dict[str, torch.Tensor]:
    """SSLTransformerRS checkpoint -> one encoder (``*_s1`` / ``*_s2``) or the pair (``s1.*``, ``s2.*``).

    Drops the optimiser state and epoch (everything outside ``state_dict``), the other modality's encoder
    for single-modality models, Swin's unused 1000-class head and its ``relative_position_index`` /
    ``attn_mask`` buffers (recomputed). Keeps the ResNet projection heads (``fc.0/fc.2`` -> ``proj.0/proj.2``).
    Keys without a ``backbone1.`` / ``backbone2.`` prefix are left as they are, so the strict load fails on them.
    """
    if cfg.architecture not in _ARCHS:
        raise CheckpointFormatError(f'converter sslrs does not build {cfg.architecture}; it builds {list(_ARCHS)}')
    want, modality = _ARCHS[cfg.architecture]
    release = detect_release(raw, cfg.name)
    if release != want:
        raise CheckpointFormatError(f'{cfg.name}: the checkpoint is the {release} release, this model needs the {want} one')
    out = {}
    for k, v in _upstream_state_dict(raw, cfg.name).items():
        prefix = next((p for p in _PREFIX if k.startswith(p)), None)
        if prefix is None:
            out[k] = v
            continue
        m = _PREFIX[prefix]
        if modality is not None and m != modality:
            continue
        new = _rename(k[len(prefix):], release)
        if new is not None:
            out[new if modality else f'{m}.{new}'] = v
    return out


def _model_card(name: str, cfg: PretrainedCfg, model: nn.Module, source: Path, release: str, sha: str) -> str:
    spec = model.input_spec
    mods = '\n'.join(
        f'| {m.name} | {m.sensor} | {", ".join(m.bands)} | {m.unit} | '
        f'{"; ".join(json.dumps(s) for s in m.normalization)} |' for m in spec.modalities)
    dropped = ('optimizer state, epoch, the unused 1000-class `head`, `relative_position_index` / `attn_mask` '
               'buffers (recomputed)' if release == 'swin_tiny' else 'optimizer state, epoch')
    if _ARCHS[cfg.architecture][1] is not None:
        dropped += ', the other modality\'s encoder'
    return f"""---
license: other
library_name: eobackbones
tags: [earth-observation, sentinel-1, sentinel-2, self-supervised]
---
# {name}

{cfg.provenance}

- Paper: {cfg.paper}
- Code: https://github.com/HSG-AIML/SSLTransformerRS
- Licence: {cfg.license} (the upstream repository states no licence; check with the authors before redistribution)
- Source: {cfg.source.describe() if cfg.source else 'n/a'} (`{source.name}`, sha256 `{sha}`)
- Converted by `eobackbones convert sslrs`: kept every backbone weight{', and the projection head as `proj`' if release != 'swin_tiny' else ''};
  dropped {dropped}.

## Input

Image size {spec.image_size[0]}x{spec.image_size[1]}, input format `{spec.input_format}`, missing modality: `{spec.missing_modality}`.

| modality | sensor | bands | unit | normalisation (in order) |
|---|---|---|---|---|
{mods}

`eobackbones.transforms.for_model(model, source_bands=...)` applies it, selecting bands by name.

## Use

```python
import eobackbones
model = eobackbones.create_model('local-dir:<this directory>').eval()
```
"""


def convert_checkpoint(checkpoint: Path, out_dir: Path, **opts: Any) -> List[Path]:
    """Convert a released SSLTransformerRS file into ``save_pretrained`` directories.

    The release (ResNet-50 / ResNet-18 / Swin-T) is read from the file's keys (and its ``arch`` field). Writes
    ``out_dir/<arch>.<tag>/`` for the S1 encoder, the S2 encoder and the pair, each with ``config.json``,
    ``model.safetensors`` and a ``README.md`` model card.

    Args:
        checkpoint: the downloaded ``.pth`` file.
        out_dir: where the directories go.
        **opts: ``tag`` (default ``sen12ms``): manifest tag whose metadata (spec, licence, provenance) is used.

    Returns:
        The written directories (S1, S2, pair).

    Raises:
        CheckpointFormatError: not an SSLTransformerRS checkpoint, or keys that do not fit the model.
    """
    from ..hub.download import read_torch_checkpoint, sha256_file
    from ._factory import create_model
    tag = opts.pop('tag', _DEFAULT_TAG)
    if opts:
        raise TypeError(f'convert sslrs: unknown options {sorted(opts)}; known: tag')
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    raw = read_torch_checkpoint(checkpoint, str(checkpoint))
    release = detect_release(raw, checkpoint.name)
    sha = sha256_file(checkpoint)
    conv = get_converter('sslrs')
    written = []
    for arch, (rel, _) in _ARCHS.items():
        if rel != release:
            continue
        cfg = get_pretrained_cfg(f'{arch}.{tag}')
        model = create_model(cfg.name, pretrained=False)  # the tag's cfg: spec, licence, provenance
        load_state_dict_strict(model, conv.fn(raw, cfg), conv.allow_missing, source=f'{checkpoint.name} -> {arch}')
        model.eval()
        d = model.save_pretrained(out_dir / cfg.name)
        (d / 'README.md').write_text(_model_card(cfg.name, cfg, model, checkpoint, release, sha), encoding='utf-8')
        written.append(d)
        _logger.info('wrote %s', d)
    return written


# ---------------------------------------------------------------- cfgs

def _s1_spec() -> ModalitySpec:
    return ModalitySpec(
        name='s1', sensor='sentinel1', bands=S1_BANDS, unit='dB', normalization=S1_NORM, processing_level='GRD',
        gsd_m=10, notes='SEN12MS Sentinel-1 GRD backscatter in dB; per-sample max normalisation after clipping.')


def _s2_spec() -> ModalitySpec:
    return ModalitySpec(
        name='s2', sensor='sentinel2', bands=S2_BANDS, unit='reflectance_1e4', normalization=S2_NORM,
        processing_level='L1C', gsd_m=10, notes='SEN12MS Sentinel-2 L1C (all 13 bands); per-sample max normalisation.')


def _spec(modalities: Sequence[str], size: int) -> InputSpec:
    mk = {'s1': _s1_spec, 's2': _s2_spec}
    return InputSpec(
        modalities=tuple(mk[m]() for m in modalities), image_size=(size, size),
        input_format='tensor' if len(modalities) == 1 else 'dict', size_multiple=1 if size == 128 else 32,
        fixed_size=size == 224)


def _arch_spec(arch: str) -> InputSpec:
    release, modality = _ARCHS[arch]
    return _spec((modality,) if modality else MODALITIES, 224 if release == 'swin_tiny' else 128)


for _a in _ARCHS:
    register_arch_cfg(PretrainedCfg(
        _a, input_spec=_arch_spec(_a),
        notes='weights on Google Drive only: download, then `eobackbones convert sslrs --checkpoint FILE --out DIR`'))


def _spec_fn(model: nn.Module, cfg: Optional[PretrainedCfg]) -> Optional[InputSpec]:
    spec = cfg.input_spec if cfg is not None and cfg.input_spec is not None else None
    if spec is None:
        return None
    if getattr(model, 'missing', 'error') != 'error':
        spec = InputSpec.from_dict(dict(spec.to_dict(), missing_modality=model.missing))
    enc = getattr(model, 's1', model)
    if isinstance(enc, SSLSwin) and tuple(enc.patch_embed.img_size) != tuple(spec.image_size):
        spec = InputSpec.from_dict(dict(spec.to_dict(), image_size=list(enc.patch_embed.img_size)))
    return spec


def _create_sslrs(cls: type, variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return build_model_with_cfg(cls, variant, pretrained, spec_fn=_spec_fn, **kwargs)


def _single(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    release, modality = _ARCHS[variant]
    cls, args = _ENCODERS[release]
    args = dict(args, in_chans=IN_CHANS[modality])
    args.update(kwargs)
    return _create_sslrs(cls, variant, pretrained, **args)


# ---------------------------------------------------------------- entrypoints

@register_model
def dualsimclr_resnet50_s1(pretrained: bool = False, **kwargs: Any) -> SimCLRResNet:
    """Dual-SimCLR ResNet-50, Sentinel-1 encoder (VV, VH), SEN12MS."""
    return _single('dualsimclr_resnet50_s1', pretrained, kwargs)


@register_model
def dualsimclr_resnet50_s2(pretrained: bool = False, **kwargs: Any) -> SimCLRResNet:
    """Dual-SimCLR ResNet-50, Sentinel-2 encoder (13 bands), SEN12MS."""
    return _single('dualsimclr_resnet50_s2', pretrained, kwargs)


@register_model
def dualsimclr_resnet18_s1(pretrained: bool = False, **kwargs: Any) -> SimCLRResNet:
    """Dual-SimCLR ResNet-18, Sentinel-1 encoder (VV, VH), SEN12MS."""
    return _single('dualsimclr_resnet18_s1', pretrained, kwargs)


@register_model
def dualsimclr_resnet18_s2(pretrained: bool = False, **kwargs: Any) -> SimCLRResNet:
    """Dual-SimCLR ResNet-18, Sentinel-2 encoder (13 bands), SEN12MS."""
    return _single('dualsimclr_resnet18_s2', pretrained, kwargs)


@register_model
def sslswin_tiny_s1(pretrained: bool = False, **kwargs: Any) -> SSLSwin:
    """Self-supervised Swin-T, Sentinel-1 encoder (VV, VH), SEN12MS, 224 px."""
    return _single('sslswin_tiny_s1', pretrained, kwargs)


@register_model
def sslswin_tiny_s2(pretrained: bool = False, **kwargs: Any) -> SSLSwin:
    """Self-supervised Swin-T, Sentinel-2 encoder (13 bands), SEN12MS, 224 px."""
    return _single('sslswin_tiny_s2', pretrained, kwargs)


@register_model
def dualsimclr_resnet50(pretrained: bool = False, **kwargs: Any) -> SSLRSPair:
    """Dual-SimCLR ResNet-50 pair {'s1', 's2'}; pooled feature 4096 = concat(S1, S2)."""
    return _create_sslrs(SSLRSPair, 'dualsimclr_resnet50', pretrained, **dict(dict(encoder='resnet50'), **kwargs))


@register_model
def dualsimclr_resnet18(pretrained: bool = False, **kwargs: Any) -> SSLRSPair:
    """Dual-SimCLR ResNet-18 pair {'s1', 's2'}; pooled feature 1024 = concat(S1, S2)."""
    return _create_sslrs(SSLRSPair, 'dualsimclr_resnet18', pretrained, **dict(dict(encoder='resnet18'), **kwargs))


@register_model
def sslswin_tiny(pretrained: bool = False, **kwargs: Any) -> SSLRSPair:
    """Self-supervised Swin-T pair {'s1', 's2'}, 224 px; pooled feature 1536 = concat(S1, S2)."""
    return _create_sslrs(SSLRSPair, 'sslswin_tiny', pretrained, **dict(dict(encoder='swin_tiny'), **kwargs))
