#!/usr/bin/env python
"""Feature-extraction throughput of the probe vs the model's plain forward at the same batch size.

The probe's path (numpy rows -> tensor -> band selection + normalisation -> resize -> autocast forward ->
pooled features -> CPU float32) is timed with ``eobackbones.eval.features.extract_features`` on the
embedded real data (cache off, repeated), the plain forward with ``eobackbones.bench.benchmark_model``
on ``example_input`` at the same image size, batch and autocast dtype. Target: extraction within 15%
of the plain forward (ratio >= 0.85).

    python benchmarks/probe_throughput.py --model dofa_base --batch-size 32 --image-size 224
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eobackbones.bench import benchmark_model, git_commit
from eobackbones.data import load_bigearthnet_mini, nan_policy
from eobackbones.eval.features import amp_dtype, extract_features, plan_inputs
from eobackbones.eval.linear_probe import build_for_data
from eobackbones.models import resolve_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--image-size', type=int, default=None, help='default: the data size (48) rounded to the model')
    p.add_argument('--dtype', default='auto', choices=['auto', 'fp32', 'bf16', 'fp16'])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=3, help='timed passes over the data (median taken)')
    p.add_argument('--norm', default='dataset-zscore', choices=['model-native', 'dataset-zscore'])
    p.add_argument('--missing-bands', default='zeros', choices=['error', 'zeros'],
                   help='fixed-band models: bands the embedded data lacks (B10) are zero-filled (speed is unaffected)')
    p.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results'))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    amp, why = amp_dtype(device, a.dtype)
    dtype = {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[amp]

    resolved = resolve_model(a.model, pretrained=False)
    arch, spec = resolved.arch, resolved.cfg.input_spec if resolved.cfg else None
    raw = load_bigearthnet_mini(('s2', 's1') if spec and 's1' in spec.modality_names else ('s2',))
    data, _ = nan_policy(raw, 'drop')
    model, _, _ = build_for_data(resolved, False, data, 'drop-model-bands', 0)
    model.to(device)
    plan = plan_inputs(model, data, norm=a.norm, missing_bands=a.missing_bands, image_size=a.image_size,
                       model_name=arch)
    # whole batches only (rows repeat): a 101-image set's partial last batch is a property of the data size,
    # not of the data path this benchmark is about
    n_batches = max(2, -(-len(data) // a.batch_size))
    rows = np.resize(np.arange(len(data)), n_batches * a.batch_size)
    extract_features(model, plan, data, rows[:a.batch_size], batch_size=a.batch_size, device=device, amp=amp,
                     progress=False)  # warm-up
    rates = []
    for _ in range(a.repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        extract_features(model, plan, data, rows, batch_size=a.batch_size, device=device, amp=amp, progress=False)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        rates.append(len(rows) / (time.perf_counter() - t0))
    probe_rate = statistics.median(rates)
    # plain forward: same model instance, same size, same batch, same autocast; enough iterations for the same images
    iters = max(3, a.repeats * -(-len(rows) // a.batch_size))
    fwd = benchmark_model(model, batch_size=a.batch_size, dtype=dtype, device=device, image_size=plan.image_size,
                          warmup=2, iters=iters, mode='forward')
    ratio = probe_rate / fwd['img_per_s']
    res = dict(model=arch, batch=a.batch_size, dtype=dtype, amp_reason=why, device=str(device),
               image_size=f'{plan.image_size[0]}x{plan.image_size[1]}', images=len(rows),
               probe_img_per_s=probe_rate, forward_img_per_s=fwd['img_per_s'], ratio=ratio,
               within_15pct=ratio >= 0.85, torch=torch.__version__, git_commit=git_commit())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f'probe_throughput-{arch}-b{a.batch_size}-{dtype}-{device.type}'
    (out / f'{stem}.json').write_text(json.dumps(res, indent=1) + '\n')
    line = (f'| {arch} | {a.batch_size} | {dtype} | {device} | {res["image_size"]} | {probe_rate:.1f} | '
            f'{fwd["img_per_s"]:.1f} | {ratio:.3f} | {"yes" if res["within_15pct"] else "NO"} |')
    md = ('| model | batch | dtype | device | image | probe img/s | forward img/s | ratio | within 15% |\n'
          '|---|---:|---|---|---|---:|---:|---:|---|\n' + line + '\n')
    (out / f'{stem}.md').write_text(md)
    print(md, end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
