"""Fine-tuning helpers that work on every backbone through the model contract (``group_matcher``,
``no_weight_decay``), and on anything that holds one (a :class:`~eobackbones.heads.SegmentationModel`, a
user's ``nn.Module`` with a backbone attribute).

- :func:`param_groups_layer_decay`: plain PyTorch parameter groups with an explicit ``lr`` per group
  (layer-wise learning-rate decay, BEiT / timm style), every trainable parameter in exactly one group.
- :func:`freeze` / :func:`unfreeze`: freeze the stem and the first stages (by ``group_matcher`` stage or by
  module name), optionally with BatchNorm statistics frozen too; :func:`unfreeze` undoes exactly that.
- :func:`unreached_parameters`: trainable parameters a forward pass never touches (they break DDP without
  ``find_unused_parameters`` and cannot be trained by that objective).
- :func:`convert_sync_batchnorm`: BatchNorm that computes its batch statistics over every process, on any
  device (``torch.nn.SyncBatchNorm`` is GPU-only), so ``torchrun --nproc_per_node N`` trains like one process
  on the global batch.

Depth: the backbone's ``group_matcher`` assigns every backbone parameter a layer id (timm's
``group_with_matcher`` does the numbering: stem 0, then blocks / stages in order); everything the matcher does
not claim -- classifier, projection heads, a decoder -- is the *head*, one id above the deepest backbone
layer. With ``H`` that head id, layer ``i`` trains at ``lr * layer_decay ** (H - i)``: the head at ``lr``, the
last block at ``lr * layer_decay``, the stem at ``lr * layer_decay ** H`` (BEiT's rule, whether or not the
model has head parameters).
"""
import fnmatch
import logging
import re
from itertools import chain
from typing import Any, Callable, Collection, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from timm.models._manipulate import group_with_matcher

__all__ = [
    'compile_group_matcher', 'layer_ids', 'param_groups_layer_decay', 'freeze', 'unfreeze',
    'unreached_parameters', 'DistributedBatchNorm', 'convert_sync_batchnorm',
]

_logger = logging.getLogger(__name__)

# a name no matcher claims: its group is the head (timm maps unmatched names to the largest ordinal)
_HEAD_SENTINEL = '\x00head'
_INF = float('inf')


def _ordinals(parts: Iterable[Any]) -> Tuple[float, ...]:
    out = []
    for p in parts:
        try:
            out.append(float(p))
        except (TypeError, ValueError):
            # a non-numeric capture group (e.g. ``(conv1|bn1)``) says nothing about depth; timm's float()
            # would raise here, so such matchers break create_optimizer_v2 but work with these helpers
            continue
    return tuple(out)


def compile_group_matcher(
        matcher: Union[Mapping[str, Any], Callable[[str], Any]],
        prefix: str = '',
) -> Callable[[str], Tuple[float, ...]]:
    """A timm ``group_matcher`` (dict of regexes or callable) as a callable over *prefixed* parameter names.

    Same ordinals as timm's ``group_with_matcher`` (``(group index, *numeric captures, *suffix)``), except that
    non-numeric capture groups are ignored instead of failing. Names outside ``prefix`` or unmatched get
    ``(inf,)``, timm's head ordinal. The result is itself a valid ``group_matcher`` for timm.

    Args:
        matcher: ``model.group_matcher(coarse)``.
        prefix: prefix of the matched module's parameters in the outer model (``'backbone.'``).
    """
    if callable(matcher) and not isinstance(matcher, Mapping):
        inner = matcher

        def match_callable(name: str) -> Tuple[float, ...]:
            if not name.startswith(prefix):
                return _INF,
            out = inner(name[len(prefix):])
            return tuple(out) if isinstance(out, Iterable) else (out,)
        return match_callable

    compiled = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        if isinstance(spec, (tuple, list)):
            compiled += [(re.compile(s[0]), (ordinal,), s[1]) for s in spec]
        else:
            compiled.append((re.compile(spec), (ordinal,), None))

    def match(name: str) -> Tuple[float, ...]:
        if not name.startswith(prefix):
            return _INF,
        rel = name[len(prefix):]
        for regex, head, tail in compiled:
            r = regex.match(rel)
            if r:
                return _ordinals(chain.from_iterable(filter(None, (head, r.groups(), tail))))
        return _INF,
    return match


def _matcher_owner(model: nn.Module) -> Tuple[str, nn.Module]:
    """The module whose ``group_matcher`` describes the model's depth, and its name prefix ('' or 'x.')."""
    if callable(getattr(model, 'group_matcher', None)):
        return '', model
    owners = []
    for name, mod in model.named_modules():
        if name and callable(getattr(mod, 'group_matcher', None)) \
                and not any(name.startswith(o + '.') for o, _ in owners):
            owners.append((name, mod))
    if not owners:
        raise ValueError(f'{type(model).__name__} has no group_matcher() and holds no module that has one; '
                         f'layer groups need a backbone built by eobackbones.create_model')
    if len(owners) > 1:
        raise ValueError(f'{type(model).__name__} holds {len(owners)} modules with a group_matcher '
                         f'({[n for n, _ in owners]}); build the groups per backbone')
    name, mod = owners[0]
    return name + '.', mod


def layer_ids(model: nn.Module, coarse: bool = False) -> Tuple[Dict[str, int], int]:
    """Layer id of every parameter of ``model`` and the head id (see the module docstring).

    Args:
        model: a backbone, or a module holding exactly one backbone.
        coarse: use ``group_matcher(coarse=True)`` (stages rather than blocks).

    Returns:
        ``({parameter name: layer id}, head id)``; head parameters have the head id.
    """
    prefix, owner = _matcher_owner(model)
    fn = compile_group_matcher(owner.group_matcher(coarse=coarse), prefix)
    names = [n for n, _ in model.named_parameters()]
    ids = group_with_matcher(((n, None) for n in names + [_HEAD_SENTINEL]), fn, reverse=True)
    head = ids.pop(_HEAD_SENTINEL)
    return ids, head


def _no_weight_decay_names(model: nn.Module) -> set:
    if callable(getattr(model, 'no_weight_decay', None)):
        return set(model.no_weight_decay())
    try:
        prefix, owner = _matcher_owner(model)
    except ValueError:
        return set()
    nwd = getattr(owner, 'no_weight_decay', None)
    return {prefix + n for n in nwd()} if callable(nwd) else set()


def param_groups_layer_decay(
        model: nn.Module,
        lr: float,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        no_weight_decay_list: Collection[str] = (),
        min_scale: float = 0.0,
        weight_decay_exclude_1d: bool = True,
) -> List[Dict[str, Any]]:
    """Parameter groups with layer-wise learning-rate decay, ready for any ``torch.optim`` optimizer.

    Each group has ``params``, ``param_names``, ``lr`` (explicit: ``lr * lr_scale``), ``weight_decay``,
    ``lr_scale`` and ``layer_id``. Every trainable parameter is in exactly one group (frozen ones are left
    out, as timm does). No weight decay for the model's ``no_weight_decay()`` names, for names matching
    ``no_weight_decay_list`` (fnmatch patterns), and for 1-D parameters (biases, norms) unless
    ``weight_decay_exclude_1d`` is False.

    Args:
        model: a backbone (with or without classifier), a SegmentationModel, or a module holding one backbone.
        lr: learning rate of the head (decoder, classifier).
        weight_decay: weight decay of the decayed groups.
        layer_decay: per-layer factor (1.0: no decay).
        no_weight_decay_list: extra fnmatch patterns of parameter names without weight decay.
        min_scale: lower bound of the lr scale.
        weight_decay_exclude_1d: no weight decay for parameters with ``ndim <= 1``.

    Example:
        >>> opt = torch.optim.AdamW(param_groups_layer_decay(model, lr=1e-3, layer_decay=0.75))
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f'layer_decay must be in (0, 1], got {layer_decay}')
    ids, head = layer_ids(model)
    nwd = _no_weight_decay_names(model)
    patterns = tuple(no_weight_decay_list)
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = ids.get(name, head)
        no_decay = (weight_decay_exclude_1d and p.ndim <= 1) or name in nwd \
            or any(fnmatch.fnmatch(name, pat) for pat in patterns)
        key = (lid, not no_decay)
        if key not in groups:
            scale = max(min_scale, layer_decay ** (head - lid))
            groups[key] = dict(params=[], param_names=[], lr=lr * scale, weight_decay=0.0 if no_decay else weight_decay,
                               lr_scale=scale, layer_id=lid)
        groups[key]['params'].append(p)
        groups[key]['param_names'].append(name)
    return [groups[k] for k in sorted(groups)]


_FROZEN_ATTR = '_eob_frozen'


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition('.')
    setattr(root.get_submodule(parent) if parent else root, child, module)


def freeze(
        model: nn.Module,
        until: Optional[Union[int, str]] = None,
        freeze_bn_stats: bool = False,
) -> List[str]:
    """Freeze the backbone, or its first layers, in place.

    Args:
        model: a backbone, a SegmentationModel or a module holding one backbone.
        until: None: every backbone parameter (the head / decoder stay trainable). An int: the
            ``group_matcher(coarse=True)`` stages ``0..until`` (0 is the stem; ResNet: 1..4 are layer1..4;
            negative counts from the last stage). A str: ``'stem'``, or a module name (``'layer2'``,
            ``'blocks.5'``; also found under a prefix such as ``backbone.``): everything up to and including the
            deepest layer of that module.
        freeze_bn_stats: also freeze the statistics of BatchNorm layers whose parameters are all frozen (they
            become timm / torchvision ``FrozenBatchNorm2d``, which keeps the running statistics in train mode).

    Returns:
        Names of the parameters this call froze (already frozen ones excluded).

    Raises:
        ValueError: ``until`` names no stage or module of the model.
    """
    if isinstance(until, int) and not isinstance(until, bool):
        ids, head = layer_ids(model, coarse=True)
        limit = until + head if until < 0 else until
        if not 0 <= limit < head:
            raise ValueError(f'until={until} is not a stage of this model: stages are 0..{head - 1} (0 = stem)')
    elif until is None or until == 'stem':
        ids, head = layer_ids(model)
        limit = head - 1 if until is None else 0
    elif isinstance(until, str):
        ids, head = layer_ids(model)
        # a module path, anchored at the start or at a module boundary ('layer2' also finds 'backbone.layer2' and
        # both encoders' 's1.layer2' / 's2.layer2' of a pair)
        hits = [n for n in ids if n.startswith(until + '.') or ('.' + until + '.') in n]
        if not hits:
            raise ValueError(f'until={until!r} matches no parameter of {type(model).__name__}; give a module name '
                             f'such as {sorted({n.rsplit(".", 2)[0] for n in ids})[:4]}')
        limit = max(ids[n] for n in hits)
    else:
        raise ValueError(f'until must be None, an int stage or a module name, got {until!r}')
    frozen = []
    for name, p in model.named_parameters():
        if p.requires_grad and ids.get(name, head) <= limit:
            p.requires_grad_(False)
            frozen.append(name)
    record = getattr(model, _FROZEN_ATTR, None) or dict(params=[], bn=[])
    record['params'] = record['params'] + frozen
    if freeze_bn_stats:
        from timm.utils.model import freeze_batch_norm_2d
        for name, mod in list(model.named_modules()):
            params = list(mod.parameters())
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
                _set_child(model, name, freeze_batch_norm_2d(mod))
                record['bn'].append(name)
    object.__setattr__(model, _FROZEN_ATTR, record)
    return frozen


def unfreeze(model: nn.Module) -> List[str]:
    """Undo :func:`freeze`: re-enable the parameters it froze and restore BatchNorm layers it converted.

    Parameters that were frozen by design (DOFA's fixed sin-cos ``pos_embed``, a projection head off the
    forward path) stay frozen.

    Returns:
        Names of the re-enabled parameters.
    """
    record = getattr(model, _FROZEN_ATTR, None)
    if not record:
        return []
    from timm.utils.model import unfreeze_batch_norm_2d
    for name in record['bn']:
        _set_child(model, name, unfreeze_batch_norm_2d(model.get_submodule(name)))
    params = dict(model.named_parameters())
    for name in record['params']:
        params[name].requires_grad_(True)
    object.__setattr__(model, _FROZEN_ATTR, None)
    return list(record['params'])


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def unreached_parameters(model: nn.Module, *args: Any, **kwargs: Any) -> List[str]:
    """Names of trainable parameters that ``model(*args, **kwargs)`` does not use.

    Runs one forward in eval mode (BatchNorm statistics untouched, mode restored) and walks the autograd
    graph of the outputs; no backward, no gradients left behind.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(*args, **kwargs)
    finally:
        model.train(was_training)
    seen, reached = set(), set()
    stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, 'variable', None)
        if var is not None:
            reached.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum of per-process losses w.r.t. the shared sum is again a sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class DistributedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch over all processes.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm{1,2,3}d``; differentiable all-reduces
    carry the gradient through the shared statistics, so data-parallel training
    computes what one process computes on the whole batch. Works on any device and backend (gloo on CPU).
    Eval mode and single-process runs are plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f'expected at least 2-D input (N, C, ...), got {x.dim()}-D')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world_size() == 1:
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        xc = x - mean.view(shape)
        # two passes (mean, then centred squares) as torch's kernels, not E[x^2] - E[x]^2
        var = all_reduce(xc.square().sum(dims)) / n
        out = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        return out


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every ``nn.BatchNorm{1,2,3}d`` compute global-batch statistics under ``torch.distributed``.

    On CUDA this is ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``; elsewhere (CPU / gloo, where
    SyncBatchNorm refuses to run) the layers become :class:`DistributedBatchNorm`, holding the same parameter
    and buffer objects. A no-op outside a process group of two or more. Subclasses of BatchNorm (timm's
    ``BatchNormAct2d``) are left as they are.
    """
    if _world_size() == 1:
        return model
    if any(p.is_cuda for p in model.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if type(model) in kinds:
        return _to_distributed_bn(model)
    for name, mod in list(model.named_modules()):
        if type(mod) in kinds:
            _set_child(model, name, _to_distributed_bn(mod))
    return model


def _to_distributed_bn(bn: nn.modules.batchnorm._BatchNorm) -> DistributedBatchNorm:
    # reuse the parameter and buffer objects (as torch's convert_sync_batchnorm does), so optimizers, parameter
    # groups and freeze records built before the conversion stay valid
    new = DistributedBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                               device='meta')
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    new.train(bn.training)
    return new
