"""Linear-probe benchmark on frozen features: ``eobackbones probe`` and ``benchmarks/linear_probe.py``.

For every model the report has, on the same samples and splits:

* ``pretrained``: the weights (default tag, or ``--pretrained TAG``), unless ``--pretrained none`` or the
  weights cannot be loaded (offline, manual-only); then the row is absent and the loader's one-line
  error says why;
* ``random-init``: the same architecture with seeded random weights (what the architecture alone gives);
* ``baseline``: per-band mean + std of the raw bands (``band_statistics_features``) with the same
  logistic regression (what no backbone gives).

Classifiers: logistic regression (``fit_linear_probe``: L2 swept on val, refit on train+val, test
touched once) and a cosine kNN (k=20, memory bank train+val). Label fractions subsample the labelled
train *and* val splits (``subsample_labels``, seeded); fraction 1 is deterministic and run once.
Metrics: accuracy / macro-F1 (single-label), macro / micro mAP and F1@0.5 (multi-label), each with a
bootstrap 95% CI over test samples.

Defaults for honest numbers: ``--norm model-native`` (the weights' own preprocessing from the input
spec) fails with one line when the data's unit differs from the weights' unit (e.g. DOFA's
``satlas_8bit`` vs Sentinel-2 reflectance) instead of converting silently; ``--norm dataset-zscore``
standardises each band with train-split statistics and is the explicit choice for such pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import (
    CheckpointFormatError, ChecksumMismatchError, EOBackbonesError, UnknownModelError, WeightsNotFoundError)
from .classifiers import DEFAULT_L2_GRID, band_statistics_features, fit_linear_probe, knn_scores
from .features import (
    MISSING_CHOICES, NORM_CHOICES, InputPlan, amp_dtype, data_modality_for, dist_info, extract_features,
    feature_cache_dir, init_distributed, model_fingerprint, needed_data_modalities, plan_inputs,
    usable_bands_for_any_band_model)
from .metrics import bootstrap_ci, miou, multilabel_metrics, singlelabel_metrics
from .report import plot_report, primary_metrics, require_matplotlib, to_markdown, write_report

__all__ = ['add_probe_args', 'main_probe', 'run_probe', 'probe_features', 'fit_segmentation_probe',
           'segmentation_probe', 'load_probe_dataset', 'DATASET_CHOICES']

DATASET_CHOICES = ('bigearthnet-mini', 'folder', 'eurosat', 'bigearthnet', 'bigearthnet-v2', 'so2sat')
# loader failures that leave the pretrained row absent (reported) instead of stopping the run
_LOAD_ERRORS = (WeightsNotFoundError, ChecksumMismatchError, CheckpointFormatError, OSError)


# ----------------------------------------------------------------------------------------------- CLI


def add_probe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``eobackbones probe`` (also used by ``benchmarks/linear_probe.py``)."""
    g = parser.add_argument_group('model')
    g.add_argument('--model', nargs='+', required=True, metavar='NAME',
                   help='model name(s) (arch or arch.tag); several names make a sweep')
    g.add_argument('--pretrained', default=None, metavar='TAG|none',
                   help='weights tag (default: the tag in the name, else the default tag); "none": random-init and baseline only')
    g.add_argument('--init-seed', type=int, default=0, help='seed of the random-init reference weights')
    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default='bigearthnet-mini', choices=DATASET_CHOICES,
                   help='default: the embedded real BigEarthNet-mini (offline)')
    g.add_argument('--root', default=None, help='dataset root (torchgeo root, or the folder of --dataset folder)')
    g.add_argument('--download', action='store_true', help='let torchgeo download the dataset (never implicit)')
    g.add_argument('--bands', nargs='+', default=None, help='band names of --dataset folder files, in channel order')
    g.add_argument('--unit', default='reflectance_1e4', help='unit of --dataset folder values')
    g.add_argument('--folder-modality', default='s2', help='modality key of --dataset folder data')
    g.add_argument('--max-per-split', type=int, default=None, help='seeded subset of torchgeo splits (quick runs)')
    g.add_argument('--nan', default='drop', choices=('drop', 'fill'), help='samples with NaN pixels: drop (default) or '
                   'fill with train-split band medians; counted in the report')
    g.add_argument('--strict', action='store_true', help='unreadable files are fatal (default: reported and skipped)')
    g = parser.add_argument_group('preprocessing')
    g.add_argument('--norm', default='model-native', choices=NORM_CHOICES,
                   help="model-native: the weights' own normalisation (errors on a unit mismatch); "
                        'dataset-zscore: per band, train-split statistics')
    g.add_argument('--missing-bands', default='error', choices=MISSING_CHOICES,
                   help='a band the model needs and the data lacks: error; zeros (fixed-band models, filled after '
                        'normalisation); drop-model-bands (wavelength-conditioned models only)')
    g.add_argument('--image-size', type=int, default=None, help='resize inputs to this size (default: native data '
                   'size, or the model size when it requires one)')
    g = parser.add_argument_group('probe')
    g.add_argument('--label-fractions', nargs='+', type=float, default=[0.1, 1.0])
    g.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    g.add_argument('--classifiers', nargs='+', default=['logreg', 'knn'], choices=('logreg', 'knn'))
    g.add_argument('--l2-grid', nargs='+', type=float, default=None,
                   help='L2 strengths swept on val for the logistic regression (default 1e-6 .. 10, x10 steps)')
    g.add_argument('--knn-k', type=int, default=20)
    g.add_argument('--n-boot', type=int, default=1000, help='bootstrap resamples for the 95%% CIs')
    g = parser.add_argument_group('run')
    g.add_argument('--out', default=None, help='directory for linear_probe.{json,csv,md} (and .png with --plot)')
    g.add_argument('--plot', action='store_true', help='write a PNG of score vs label fraction (needs matplotlib)')
    g.add_argument('--batch-size', type=int, default=64)
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    g.add_argument('--amp', default='auto', choices=('auto', 'bf16', 'fp16', 'fp32'),
                   help='autocast dtype; auto = bf16 on CUDA with bf16 or on CPUs with native bf16 (AMX, AVX512-BF16), else fp32')
    g.add_argument('--cache-dir', default=None, help='feature cache (default EOBACKBONES_HOME/features)')
    g.add_argument('--no-cache', action='store_true', help='do not read or write the feature cache')
    g.add_argument('--quiet', action='store_true', help='no progress bars, no table on stdout')
    return parser


def main_probe(args: argparse.Namespace) -> int:
    """Run the probe and print the Markdown table; user errors become one line on stderr and exit code 2."""
    try:
        result = run_probe(args)
    except (EOBackbonesError, ValueError, FileNotFoundError, ImportError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f'error: {msg}', file=sys.stderr)
        return 2
    if result is not None and not getattr(args, 'quiet', False):
        print(result['markdown'], end='')
    return 0


# ----------------------------------------------------------------------------------------------- data


def load_probe_dataset(args: argparse.Namespace, modalities: Sequence[str]):
    """The ProbeData for ``--dataset`` with the modalities a model needs."""
    from ..data import datasets as D
    name = args.dataset or 'bigearthnet-mini'
    if name == 'bigearthnet-mini':
        mods = tuple(m for m in ('s2', 's1') if m in modalities) or ('s2',)
        return D.load_bigearthnet_mini(mods)
    if args.root is None:
        raise ValueError(f'--dataset {name} needs --root DIR')
    if name == 'folder':
        if not args.bands:
            raise ValueError('--dataset folder needs --bands NAME ... (band names in the files\' channel order)')
        return D.load_folder(args.root, bands=args.bands, modality=args.folder_modality, unit=args.unit,
                             strict=args.strict)
    from .datasets_torchgeo import load_torchgeo
    return load_torchgeo(name, args.root, modalities=tuple(m for m in ('s2', 's1') if m in modalities),
                         download=args.download, strict=args.strict, max_per_split=args.max_per_split)


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
    """
    from .classifiers import DEFAULT_L2_GRID
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
                    probe = fit_linear_probe(x_tr, y[tr], x_va, y[va], data.multilabel, num_classes=k, grid=grid)
                    scores = probe.predict_scores(x_te)
                    extra['l2'] = probe.chosen_l2
                else:
                    scores = knn_scores(np.concatenate([x_tr, x_va]), np.concatenate([y[tr], y[va]]), x_te,
                                        k=knn_k, multilabel=data.multilabel, num_classes=k)
                    extra['k'] = min(knn_k, len(tr) + len(va))
                row = dict(base or {})
                row.update(classifier=clf, label_fraction=float(frac), seed=int(seed) if frac < 1 else None,
                           n_train=int(len(tr)), n_val=int(len(va)), n_test=int(len(y_te)), feature_dim=int(x_te.shape[1]))
                row.update(_with_cis(y_te, scores, data.multilabel, n_boot))
                row.update(extra, fit_seconds=round(time.perf_counter() - t0, 3))
                rows.append(row)
    return rows


def _subsample(indices: np.ndarray, labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    from ..data.datasets import subsample_labels
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
    """1x1-conv probe on frozen stride-16 maps, trained with cross-entropy on logits upsampled to the masks.

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

    def fit(xs: torch.Tensor, ys: torch.Tensor, wd: float) -> Tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
        mean = xs.mean((0, 2, 3), keepdim=True)
        std = xs.std((0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-6)
        g = torch.Generator().manual_seed(seed)
        conv = nn.Conv2d(xs.shape[1], num_classes, 1).to(dev)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.01)
            conv.bias.zero_()
        opt = torch.optim.AdamW(conv.parameters(), lr=lr, weight_decay=wd)
        xn = (xs - mean) / std
        for _ in range(epochs):
            opt.zero_grad()
            logits = F.interpolate(conv(xn), size=ys.shape[-2:], mode='bilinear', align_corners=False)
            F.cross_entropy(logits, ys, ignore_index=ign).backward()
            opt.step()
        return conv, mean, std

    @torch.no_grad()
    def predict(conv, mean, std, xs, size) -> np.ndarray:
        z = F.interpolate(conv((xs - mean) / std), size=size, mode='bilinear', align_corners=False)
        return z.argmax(1).cpu().numpy()

    val_scores = {}
    for wd in wd_grid:
        conv, mu, sd = fit(t['train'], m['train'], wd)
        val_scores[wd] = miou(predict(conv, mu, sd, t['val'], m['val'].shape[-2:]), masks['val'], num_classes, ignore_index)
    best = max(wd_grid, key=lambda w: (np.nan_to_num(val_scores[w], nan=-1.0), w))
    conv, mu, sd = fit(torch.cat([t['train'], t['val']]), torch.cat([m['train'], m['val']]), best)
    pred = predict(conv, mu, sd, t['test'], m['test'].shape[-2:])
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


def _git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else '') or type(e).__name__


def _resolve(name: str, pretrained: Optional[str]):
    """(arch, tag or None, cfg for the spec, reason the pretrained row is absent or None)."""
    from ..models import get_pretrained_cfg, model_entrypoint, split_model_name_tag
    from ..models._factory import parse_model_name, read_model_dir
    from ..models._registry import _ensure_manifest, default_tag, get_arch_cfg
    _ensure_manifest()
    if parse_model_name(name)[0] != 'registry':  # a save_pretrained directory: its weights are the pretrained row
        import dataclasses
        from ..spec import InputSpec
        conf, _, _ = read_model_dir(name)
        arch = conf['architecture']
        cfg = get_pretrained_cfg(arch)
        if conf.get('input_spec'):
            cfg = dataclasses.replace(cfg, input_spec=InputSpec.from_dict(conf['input_spec']))
        if pretrained is not None and pretrained.lower() == 'none':
            return arch, None, cfg, '--pretrained none'
        return arch, name, cfg, None
    arch, tag = split_model_name_tag(name)
    model_entrypoint(arch)  # unknown names fail here, with close matches
    if pretrained is not None and pretrained.lower() == 'none':
        return arch, None, get_pretrained_cfg(f'{arch}.{tag}' if tag else arch), '--pretrained none'
    if pretrained:
        if tag and tag != pretrained:
            raise UnknownModelError(f'conflicting tags: name {name!r} and --pretrained {pretrained!r}')
        tag = pretrained
    if tag:
        return arch, tag, get_pretrained_cfg(f'{arch}.{tag}'), None
    tag = default_tag(arch)
    if tag is None:
        note = getattr(get_arch_cfg(arch), 'notes', '') or ''
        return arch, None, get_pretrained_cfg(arch), f'no published weights for {arch}' + (f': {note}' if note else '')
    return arch, tag, get_pretrained_cfg(f'{arch}.{tag}'), None


def _build(arch: str, tag: Optional[str], pretrained: bool, data: Any, spec_hint, missing: str, init_seed: int):
    """Create a model; wavelength-conditioned models are bound to the data's bands (``bands=``)."""
    from ..models import create_model
    kwargs: Dict[str, Any] = {}
    dropped: Dict[str, List[str]] = {}
    notes = []
    if spec_hint is not None and spec_hint.any_bands:
        m = spec_hint.modalities[0]
        dm = data_modality_for(m, list(data.images))
        if dm is None:
            raise UnknownModelError(f'{arch}: no data modality for {m.name!r} (sensor {m.sensor}); data has {list(data.images)}')
        usable, unusable = usable_bands_for_any_band_model(m, data.bands[dm])
        lack = [b for b in m.bands if b not in data.bands[dm]]
        if lack:
            if missing == 'zeros':
                raise ValueError(f'--missing-bands zeros is not used for wavelength-conditioned {arch}: it takes the data\'s '
                                 f'bands directly; its default bands {lack} are absent, use --missing-bands drop-model-bands')
            if missing == 'error':
                from ..errors import UnknownBandError
                raise UnknownBandError(
                    f'{arch} default bands {lack} are absent from {data.name} {dm}; pass --missing-bands drop-model-bands '
                    f'to run it on the data\'s bands {usable} (recorded in the results)')
            dropped[m.name] = lack
        if unusable:
            notes.append(f'data bands without a catalogue wavelength not used: {unusable}')
        kwargs['bands'] = list(usable)
    name = tag if tag and ':' in tag else (f'{arch}.{tag}' if tag else arch)  # tag may be a dir source
    if pretrained:
        model = create_model(name, pretrained=True, **kwargs)
    else:
        torch.manual_seed(init_seed)
        model = create_model(name, pretrained=False, **kwargs)
    return model.eval(), dropped, notes


def _device(arg: str) -> torch.device:
    if arg == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        return torch.device('cpu')
    return torch.device(arg)


def _split_counts(data) -> Dict[str, int]:
    return {s: int((data.split == s).sum()) for s in ('train', 'val', 'test')}


def run_probe(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Run the probe for ``args`` (from :func:`add_probe_args`); returns the result dict on rank 0, else None.

    Writes ``linear_probe.{json,csv,md}`` (and ``.png`` with ``--plot``) into ``--out`` on rank 0.
    """
    from ..data.datasets import nan_policy
    from .. import __version__
    if args.plot:
        if not args.out:
            raise ValueError('--plot needs --out DIR to write the PNG into')
        require_matplotlib()
    for f in args.label_fractions:
        if not 0 < f <= 1:
            raise ValueError(f'--label-fractions must be in (0, 1], got {f}')
    rank, world, created = init_distributed(args.device)
    try:
        device = _device(args.device)
        amp, amp_reason = amp_dtype(device, args.amp)
        cache_root = None if args.no_cache else feature_cache_dir(args.cache_dir)
        progress = not args.quiet
        datasets: Dict[Tuple[str, ...], Any] = {}
        nan_reports: Dict[Tuple[str, ...], Dict[str, Any]] = {}
        rows: List[Dict[str, Any]] = []
        models_info: List[Dict[str, Any]] = []
        notes: List[str] = []
        baselines_done = set()
        data = None
        for name in args.model:
            arch, tag, cfg, absent_reason = _resolve(name, args.pretrained)
            spec_hint = cfg.input_spec if cfg is not None else None
            mods = needed_data_modalities(spec_hint) if spec_hint is not None else ('s2',)
            if mods not in datasets:
                raw = load_probe_dataset(args, mods)
                datasets[mods], nan_reports[mods] = nan_policy(raw, args.nan)
                datasets[mods].meta.setdefault('unreadable', raw.meta.get('unreadable', []))
            data = datasets[mods]
            variants = [] if absent_reason else [('pretrained', True)]
            if absent_reason:
                models_info.append(dict(model=arch, row='pretrained', weights=tag or '-', status='absent',
                                        reason=absent_reason))
            variants.append(('random-init', False))
            used_mods: Tuple[str, ...] = ()
            for row_name, pre in variants:
                weights = tag if pre else f'seed {args.init_seed}'
                info = dict(model=arch, row=row_name, weights=weights)
                try:
                    model, dropped, bnotes = _build(arch, tag, pre, data, spec_hint, args.missing_bands, args.init_seed)
                except _LOAD_ERRORS as e:
                    if not pre:
                        raise
                    models_info.append(dict(info, status='absent', reason=_one_line(e)))
                    continue
                plan = plan_inputs(model, data, norm=args.norm, missing_bands=args.missing_bands,
                                   image_size=args.image_size, model_name=arch, dropped_model_bands=dropped)
                used_mods = tuple(plan.modality_map.values())
                wcfg = getattr(model, 'pretrained_cfg', None)
                digest = getattr(getattr(wcfg, 'source', None), 'digest', None) if pre else None
                key = dict(model=arch, weights=(wcfg.name if pre and wcfg else f'random-init:{args.init_seed}'),
                           digest=digest, model_fp=model_fingerprint(model), dataset=data.name)
                feats, ext = {}, []
                model.to(device)
                for split in ('train', 'val', 'test'):
                    st: Dict[str, Any] = {}
                    cache = None if cache_root is None else dict(dir=cache_root, key=dict(key, split=split))
                    feats[split] = extract_features(model, plan, data, data.indices(split), kind='pooled',
                                                    batch_size=args.batch_size, device=device, amp=amp, cache=cache,
                                                    progress=progress, desc=f'{arch} {row_name} {split}', stats=st)
                    ext.append(st)
                del model
                pdesc = plan.describe()
                base = dict(model=arch, row=row_name, weights=weights, dataset=data.name, norm=args.norm,
                            missing_bands=args.missing_bands, bands=json.dumps(pdesc['model_bands']),
                            filled_bands=json.dumps(pdesc['filled_bands']),
                            dropped_model_bands=json.dumps(pdesc['dropped_model_bands']),
                            image_size=f'{plan.image_size[0]}x{plan.image_size[1]}',
                            resized_from=(f'{plan.resized_from[0]}x{plan.resized_from[1]}' if plan.resized_from else ''),
                            amp=amp_reason.split(' ')[0], device=str(device), world_size=world, nan=args.nan)
                models_info.append(dict(info, status='ok', plan=pdesc, notes=bnotes,
                                        extractions=len(ext), cache_hits=sum(bool(s.get('cache_hit')) for s in ext),
                                        extract_seconds=round(sum(s.get('seconds', 0.0) for s in ext), 3),
                                        cache_files=[s.get('cache_file') for s in ext]))
                if rank == 0:
                    rows += probe_features(feats, data, args.label_fractions, args.seeds, args.classifiers,
                                           args.knn_k, args.n_boot, base, args.l2_grid)
            used_mods = used_mods or mods
            if used_mods not in baselines_done and rank == 0:
                baselines_done.add(used_mods)
                feats = {s: np.concatenate([band_statistics_features(data.images[m][data.indices(s)])
                                            for m in used_mods], axis=1) for s in ('train', 'val', 'test')}
                bands = {m: list(data.bands[m]) for m in used_mods}
                base = dict(model=f'band-stats ({"+".join(used_mods)})', row='baseline', weights='-',
                            dataset=data.name, norm='raw mean/std per band (probe standardises)',
                            missing_bands='-', bands=json.dumps(bands), filled_bands='{}', dropped_model_bands='{}',
                            image_size='-', resized_from='', amp='-', device='cpu', world_size=world, nan=args.nan)
                rows += probe_features(feats, data, args.label_fractions, args.seeds, ['logreg'], args.knn_k,
                                       args.n_boot, base, args.l2_grid)
        if rank != 0:
            return None
        top = max(args.l2_grid) if args.l2_grid else max(DEFAULT_L2_GRID)
        edge = sorted({f"{r['model']} {r['row']}" for r in rows if r.get('l2') is not None and r['l2'] >= top})
        if edge:  # the classifier fell back to (nearly) the label priors: say so rather than let it pass as a score
            notes.append(f'L2 chosen at the top of the grid ({top:g}), i.e. almost no usable linear signal on the '
                         f'validation split, for: {", ".join(edge)}')
        first = next(iter(datasets.values()))
        nan_summary = '; '.join(
            f'{"+".join(m)}: ' + ', '.join(f'{s} {n}' for s, n in r['nan_samples'].items() if n) + f' ({r["policy"]})'
            for m, r in nan_reports.items() if any(r['nan_samples'].values())) or 'no NaN samples'
        result = dict(
            task='classification', eobackbones=__version__, torch=torch.__version__, git_commit=_git_commit(),
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
                          batch_size=args.batch_size, init_seed=args.init_seed,
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
