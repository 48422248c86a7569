"""Linear-probe benchmark on frozen features: ``eobackbones probe`` and ``benchmarks/linear_probe.py``.

For every model the report has, on the same samples and splits:

* ``pretrained``: the weights (default tag, ``--pretrained TAG`` or a ``local-dir:`` / ``hf-hub:`` directory),
  unless ``--pretrained none`` or the weights cannot be loaded (offline, manual-only); then the row is absent and
  the loader's one-line error says why;
* ``random-init``: the same architecture with seeded random weights (what the architecture alone gives);
* ``baseline``: per-band mean + std of the raw bands (``band_statistics_features``; segmentation: the raw bands per
  pixel) with every requested classifier (what no backbone gives).

The probe knows no family: modality keys come from the model's input spec and the sensor catalogue, a
wavelength-conditioned modality is bound to the data's bands, per-model forward arguments (``feature_kwargs``,
e.g. a diffusion ``timestep``) and the segmentation level come from the cfg, and datasets are a table of adapters
(``eobackbones.data.catalog``). Multimodal models can be probed with some modalities absent
(``--modalities``, ``--modality-subsets all``), each subset its own row, following the model's declared policy.

Classifiers: logistic regression (``fit_linear_probe``: L2 swept on val, refit on train+val, test touched once) and
a cosine kNN (k=20, memory bank train+val); ``--protocol torchgeo-bench`` switches to that benchmark's settings.
Label fractions subsample the labelled train *and* val splits (``subsample_labels``, seeded); fraction 1 is
deterministic and run once. Metrics: accuracy / macro-F1 (single-label), macro / micro mAP and F1@0.5
(multi-label), mIoU (segmentation), each with a bootstrap 95% CI over test samples.

Normalisation (``--norm``): ``auto`` (default) uses the weights' own normalisation for every modality whose data unit
matches the spec's unit and a train-split z-score for the others (e.g. DOFA's Satlas 8-bit statistics vs Sentinel-2
reflectance), recorded per modality in the header and every row; ``model-native`` refuses a unit mismatch;
``dataset-zscore`` always standardises. NaN rule (``--nan``): ``drop`` samples with NaN pixels (default), ``fill``
(statistics over valid pixels, 0 after normalisation, as ``transforms.for_model(nan="fill")``), or ``error``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import git_commit
from ..data.catalog import DATASETS, DataRequest, check_request, list_datasets, load_dataset
from ..data.datasets import nan_policy, subsample_labels
from ..heads import LinearSegHead
from ..errors import (
    CheckpointFormatError, ChecksumMismatchError, EOBackbonesError, MissingModalityError, UnknownBandError,
    UnknownModelError, WeightsNotFoundError, first_line)
from ..models import ResolvedModel, create_model, parse_model_name, resolve_model
from ..spec import InputSpec
from ..version import __version__
from .classifiers import DEFAULT_L2_GRID, band_statistics_features, fit_linear_probe, knn_scores
from .features import (
    MISSING_CHOICES, NORM_CHOICES, InputPlan, amp_dtype, data_modality_for, extract_features, feature_cache_dir,
    init_distributed, model_fingerprint, needed_data_modalities, plan_inputs, seg_feature_index,
    usable_bands_for_any_band_model)
from .metrics import bootstrap_ci, miou, multilabel_metrics, singlelabel_metrics
from .report import plot_report, primary_metrics, require_matplotlib, to_markdown, write_report

__all__ = ['add_probe_args', 'main_probe', 'run_probe', 'probe_features', 'fit_segmentation_probe',
           'segmentation_probe', 'validate_probe_args', 'build_for_data', 'ProbeProtocol', 'PROTOCOLS']

# loader failures that leave the pretrained row absent (reported) instead of stopping the run
LOAD_ERRORS = (WeightsNotFoundError, ChecksumMismatchError, CheckpointFormatError, OSError)


# ----------------------------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class ProbeProtocol:
    """How features are probed: classifier settings, band sets, and the run settings a preset fixes."""
    name: str
    args: Dict[str, Any] = field(default_factory=dict)  # command-line settings the preset fixes
    c_grid: Optional[Tuple[float, ...]] = None           # logreg: sweep C (l2 = 1 / (C n)) instead of l2
    standardize: bool = True                             # logreg on standardised features
    select_metric_multilabel: str = 'map_macro'          # validation metric for multi-label C / l2 selection
    tie_break: str = 'val_loss'
    knn_metric: str = 'cosine'                           # cosine + similarity-weighted votes, or l2 + uniform
    knn_bank: str = 'train+val'                          # kNN memory bank
    band_sets: Tuple[Tuple[str, Optional[Tuple[str, ...]]], ...] = (('all', None),)  # rows per S2 band set
    note: str = ''


PROTOCOLS = {
    'eobackbones': ProbeProtocol('eobackbones'),
    # torchgeo/torchgeo-bench (v0.4.0 / its config): 224 px bilinear, per-band z-score, logreg over 40 C values
    # 1e-6..1e4 on raw features chosen on val (accuracy / micro mAP; ties -> smallest C) then refit on train+val;
    # kNN k=5, Euclidean, uniform votes, train only; 200 bootstrap resamples of the test rows (seed 0); rows for
    # all bands and for RGB (B04, B03, B02).
    'torchgeo-bench': ProbeProtocol(
        'torchgeo-bench',
        args=dict(image_size=224, norm='dataset-zscore', knn_k=5, n_boot=200, label_fractions=[1.0], seeds=[0],
                  classifiers=['logreg', 'knn'], l2_grid=None),
        c_grid=tuple(float(c) for c in np.logspace(-6, 4, 40)), standardize=False, select_metric_multilabel='map_micro',
        tie_break='smallest_c', knn_metric='l2', knn_bank='train', band_sets=(('all', None), ('rgb', ('B04', 'B03', 'B02'))),
        note='protocol torchgeo-bench: its classifiers, C grid, kNN and bootstrap; differences: the z-score uses '
             'train-split statistics (torchgeo-bench: each dataset\'s declared band statistics), the logistic '
             'regression runs to convergence in float64 on CPU (torchgeo-bench: L-BFGS capped at 2000/4000 iterations, '
             'TF32 on GPU); its published tables use GEO-Bench m-eurosat / m-bigearthnet, not this dataset'),
}


# ----------------------------------------------------------------------------------------------- CLI


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {v!r}') from None
    if n < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {v!r}')
    return n


def _non_negative_int(v: str) -> int:
    n = int(v) if v.lstrip('-').isdigit() else -1
    if n < 0:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {v!r}')
    return n


def _fraction(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number in (0, 1], got {v!r}') from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f'label fractions must be in (0, 1], got {v!r}')
    return f


def _csv_list(v: str) -> Tuple[str, ...]:
    items = tuple(x.strip() for x in v.split(',') if x.strip())
    if not items:
        raise argparse.ArgumentTypeError(f'expected a comma-separated list, got {v!r}')
    return items


def add_probe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``eobackbones probe`` (also used by ``benchmarks/linear_probe.py``)."""
    g = parser.add_argument_group('model')
    g.add_argument('--model', nargs='+', required=True, metavar='NAME',
                   help='model name(s): arch, arch.tag, local-dir:PATH or hf-hub:ORG/REPO; several names make a sweep')
    g.add_argument('--pretrained', default=None, metavar='TAG|none',
                   help='weights tag (default: the tag in the name, else the default tag); "none": random-init and '
                        'baseline only')
    g.add_argument('--init-seed', type=int, default=0, help='seed of the random-init reference weights')
    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default='bigearthnet-mini', choices=list_datasets(),
                   help='default: the embedded real BigEarthNet-mini (offline)')
    g.add_argument('--root', default=None, help='dataset root (torchgeo root, or the folder of --dataset folder)')
    g.add_argument('--download', action='store_true', help='let torchgeo download the dataset (never implicit)')
    g.add_argument('--bands', nargs='+', default=None, help='band names of --dataset folder files, in channel order')
    g.add_argument('--unit', default=None, help='unit of --dataset folder values (default reflectance_1e4)')
    g.add_argument('--folder-modality', default=None, help='modality key of --dataset folder data (default s2)')
    g.add_argument('--max-per-split', type=_positive_int, default=None, help='seeded subset of torchgeo splits')
    g.add_argument('--nan', default='drop', choices=('drop', 'fill', 'error'),
                   help='NaN pixels: drop the samples (default), fill (statistics over valid pixels, 0 after '
                        'normalisation), or error; counted in the report')
    g.add_argument('--strict', action='store_true', help='unreadable files are fatal (default: reported and skipped)')
    g = parser.add_argument_group('inputs')
    g.add_argument('--norm', default='auto', choices=NORM_CHOICES,
                   help="auto: the weights' own normalisation where the data's unit matches the spec's, else a "
                        'train-split z-score (recorded); model-native: refuse a unit mismatch; dataset-zscore: always')
    g.add_argument('--missing-bands', default='error', choices=MISSING_CHOICES,
                   help='a band the model needs and the data lacks: error; zeros (fixed-band models, filled after '
                        'normalisation); drop-model-bands (wavelength-conditioned models only)')
    g.add_argument('--image-size', type=_positive_int, default=None,
                   help='resize inputs to this size (default: native data size, or the model size when it requires one)')
    g.add_argument('--modalities', type=_csv_list, default=None, metavar='M1,M2',
                   help='data modalities to feed (default: every one the model takes and the data has), e.g. s2 or s1,s2')
    g.add_argument('--modality-subsets', default='none', choices=('none', 'all'),
                   help='all: probe multimodal models once per non-empty subset of their modalities (own rows)')
    g = parser.add_argument_group('probe')
    g.add_argument('--task', default='auto', choices=('auto', 'classification', 'segmentation'),
                   help='auto: the dataset\'s task')
    g.add_argument('--protocol', default='eobackbones', choices=('eobackbones', 'torchgeo-bench'),
                   help='torchgeo-bench: that benchmark\'s linear-probe protocol (see the README)')
    g.add_argument('--label-fractions', nargs='+', type=_fraction, default=[0.1, 1.0])
    g.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    g.add_argument('--classifiers', nargs='+', default=['logreg', 'knn'], choices=('logreg', 'knn'))
    g.add_argument('--l2-grid', nargs='+', type=float, default=None,
                   help='L2 strengths swept on val for the logistic regression (default 1e-6 .. 10, x10 steps)')
    g.add_argument('--knn-k', type=_positive_int, default=20)
    g.add_argument('--n-boot', type=_non_negative_int, default=1000, help='bootstrap resamples for the 95%% CIs')
    g = parser.add_argument_group('run')
    g.add_argument('--out', default=None, help='directory for linear_probe.{json,csv,md} (and .png with --plot)')
    g.add_argument('--plot', action='store_true', help='write a PNG of score vs label fraction (needs matplotlib)')
    g.add_argument('--batch-size', type=_positive_int, default=64)
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    g.add_argument('--amp', default='auto', choices=('auto', 'bf16', 'fp16', 'fp32'),
                   help='autocast dtype; auto = bf16 where the device computes it natively (Ampere+ GPUs, CPUs with '
                        'AMX or AVX512-BF16), else fp32')
    g.add_argument('--cache-dir', default=None, help='feature cache (default EOBACKBONES_HOME/features)')
    g.add_argument('--no-cache', action='store_true', help='do not read or write the feature cache')
    g.add_argument('--quiet', action='store_true', help='no progress bars, no table on stdout')
    return parser


def _data_request(args: argparse.Namespace, modalities: Sequence[str] = ('s2',)) -> DataRequest:
    return DataRequest(modalities=tuple(modalities), root=args.root, bands=tuple(args.bands) if args.bands else None,
                       unit=args.unit, folder_modality=args.folder_modality, download=args.download,
                       max_per_split=args.max_per_split, strict=args.strict)


def validate_probe_args(args: argparse.Namespace) -> None:
    """Option checks argparse cannot express, before any work (one line each)."""
    if getattr(args, '_validated', False):
        return
    check_request(args.dataset, _data_request(args))
    if args.plot and not args.out:
        raise ValueError('--plot needs --out DIR to write the PNG into')
    if args.device != 'auto':
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f'--device {args.device!r}: expected auto, cpu, cuda or cuda:N') from None
        if dev.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'--device {args.device}: CUDA is not available on this machine')
    if args.l2_grid and any(v < 0 for v in args.l2_grid):
        raise ValueError(f'--l2-grid values must be >= 0, got {args.l2_grid}')
    adapter = DATASETS[args.dataset]
    if args.task not in ('auto', adapter.task):
        raise ValueError(f'--task {args.task}: --dataset {args.dataset} is a {adapter.task} dataset')
    if args.modalities and not set(args.modalities) <= set(adapter.modalities):
        raise ValueError(f'--modalities {",".join(args.modalities)}: --dataset {args.dataset} has '
                         f'{", ".join(adapter.modalities)}')
    if args.protocol == 'torchgeo-bench' and adapter.task != 'classification':
        raise ValueError('--protocol torchgeo-bench is a classification protocol')
    if args.plot:
        require_matplotlib()
    args._validated = True


def main_probe(args: argparse.Namespace) -> int:
    """Run the probe and print the Markdown table; user errors become one line on stderr and exit code 2."""
    try:
        validate_probe_args(args)
        result = run_probe(args)
    except (EOBackbonesError, ValueError, FileNotFoundError, ImportError, KeyError) as e:
        print(f'error: {first_line(e)}', file=sys.stderr)
        return 2
    if result is not None and not getattr(args, 'quiet', False):
        print(result['markdown'], end='')
    return 0


# ----------------------------------------------------------------------------------------------- classification


def _metrics_fn(multilabel: bool):
    return multilabel_metrics if multilabel else singlelabel_metrics


def _with_cis(y: np.ndarray, scores: np.ndarray, multilabel: bool, n_boot: int, seed: int = 0) -> Dict[str, float]:
    """Test metrics and their bootstrap 95% CIs (one metric pass per resample, shared by all metrics)."""
    fn = _metrics_fn(multilabel)
    out = dict(fn(y, scores))
    if n_boot <= 0 or len(y) < 2:
        return out
    names = primary_metrics(multilabel)
    memo: List[Dict[str, float]] = []
    for j, m in enumerate(names):
        calls = iter(range(n_boot))

        def metric(yt, st, m=m, j=j, calls=calls):
            i = next(calls)
            if j == 0:
                memo.append(fn(yt, st))
            return memo[i][m]
        lo, hi = bootstrap_ci(metric, y, scores, n_boot=n_boot, seed=seed)
        out[f'{m}_ci_lo'], out[f'{m}_ci_hi'] = lo, hi
    return out


def probe_features(
        feats: Dict[str, np.ndarray],
        data: Any,
        fractions: Sequence[float],
        seeds: Sequence[int],
        classifiers: Sequence[str] = ('logreg', 'knn'),
        knn_k: int = 20,
        n_boot: int = 1000,
        base: Optional[Dict[str, Any]] = None,
        l2_grid: Optional[Sequence[float]] = None,
        protocol: ProbeProtocol = PROTOCOLS['eobackbones'],
) -> List[Dict[str, Any]]:
    """Fit the probes on split features and score the test split once per (classifier, fraction, seed).

    Args:
        feats: split -> (n_split, D) features aligned with ``data.indices(split)``.
        data: the ProbeData (labels, splits).
        fractions: label fractions of train and val (1.0 = all labels, run once).
        seeds: seeds of the subsampling.
        classifiers: ``logreg`` and/or ``knn``.
        knn_k: neighbours of the kNN probe.
        n_boot: bootstrap resamples for the CIs (0 = none).
        base: fields copied into every row.
        l2_grid: L2 strengths swept on val (default ``DEFAULT_L2_GRID``).
        protocol: classifier settings (C grid, standardisation, kNN metric and memory bank).
    """
    grid = tuple(l2_grid) if l2_grid else DEFAULT_L2_GRID
    y = data.labels
    idx = {s: data.indices(s) for s in ('train', 'val', 'test')}
    pos = {s: {int(r): i for i, r in enumerate(idx[s])} for s in idx}
    k = data.num_classes
    rows = []
    for frac in fractions:
        for seed in (seeds[:1] if frac >= 1 else seeds):
            tr = np.asarray(_subsample(idx['train'], y, frac, seed))
            va = np.asarray(_subsample(idx['val'], y, frac, seed))
            x_tr = feats['train'][[pos['train'][int(r)] for r in tr]]
            x_va = feats['val'][[pos['val'][int(r)] for r in va]]
            x_te, y_te = feats['test'], y[idx['test']]
            for clf in classifiers:
                t0 = time.perf_counter()
                extra: Dict[str, Any] = {}
                if clf == 'logreg':
                    probe = fit_linear_probe(
                        x_tr, y[tr], x_va, y[va], data.multilabel, num_classes=k, grid=grid, c_grid=protocol.c_grid,
                        standardize=protocol.standardize, tie_break=protocol.tie_break,
                        select_metric=protocol.select_metric_multilabel if data.multilabel else None)
                    scores = probe.predict_scores(x_te)
                    extra['C' if protocol.c_grid is not None else 'l2'] = probe.chosen_l2
                else:
                    bank_x = x_tr if protocol.knn_bank == 'train' else np.concatenate([x_tr, x_va])
                    bank_y = y[tr] if protocol.knn_bank == 'train' else np.concatenate([y[tr], y[va]])
                    scores = knn_scores(bank_x, bank_y, x_te, k=knn_k, multilabel=data.multilabel, num_classes=k,
                                        metric=protocol.knn_metric)
                    extra['k'] = min(knn_k, len(bank_x))
                row = dict(base or {})
                row.update(classifier=clf, label_fraction=float(frac), seed=int(seed) if frac < 1 else None,
                           n_train=int(len(tr)), n_val=int(len(va)), n_test=int(len(y_te)), feature_dim=int(x_te.shape[1]))
                row.update(_with_cis(y_te, scores, data.multilabel, n_boot))
                row.update(extra, fit_seconds=round(time.perf_counter() - t0, 3))
                rows.append(row)
    return rows


def _subsample(indices: np.ndarray, labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    return subsample_labels(indices, labels, frac, seed)


# ----------------------------------------------------------------------------------------------- segmentation


def fit_segmentation_probe(
        feats: Dict[str, np.ndarray],
        masks: Dict[str, np.ndarray],
        num_classes: int,
        ignore_index: Optional[int] = None,
        wd_grid: Sequence[float] = (0.0, 1e-4, 1e-2),
        epochs: int = 200,
        lr: float = 0.05,
        seed: int = 0,
        device: str | torch.device = 'cpu',
        n_boot: int = 1000,
) -> Dict[str, Any]:
    """1x1-conv probe on the frozen maps of one level (``seg_feature_index``: the cfg's, else stride 16), trained
    with cross-entropy on logits upsampled to the masks.

    Features are standardised per channel with train statistics. Each weight decay of ``wd_grid`` is
    fit on train and scored on val (mIoU); the best is refit on train + val and scored once on test.
    Full-batch Adam, ``epochs`` steps, seeded.

    Args:
        feats: split -> (N, C, h, w) features.
        masks: split -> (N, H, W) int label maps.
        num_classes: number of classes.
        ignore_index: mask value excluded from loss and mIoU.

    Returns:
        dict(miou, miou_ci_lo, miou_ci_hi, weight_decay, val_scores, pred) with ``pred`` the (N, H, W) test prediction.
    """
    dev = torch.device(device)
    t = {s: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=dev) for s, v in feats.items()}
    m = {s: torch.as_tensor(np.asarray(v), dtype=torch.long, device=dev) for s, v in masks.items()}
    ign = -100 if ignore_index is None else ignore_index

    def fit(xs: torch.Tensor, ys: torch.Tensor, wd: float) -> LinearSegHead:
        # the probe's head is the package's linear segmentation head (heads.LinearSegHead): standardised features,
        # a 1x1 conv, logits upsampled to the masks
        head = LinearSegHead((xs.shape[1],), (1.0,), num_classes).to(dev)
        head.set_feature_stats(xs.mean((0, 2, 3)), xs.std((0, 2, 3), unbiased=False).clamp_min(1e-6))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.conv.weight.copy_(torch.randn(head.conv.weight.shape, generator=g) * 0.01)
            head.conv.bias.zero_()
        opt = torch.optim.AdamW(head.conv.parameters(), lr=lr, weight_decay=wd)
        for _ in range(epochs):
            opt.zero_grad()
            logits = F.interpolate(head(xs), size=ys.shape[-2:], mode='bilinear', align_corners=False)
            F.cross_entropy(logits, ys, ignore_index=ign).backward()
            opt.step()
        return head

    @torch.no_grad()
    def predict(head: LinearSegHead, xs: torch.Tensor, size) -> np.ndarray:
        z = F.interpolate(head(xs), size=size, mode='bilinear', align_corners=False)
        return z.argmax(1).cpu().numpy()

    val_scores = {}
    for wd in wd_grid:
        head = fit(t['train'], m['train'], wd)
        val_scores[wd] = miou(predict(head, t['val'], m['val'].shape[-2:]), masks['val'], num_classes, ignore_index)
    best = max(wd_grid, key=lambda w: (np.nan_to_num(val_scores[w], nan=-1.0), w))
    head = fit(torch.cat([t['train'], t['val']]), torch.cat([m['train'], m['val']]), best)
    pred = predict(head, t['test'], m['test'].shape[-2:])
    y_test = np.asarray(masks['test'])
    out = dict(miou=miou(pred, y_test, num_classes, ignore_index), weight_decay=best,
               val_scores={str(k): v for k, v in val_scores.items()}, pred=pred)
    if n_boot > 0 and len(y_test) > 1:
        lo, hi = bootstrap_ci(lambda a, b: miou(b, a, num_classes, ignore_index), y_test, pred, n_boot=n_boot)
        out['miou_ci_lo'], out['miou_ci_hi'] = lo, hi
    return out


def segmentation_probe(model: nn.Module, data: Any, masks: np.ndarray, num_classes: int, norm: str = 'model-native',
                       missing_bands: str = 'error', ignore_index: Optional[int] = None, batch_size: int = 64,
                       device: str = 'cpu', amp: Optional[torch.dtype] = None, cache: Optional[Dict[str, Any]] = None,
                       progress: bool = False, **fit_kwargs: Any) -> Dict[str, Any]:
    """Segmentation probe of ``model`` on ``data`` with per-pixel ``masks`` (N, H, W) aligned with its rows.

    There is no embedded segmentation dataset; the test builds a synthetic-label task on real images.
    """
    plan = plan_inputs(model, data, norm=norm, missing_bands=missing_bands)
    feats, ms = {}, {}
    for split in ('train', 'val', 'test'):
        rows = data.indices(split)
        c = None if cache is None else dict(cache, key=dict(cache['key'], split=split))
        feats[split] = extract_features(model, plan, data, rows, kind='map', batch_size=batch_size,
                                        device=torch.device(device), amp=amp, cache=c, progress=progress)
        ms[split] = masks[rows]
    out = fit_segmentation_probe(feats, ms, num_classes, ignore_index=ignore_index, device=device, **fit_kwargs)
    out['plan'] = plan.describe()
    out['feature_shape'] = list(feats['test'].shape[1:])
    return out


# ----------------------------------------------------------------------------------------------- the run


def _resolve(name: str, pretrained: Optional[str]) -> Tuple[ResolvedModel, Optional[str]]:
    """The package's one resolver, plus why the pretrained row is absent (None when it is there)."""
    if pretrained is not None and pretrained.lower() == 'none':
        r = resolve_model(name) if parse_model_name(name)[0] != 'registry' else resolve_model(name, pretrained=False)
        return dataclasses.replace(r, pretrained=False), '--pretrained none'
    try:
        return resolve_model(name, pretrained=pretrained or True), None
    except UnknownModelError as e:
        if 'no pretrained weights exist' not in str(e):
            raise
        return resolve_model(name, pretrained=False), first_line(e)


def build_for_data(resolved: ResolvedModel, pretrained: bool, data: Any, missing: str = 'error', init_seed: int = 0,
                   data_modalities: Optional[Sequence[str]] = None) -> Tuple[nn.Module, Dict[str, List[str]], List[str]]:
    """Create a probe model; wavelength-conditioned modalities are bound to the data's bands (``bands=``).

    Returns (model in eval mode, model default bands dropped because the data lacks them, notes).
    """
    spec_hint = resolved.cfg.input_spec if resolved.cfg is not None else None
    kwargs: Dict[str, Any] = {}
    dropped: Dict[str, List[str]] = {}
    notes = []
    avail = [m for m in (data_modalities or data.images) if m in data.images]
    free = [m for m in (spec_hint.modalities if spec_hint else ()) if m.any_bands]
    binding: Dict[str, List[str]] = {}
    for m in free:
        dm = data_modality_for(m, avail)
        if dm is None:
            raise UnknownModelError(f'{resolved.arch}: no data modality for {m.name!r} (sensor {m.sensor}); '
                                    f'data has {avail}')
        usable, unusable = usable_bands_for_any_band_model(m, data.bands[dm])
        lack = [b for b in m.bands if b not in data.bands[dm]]
        if lack:
            if missing == 'zeros':
                raise ValueError(f'--missing-bands zeros is not used for wavelength-conditioned {resolved.arch}: it '
                                 f'takes the data\'s bands directly; use --missing-bands drop-model-bands')
            if missing == 'error':
                raise UnknownBandError(
                    f'{resolved.arch} default bands {lack} are absent from {data.name} {dm}; pass --missing-bands '
                    f'drop-model-bands to run it on the data\'s bands {usable} (recorded in the results)')
            dropped[m.name] = lack
        if unusable:
            notes.append(f'data bands without a catalogue wavelength not used: {unusable}')
        binding[m.name] = list(usable)
    if binding:
        kwargs['bands'] = next(iter(binding.values())) if len(binding) == 1 else binding
    if pretrained:
        model = create_model(resolved.name, pretrained=True, **kwargs)
    else:
        torch.manual_seed(init_seed)
        model = create_model(resolved.arch, pretrained=False, pretrained_cfg=resolved.cfg, **kwargs)
    return model.eval(), dropped, notes


def _device(arg: str) -> torch.device:
    if arg == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        return torch.device('cpu')
    return torch.device(arg)


def _split_counts(data) -> Dict[str, int]:
    return {s: int((data.split == s).sum()) for s in ('train', 'val', 'test')}


def _protocol(args: argparse.Namespace) -> Tuple[argparse.Namespace, ProbeProtocol]:
    """The protocol of ``--protocol`` and the arguments with its fixed settings applied."""
    proto = PROTOCOLS[args.protocol]
    return argparse.Namespace(**dict(vars(args), **proto.args)), proto


def _subsets(spec: InputSpec, data: Any, args: argparse.Namespace) -> List[Optional[Tuple[str, ...]]]:
    """The data-modality sets to probe a model with: [None] (all it takes), or every non-empty subset."""
    avail = [m for m in (args.modalities or data.images) if m in data.images]
    if args.modality_subsets != 'all' or spec.input_format != 'dict':
        return [tuple(avail) if args.modalities else None]
    fed = [data_modality_for(m, avail) for m in spec.modalities]
    keys = [k for k in dict.fromkeys(fed) if k is not None]
    return [tuple(c) for n in range(1, len(keys) + 1) for c in itertools.combinations(keys, n)]


def _forward_kwargs(model: nn.Module) -> Dict[str, Any]:
    """Call arguments of every forward: the spec's defaults, then the cfg's ``feature_kwargs`` (recorded)."""
    spec = model.input_spec
    cfg = getattr(model, 'pretrained_cfg', None)
    out = dict(spec.call_defaults) if spec is not None else {}
    out.update(cfg.feature_kwargs if cfg is not None else {})
    return out


def _extract(model: nn.Module, plan: InputPlan, data: Any, args: argparse.Namespace, key: Dict[str, Any],
             kind: str, device: torch.device, amp: Optional[torch.dtype], cache_root: Optional[Path],
             desc: str) -> Tuple[Dict[str, np.ndarray], List[Dict[str, Any]]]:
    feats, stats = {}, []
    for split in ('train', 'val', 'test'):
        st: Dict[str, Any] = {}
        cache = None if cache_root is None else dict(dir=cache_root, key=dict(key, split=split))
        feats[split] = extract_features(model, plan, data, data.indices(split), kind=kind, batch_size=args.batch_size,
                                        device=device, amp=amp, cache=cache, progress=not args.quiet,
                                        desc=f'{desc} {split}', stats=st)
        stats.append(st)
    return feats, stats


def _fit(feats: Dict[str, np.ndarray], data: Any, args: argparse.Namespace, base: Dict[str, Any],
         classifiers: Sequence[str], device: torch.device) -> List[Dict[str, Any]]:
    """Rows of one feature set: classification probes, or the segmentation probe on maps."""
    if data.task == 'segmentation':
        masks = {s: data.masks[data.indices(s)] for s in ('train', 'val', 'test')}
        out = fit_segmentation_probe(feats, masks, data.num_classes, ignore_index=data.ignore_index,
                                     device=device, n_boot=args.n_boot, seed=args.seeds[0])
        row = dict(base, classifier='linear-seg', label_fraction=1.0, seed=None, n_train=int(len(masks['train'])),
                   n_val=int(len(masks['val'])), n_test=int(len(masks['test'])), feature_dim=int(feats['test'].shape[1]),
                   miou=out['miou'], weight_decay=out['weight_decay'])
        for k in ('miou_ci_lo', 'miou_ci_hi'):
            if k in out:
                row[k] = out[k]
        return [row]
    return probe_features(feats, data, args.label_fractions, args.seeds, classifiers, args.knn_k, args.n_boot, base,
                          args.l2_grid, PROTOCOLS[args.protocol])


def _baseline(data: Any, mods: Tuple[str, ...], args: argparse.Namespace, world: int,
              device: torch.device) -> List[Dict[str, Any]]:
    """Band statistics (classification) or raw bands per pixel (segmentation), with every requested classifier."""
    if data.task == 'segmentation':
        feats = {}
        for s in ('train', 'val', 'test'):
            x = np.concatenate([np.asarray(data.images[m][data.indices(s)], dtype=np.float32) for m in mods], axis=1)
            feats[s] = np.nan_to_num(x)
        norm = 'raw bands per pixel (the probe standardises)'
    else:
        feats = {s: np.concatenate([band_statistics_features(data.images[m][data.indices(s)]) for m in mods], axis=1)
                 for s in ('train', 'val', 'test')}
        # NaN rule "fill": statistics over valid pixels; a feature still undefined (an all-NaN image) takes the
        # train mean of that feature, i.e. 0 once the probe standardises
        fill = np.nan_to_num(np.nanmean(feats['train'], axis=0))
        feats = {s: np.where(np.isnan(v), fill, v).astype(np.float32) for s, v in feats.items()}
        norm = 'raw mean/std per band (the probe standardises)'
    bands = {m: list(data.bands[m]) for m in mods}
    base = dict(model=f'band-stats ({"+".join(mods)})', row='baseline', weights='-', dataset=data.name,
                modalities='+'.join(mods), norm=norm, missing_bands='-', bands=json.dumps(bands), filled_bands='{}',
                dropped_model_bands='{}', image_size='-', resized_from='', amp='-', device='cpu', world_size=world,
                nan=args.nan, feature_kwargs='{}')
    return _fit(feats, data, args, base, args.classifiers, device)


@dataclass
class _RunContext:
    """What every (model, row, modality subset) of one probe run shares."""
    args: argparse.Namespace
    proto: ProbeProtocol
    data: Any
    device: torch.device
    amp: Optional[torch.dtype]
    amp_reason: str
    cache_root: Optional[Path]
    kind: str
    world: int
    band_set: str


def _probe_one(ctx: _RunContext, resolved: ResolvedModel, row_name: str, pretrained: bool,
               subset: Optional[Tuple[str, ...]]) -> Tuple[Dict[str, Any], List[Dict[str, Any]], Tuple[str, ...]]:
    """Build, plan, extract and fit one row: (model info, result rows, data modalities fed)."""
    args, data = ctx.args, ctx.data
    weights = resolved.name if pretrained else f'seed {args.init_seed}'
    info = dict(model=resolved.arch, row=row_name, weights=weights, modalities='+'.join(subset) if subset else 'all',
                band_set=ctx.band_set)
    try:
        model, dropped, bnotes = build_for_data(resolved, pretrained, data, args.missing_bands, args.init_seed, subset)
    except LOAD_ERRORS as e:
        if not pretrained:
            raise
        return dict(info, status='absent', reason=first_line(e)), [], ()
    try:
        plan = plan_inputs(model, data, norm=args.norm, missing_bands=args.missing_bands, image_size=args.image_size,
                           model_name=resolved.arch, dropped_model_bands=dropped, data_modalities=subset,
                           nan=args.nan, forward_kwargs=_forward_kwargs(model))
    except MissingModalityError as e:
        if subset is None:
            raise
        return dict(info, status='absent', reason=first_line(e)), [], ()
    fed = tuple(dict.fromkeys(plan.modality_map.values()))
    key = dict(model=resolved.arch, weights=resolved.name if pretrained else f'random-init:{args.init_seed}',
               provenance=model.provenance.to_dict() if hasattr(model, 'provenance') else None,
               model_fp=model_fingerprint(model), dataset=data.name)
    model.to(ctx.device)
    feats, ext = _extract(model, plan, data, args, key, ctx.kind, ctx.device, ctx.amp, ctx.cache_root,
                          f'{resolved.arch} {row_name}')
    seg_index = seg_feature_index(model) if ctx.kind == 'map' else None
    del model
    pdesc = plan.describe()
    base = dict(model=resolved.arch, row=row_name, weights=weights, dataset=data.name, modalities='+'.join(fed),
                band_set=ctx.band_set,
                norm=plan.norm if plan.norm != 'mixed' else json.dumps(plan.norm_by_modality),
                missing_bands=args.missing_bands, bands=json.dumps(pdesc['model_bands']),
                filled_bands=json.dumps(pdesc['filled_bands']),
                dropped_model_bands=json.dumps(pdesc['dropped_model_bands']),
                image_size=f'{plan.image_size[0]}x{plan.image_size[1]}',
                resized_from=f'{plan.resized_from[0]}x{plan.resized_from[1]}' if plan.resized_from else '',
                amp=ctx.amp_reason.split(' ')[0], device=str(ctx.device), world_size=ctx.world, nan=args.nan,
                feature_kwargs=json.dumps(plan.forward_kwargs))
    info = dict(info, modalities='+'.join(fed), status='ok', plan=pdesc, notes=bnotes, extractions=len(ext),
                cache_hits=sum(bool(s.get('cache_hit')) for s in ext),
                extract_seconds=round(sum(s.get('seconds', 0.0) for s in ext), 3),
                cache_files=[s.get('cache_file') for s in ext], provenance=key['provenance'],
                seg_feature_index=seg_index)
    return info, _fit(feats, data, args, base, args.classifiers, ctx.device), fed


def run_probe(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Run the probe for ``args`` (from :func:`add_probe_args`); returns the result dict on rank 0, else None.

    Resolve every model -> load the data it needs -> per row (pretrained, random-init) and modality subset: build,
    plan the inputs, extract features -> fit the probes -> report. Writes ``linear_probe.{json,csv,md}`` (and
    ``.png`` with ``--plot``) into ``--out`` on rank 0.
    """
    validate_probe_args(args)
    args, proto = _protocol(args)
    rank, world, created = init_distributed(args.device)
    try:
        device = _device(args.device)
        amp, amp_reason = amp_dtype(device, args.amp)
        cache_root = None if args.no_cache else feature_cache_dir(args.cache_dir)
        adapter = DATASETS[args.dataset]
        kind = 'map' if adapter.task == 'segmentation' else 'pooled'
        datasets: Dict[Tuple[str, ...], Any] = {}
        nan_reports: Dict[Tuple[str, ...], Dict[str, Any]] = {}
        rows: List[Dict[str, Any]] = []
        models_info: List[Dict[str, Any]] = []
        notes: List[str] = []
        baselines_done = set()
        for name in args.model:
            resolved, absent_reason = _resolve(name, args.pretrained)
            spec_hint = resolved.cfg.input_spec if resolved.cfg is not None else None
            mods = needed_data_modalities(spec_hint, adapter.modalities) if spec_hint is not None else ('s2',)
            if args.modalities:
                mods = tuple(dict.fromkeys(tuple(args.modalities) + mods))
            if mods not in datasets:
                raw = load_dataset(args.dataset, _data_request(args, mods))
                datasets[mods], nan_reports[mods] = nan_policy(raw, 'drop' if args.nan == 'drop' else 'keep')
                datasets[mods].meta.setdefault('unreadable', raw.meta.get('unreadable', []))
                counts = _split_counts(datasets[mods])
                empty = [s for s, n in counts.items() if n == 0]
                if empty:
                    raise ValueError(f'{datasets[mods].name}: the {" and ".join(empty)} split{"s are" if len(empty) > 1 else " is"} '
                                     f'empty (train/val/test {counts["train"]}/{counts["val"]}/{counts["test"]}'
                                     f'{", after dropping NaN samples" if args.nan == "drop" else ""}); the probe needs '
                                     f'all three (more samples per class, or a dataset with an official split)')
            if absent_reason:
                models_info.append(dict(model=resolved.arch, row='pretrained', weights='-', status='absent',
                                        reason=absent_reason))
            for band_set, bs_bands in proto.band_sets:
                data = datasets[mods]
                if bs_bands is not None:
                    if 's2' not in data.images or not set(bs_bands) <= set(data.bands['s2']):
                        notes.append(f'band set {band_set} skipped: {data.name} has no s2 bands {list(bs_bands)}')
                        continue
                    data = data.restrict_bands('s2', bs_bands)
                ctx = _RunContext(args, proto, data, device, amp, amp_reason, cache_root, kind, world, band_set)
                variants = ([] if absent_reason else [('pretrained', True)]) + [('random-init', False)]
                used_mods: Tuple[str, ...] = ()
                for row_name, pre in variants:
                    for subset in _subsets(spec_hint, data, args) if spec_hint is not None else [None]:
                        info, new_rows, fed = _probe_one(ctx, resolved, row_name, pre, subset)
                        models_info.append(info)
                        if info['status'] == 'absent' and pre:
                            break  # no weights: no subset of them either
                        used_mods = tuple(dict.fromkeys(used_mods + fed))
                        if rank == 0:
                            rows += new_rows
                used_mods = used_mods or mods
                if (used_mods, band_set) not in baselines_done and rank == 0:
                    baselines_done.add((used_mods, band_set))
                    rows += [dict(r, band_set=band_set) for r in _baseline(data, used_mods, args, world, device)]
        if rank != 0:
            return None
        top = max(args.l2_grid) if args.l2_grid else max(DEFAULT_L2_GRID)
        edge = sorted({f"{r['model']} {r['row']}" for r in rows if r.get('l2') is not None and r['l2'] >= top})
        if edge:  # the classifier fell back to (nearly) the label priors: say so rather than let it pass as a score
            notes.append(f'L2 chosen at the top of the grid ({top:g}), i.e. almost no usable linear signal on the '
                         f'validation split, for: {", ".join(edge)}')
        if proto.note:
            notes.append(proto.note)
        first = next(iter(datasets.values()))
        nan_summary = '; '.join(
            f'{"+".join(m)}: ' + ', '.join(f'{s} {n}' for s, n in r['nan_samples'].items() if n) + f' ({args.nan})'
            for m, r in nan_reports.items() if any(r['nan_samples'].values())) or 'no NaN samples'
        result = dict(
            task=first.task, eobackbones=__version__, torch=torch.__version__, git_commit=git_commit(),
            created=time.strftime('%Y-%m-%dT%H:%M:%S%z'), command=' '.join(sys.argv),
            dataset=dict(name=first.name, multilabel=bool(first.multilabel), num_classes=int(first.num_classes),
                         label_names=list(first.label_names), n=_split_counts(first),
                         n_by_modalities={'+'.join(m): _split_counts(d) for m, d in datasets.items()},
                         units={'+'.join(m): d.units for m, d in datasets.items()},
                         nan_report={'+'.join(m): r for m, r in nan_reports.items()}, nan_summary=nan_summary,
                         unreadable=[list(u) for d in datasets.values() for u in d.meta.get('unreadable', [])],
                         notes=first.meta.get('notes', [])),
            settings=dict(norm=args.norm, missing_bands=args.missing_bands, nan=args.nan, amp=amp_reason,
                          device=str(device), world_size=world, label_fractions=list(args.label_fractions),
                          seeds=list(args.seeds), classifiers=list(args.classifiers), knn_k=args.knn_k,
                          n_boot=args.n_boot, l2_grid=list(args.l2_grid) if args.l2_grid else 'default 1e-6..10',
                          batch_size=args.batch_size, init_seed=args.init_seed, protocol=args.protocol,
                          modalities=list(args.modalities) if args.modalities else 'all',
                          modality_subsets=args.modality_subsets,
                          cache_dir=str(cache_root) if cache_root else None),
            models=models_info, rows=rows, notes=notes)
        result['markdown'] = to_markdown(result)
        if args.out:
            paths = write_report(result, args.out)
            result['files'] = {k: str(v) for k, v in paths.items()}
            if args.plot:
                result['files']['png'] = str(plot_report(result, Path(args.out) / 'linear_probe.png'))
        return result
    finally:
        if created:
            torch.distributed.destroy_process_group()

