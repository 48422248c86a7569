"""Dual-SimCLR: ResNet-50 / ResNet-18 encoders for Sentinel-1 + Sentinel-2, trained with cross-modal InfoNCE.

Paper: Scheibenreif, Mommert, Borth, "Contrastive Self-Supervised Data Fusion for Satellite Imagery",
ISPRS Annals 2022 (doi:10.5194/isprs-annals-V-3-2022-705-2022). One ResNet per modality with an MLP projection
head, trained on SEN12MS.

Origin: https://github.com/HSG-AIML/SSLTransformerRS (code; the repository states no licence, so the weights are
listed as NOASSERTION). Weights are on Google Drive only: ``eobackbones convert sslrs --checkpoint FILE`` installs
them (the shared SEN12MS release converter is in ``_sen12ms.py``).

Models:
    - ``dualsimclr_resnet{50,18}_s{1,2}``: one encoder (tensor input). The contrastive projection head is kept as
      ``proj`` (``forward_projection``), apart from the classifier ``fc``.
    - ``dualsimclr_resnet{50,18}``: the pair (:class:`~eobackbones.models.MultiEncoder`), input
      ``{'s1': (B, 2, H, W), 's2': (B, 13, H, W)}``; features concatenated S1 then S2 (pooled width 4096 / 1024).
      Missing modality: an error by default; ``missing='zeros'`` zero-fills an absent encoder's features.

Reuses timm's ResNet (torchvision key names, v1.5: stride in the 3x3 conv).
"""
import logging
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..cfg import PretrainedCfg
from ..spec import InputSpec, check_image
from . import _sen12ms  # noqa: F401  (registers the shared `sslrs` converter)
from ._base import EOModelMixin
from ._builder import adapt_spec, build_model_with_cfg
from ._features import feature_take_indices
from ._multi import MultiEncoder
from ._registry import register_model

__all__ = ['SimCLRResNet']

_logger = logging.getLogger(__name__)


class SimCLRResNet(EOModelMixin, ResNet):
    """torchvision-layout ResNet encoder of one modality, with the Dual-SimCLR projection head.

    ``forward_head(pre_logits=True)`` is the global-average-pooled feature (the upstream downstream feature);
    ``forward_projection`` is the contrastive embedding ``proj(pooled)``; ``fc`` is the (timm) classifier.
    The projection head is trainable while no classifier is attached and frozen once one is.
    """
    classifier_prefix = 'fc'
    # the stem conv indexes the input bands: create_model(..., pretrained=True, bands=[...]) maps them by name
    input_convs = {None: (('conv1.weight', 1),)}

    @staticmethod
    def args_for_channels(counts: Dict[str, int], args: Dict[str, Any]) -> Dict[str, Any]:
        return dict(in_chans=next(iter(counts.values())))

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
        self.set_aux_trainable(num_classes == 0)
        chs = [info['num_chs'] for info in self.feature_info[1:]]
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f'layer{i + 1}') for i, c in enumerate(chs)]

    def set_aux_trainable(self, enable: bool) -> None:
        """Train the projection head or freeze it (it is off the classification path: frozen, every trainable
        parameter gets a gradient, so DDP needs no ``find_unused_parameters``). ``model.proj.requires_grad_(True)``
        undoes it."""
        if getattr(self, 'proj', None) is not None:
            self.proj.requires_grad_(enable)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.set_aux_trainable(num_classes == 0)

    def _check(self, x: torch.Tensor) -> None:
        if self.input_spec is not None:
            self.input_spec.split(x, dtype=self._param_dtype())
        else:
            check_image(x, type(self).__name__, in_chans=self.in_chans, dtype=self._param_dtype())

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
        """Drop the stages after the last one in ``indices``; with ``prune_head`` also the classifier and the
        projection head (neither is on the path of the intermediates)."""
        take_indices, max_index = feature_take_indices(4, indices)
        for n in ('layer1', 'layer2', 'layer3', 'layer4')[max_index + 1:]:
            setattr(self, n, nn.Identity())
        if max_index < 3:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < 3:
            self.proj = None  # sized for the final features, and off the intermediates' path
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

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # timm's ResNet stem regex is an unanchored alternation; keep it in one non-capturing group
        return dict(stem=r'^(?:conv1|bn1|maxpool)', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')


# ---------------------------------------------------------------- cfgs / create

def _spec_fn(model: nn.Module, cfg: Optional[PretrainedCfg]) -> Optional[InputSpec]:
    """The weights' spec, made true for this instance (channel counts, missing-modality policy)."""
    spec = cfg.input_spec if cfg is not None else None
    if isinstance(model, MultiEncoder):
        return adapt_spec(spec, {m: e.in_chans for m, e in model.encoders.items()}, missing=model.missing)
    return adapt_spec(spec, {spec.modality().name: model.in_chans} if spec is not None else None)


def _create_encoder(variant: str, pretrained: bool = False, default_args: Optional[Dict[str, Any]] = None,
                    **kwargs: Any) -> SimCLRResNet:
    return build_model_with_cfg(SimCLRResNet, variant, pretrained, spec_fn=_spec_fn, default_args=default_args,
                                **kwargs)


# pair configs saved before the MultiEncoder refactor name their encoder by release
_RELEASE_ENCODERS = {'resnet50': dict(block='bottleneck', layers=(3, 4, 6, 3)), 'resnet18': dict(block='basic', layers=(2, 2, 2, 2))}


def _pair(encoder: Union[str, Dict[str, Any]], in_chans: Dict[str, int] = None, num_classes: int = 0, missing: str = 'error',
          drop_rate: float = 0., encoder_args: Optional[Dict[str, Any]] = None) -> MultiEncoder:
    """One SimCLRResNet per modality (S1 then S2) in a :class:`MultiEncoder`."""
    in_chans = in_chans or {'s1': 2, 's2': 13}
    encoder = _RELEASE_ENCODERS[encoder] if isinstance(encoder, str) else encoder
    encs = {m: SimCLRResNet(in_chans=c, num_classes=0, **dict(encoder, **(encoder_args or {})))
            for m, c in in_chans.items()}
    return MultiEncoder(encs, num_classes=num_classes, missing=missing, drop_rate=drop_rate)


_pair.input_convs = {'s1': (('s1.conv1.weight', 1),), 's2': (('s2.conv1.weight', 1),)}
_pair.args_for_channels = lambda counts, args: dict(in_chans=dict(counts))


def _create_pair(variant: str, pretrained: bool = False, default_args: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> MultiEncoder:
    return build_model_with_cfg(_pair, variant, pretrained, spec_fn=_spec_fn, default_args=default_args,
                                **kwargs)


# ---------------------------------------------------------------- entrypoints

@register_model
def dualsimclr_resnet50_s1(pretrained: bool = False, **kwargs: Any) -> SimCLRResNet:
    """Dual-SimCLR ResNet-50, Sentinel-1 encoder (VV, VH), SEN12MS."""
    model_args = dict(block='bottleneck', layers=(3, 4, 6, 3), in_chans=2)
    return _create_encoder('dualsimclr_resnet50_s1', pretrained, model_args, **kwargs)


@register_model
def dualsimclr_resnet50_s2(pretrained: bool = False, **kwargs: Any) -> SimCLRResNet:
    """Dual-SimCLR ResNet-50, Sentinel-2 encoder (13 bands), SEN12MS."""
    model_args = dict(block='bottleneck', layers=(3, 4, 6, 3), in_chans=13)
    return _create_encoder('dualsimclr_resnet50_s2', pretrained, model_args, **kwargs)


@register_model
def dualsimclr_resnet18_s1(pretrained: bool = False, **kwargs: Any) -> SimCLRResNet:
    """Dual-SimCLR ResNet-18, Sentinel-1 encoder (VV, VH), SEN12MS."""
    model_args = dict(block='basic', layers=(2, 2, 2, 2), in_chans=2)
    return _create_encoder('dualsimclr_resnet18_s1', pretrained, model_args, **kwargs)


@register_model
def dualsimclr_resnet18_s2(pretrained: bool = False, **kwargs: Any) -> SimCLRResNet:
    """Dual-SimCLR ResNet-18, Sentinel-2 encoder (13 bands), SEN12MS."""
    model_args = dict(block='basic', layers=(2, 2, 2, 2), in_chans=13)
    return _create_encoder('dualsimclr_resnet18_s2', pretrained, model_args, **kwargs)


@register_model
def dualsimclr_resnet50(pretrained: bool = False, **kwargs: Any) -> MultiEncoder:
    """Dual-SimCLR ResNet-50 pair {'s1', 's2'}; pooled feature 4096 = concat(S1, S2)."""
    model_args = dict(encoder=dict(block='bottleneck', layers=(3, 4, 6, 3)))
    return _create_pair('dualsimclr_resnet50', pretrained, model_args, **kwargs)


@register_model
def dualsimclr_resnet18(pretrained: bool = False, **kwargs: Any) -> MultiEncoder:
    """Dual-SimCLR ResNet-18 pair {'s1', 's2'}; pooled feature 1024 = concat(S1, S2)."""
    model_args = dict(encoder=dict(block='basic', layers=(2, 2, 2, 2)))
    return _create_pair('dualsimclr_resnet18', pretrained, model_args, **kwargs)
