#!/usr/bin/env python
"""Forward throughput of models x batch sizes x autocast dtypes -> JSON / CSV / Markdown.

    python benchmarks/throughput.py --models dofa_base dualsimclr_resnet50_s2 --batch-sizes 1 8 32 \
        --dtypes fp32 bf16 --device cuda --out benchmarks/results

Models are built with random init (weights do not change speed). Rows: eobackbones.bench.benchmark_model.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from eobackbones.bench import benchmark_model

COLS = ['model', 'batch', 'dtype', 'device', 'mode', 'image_size', 'img_per_s', 'latency_ms_p50', 'latency_ms_p90',
        'peak_mem_mb', 'iters', 'torch', 'git_commit']


def _fmt(v):
    if isinstance(v, float):
        return f'{v:.2f}'
    return '' if v is None else str(v)


def markdown(rows) -> str:
    head = ['model', 'batch', 'dtype', 'device', 'image', 'img/s', 'p50 ms', 'p90 ms', 'peak MB']
    keys = ['model', 'batch', 'dtype', 'device', 'image_size', 'img_per_s', 'latency_ms_p50', 'latency_ms_p90',
            'peak_mem_mb']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * 5 + '---:|' * 4]
    for r in rows:
        lines.append('| ' + ' | '.join(_fmt(r.get(k)) if 'error' not in r or k == 'model' else
                                        (r['error'] if k == 'dtype' else '') for k in keys) + ' |')
    return '\n'.join(lines) + '\n'


def write(rows, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{stem}.json').write_text(json.dumps(rows, indent=1) + '\n')
    with (out / f'{stem}.csv').open('w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=COLS + ['error'], extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
    (out / f'{stem}.md').write_text(markdown(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', required=True)
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8, 32])
    p.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16', 'fp16'])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--image-size', type=int, default=None, help='default: each model\'s native size')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--mode', default='forward', choices=['forward', 'features'])
    p.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results'))
    p.add_argument('--stem', default=None, help='file name stem (default throughput-<device>-<date>)')
    a = p.parse_args(argv)
    rows = []
    for m in a.models:
        for b in a.batch_sizes:
            for d in a.dtypes:
                try:
                    row = benchmark_model(m, batch_size=b, dtype=d, device=a.device, image_size=a.image_size,
                                          warmup=a.warmup, iters=a.iters, mode=a.mode)
                except (ValueError, RuntimeError) as e:  # e.g. fp16 on CPU, out of memory
                    row = dict(model=m, batch=b, dtype=d, device=a.device, error=str(e).splitlines()[0][:200])
                    if a.device.startswith('cuda'):
                        torch.cuda.empty_cache()
                rows.append(row)
                print(markdown([row]).splitlines()[-1], flush=True)
    stem = a.stem or f'throughput-{a.device.replace(":", "")}-{time.strftime("%Y%m%d")}'
    write(rows, Path(a.out), stem)
    print(markdown(rows), end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
