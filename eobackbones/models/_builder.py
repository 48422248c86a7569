"""Build a model from its cfg: construct (on ``meta`` when weights follow), load strictly, wrap features."""
import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import CheckpointFormatError
from ._features import FeatureGetter
from ._pretrained import PretrainedCfg

__all__ = ['Converter', 'register_converter', 'get_converter', 'build_model_with_cfg', 'load_state_dict_strict']

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Converter:
    """Maps an upstream checkpoint to our keys.

    ``fn(state_dict, cfg) -> state_dict``. The function drops what it knows to be unused (optimiser
    state, MAE decoders) *by name*; anything else it does not know stays and fails the strict load.
    ``allow_missing`` lists fnmatch patterns of our keys the upstream file legitimately lacks.
    """
    name: str
    fn: Callable[[Dict[str, torch.Tensor], PretrainedCfg], Dict[str, torch.Tensor]]
    allow_missing: Tuple[str, ...] = ()


_converters: Dict[str, Converter] = {}


def register_converter(name: str, allow_missing: Sequence[str] = ()) -> Callable:
    def deco(fn):
        _converters[name] = Converter(name, fn, tuple(allow_missing))
        return fn
    return deco


def get_converter(name: str) -> Converter:
    if name not in _converters:
        raise CheckpointFormatError(f'unknown converter {name!r}; known: {", ".join(sorted(_converters)) or "none"}')
    return _converters[name]


def _fmt_keys(keys: Iterable[str], n: int = 6) -> str:
    keys = sorted(keys)
    more = f' (+{len(keys) - n} more)' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def load_state_dict_strict(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        allow_missing: Sequence[str] = (),
        source: str = 'checkpoint',
        assign: bool = False,
) -> Tuple[str, ...]:
    """Load with every key accounted for; returns the missing keys that were allowed.

    Raises:
        CheckpointFormatError: unexpected keys, missing keys outside ``allow_missing``, or shape mismatches.
    """
    own = model.state_dict()
    unexpected = set(state_dict) - set(own)
    missing = set(own) - set(state_dict)
    not_allowed = {k for k in missing if not any(fnmatch.fnmatch(k, p) for p in allow_missing)}
    if unexpected:
        raise CheckpointFormatError(f'{source}: {len(unexpected)} unexpected keys: {_fmt_keys(unexpected)}')
    if not_allowed:
        raise CheckpointFormatError(f'{source}: {len(not_allowed)} missing keys: {_fmt_keys(not_allowed)}')
    bad = [f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}' for k, v in state_dict.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointFormatError(f'{source}: {len(bad)} shape mismatches: {"; ".join(bad[:4])}')
    if assign:
        # safetensors hands out 32-byte aligned buffers, torch allocates 64-byte aligned ones, and AVX-512 kernels
        # round differently between the two: own aligned memory so loaded weights compute exactly like built ones
        state_dict = {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=assign)
    if missing:
        _logger.info('%s: initialised %d keys not in the weights: %s', source, len(missing), _fmt_keys(missing))
    return tuple(sorted(missing))


def _materialize(model: nn.Module) -> None:
    """After an ``assign`` load on meta: initialise what the weights did not provide, then check."""
    for mod in model.modules():
        own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        if any(t.is_meta for _, t in own):
            # to_empty / reset_parameters act on ALL of the module's own tensors: keep the loaded ones
            loaded = {n: t.detach() for n, t in own if not t.is_meta}
            mod.to_empty(device='cpu', recurse=False)
            if hasattr(mod, 'reset_parameters'):
                mod.reset_parameters()
            with torch.no_grad():
                for n, t in loaded.items():
                    getattr(mod, n).copy_(t)
    if hasattr(model, 'init_non_persistent_buffers'):
        model.init_non_persistent_buffers()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f'internal error: tensors left on the meta device after loading: {_fmt_keys(left)}')


def build_model_with_cfg(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        pretrained_cfg: Optional[PretrainedCfg] = None,
        feature_cfg: Optional[Dict[str, Any]] = None,
        spec_fn: Optional[Callable[[nn.Module, PretrainedCfg], Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """The one place families wire into: cfg -> constructor -> weights -> features wrapper.

    Args:
        model_cls: the family's model class (or a builder function).
        variant: the architecture name.
        pretrained: load the weights of ``pretrained_cfg``.
        pretrained_cfg: resolved by ``create_model``; the architecture's default when None.
        feature_cfg: unused keys reserved for families (e.g. default ``out_indices``).
        spec_fn: computes the model's input spec when it depends on kwargs (e.g. DOFA's bound bands);
            defaults to the cfg's spec.
        **kwargs: constructor arguments; ``features_only`` / ``out_indices`` select the features wrapper.
    """
    from ._registry import get_pretrained_cfg
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', None)
    user_args = {k: v for k, v in kwargs.items() if v is not None}
    cfg = pretrained_cfg or get_pretrained_cfg(variant)
    args = dict(cfg.model_args) if cfg is not None else {}
    args.update(user_args)

    if pretrained:
        from ..hub.download import load_pretrained_state_dict
        state_dict, allow_missing = load_pretrained_state_dict(cfg)
        with torch.device('meta'):
            model = model_cls(**args)
        allow = list(allow_missing)
        prefix = getattr(model, 'classifier_prefix', None)
        if prefix and getattr(model, 'num_classes', 0) != cfg.num_classes:
            # head of a different size: drop the weights' head (if any), initialise ours
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix + '.')}
            allow.append(prefix + '.*')
        load_state_dict_strict(model, state_dict, allow, source=cfg.name, assign=True)
        _materialize(model)
    else:
        model = model_cls(**args)

    model.pretrained_cfg = cfg
    model.model_args = args
    model.input_spec = spec_fn(model, cfg) if spec_fn else (cfg.input_spec if cfg else None)
    if features_only:
        model = FeatureGetter(model, out_indices)
    return model
