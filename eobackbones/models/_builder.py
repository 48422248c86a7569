"""Build a model from its cfg: the one loading path for every weights source.

``build_model_with_cfg`` constructs the model (on ``meta`` when weights follow), loads them strictly (published
weights, installed manual weights and ``save_pretrained`` directories alike), applies the one head rule
(``num_classes`` differs from the weights' -> a fresh head), materialises what the weights did not provide,
records the input spec and the provenance, and wraps ``features_only`` models (pruning what they do not use).
"""
import dataclasses
import fnmatch
import logging
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..cfg import DirSource, PretrainedCfg, Provenance
from ..errors import CheckpointFormatError
from ..hub.weights import load_weights
from ..spec import InputSpec
from ._adapt import adapt_state_dict_by_count, adapt_state_dict_by_name, band_plan, normalise_bands
from ._features import FeatureGetter
from ._registry import get_pretrained_cfg

__all__ = ['build_model_with_cfg', 'load_state_dict_strict', 'merge_model_args', 'adapt_spec']

_logger = logging.getLogger(__name__)


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
    for mod in model.modules():
        # families (and the timm modules inside them, e.g. Swin's attention) recompute non-persistent buffers here
        if hasattr(mod, 'init_non_persistent_buffers'):
            mod.init_non_persistent_buffers()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f'internal error: tensors left on the meta device after loading: {_fmt_keys(left)}')


def merge_model_args(model_cls: Any, base: Dict[str, Any], user: Dict[str, Any]) -> Dict[str, Any]:
    """The weights' (or saved) constructor arguments, overridden by the user's.

    A model class may declare ``arg_groups``: alternative ways to state one thing (e.g. DOFA's ``bands`` /
    ``wavelengths``); a user argument of a group replaces the whole group of ``base``, so a saved ``bands=`` never
    contradicts a requested ``wavelengths=``.
    """
    args = dict(base)
    for group in getattr(model_cls, 'arg_groups', ()):
        if any(k in user for k in group):
            for k in group:
                args.pop(k, None)
    args.update(user)
    return args


def build_model_with_cfg(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        pretrained_cfg: Optional[PretrainedCfg] = None,
        spec_fn: Optional[Callable[[nn.Module, Optional[PretrainedCfg]], Any]] = None,
        default_args: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """The one place families wire into: cfg -> constructor -> weights -> spec, provenance -> features wrapper.

    Args:
        model_cls: the family's model class (or a builder function).
        variant: the architecture name.
        pretrained: load the weights of ``pretrained_cfg`` (a manifest tag, installed manual weights or a directory).
        pretrained_cfg: resolved by ``create_model``; the architecture's default when None.
        spec_fn: computes the instance's input spec when it depends on constructor arguments (bands, channels,
            image size); defaults to the cfg's spec.
        default_args: the architecture's constructor arguments (the entrypoint's); the weights' ``model_args``
            (a manifest tag's, or everything a saved directory recorded) override them, the user's kwargs override both.
        **kwargs: constructor arguments (None values dropped); ``features_only`` / ``out_indices`` select the
            features wrapper.
    """
    user_args = {k: v for k, v in kwargs.items() if v is not None}
    cfg = pretrained_cfg or get_pretrained_cfg(variant)
    input_convs = getattr(model_cls, 'input_convs', None)
    base = merge_model_args(model_cls, dict(default_args or {}), dict(cfg.model_args) if cfg is not None else {})
    plan = None
    if input_convs is not None and 'bands' in user_args:
        # a fixed-band model on other bands: filters selected / reordered / stood in for by band name
        plan = band_plan(cfg.input_spec, normalise_bands(cfg.input_spec, user_args.pop('bands')))
        user_args.update(model_cls.args_for_channels({m: len(rows) for m, rows in plan.items()},
                                                     merge_model_args(model_cls, base, user_args)))
        weights_spec = cfg.input_spec
        cfg = dataclasses.replace(cfg, input_spec=dataclasses.replace(weights_spec, modalities=tuple(
            m.with_bands([r['band'] for r in plan[m.name]], qualified=[r['qualified'] for r in plan[m.name]])
            for m in weights_spec.modalities)))
    args = merge_model_args(model_cls, base, user_args)
    # a saved features_only model records these in its model_args: it is rebuilt (and pruned) the same way
    features_only = args.pop('features_only', False)
    out_indices = args.pop('out_indices', None)

    adapted = None
    if pretrained:
        state_dict, allow_missing, provenance = load_weights(cfg)
        with torch.device('meta'):
            model = model_cls(**args)
        if plan is not None:
            state_dict = adapt_state_dict_by_name(state_dict, weights_spec, input_convs, plan)
        elif input_convs is not None:
            own = model.state_dict()
            counts = {m: own[c[0]].shape[c[1]] for m, convs in input_convs.items() for c in convs
                      if c[0] in own and c[0] in state_dict and own[c[0]].shape[c[1]] != state_dict[c[0]].shape[c[1]]}
            if counts:
                counts = {(m if m is not None else cfg.input_spec.modalities[0].name): n for m, n in counts.items()}
                state_dict = adapt_state_dict_by_count(state_dict, cfg.input_spec, input_convs, counts)
                adapted = {m: dict(by='count', pretrained_channels=cfg.input_spec.modality(m).in_chans, channels=n)
                           for m, n in counts.items()}
                provenance = dataclasses.replace(provenance, note=(provenance.note + '; ' if provenance.note else '')
                                                 + 'input filters adapted by channel count (see band_adaptation)')
        allow = list(allow_missing)
        prefix = getattr(model, 'classifier_prefix', None)
        if prefix and getattr(model, 'num_classes', 0) != cfg.num_classes:
            # the one head rule: a head of another size (or none) -> drop the weights' head, initialise ours
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix + '.')}
            allow.append(prefix + '.*')
            if getattr(model, 'num_classes', 0):
                provenance = dataclasses.replace(provenance, note=(provenance.note + '; ' if provenance.note else '')
                                                 + f'new {model.num_classes}-class head (random init)')
        wrapper = None
        if features_only:
            # prune on meta, before loading: the pruned parts are never materialised; their weights are dropped
            full = set(model.state_dict())
            wrapper = FeatureGetter(model, out_indices)
            pruned = full - set(model.state_dict())
            state_dict = {k: v for k, v in state_dict.items() if k not in pruned}
        where = cfg.source.uri if isinstance(cfg.source, DirSource) else cfg.name
        load_state_dict_strict(model, state_dict, allow, source=where, assign=True)
        _materialize(model)
    else:
        model = model_cls(**args)
        provenance = Provenance('none')
        wrapper = FeatureGetter(model, out_indices) if features_only else None

    if adapted is not None:
        model.band_adaptation = adapted
    if plan is not None:
        # every modality whose bands differ from the weights' (a subset, an order, stand-ins) is reported
        changed = {m: rows for m, rows in plan.items()
                   if [r['qualified'] for r in rows] != [weights_spec.modality(m).qualified(b)
                                                        for b in weights_spec.modality(m).bands]}
        model.band_adaptation = changed
        if changed:
            _logger.info('%s: input bands mapped by name: %s', variant, changed)
            if pretrained:
                provenance = dataclasses.replace(provenance, note=(provenance.note + '; ' if provenance.note else '')
                                                 + 'input filters adapted by band name (see band_adaptation)')
    model.model_args = args
    model.input_spec = spec_fn(model, cfg) if spec_fn else (cfg.input_spec if cfg else None)
    # the cfg describes this instance (timm's data config reads input_size / mean / std from it)
    model.pretrained_cfg = dataclasses.replace(cfg, input_spec=model.input_spec) if cfg is not None and model.input_spec else cfg
    model._builder = (model_cls, args)
    if hasattr(model, 'mark_weights'):
        model.mark_weights(provenance)
    return wrapper if wrapper is not None else model


def adapt_spec(
        spec: Optional[InputSpec],
        in_chans: Optional[Dict[str, int]] = None,
        image_size: Optional[Dict[str, Tuple[int, int]]] = None,
        missing: Optional[str] = None,
) -> Optional[InputSpec]:
    """The weights' spec made true for an instance built with other channel counts, sizes or missing policy.

    A modality whose channel count differs from the spec's bands gets placeholder band names ``c0 .. c{n-1}`` and no
    normalisation (nothing is known about those channels; the spec says so); a new fixed size replaces the native
    size; ``missing`` sets the missing-modality policy.
    """
    if spec is None:
        return None
    mods = []
    for m in spec.modalities:
        n = (in_chans or {}).get(m.name)
        if n is not None and n != m.in_chans:
            m = dataclasses.replace(
                m.with_bands(tuple(f'c{i}' for i in range(n))), sensor='unknown', normalization=(), unit='unknown',
                notes=f'built with {n} input channels instead of the weights\' {m.in_chans} bands {list(m.bands)}: band '
                      f'names and normalisation unknown; normalise the data yourself')
        size = (image_size or {}).get(m.name)
        if size is not None and tuple(size) != tuple(m.image_size):
            m = dataclasses.replace(m, image_size=tuple(size))
        mods.append(m)
    out = dataclasses.replace(spec, modalities=tuple(mods))
    if missing is not None and missing != spec.missing_modality:
        out = dataclasses.replace(out, missing_modality=missing)
    return out
