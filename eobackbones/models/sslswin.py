"""Self-supervised Swin-T pairs for Sentinel-1 + Sentinel-2 (and their SwinUNet decoder, in ``heads``).

Paper: Scheibenreif, Hanna, Mommert, Borth, "Self-Supervised Vision Transformers for Land-cover Segmentation and
Classification", CVPR EarthVision 2022 (doi:10.1109/CVPRW56347.2022.00148). A pair of Swin-T backbones trained
contrastively on SEN12MS.

Origin: https://github.com/HSG-AIML/SSLTransformerRS (no licence stated; weights NOASSERTION, Google Drive only:
``eobackbones convert sslrs --checkpoint FILE``; the shared release converter is in ``_sen12ms.py``).

Models: ``sslswin_tiny_s1`` / ``sslswin_tiny_s2`` (one encoder, tensor input) and ``sslswin_tiny``, the pair
(:class:`~eobackbones.models.MultiEncoder`, ``{'s1': (B, 2, 224, 224), 's2': (B, 13, 224, 224)}``, pooled feature
1536 = concat(S1, S2)). timm's SwinTransformer reproduces the original Microsoft implementation; windows are built
for the image size, so inputs must have exactly that size (224 upstream; ``img_size=`` builds another).
"""
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn
from timm.models.swin_transformer import SwinTransformer

from ..cfg import PretrainedCfg
from ..spec import InputSpec, check_image
from . import _sen12ms  # noqa: F401  (registers the shared `sslrs` converter)
from ._base import EOModelMixin
from ._builder import adapt_spec, build_model_with_cfg
from ._multi import MultiEncoder
from ._registry import register_model

__all__ = ['SSLSwin']


class SSLSwin(EOModelMixin, SwinTransformer):
    """Swin-T encoder of one modality (timm's SwinTransformer; ``forward_features`` is NHWC, ``output_fmt``)."""
    classifier_prefix = 'head'
    # the patch-embedding conv indexes the input bands: bands=[...] maps them by name
    input_convs = {None: (('patch_embed.proj.weight', 1),)}

    @staticmethod
    def args_for_channels(counts: Dict[str, int], args: Dict[str, Any]) -> Dict[str, Any]:
        return dict(in_chans=next(iter(counts.values())))

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
        if self.input_spec is not None:
            self.input_spec.split(x, dtype=self._param_dtype())
        else:
            check_image(x, type(self).__name__, in_chans=self.in_chans, dtype=self._param_dtype(),
                        size=tuple(self.patch_embed.img_size))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """Stage outputs (strides 4, 8, 16, 32) as NCHW; see timm's ``SwinTransformer.forward_intermediates``."""
        self._check(x)
        return super().forward_intermediates(x, *args, **kwargs)


def _spec_fn(model: nn.Module, cfg: Optional[PretrainedCfg]) -> Optional[InputSpec]:
    """The weights' spec, made true for this instance (channels, the size the windows are built for, missing policy)."""
    spec = cfg.input_spec if cfg is not None else None
    encs = model.encoders if isinstance(model, MultiEncoder) else {spec.modality().name: model} if spec else {}
    return adapt_spec(spec, {m: e.in_chans for m, e in encs.items()},
                      {m: tuple(e.patch_embed.img_size) for m, e in encs.items()},
                      missing=getattr(model, 'missing', None))


def _create_encoder(variant: str, pretrained: bool = False, default_args: Optional[Dict[str, Any]] = None,
                    **kwargs: Any) -> SSLSwin:
    return build_model_with_cfg(SSLSwin, variant, pretrained, spec_fn=_spec_fn, default_args=default_args,
                                **kwargs)


# pair configs saved before the MultiEncoder refactor name their encoder by release
_RELEASE_ENCODERS = {'swin_tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)}


def _pair(encoder: Union[str, Dict[str, Any]], in_chans: Dict[str, int] = None, num_classes: int = 0, missing: str = 'error',
          drop_rate: float = 0., encoder_args: Optional[Dict[str, Any]] = None) -> MultiEncoder:
    """One SSLSwin per modality (S1 then S2) in a :class:`MultiEncoder`."""
    in_chans = in_chans or {'s1': 2, 's2': 13}
    encoder = _RELEASE_ENCODERS[encoder] if isinstance(encoder, str) else encoder
    encs = {m: SSLSwin(in_chans=c, num_classes=0, **dict(encoder, **(encoder_args or {}))) for m, c in in_chans.items()}
    return MultiEncoder(encs, num_classes=num_classes, missing=missing, drop_rate=drop_rate)


_pair.input_convs = {'s1': (('s1.patch_embed.proj.weight', 1),), 's2': (('s2.patch_embed.proj.weight', 1),)}
_pair.args_for_channels = lambda counts, args: dict(in_chans=dict(counts))


def _create_pair(variant: str, pretrained: bool = False, default_args: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> MultiEncoder:
    return build_model_with_cfg(_pair, variant, pretrained, spec_fn=_spec_fn, default_args=default_args,
                                **kwargs)


@register_model
def sslswin_tiny_s1(pretrained: bool = False, **kwargs: Any) -> SSLSwin:
    """Self-supervised Swin-T, Sentinel-1 encoder (VV, VH), SEN12MS, 224 px."""
    model_args = dict(in_chans=2, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
    return _create_encoder('sslswin_tiny_s1', pretrained, model_args, **kwargs)


@register_model
def sslswin_tiny_s2(pretrained: bool = False, **kwargs: Any) -> SSLSwin:
    """Self-supervised Swin-T, Sentinel-2 encoder (13 bands), SEN12MS, 224 px."""
    model_args = dict(in_chans=13, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
    return _create_encoder('sslswin_tiny_s2', pretrained, model_args, **kwargs)


@register_model
def sslswin_tiny(pretrained: bool = False, **kwargs: Any) -> MultiEncoder:
    """Self-supervised Swin-T pair {'s1', 's2'}, 224 px; pooled feature 1536 = concat(S1, S2)."""
    model_args = dict(encoder=dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7))
    return _create_pair('sslswin_tiny', pretrained, model_args, **kwargs)
