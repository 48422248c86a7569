"""Frozen-backbone features for probing: band mapping, normalisation, batching, autocast, disk cache, DDP.

The pieces, in the order the probe uses them:

* :func:`plan_inputs` maps a dataset's named bands onto a model's input spec (by name, never by
  position) and builds the preprocessing (``model-native``: the weights' own normalisation from the
  spec; ``dataset-zscore``: per-band z-score with train-split statistics). Every decision is recorded
  in an :class:`InputPlan` so it can be written next to the numbers.
* :func:`extract_features` runs the frozen model (``eval``, ``no_grad``, optional autocast) over a set of
  rows, either pooled vectors (``forward_head(forward_features(x), pre_logits=True)``) or the
  stride-16 map (``forward_intermediates``), sharded over the ranks of a ``torch.distributed`` group
  without padding duplicates, and cached on disk.

Band policies (``missing_bands``) for a band the model needs and the data lacks:

* ``error`` (default): refuse, naming the bands.
* ``zeros``: fixed-band models only; the band is filled with 0 *after* normalisation (the training
  mean under z-score) via ``transforms.for_model(..., missing_bands='zeros')``; filled bands are listed.
* ``drop-model-bands``: wavelength-conditioned models (``any_bands``, e.g. DOFA) are built on the
  data's bands, so the model's default bands the data lacks are dropped (listed). For fixed-band
  models this is refused: slicing a pretrained first convolution removes terms from every sum the
  weights were trained on, and no published rule says how to compensate, so the result would not be
  "the pretrained model" any more.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..env import cache_home
from ..errors import InvalidInputError, MissingModalityError, NormalisationError, UnknownBandError
from ..models import seg_feature_index  # noqa: F401  (the probe's segmentation level)
from ..precision import precision_and_reason
from ..sensors import get_sensor, resolve_band
from ..spec import InputSpec, ModalitySpec
from ..transforms import for_model
from ..version import __version__

__all__ = [
    'NORM_CHOICES', 'MISSING_CHOICES', 'InputPlan', 'NormalisationError', 'amp_dtype', 'data_modality_for',
    'plan_inputs', 'extract_features', 'feature_cache_dir', 'dist_info', 'init_distributed', 'data_fingerprint',
    'model_fingerprint', 'seg_feature_index',
]

NORM_CHOICES = ('auto', 'model-native', 'dataset-zscore')
MISSING_CHOICES = ('error', 'zeros', 'drop-model-bands')


# ----------------------------------------------------------------------------------------------- hardware


def amp_dtype(device: torch.device, requested: str = 'auto') -> Tuple[Optional[torch.dtype], str]:
    """Autocast dtype for feature extraction and why: bf16 on CUDA with bf16 support or on CPUs with native bf16.

    Args:
        device: the extraction device.
        requested: ``auto``, ``bf16``, ``fp16`` or ``fp32``.

    Returns:
        (dtype or None for no autocast, reason string recorded in the results).
    """
    if requested not in ('auto', 'bf16', 'fp16', 'fp32'):
        raise ValueError(f'amp must be auto, bf16, fp16 or fp32, got {requested!r}')
    if requested == 'fp16' and device.type != 'cuda':
        raise ValueError('fp16 autocast is for CUDA devices; use --amp bf16 or fp32 on CPU')
    dtype, reason = precision_and_reason(requested, device)  # the package's one precision policy
    return (None if dtype == torch.float32 else dtype), reason


# ----------------------------------------------------------------------------------------------- distributed


def dist_info() -> Tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str = 'auto') -> Tuple[int, int, bool]:
    """Join the process group ``torchrun`` describes in the environment (no-op otherwise).

    Returns (rank, world_size, created): ``created`` tells the caller to destroy the group at the end.
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1, False
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), False
    use_cuda = torch.cuda.is_available() and device in ('auto', 'cuda') or device.startswith('cuda')
    backend = 'nccl' if use_cuda else 'gloo'
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), True


def _broadcast_obj(obj: Any) -> Any:
    rank, world = dist_info()
    if world == 1:
        return obj
    buf = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(buf, src=0)
    return buf[0]


def _gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: padded ``all_gather`` of tensors, then trimmed."""
    rank, world = dist_info()
    if world == 1:
        return local
    sizes: List[Any] = [None] * world
    torch.distributed.all_gather_object(sizes, (local.shape[0], tuple(local.shape[1:])))
    tail = next((s[1] for s in sizes if s[0] > 0), tuple(local.shape[1:]))
    n_max = max(s[0] for s in sizes)
    comm_dev = device if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')
    flat = local.reshape(local.shape[0], -1).to(comm_dev, torch.float32)
    width = int(np.prod(tail)) if tail else 1
    if flat.shape[1] != width:  # an empty shard has no columns yet
        flat = flat.new_zeros(0, width)
    padded = flat.new_zeros(n_max, width)
    padded[:flat.shape[0]] = flat
    out = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    rows = torch.cat([o[:s[0]] for o, s in zip(out, sizes)])
    return rows.reshape(rows.shape[0], *tail).cpu()


# ----------------------------------------------------------------------------------------------- band plan


def data_modality_for(mspec: ModalitySpec, available: Sequence[str]) -> Optional[str]:
    """Which data modality feeds a model modality: the same name, else the catalogue's modality key of its sensor
    (``sentinel2`` -> ``s2``, ``dem`` -> ``dem``), else, for a wavelength-conditioned modality, the first available."""
    if mspec.name in available:
        return mspec.name
    try:
        key = get_sensor(mspec.sensor).modality
    except UnknownBandError:
        key = None
    if key in available:
        return key
    if mspec.any_bands and available:
        return available[0]
    return None


def needed_data_modalities(spec: InputSpec, available: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """Data modality keys a model spec consumes (by name, else by the sensor catalogue), in the spec's order."""
    out = []
    for m in spec.modalities:
        key = data_modality_for(m, available) if available is not None else None
        if key is None:
            try:
                key = m.name if m.any_bands and m.name != 'image' else get_sensor(m.sensor).modality
            except UnknownBandError:
                key = m.name
            if m.any_bands and m.name == 'image':
                key = available[0] if available else 's2'
        if key not in out:
            out.append(key)
    return tuple(out)


@dataclass
class InputPlan:
    """How the data reaches one model; written into every result row."""
    spec: InputSpec                          # the spec the preprocessing applies (zscore replaces normalisation)
    modality_map: Dict[str, str]             # model modality -> data modality (only the ones fed)
    source_bands: Dict[str, Tuple[str, ...]]  # model modality -> the data's band names (channel order)
    model_bands: Dict[str, Tuple[str, ...]]   # model modality -> bands fed to the model, in model order
    filled_bands: Dict[str, List[str]]       # zero-filled (missing_bands=zeros)
    dropped_model_bands: Dict[str, List[str]]  # model default bands the data lacks (any-band models)
    unused_data_bands: Dict[str, List[str]]  # data bands the model does not take
    norm: str
    missing_bands: str
    image_size: Tuple[int, int]
    resized_from: Optional[Tuple[int, int]]
    zscore_stats: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)
    preprocess: Optional[nn.Module] = None
    norm_by_modality: Dict[str, str] = field(default_factory=dict)  # model-native / dataset-zscore, per modality
    absent: Tuple[str, ...] = ()             # model modalities given no data (the model's missing policy applies)
    forward_kwargs: Dict[str, Any] = field(default_factory=dict)   # call arguments passed with every forward
    conditions: Dict[str, str] = field(default_factory=dict)        # condition name -> data condition key

    def describe(self) -> Dict[str, Any]:
        return dict(
            norm=self.norm, norm_by_modality=dict(self.norm_by_modality), missing_bands=self.missing_bands,
            modality_map=dict(self.modality_map), absent_modalities=list(self.absent),
            model_bands={k: list(v) for k, v in self.model_bands.items()},
            filled_bands=self.filled_bands, dropped_model_bands=self.dropped_model_bands,
            unused_data_bands=self.unused_data_bands, image_size=list(self.image_size),
            resized_from=list(self.resized_from) if self.resized_from else None,
            units={m: self.spec.modality(m).unit for m in self.modality_map},
            forward_kwargs=dict(self.forward_kwargs), conditions=dict(self.conditions))

    def key(self) -> Dict[str, Any]:
        d = self.describe()
        d['normalization'] = {m.name: list(m.normalization) for m in self.spec.modalities}
        return d


def usable_bands_for_any_band_model(mspec: ModalitySpec, data_bands: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Data bands a wavelength-conditioned model can take (those with a catalogue wavelength), and the rest."""
    ok, bad = [], []
    sensor = mspec.sensor if mspec.sensor not in ('any', '') else None
    for b in data_bands:
        try:
            band = resolve_band(b, sensor)
            (ok if band.wavelength_um is not None else bad).append(b)
        except UnknownBandError:
            bad.append(b)
    return ok, bad


def check_missing_policy(spec: InputSpec, modality_map: Mapping[str, str], data_bands: Mapping[str, Sequence[str]],
                         missing: str, model_name: str) -> Dict[str, List[str]]:
    """Bands each fed model modality needs that the data lacks; raises unless the policy allows it."""
    if missing not in MISSING_CHOICES:
        raise ValueError(f'missing_bands must be one of {MISSING_CHOICES}, got {missing!r}')
    absent = {}
    for name, dm in modality_map.items():
        m = spec.modality(name)
        have = set(data_bands[dm])
        lack = [b for b in m.bands if b not in have]
        if lack:
            absent[m.name] = lack
    fixed = {k: v for k, v in absent.items() if not spec.modality(k).any_bands}
    if not fixed:
        return absent
    desc = '; '.join(f'{k}: {v}' for k, v in fixed.items())
    if missing == 'error':
        raise UnknownBandError(
            f'{model_name} needs bands the data lacks ({desc}); pass --missing-bands zeros to zero-fill them '
            f'(recorded in the results) or use a wavelength-conditioned model')
    if missing == 'drop-model-bands':
        raise UnknownBandError(
            f'--missing-bands drop-model-bands is only for wavelength-conditioned models; {model_name} has fixed '
            f'input bands and slicing its pretrained first conv has no published rule ({desc}); use --missing-bands zeros')
    return absent


def _target_size(spec: InputSpec, fed: Sequence[str], hw: Tuple[int, int],
                 forced: Optional[int]) -> Tuple[Tuple[int, int], Optional[Tuple[int, int]]]:
    mods = [spec.modality(m) for m in fed]
    if forced:
        size = (int(forced), int(forced))
    elif any(m.fixed_size for m in mods):
        size = tuple(next(m for m in mods if m.fixed_size).image_size)
    else:
        k = max(max(1, int(m.size_multiple)) for m in mods)
        size = tuple(int(-(-s // k) * k) for s in hw)
    return size, (None if tuple(size) == tuple(hw) else tuple(hw))


def plan_inputs(model: nn.Module, data: Any, norm: str = 'auto', missing_bands: str = 'error',
                image_size: Optional[int] = None, model_name: str = '', dropped_model_bands=None,
                data_modalities: Optional[Sequence[str]] = None, nan: str = 'drop',
                forward_kwargs: Optional[Dict[str, Any]] = None) -> InputPlan:
    """Map ``data`` (a :class:`~eobackbones.data.ProbeData`) onto ``model``'s input spec and build the preprocessing.

    Args:
        model: a model built by ``create_model``.
        data: the probe dataset.
        norm: ``model-native`` (the weights' own normalisation; errors on a unit mismatch), ``dataset-zscore``
            (per band, train-split statistics) or ``auto`` (model-native for every modality whose data unit matches
            the spec's unit, dataset z-score for the others; the choice is recorded per modality).
        missing_bands: see the module docstring.
        image_size: resize to this size.
        model_name: for messages.
        dropped_model_bands: recorded as given (wavelength-conditioned models bound to the data's bands).
        data_modalities: the data modalities to feed, in preference order (default: every one the data has); model
            modalities left without data are absent and the model's missing-modality policy decides (error / zeros
            / subset).
        nan: the NaN rule (``drop`` samples were removed before; ``fill``: statistics over valid pixels, 0 after
            normalisation; ``error``).
        forward_kwargs: call arguments passed with every forward (recorded).

    Raises:
        NormalisationError: ``model-native`` when the data's unit differs from the weights' unit.
        UnknownBandError: bands missing under the chosen policy, or no data modality for a model modality.
        MissingModalityError: absent modalities the model's policy does not accept.
    """
    if norm not in NORM_CHOICES:
        raise ValueError(f'norm must be one of {NORM_CHOICES}, got {norm!r}')
    spec = model.input_spec
    if spec is None:
        raise InvalidInputError(f'{model_name}: the model has no input_spec; build it with eobackbones.create_model')
    name = model_name or type(model).__name__
    avail = [m for m in (data_modalities if data_modalities is not None else data.images) if m in data.images]
    mmap = {}
    for m in spec.modalities:
        dm = data_modality_for(m, avail)
        if dm is not None:
            mmap[m.name] = dm
    absent = tuple(m for m in spec.modality_names if m not in mmap)
    if not mmap:
        raise UnknownBandError(f'{name}: no data modality for any of its modalities {list(spec.modality_names)}; '
                               f'data has {avail}')
    if absent and (spec.input_format == 'tensor' or spec.missing_modality == 'error'):
        raise MissingModalityError(
            f'{name} needs modalities {list(absent)} that the data ({avail}) does not provide, and its missing-modality '
            f'policy is {spec.missing_modality!r}')
    src = {mm: tuple(data.bands[dm]) for mm, dm in mmap.items()}
    absent_bands = check_missing_policy(spec, mmap, data.bands, missing_bands, name)
    filled = {k: v for k, v in absent_bands.items() if not spec.modality(k).any_bands}

    train = data.indices('train')
    pspec, stats, chosen = spec, {}, {}
    for mm, dm in mmap.items():
        m = spec.modality(mm)
        unit = data.units.get(dm, 'unknown')
        native_ok = bool(m.normalization) and m.unit != 'unknown' and unit == m.unit
        if norm == 'model-native' and not native_ok:
            why = (f'its input spec for {m.name} bands {list(m.bands)} declares no normalisation (unit {m.unit!r})'
                   if not m.normalization or m.unit == 'unknown' else
                   f'its weights expect {m.name} in unit {m.unit!r} but {data.name} {dm} is {unit!r} and no published '
                   f'mapping exists')
            raise NormalisationError(f'--norm model-native is impossible for {name}: {why}; use --norm auto or '
                                     f'dataset-zscore')
        if norm == 'model-native' or (norm == 'auto' and native_ok):
            chosen[mm] = 'model-native'
            continue
        chosen[mm] = 'dataset-zscore'
        if len(train) == 0:
            raise InvalidInputError(f'{data.name}: dataset-zscore needs a train split, found none')
        x = data.images[dm]
        have = src[mm]
        mean, std = [], []
        for b in m.bands:
            if b in have:
                v = np.asarray(x[train, have.index(b)], dtype=np.float64)
                mu, sd = float(np.nanmean(v)), float(np.nanstd(v))
                mean.append(mu)
                std.append(sd if sd > 0 else 1.0)
            else:  # zero-filled after normalisation; placeholders never touch data
                mean.append(0.0)
                std.append(1.0)
        stats[mm] = dict(mean=mean, std=std)
        pspec = pspec.replace_modality(mm, normalization=({'op': 'meanstd', 'mean': mean, 'std': std},), unit=unit)
    fed_spec = dataclasses.replace(pspec, modalities=tuple(pspec.modality(mm) for mm in mmap)) \
        if spec.input_format == 'dict' else pspec
    prep = for_model(fed_spec, source_bands=dict(src) if spec.input_format == 'dict' else src[spec.modalities[0].name],
                     missing_bands='zeros' if filled else 'error', nan='fill' if nan == 'fill' else 'error')
    hw = tuple(next(iter(data.images.values())).shape[-2:])
    size, resized_from = _target_size(spec, list(mmap), hw, image_size)
    unused = {mm: [b for b in src[mm] if b not in spec.modality(mm).bands] for mm in mmap}
    conds = {c.name: c.name for c in spec.conditions if c.name in getattr(data, 'conditions', {})}
    missing_conds = [c.name for c in spec.conditions if c.required and c.name not in conds]
    if missing_conds:
        raise MissingModalityError(f'{name} needs conditioning inputs {missing_conds} that {data.name} does not provide')
    kinds = set(chosen.values())
    return InputPlan(
        spec=pspec, modality_map=mmap, source_bands=src,
        model_bands={mm: tuple(spec.modality(mm).bands) for mm in mmap}, filled_bands=filled,
        dropped_model_bands=dict(dropped_model_bands or {}), unused_data_bands={k: v for k, v in unused.items() if v},
        norm=kinds.pop() if len(kinds) == 1 else 'mixed', missing_bands=missing_bands, image_size=size,
        resized_from=resized_from, zscore_stats=stats, preprocess=prep, norm_by_modality=chosen, absent=absent,
        forward_kwargs=dict(forward_kwargs or {}), conditions=conds)


# ----------------------------------------------------------------------------------------------- extraction


def _as_input(plan: InputPlan, data: Any, rows: np.ndarray, device: torch.device):
    """A batch: preprocessed, resized images (dict or tensor) and the forward keyword arguments."""
    batch = {mm: torch.from_numpy(np.ascontiguousarray(data.images[dm][rows])).to(device, non_blocking=True)
             for mm, dm in plan.modality_map.items()}
    x = plan.preprocess(batch if plan.spec.input_format == 'dict' else batch[plan.spec.modalities[0].name])

    def resize(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape[-2:]) == tuple(plan.image_size):
            return t
        return F.interpolate(t, size=plan.image_size, mode='bilinear', align_corners=False)
    x = {k: resize(v) for k, v in x.items()} if isinstance(x, dict) else resize(x)
    kwargs = dict(plan.forward_kwargs)
    if plan.conditions:
        raw = {c: torch.from_numpy(np.asarray(data.conditions[k][rows], dtype=np.float32)) for c, k in plan.conditions.items()}
        kwargs.update({k: v.to(device) for k, v in plan.preprocess.conditions(**raw).items()})
    return x, kwargs


def _forward(model: nn.Module, x: Any, kwargs: Dict[str, Any], kind: str, map_index: Optional[int]) -> torch.Tensor:
    if kind == 'pooled':
        return model.forward_head(model.forward_features(x, **kwargs), pre_logits=True)
    return model.forward_intermediates(x, indices=[map_index], stop_early=True, intermediates_only=True, **kwargs)[0]


@torch.no_grad()
def _extract_local(model, plan, data, rows, kind, batch_size, device, amp, progress, desc) -> torch.Tensor:
    map_index = seg_feature_index(model) if kind == 'map' else None
    outs = []
    starts = range(0, len(rows), batch_size)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(rows), desc=desc, unit='img', leave=False, dynamic_ncols=True)
        except ImportError:
            bar = None
    ctx = (lambda: torch.autocast(device_type=device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    for s in starts:
        r = rows[s:s + batch_size]
        x, kwargs = _as_input(plan, data, r, device)
        with ctx():
            y = _forward(model, x, kwargs, kind, map_index)
        outs.append(y.float().cpu())
        if bar is not None:
            bar.update(len(r))
    if bar is not None:
        bar.close()
    if not outs:
        return torch.zeros(0)
    return torch.cat(outs)


def feature_cache_dir(cache_dir: Optional[str] = None) -> Path:
    """``--cache-dir`` or ``EOBACKBONES_HOME/features``."""
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    return cache_home() / 'features'


def data_fingerprint(data: Any, rows: np.ndarray) -> str:
    """Content hash of the rows of a probe dataset (images of every modality, band names, units, ids)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([data.name, {k: list(v) for k, v in data.bands.items()}, data.units], sort_keys=True).encode())
    h.update(np.asarray(rows, dtype=np.int64).tobytes())
    for m in sorted(data.images):
        x = data.images[m]
        for start in range(0, len(rows), 4096):
            h.update(np.ascontiguousarray(x[rows[start:start + 4096]]).tobytes())
    if data.ids is not None:
        h.update('\n'.join(str(i) for i in np.asarray(data.ids)[rows]).encode())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Cheap weights fingerprint: names, shapes and a few values of every tensor in the state dict."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        flat = v.detach().reshape(-1)
        h.update(f'{k}{tuple(v.shape)}{v.dtype}'.encode())
        if flat.numel():
            h.update(torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy().tobytes())
            h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()


def extract_features(
        model: nn.Module,
        plan: InputPlan,
        data: Any,
        rows: np.ndarray,
        kind: str = 'pooled',
        batch_size: int = 64,
        device: Optional[torch.device] = None,
        amp: Optional[torch.dtype] = None,
        cache: Optional[Dict[str, Any]] = None,
        progress: bool = True,
        desc: str = '',
        stats: Optional[Dict[str, Any]] = None,
) -> Optional[np.ndarray]:
    """Features of ``data`` rows ``rows`` from a frozen ``model``; cached on disk when ``cache`` is given.

    Under ``torch.distributed`` every rank extracts its contiguous share of ``rows`` (no padding
    duplicates), the shares are all-gathered (padded tensors, then trimmed) and every rank gets the
    full array in the original order; rank 0 alone writes the cache.

    Args:
        model: a model built by ``create_model`` (put in ``eval`` mode here).
        plan: from :func:`plan_inputs`.
        data: the ProbeData the plan was built for.
        rows: row indices to extract.
        kind: ``pooled`` (B, D) or ``map`` (B, C, h, w) stride-16 features.
        batch_size: images per forward.
        device: extraction device (default CPU).
        amp: autocast dtype or None.
        cache: ``dict(dir=Path, key=dict)`` identifying the features (model, weights, dataset, split,
            preprocessing, bands policy, image size, package version); None disables caching.
        progress: show a tqdm bar (rank 0 only).
        desc: bar label.
        stats: filled with ``cache_hit``, ``seconds``, ``images``.

    Returns:
        float32 array aligned with ``rows``.
    """
    if kind not in ('pooled', 'map'):
        raise ValueError(f'kind must be pooled or map, got {kind!r}')
    device = torch.device(device or 'cpu')
    rows = np.asarray(rows, dtype=np.int64)
    rank, world = dist_info()
    stats = stats if stats is not None else {}
    path = None
    if cache is not None:
        key = dict(cache['key'], kind=kind, rows_fp=data_fingerprint(data, rows), plan=plan.key(),
                   amp=str(amp), eobackbones=__version__)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:40]
        root = Path(cache['dir'])
        path = root / f'{digest}.npy'
        hit = _broadcast_obj(path.is_file() if rank == 0 else None)
        if hit:
            try:
                arr = np.load(path, allow_pickle=False)
                if len(arr) == len(rows):
                    stats.update(cache_hit=True, seconds=0.0, images=0, cache_file=str(path))
                    return arr
            except (OSError, ValueError):
                pass  # a damaged cache entry is recomputed below (all ranks read the same file)
    model.eval()
    t0 = time.perf_counter()
    share = np.array_split(rows, world)[rank] if world > 1 else rows
    local = _extract_local(model, plan, data, share, kind, batch_size, device, amp,
                           progress and rank == 0, desc)
    if world > 1:
        feats = _gather_rows(local, device)
    else:
        feats = local
    arr = feats.numpy().astype(np.float32, copy=False)
    stats.update(cache_hit=False, seconds=time.perf_counter() - t0, images=len(share))
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f'.tmp{os.getpid()}.npy')
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, path)
        meta = dict(cache['key'], kind=kind, n=len(rows), shape=list(arr.shape), plan=plan.describe(), amp=str(amp))
        path.with_suffix('.json').write_text(json.dumps(meta, indent=1, default=str), encoding='utf-8')
        stats['cache_file'] = str(path)
    return arr
