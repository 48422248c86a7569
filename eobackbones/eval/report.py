"""Probe results as JSON, CSV, a Markdown table and (optionally) a PNG plot."""
from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

__all__ = ['primary_metrics', 'to_markdown', 'write_report', 'plot_report', 'require_matplotlib']


def primary_metrics(multilabel: bool, task: str = 'classification') -> List[str]:
    if task == 'segmentation':
        return ['miou']
    return ['map_macro', 'map_micro', 'f1_macro', 'f1_micro'] if multilabel else ['accuracy', 'f1_macro']


_LABEL = {'map_macro': 'mAP macro', 'map_micro': 'mAP micro', 'f1_macro': 'F1@0.5 macro' , 'f1_micro': 'F1@0.5 micro',
          'accuracy': 'accuracy', 'miou': 'mIoU'}


def _fmt(v: Any, d: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return 'n/a'
    return f'{v:.{d}f}'


def _label(multilabel: bool, m: str) -> str:
    if m == 'f1_macro' and not multilabel:
        return 'F1 macro'
    return _LABEL.get(m, m)


def _group_rows(rows: Sequence[Dict[str, Any]]) -> 'OrderedDict[tuple, List[Dict[str, Any]]]':
    groups: 'OrderedDict[tuple, List[Dict[str, Any]]]' = OrderedDict()
    for r in rows:
        key = (r['model'], r['row'], r['weights'], r.get('modalities', ''), r.get('band_set', 'all'), r['classifier'],
               r['label_fraction'])
        groups.setdefault(key, []).append(r)
    return groups


def to_markdown(result: Dict[str, Any]) -> str:
    """The report as Markdown: a settings header, one table row per (model, row, classifier, fraction), notes.

    A cell is the test score; with one run it carries its bootstrap 95% CI, with several seeds it is
    ``mean ± sd`` over seeds (per-seed CIs are in the JSON/CSV).
    """
    ds = result['dataset']
    st = result['settings']
    multilabel = ds['multilabel']
    metrics = primary_metrics(multilabel, result.get('task', 'classification'))
    lines = [f"## Linear probe: {ds['name']} ({'multi-label' if multilabel else 'single-label'}, "
             f"{ds['num_classes']} classes)", '']
    lines.append(f"samples train/val/test: {ds['n']['train']}/{ds['n']['val']}/{ds['n']['test']}; "
                 f"NaN policy `{st['nan']}` ({ds.get('nan_summary', 'no NaN samples')}); "
                 f"unreadable files: {len(ds.get('unreadable', []))}")
    proto = st.get('protocol', 'eobackbones')
    if result.get('task', 'classification') == 'segmentation':
        clf = 'per-pixel linear head (1x1 conv) on the frozen feature map, upsampled to the label grid'
    elif proto == 'torchgeo-bench':
        clf = 'kNN k=5 Euclidean on train, logreg C swept on val (raw features) then refit on train+val'
    else:
        clf = f"kNN k={st['knn_k']} cosine, logreg L2 swept on val then refit on train+val"
    lines.append(f"protocol `{proto}`, norm `{st['norm']}`, missing bands `{st['missing_bands']}`, device "
                 f"{st['device']}, autocast {st['amp']}, world size {st['world_size']}, {clf}; label fractions "
                 f"subsample train and val")
    lines.append('')
    head = ['model', 'row', 'classifier', 'labels', 'n train', 'runs'] + [_label(multilabel, m) for m in metrics]
    lines.append('| ' + ' | '.join(head) + ' |')
    lines.append('|' + '|'.join(['---'] * 4 + ['---:'] * (len(head) - 4)) + '|')
    subsets = len({r.get('modalities', '') for r in result['rows'] if r['row'] != 'baseline'}) > 1
    for (model, row, weights, mods, band_set, clf, frac), rs in _group_rows(result['rows']).items():
        label = f'{row} ({weights})' if weights not in ('-', '') else row
        if subsets and row != 'baseline':
            label += f' [{mods}]'
        if band_set != 'all':
            label += f' {{{band_set}}}'
        cells = [model, label, clf, f'{frac:.0%}',
                 str(int(round(np.mean([r['n_train'] for r in rs])))), str(len(rs))]
        for m in metrics:
            vals = np.array([r.get(m, float('nan')) for r in rs], dtype=float)
            if len(rs) == 1:
                lo, hi = rs[0].get(f'{m}_ci_lo'), rs[0].get(f'{m}_ci_hi')
                ci = f' [{_fmt(lo)}, {_fmt(hi)}]' if lo is not None else ''
                cells.append(_fmt(vals[0]) + ci)
            else:
                cells.append(f'{_fmt(np.nanmean(vals))} ± {_fmt(np.nanstd(vals))}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    notes = list(result.get('notes', []))
    for m in result.get('models', []):
        if m.get('status') != 'ok':
            sub = f" [{m['modalities']}]" if m.get('modalities', 'all') != 'all' else ''
            notes.append(f"{m['model']} {m['row']}{sub} row absent: {m['reason']}")
    for m in result.get('models', []):
        if m.get('status') == 'ok' and m.get('plan'):
            p = m['plan']
            extra = []
            if p.get('filled_bands'):
                extra.append(f"zero-filled {p['filled_bands']}")
            if p.get('dropped_model_bands'):
                extra.append(f"dropped model bands {p['dropped_model_bands']}")
            if p.get('resized_from'):
                extra.append(f"resized {p['resized_from']} -> {p['image_size']}")
            bands = '; '.join(f'{k}: {",".join(v)}' for k, v in p['model_bands'].items())
            if p.get('norm_by_modality'):  # what --norm auto chose, per modality (never silent)
                extra.insert(0, 'norm ' + ', '.join(f'{k} {v}' for k, v in p['norm_by_modality'].items()))
            notes.append(f"{m['model']} {m['row']}: bands {bands}; image {p['image_size'][0]}x{p['image_size'][1]}"
                         + (f"; {'; '.join(extra)}" if extra else '')
                         + f"; features {'from cache' if m.get('cache_hits') == m.get('extractions') else 'extracted'}")
    if notes:
        lines += [''] + [f'- {n}' for n in notes]
    return '\n'.join(lines) + '\n'


def _csv_value(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return v


def write_report(result: Dict[str, Any], out_dir: str | Path, stem: str = 'linear_probe') -> Dict[str, Path]:
    """Write ``<stem>.json`` (everything), ``<stem>.csv`` (one line per run) and ``<stem>.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {'json': out / f'{stem}.json', 'csv': out / f'{stem}.csv', 'md': out / f'{stem}.md'}
    paths['json'].write_text(json.dumps(result, indent=1, default=_json_default) + '\n', encoding='utf-8')
    rows = result['rows']
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with paths['csv'].open('w', newline='', encoding='utf-8') as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in cols})
    paths['md'].write_text(to_markdown(result), encoding='utf-8')
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def require_matplotlib():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'eobackbones[plot]'") from None
    return plt


def plot_report(result: Dict[str, Any], path: str | Path) -> Path:
    """Score vs label fraction, one line per (model, row, classifier); error bars = sd over seeds."""
    plt = require_matplotlib()
    multilabel = result['dataset']['multilabel']
    metric = primary_metrics(multilabel, result.get('task', 'classification'))[0]
    series: 'OrderedDict[tuple, Dict[float, List[float]]]' = OrderedDict()
    for r in result['rows']:
        series.setdefault((r['model'], r['row'], r['classifier']), {}).setdefault(r['label_fraction'], []).append(r.get(metric))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (model, row, clf), pts in series.items():
        xs = sorted(pts)
        ys = [np.nanmean(pts[x]) for x in xs]
        es = [np.nanstd(pts[x]) for x in xs]
        style = '-' if row == 'pretrained' else ('--' if row == 'random-init' else ':')
        ax.errorbar(xs, ys, yerr=es, fmt='o' + style, capsize=3, label=f'{model} {row} {clf}' if row != 'baseline'
                    else f'band-stats baseline {clf}')
    ax.set_xscale('log')
    ax.set_xlabel('label fraction (train and val)')
    ax.set_ylabel(_label(multilabel, metric) + ' (test)')
    ax.set_title(f"{result['dataset']['name']}: linear / kNN probe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
