"""torchgeo datasets as :class:`~eobackbones.data.ProbeData` (whole splits in memory, bands by name).

Supported (``torchgeo`` must be installed; nothing is downloaded unless ``download=True``):

============== ================================ ==================================================
name           torchgeo class                   modalities / band names
============== ================================ ==================================================
eurosat        ``EuroSAT`` (13-band MS)         s2: ``EuroSAT.all_band_names`` as torchgeo declares
                                                them (B01..B12 then **B8A last**, the file order);
                                                L1C TOA reflectance x 1e4
bigearthnet    ``BigEarthNet`` (v1, 19 classes) s1 / s2 / both; band names parsed from the band
                                                files torchgeo reads (its sort order), e.g. s1 =
                                                (VH, VV), s2 = B01..B08, B8A, B09, B11, B12
bigearthnet-v2 ``BigEarthNetV2`` (reBEN)        as bigearthnet (same file naming and sort order)
so2sat         ``So2Sat`` (v2, LCZ 17 classes)  s2: B02..B12 (reflectance stored / 1e4, scaled
                                                back x 1e4); s1: VH, VV in dB = 10 log10 of the
                                                Lee-filtered intensities (channels 5, 6)
============== ================================ ==================================================

Unreadable samples are skipped and listed in ``meta['unreadable']`` unless ``strict``. Integer-valued
rasters are stored as uint16 (EuroSAT: 1.4 GB for all 27k patches instead of 5.7 GB as float32);
``max_per_split`` takes a seeded random subset of each split for quick runs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .datasets import ProbeData

__all__ = ['TORCHGEO_DATASETS', 'load_torchgeo']

TORCHGEO_DATASETS = ('eurosat', 'bigearthnet', 'bigearthnet-v2', 'so2sat')
_SPLIT = {'train': 'train', 'val': 'val', 'test': 'test'}
# BigEarthNet band files are sorted by torchgeo: S1 alphabetically, S2 with torchgeo's sort_sentinel2_bands.
_BEN_S2_FALLBACK = ('B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B09', 'B11', 'B12')
_BEN_S1_FALLBACK = ('VH', 'VV')


def _tg():
    try:
        import torchgeo.datasets as tgd
    except ImportError as e:
        raise ImportError("torchgeo datasets need `pip install 'eobackbones[datasets]'` (torchgeo)") from e
    return tgd


def _band_from_path(p: str) -> str:
    stem = os.path.splitext(os.path.basename(p))[0]
    return stem.split('_')[-1]


def _ben_bands(ds: Any, which: str) -> Dict[str, Tuple[str, ...]]:
    """Band names of BigEarthNet from the file names torchgeo reads for sample 0 (fallback: its sort rules)."""
    out = {}
    paths: List[str] = []
    if hasattr(ds, '_load_paths') and len(ds):
        try:
            paths = list(ds._load_paths(0))
        except Exception:
            paths = []
    names = [_band_from_path(p) for p in paths]
    s1 = tuple(n for n in names if n in ('VV', 'VH'))
    s2 = tuple(n for n in names if re.fullmatch(r'B\d\d|B8A', n))
    if which in ('s1', 'all'):
        out['s1'] = s1 or _BEN_S1_FALLBACK
    if which in ('s2', 'all'):
        out['s2'] = s2 or _BEN_S2_FALLBACK
    return out


def _compact(x: np.ndarray) -> np.ndarray:
    """torchgeo returns float tensors; integer-valued rasters in [0, 65535] are kept as uint16 (lossless, 1/2 the memory)."""
    if x.dtype.kind == 'f' and x.size and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 65535 \
            and np.array_equal(x, np.round(x)):
        return x.astype(np.uint16)
    return x.astype(np.float32) if x.dtype != np.float32 and x.dtype.kind == 'f' else x


def _collect(ds: Any, split: str, keys: Dict[str, str], strict: bool, limit: Optional[int], seed: int,
             post=None) -> Tuple[Dict[str, np.ndarray], List[Any], List[str], List[Tuple[str, str]]]:
    """Read every sample of a torchgeo dataset: {modality: stacked array}, labels, ids, unreadable."""
    n = len(ds)
    order = np.arange(n)
    if limit and limit < n:
        order = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    arrays: Dict[str, List[np.ndarray]] = {}  # by output modality (``post`` may split one raster into two)
    labels, ids, bad = [], [], []
    for i in order:
        sid = f'{split}/{int(i)}'
        try:
            sample = ds[int(i)]
            parts = {m: sample[k].numpy() for m, k in keys.items()}
            if post is not None:
                parts = post(parts)
        except Exception as e:  # decoders raise many types for corrupt files
            if strict:
                raise ValueError(f'{type(ds).__name__} {sid}: unreadable ({type(e).__name__}: {e})') from e
            bad.append((sid, f'{type(e).__name__}: {e}'))
            continue
        for m, x in parts.items():
            arrays.setdefault(m, []).append(_compact(x))
        labels.append(sample['label'].numpy())
        ids.append(sid)
    stacked = {}
    for m, xs in arrays.items():
        if xs:
            if len({x.dtype for x in xs}) > 1:
                xs = [x.astype(np.float32) for x in xs]
            stacked[m] = np.stack(xs)
    return stacked, labels, ids, bad


def _open_eurosat(tgd: Any, root: str, split: str, download: bool, modalities: Tuple[str, ...]) -> Dict[str, Any]:
    ds = tgd.EuroSAT(root=root, split=split, download=download)
    return dict(ds=ds, bands={'s2': tuple(ds.bands)}, units={'s2': 'reflectance_1e4'}, keys={'s2': 'image'},
                label_names=tuple(ds.classes),
                notes=['EuroSAT-MS: Sentinel-2 L1C TOA reflectance x 1e4; band order as torchgeo declares it (B8A last)'])


def _open_bigearthnet(tgd: Any, root: str, split: str, download: bool, modalities: Tuple[str, ...],
                      v2: bool = False) -> Dict[str, Any]:
    which = 'all' if set(modalities) >= {'s1', 's2'} else ('s1' if 's1' in modalities else 's2')
    if not v2:
        ds = tgd.BigEarthNet(root=root, split=split, bands=which, num_classes=19, download=download)
        label_names = tuple(ds.class_sets[19])
    else:
        ds = tgd.BigEarthNetV2(root=root, split=split, bands=which, download=download)
        label_names = tuple(getattr(ds, 'class_set', None) or getattr(ds, 'classes', ()) or [str(i) for i in range(19)])
    bands = _ben_bands(ds, which)
    post = None
    if which == 'all' and not v2:
        n1 = len(bands['s1'])
        keys = {'all': 'image'}

        def post(parts, n1=n1):
            x = parts.pop('all')
            return {'s1': x[:n1], 's2': x[n1:]}
    elif which == 'all':
        keys = {'s1': 'image_s1', 's2': 'image_s2'}
    else:
        keys = {which: 'image'}
    name = 'bigearthnet-v2' if v2 else 'bigearthnet'
    return dict(ds=ds, bands=bands, units={m: {'s1': 'dB', 's2': 'reflectance_1e4'}[m] for m in bands}, keys=keys,
                label_names=label_names, post=post,
                notes=[f'{name}: band names parsed from the files torchgeo reads ({ {k: list(v) for k, v in bands.items()} })'])


def _open_so2sat(tgd: Any, root: str, split: str, download: bool, modalities: Tuple[str, ...]) -> Dict[str, Any]:
    ds = tgd.So2Sat(root=root, version='2', split={'val': 'validation'}.get(split, split))
    s2_names = tuple(b.replace('S2_', '') for b in ds.all_s2_band_names)
    n1 = len(ds.all_s1_band_names)
    lee = [ds.all_s1_band_names.index('S1_B5'), ds.all_s1_band_names.index('S1_B6')]

    def post(parts, n1=n1, lee=lee):
        x = parts.pop('all').astype(np.float32)
        s1 = 10.0 * np.log10(np.maximum(x[:n1][lee], 1e-10))
        return {'s1': s1.astype(np.float32), 's2': x[n1:] * 1e4}
    return dict(ds=ds, bands={'s1': ('VH', 'VV'), 's2': s2_names}, units={'s1': 'dB', 's2': 'reflectance_1e4'},
                keys={'all': 'image'}, label_names=tuple(ds.classes), post=post,
                notes=['So2Sat v2: s2 = stored reflectance x 1e4; s1 = VH, VV in dB from the Lee-filtered '
                       'intensities (channels 5, 6); the complex channels are not used'])


# one opener per dataset: (torchgeo module, root, split, download, modalities) -> dataset + how to read it
_OPENERS = {
    'eurosat': _open_eurosat,
    'bigearthnet': _open_bigearthnet,
    'bigearthnet-v2': partial(_open_bigearthnet, v2=True),
    'so2sat': _open_so2sat,
}


def load_torchgeo(
        name: str,
        root: str | Path,
        modalities: Optional[Sequence[str]] = None,
        download: bool = False,
        strict: bool = False,
        max_per_split: Optional[int] = None,
        seed: int = 0,
) -> ProbeData:
    """Load a torchgeo dataset's train/val/test splits into a ProbeData.

    Args:
        name: one of :data:`TORCHGEO_DATASETS`.
        root: the torchgeo ``root`` directory.
        modalities: for BigEarthNet, ``('s2',)``, ``('s1',)`` or both (default s2); ignored otherwise.
        download: let torchgeo download the data (never implicit).
        strict: raise on the first unreadable sample instead of listing it.
        max_per_split: seeded random subset of at most this many samples per split.
        seed: seed of that subset.
    """
    name = name.lower()
    if name not in _OPENERS:
        raise ValueError(f'unknown torchgeo dataset {name!r}; supported: {", ".join(TORCHGEO_DATASETS)}')
    tgd = _tg()
    root = str(root)
    images: Dict[str, List[np.ndarray]] = {}
    labels: List[Any] = []
    ids: List[str] = []
    split_col: List[str] = []
    unreadable: List[Tuple[str, str]] = []
    multilabel = name.startswith('bigearthnet')
    for split in ('train', 'val', 'test'):
        o = _OPENERS[name](tgd, root, split, download, tuple(modalities or ('s2',)))
        ds, bands, units, keys, label_names, notes, post = (
            o['ds'], o['bands'], o['units'], o['keys'], o['label_names'], o['notes'], o.get('post'))
        arrays, lab, sid, bad = _collect(ds, split, keys, strict, max_per_split, seed, post)
        unreadable += bad
        for m, a in arrays.items():
            images.setdefault(m, []).append(a)
        labels += lab
        ids += sid
        split_col += [split] * len(lab)
    if not labels:
        raise ValueError(f'{name} at {root}: no readable samples ({len(unreadable)} unreadable)')
    y = np.stack(labels).astype(np.int64)
    if not multilabel:
        y = y.reshape(-1)
    data = ProbeData(
        name=name, images={m: np.concatenate(v) for m, v in images.items()}, bands=bands, units=units,
        labels=y, label_names=label_names, multilabel=multilabel, split=np.asarray(split_col),
        ids=np.asarray(ids), meta={'unreadable': unreadable, 'source': f'torchgeo:{name}', 'notes': notes,
                                   'max_per_split': max_per_split})
    return data
