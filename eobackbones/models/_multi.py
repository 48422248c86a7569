"""``MultiEncoder``: generic late fusion, one encoder per modality, features concatenated.

Used by the Dual-SimCLR and SSL-Swin pairs (state-dict keys ``<modality>.*`` and ``head.*``). Any encoders that keep
the model contract fit, as long as their unpooled features have the same spatial size (they are concatenated
along channels) and their pyramids share reductions (levels are matched by reduction).
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ..errors import InvalidInputError, MissingModalityError
from ..spec import check_image
from ._base import EOModelMixin
from ._features import feature_take_indices

__all__ = ['MultiEncoder']


def _prefix(pattern: str, name: str) -> str:
    """Anchor a timm group-matcher regex under ``<name>.`` (alternations kept inside a non-capturing group)."""
    body = re.sub(r'(^|(?<!\\)\|)\^', r'\1', pattern)  # every branch's own anchor: '^a|^b' -> 'a|b'
    return rf'^{re.escape(name)}\.(?:{body})'


class MultiEncoder(EOModelMixin, nn.Module):
    """One encoder per modality; features concatenated in modality order.

    Input: ``{modality: (B, C_m, H, W)}``. ``forward_features`` is the channel concatenation of the encoders'
    unpooled features (NCHW, or NHWC when the encoders say so in ``output_fmt``); ``forward_head(pre_logits=True)``
    is the concatenation of the encoders' own pooled vectors (``num_features`` = their sum); every
    ``feature_info`` level concatenates the encoders' maps of the same reduction.

    Missing modality policy (``missing``): ``error`` raises :class:`MissingModalityError` naming it; ``zeros``
    runs only the present encoders and fills the absent encoders' features with zeros (every level, before
    pooling), so every width stays the same and heads trained on all modalities still apply.

    Args:
        encoders: modality -> encoder (order = feature order).
        num_classes: outputs of the linear classifier over the concatenated pooled features (0: none).
        missing: ``error`` or ``zeros``.
        drop_rate: dropout before the classifier.
    """
    classifier_prefix = 'head'

    def __init__(self, encoders: Mapping[str, nn.Module], num_classes: int = 0, missing: str = 'error',
                 drop_rate: float = 0.):
        super().__init__()
        if missing not in ('error', 'zeros'):
            raise ValueError(f'missing must be "error" or "zeros", got {missing!r}')
        if not encoders:
            raise ValueError('MultiEncoder needs at least one encoder')
        self.modalities = tuple(encoders)
        for name, enc in encoders.items():
            self.add_module(name, enc)  # keys <modality>.*, as the upstream pair checkpoints
        fmts = {getattr(e, 'output_fmt', 'NCHW') for e in encoders.values()}
        if len(fmts) != 1:
            raise ValueError(f'encoders must share one output_fmt, got {fmts}')
        self.output_fmt = fmts.pop()
        self.missing = missing
        self.widths = [e.num_features for e in encoders.values()]
        self.num_features = self.head_hidden_size = sum(self.widths)
        # pyramid levels: the reductions every encoder has, matched by reduction
        per = [{fi['reduction']: i for i, fi in enumerate(e.feature_info)} for e in encoders.values()]
        common = [r for r in (fi['reduction'] for fi in next(iter(encoders.values())).feature_info)
                  if all(r in p for p in per)]
        self._level_index = [[p[r] for p in per] for r in common]
        encs = list(encoders.items())
        self.feature_info = [
            dict(num_chs=sum(e.feature_info[j]['num_chs'] for (_, e), j in zip(encs, idx)), reduction=r,
                 module='+'.join(f'{n}.{e.feature_info[j]["module"]}' for (n, e), j in zip(encs, idx)))
            for r, idx in zip(common, self._level_index)]
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._sync_aux()

    @property
    def encoders(self) -> Dict[str, nn.Module]:
        return {m: getattr(self, m) for m in self.modalities}

    def _sync_aux(self) -> None:
        # encoders with auxiliary heads (Dual-SimCLR projections) freeze them while a classifier is attached, so every
        # trainable parameter gets a gradient (DDP without find_unused_parameters)
        for enc in self.encoders.values():
            if hasattr(enc, 'set_aux_trainable'):
                enc.set_aux_trainable(self.num_classes == 0)

    # ------------------------------------------------------------------ inputs
    def _split(self, x: Any) -> Dict[str, torch.Tensor]:
        """Validate the dict input (the spec's checks, the missing policy); returns the present modalities."""
        if self.input_spec is not None:
            return self.input_spec.split(x, missing=self.missing, dtype=self._param_dtype())
        if not isinstance(x, Mapping):
            raise InvalidInputError(f'expected a dict keyed by {list(self.modalities)}, got {type(x).__name__}')
        unknown = [k for k in x if k not in self.modalities]
        if unknown:
            raise InvalidInputError(f'unknown modality keys {unknown}; expected {list(self.modalities)}')
        present = {m: x[m] for m in self.modalities if x.get(m) is not None}
        absent = [m for m in self.modalities if m not in present]
        if not present or (absent and self.missing == 'error'):
            raise MissingModalityError(
                f'missing modality {", ".join(repr(m) for m in absent)}: expected {list(self.modalities)}, got '
                f'{list(present)}')
        for m, v in present.items():
            check_image(v, f'modality {m!r}', in_chans=getattr(self.encoders[m], 'in_chans', None),
                        dtype=self._param_dtype())
        return present

    def _cat(self, parts: Dict[str, torch.Tensor], widths: Sequence[int], dim: int) -> torch.Tensor:
        """Concatenate in modality order along ``dim``; an absent modality (``missing='zeros'``) is zeros."""
        ref = next(iter(parts.values()))
        out = []
        for m, w in zip(self.modalities, widths):
            if m in parts:
                out.append(parts[m])
            else:
                shape = list(ref.shape)
                shape[dim] = w
                out.append(ref.new_zeros(shape))
        return torch.cat(out, dim=dim)

    @property
    def _cdim(self) -> int:
        return -1 if self.output_fmt == 'NHWC' else 1

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        present = self._split(x)
        feats = {m: self.encoders[m].forward_features(v) for m, v in present.items()}
        return self._cat(feats, self.widths, self._cdim)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        parts = torch.split(x, self.widths, dim=self._cdim)
        x = torch.cat([enc.forward_head(p, pre_logits=True) for enc, p in zip(self.encoders.values(), parts)], dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_pooled(self, x: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Pooled features of each present modality (e.g. the SSL-Swin contrastive features)."""
        present = self._split(x)
        return {m: self.encoders[m].forward_head(self.encoders[m].forward_features(v), pre_logits=True)
                for m, v in present.items()}

    def forward_projection(self, x: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Projection-head embeddings of each present modality (encoders with ``forward_projection``)."""
        present = self._split(x)
        if not all(hasattr(self.encoders[m], 'forward_projection') for m in present):
            raise RuntimeError('these encoders have no projection head; use forward_pooled')
        return {m: self.encoders[m].forward_projection(v) for m, v in present.items()}

    def forward_intermediates(
            self,
            x: Dict[str, torch.Tensor],
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Per level, the NCHW maps of every modality concatenated along channels (``feature_info``)."""
        present = self._split(x)
        take, _ = feature_take_indices(len(self.feature_info), indices)
        finals, inters = {}, {}
        for k, (m, enc) in enumerate(self.encoders.items()):
            if m not in present:
                continue
            own = [self._level_index[i][k] for i in take]
            out = enc.forward_intermediates(present[m], indices=own, norm=norm, stop_early=stop_early,
                                            output_fmt=output_fmt, intermediates_only=intermediates_only)
            if intermediates_only:
                inters[m] = out
            else:
                finals[m], inters[m] = out
        intermediates = []
        for n, i in enumerate(take):
            widths = [e.feature_info[self._level_index[i][k]]['num_chs'] for k, e in enumerate(self.encoders.values())]
            intermediates.append(self._cat({m: inters[m][n] for m in inters}, widths, 1))
        if intermediates_only:
            return intermediates
        return self._cat(finals, self.widths, self._cdim), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, _ = feature_take_indices(len(self.feature_info), indices)
        for k, enc in enumerate(self.encoders.values()):
            enc.prune_intermediate_layers([self._level_index[i][k] for i in take], prune_norm, prune_head=True)
        self.widths = [e.num_features for e in self.encoders.values()]
        self.num_features = self.head_hidden_size = sum(self.widths)
        self.reset_classifier(0 if prune_head else self.num_classes)
        return take

    # ------------------------------------------------------------------ timm helpers
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, 'avg'):
            raise ValueError(f'{type(self).__name__} pools as its encoders do, got global_pool={global_pool!r}')
        self.num_classes = num_classes
        dev = next(iter(self.parameters())).device
        self.head = nn.Linear(self.num_features, num_classes, device=dev) if num_classes > 0 else nn.Identity()
        self._sync_aux()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for enc in self.encoders.values():
            enc.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {f'{m}.{n}' for m, enc in self.encoders.items() for n in enc.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The encoders' matchers under their modality prefix: a block's depth is shared across modalities; the
        classifier, unmatched, is the head (timm's last group)."""
        stems, blocks = [], []
        for m, enc in self.encoders.items():
            gm = enc.group_matcher(coarse)
            stems.append(_prefix(gm['stem'], m))
            b = gm['blocks']
            for pattern, suffix in ([(b, None)] if isinstance(b, str) else b):
                blocks.append((_prefix(pattern, m), suffix))
        return dict(stem='|'.join(stems), blocks=blocks)
