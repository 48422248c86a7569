"""Shared pieces of the fine-tuning examples: process group, preprocessing by band name, exact data sharding.

Plain PyTorch. Under ``torchrun --nproc_per_node N`` the examples train exactly what one process trains:

- every process builds the same global batches (one seeded permutation per epoch, flips drawn with it) and
  takes its contiguous share of each (no sample twice, none dropped: batches are ``N // batch_size`` near-equal
  parts of the epoch, so each has at least ``batch_size >= N_processes`` samples);
- the loss of a share is its *sum* divided by the global batch's count, times the number of processes, so
  the average DDP takes of the processes' gradients is the gradient of the global batch mean;
- BatchNorm layers compute global-batch statistics (``eobackbones.finetune.convert_sync_batchnorm``;
  ``torch.nn.SyncBatchNorm`` is GPU-only); the decoders use GroupNorm, which needs nothing;
- evaluation shards the rows and sums confusion matrices / gathers scores.

What stays different is floating-point summation order (gradients summed across processes, statistics summed
per share): the gradients agree to about 1e-6 relative, not bit for bit. With SGD the runs stay that close and
the metrics agree; Adam(W) divides each element's step by its own gradient magnitude, so elements whose
gradient is at rounding level step in opposite directions in the two runs, and after a few steps the
metrics differ in the third decimal. Dropout and stochastic depth draw different masks in different
processes: keep them off (the examples' default) when comparing runs.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import eobackbones
from eobackbones import finetune, transforms
from eobackbones._io import atomic_path, atomic_write_text
from eobackbones.spec import InputSpec


_OWN_GROUP = False


def setup_distributed(device: str = 'cpu') -> Tuple[int, int, torch.device]:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on CUDA); (rank, world, device)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(dev)
    global _OWN_GROUP
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
        _OWN_GROUP = True
    return rank, world, dev


def cleanup_distributed() -> None:
    """Leave the process group if :func:`setup_distributed` created it (a caller's own group stays)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


_SENSOR_KEY = {'sentinel2': 's2', 'sentinel1': 's1'}


def data_modality(mspec: Any, available: Sequence[str]) -> str:
    """Which data modality feeds a model modality: same name, else by sensor (sentinel2 -> s2), else the only one."""
    if mspec.name in available:
        return mspec.name
    key = _SENSOR_KEY.get(mspec.sensor)
    if key in available:
        return key
    if len(available) == 1:
        return available[0]
    raise ValueError(f'no data modality for the model\'s {mspec.name!r} ({mspec.sensor}); the data has {list(available)}')


def for_model_keys(spec: InputSpec, per_modality: Mapping[str, Any]) -> Dict[str, Any]:
    """Re-key a per-data-modality dict (images, bands, units) by the model's modality names."""
    return {m.name: per_modality[data_modality(m, list(per_modality))] for m in spec.modalities}


def any_band_kwargs(model_name: str, data_bands: Mapping[str, Sequence[str]]) -> Dict[str, Any]:
    """``bands=`` binding the data's band names, for wavelength-conditioned (any-band) single-modality models."""
    if ':' in model_name:  # local-dir: / hf-hub: directories keep their own binding
        return {}
    cfg = eobackbones.get_pretrained_cfg(model_name.split('.')[0])
    spec = cfg.input_spec if cfg is not None else None
    if spec is None or not spec.any_bands or spec.input_format != 'tensor':
        return {}
    return dict(bands=list(data_bands[data_modality(spec.modalities[0], list(data_bands))]))


def input_plan(
        spec: InputSpec,
        data_bands: Mapping[str, Sequence[str]],
        data_units: Mapping[str, str],
        train_images: Mapping[str, np.ndarray],
        norm: str = 'auto',
        missing_bands: str = 'error',
        nan: str = 'fill',
) -> Tuple[transforms.Preprocess, Dict[str, str]]:
    """Band selection by name + normalisation for every modality of ``spec``.

    ``norm='auto'``: the weights' own normalisation (``transforms.for_model``) where the spec has one and the
    data's unit is the spec's unit, else a z-score with the train split's per-band mean and std (the same
    for every process). ``'model'`` insists on the former, ``'zscore'`` always uses the latter.

    All mappings are keyed by the model's modality names (see :func:`for_model_keys`).

    Returns:
        The preprocessing module (tensor or dict in the data's band order -> model input) and, per modality,
        which normalisation was used.
    """
    if norm not in ('auto', 'model', 'zscore'):
        raise ValueError(f'norm must be auto, model or zscore, got {norm!r}')
    used = {}
    for m in spec.modalities:
        if m.name not in data_bands:
            raise ValueError(f'the model needs modality {m.name!r}; the data has {list(data_bands)}')
        native = bool(m.normalization) and m.unit == data_units[m.name]
        if norm == 'model' and not native:
            raise ValueError(f'{m.name}: the model expects {m.unit!r} with {len(m.normalization)} normalisation steps, '
                             f'the data is {data_units[m.name]!r}; use --norm zscore')
        if native and norm != 'zscore':
            used[m.name] = 'model-native'
            continue
        have = list(data_bands[m.name])
        x = train_images[m.name].astype(np.float64)
        mean = np.nanmean(x, axis=(0, 2, 3))
        std = np.nanstd(x, axis=(0, 2, 3))
        std = np.where(std > 0, std, 1.0)
        # model bands the data lacks are zero-filled after normalisation by for_model(missing_bands='zeros')
        mu = [float(mean[have.index(b)]) if b in have else 0.0 for b in m.bands]
        sd = [float(std[have.index(b)]) if b in have else 1.0 for b in m.bands]
        spec = spec.replace_modality(m.name, unit=data_units[m.name],
                                     normalization=({'op': 'meanstd', 'mean': mu, 'std': sd},))
        used[m.name] = 'dataset-zscore (train split)'
    source = {m.name: list(data_bands[m.name]) for m in spec.modalities}
    if spec.input_format == 'tensor':
        source = source[spec.modalities[0].name]
    return transforms.for_model(spec, source_bands=source, missing_bands=missing_bands, nan=nan), used


def target_size(spec: InputSpec, hw: Tuple[int, int], forced: Optional[int] = None) -> Tuple[int, int]:
    """Model input size: ``forced``, the fixed size of fixed-size models, else ``hw`` rounded up to the size multiple."""
    if forced:
        return forced, forced
    if spec.fixed_size:
        return tuple(spec.image_size)
    m = max(1, spec.size_multiple)
    return tuple(-(-s // m) * m for s in hw)


def model_input(pre: torch.nn.Module, spec: InputSpec, images: Mapping[str, np.ndarray], rows: np.ndarray,
                size: Tuple[int, int], flips: Optional[np.ndarray] = None, device: torch.device = torch.device('cpu')):
    """Rows of the data -> preprocessed model input (tensor or dict) at ``size``, flipped where ``flips`` says."""
    out = {}
    for m in spec.modalities:
        x = torch.from_numpy(np.ascontiguousarray(images[m.name][rows])).float()
        out[m.name] = x
    x = pre(out if spec.input_format == 'dict' else out[spec.modalities[0].name])
    parts = x if isinstance(x, dict) else {'_': x}
    for k, t in parts.items():
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=size, mode='bilinear', align_corners=False)
        if flips is not None:
            t = flip(t, flips)
        parts[k] = t.to(device)
    return parts if isinstance(x, dict) else parts['_']


def flip(t: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
    """Per-sample horizontal (bit 0) / vertical (bit 1) flips of (B, ..., H, W)."""
    t = t.clone()
    for i, f in enumerate(flips):
        if f & 1:
            t[i] = t[i].flip(-1)
        if f & 2:
            t[i] = t[i].flip(-2)
    return t


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, world: int, augment: bool
                  ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The global batches of one epoch: (row positions, flip codes), identical in every process."""
    if batch_size < world or n < world:
        raise ValueError(f'every process needs a sample per step: batch size {batch_size} and {n} training samples '
                         f'must be >= {world} processes')
    g = np.random.default_rng([seed, epoch])
    perm = g.permutation(n)
    flips = g.integers(0, 4, size=n) if augment else np.zeros(n, dtype=np.int64)
    parts = np.array_split(np.arange(n), max(1, n // batch_size))
    return [(perm[p], flips[p]) for p in parts]


def make_optimizer(name: str, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9) over parameter groups that carry their own ``lr`` and ``weight_decay``."""
    if name == 'adamw':
        return torch.optim.AdamW(groups)
    if name == 'sgd':
        return torch.optim.SGD(groups, momentum=0.9)
    raise ValueError(f'unknown optimizer {name!r}')



def training_setup(model: torch.nn.Module, args: argparse.Namespace, n_train: int, device: torch.device, world: int
                   ) -> Tuple[torch.nn.Module, torch.nn.Module, List[Dict[str, Any]], torch.optim.Optimizer, Any]:
    """What the fine-tuning examples share between building the model and the loop: ``--freeze-until``,
    global-batch BatchNorm, layer-decay groups, the optimiser, DDP and the cosine schedule over the run's steps.

    Returns ``(model, core, groups, opt, sched)``: ``model`` is DDP-wrapped when ``world > 1``, ``core`` never is.
    """
    if args.freeze_until is not None:
        until = int(args.freeze_until) if args.freeze_until.lstrip('-').isdigit() else args.freeze_until
        finetune.freeze(model, until=until)
    core = finetune.convert_sync_batchnorm(model.to(device))
    groups = finetune.param_groups_layer_decay(core, args.lr, args.weight_decay, args.layer_decay)
    opt = make_optimizer(args.opt, groups)
    model = DDP(core, device_ids=[device.index] if device.type == 'cuda' else None) if world > 1 else core
    steps_per_epoch = max(1, n_train // args.batch_size)
    total = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, steps_per_epoch * args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return model, core, groups, opt, sched

def shard(a: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's contiguous share of ``a`` (near-equal shares, none empty when len(a) >= world)."""
    return np.array_split(a, world)[rank]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate per-process row blocks (of different lengths) in rank order."""
    if not dist.is_initialized():
        return t
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, t.cpu())
    return torch.cat(out)


def progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kw)


def write_loss_logs(out: Path, history: List[Dict[str, Any]], fields: Sequence[str]) -> None:
    """``loss.csv`` and ``loss.json`` of a pretraining run, each written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields))
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / 'loss.csv', buf.getvalue())
    atomic_write_text(out / 'loss.json', json.dumps(history, indent=1) + '\n')


def save_checkpoint(out: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                    history: List[Dict[str, Any]], args: argparse.Namespace, fields: Sequence[str]) -> None:
    """``checkpoint.pt`` (module and optimiser state, step, loss log, arguments but ``--resume``) and the loss logs;
    atomic, so an interrupted save leaves the previous checkpoint intact for ``--resume``."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / 'checkpoint.pt') as tmp:
        torch.save(dict(model=module.state_dict(), optimizer=opt.state_dict(), step=step, history=history,
                        args={k: v for k, v in vars(args).items() if k != 'resume'}), tmp)
    write_loss_logs(out, history, fields)


def resume_checkpoint(out: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace,
                      rank: int, resume_keys: Sequence[str]) -> Tuple[int, List[Dict[str, Any]]]:
    """Load ``save_checkpoint``'s file into ``module`` and ``opt`` when ``--resume`` and it exists; returns
    ``(step, history)`` (``(0, [])`` otherwise). Settings in ``resume_keys`` that differ from the checkpoint's are
    printed as a warning."""
    ckpt = out / 'checkpoint.pt'
    if not (args.resume and ckpt.is_file()):
        return 0, []
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    module.load_state_dict(state['model'])
    opt.load_state_dict(state['optimizer'])
    if rank == 0:
        changed = {k: (state['args'].get(k), getattr(args, k)) for k in resume_keys
                   if state['args'].get(k) != getattr(args, k)}
        print(f'resumed from {ckpt} at step {state["step"]}' + (f'; WARNING: settings changed since the checkpoint '
                                                               f'(then, now): {changed}' if changed else ''), flush=True)
    return int(state['step']), list(state['history'])
