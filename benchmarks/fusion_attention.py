"""Zorro masked self-attention of the fusion-token ViT: per-modality + fusion-to-all SDPA vs one dense masked SDPA.

    python benchmarks/fusion_attention.py [--repeats 3] [--batch 2] [--threads 1] [--no-memory] [--device cpu]

The sequence is ``[M modalities x N tokens, N fusion tokens]`` (N = (px / 16)^2); modality tokens attend within
their own modality, fusion tokens to everything. Paths, timed interleaved (round-robin, so machine load hits
both alike; median per path):

  dense      ``F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)`` with the (L, L) boolean Zorro mask
             (built once, outside the timing): what a straightforward port runs
  efficient  ``eobackbones.models.fusion_vit.zorro_attention``: one SDPA over the M modality blocks (batched) plus
             one fusion-to-all SDPA, no mask

Both forward (``torch.inference_mode``) and forward + backward (training) are timed. Peak memory: each path runs
in a fresh subprocess; the peak resident set (VmHWM) is reset through ``/proc/self/clear_refs`` after the inputs
exist, so the number is the growth caused by the attention call itself (plus the mask for ``dense``, counted
because that path needs it). Settings: M = 2, 3, 4 modalities, 256 and 512 px, tiny (3 heads) and base
(12 heads) widths, head dim 64, batch 2, one thread by default (``--threads 2 --tag threads2`` for two).
``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here: with spinning OpenMP workers, two threads on the project's
shared 2-core machine stall whenever another process holds a core, and small ops (fills, copies, many short
kernels) then measure the scheduler, not the code (e.g. efficient tiny / 256 px / 3 modalities: 61 ms spinning,
12 ms passive, 7 ms on one thread). Writes ``benchmarks/results/fusion_attention[-TAG].{json,md}``.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Read by the OpenMP runtime when torch loads. Spinning worker threads (the default) stall whenever another
# process holds a core, which on a shared machine turns every small op into scheduling noise; passive waiting
# measures the kernels. Set OMP_WAIT_POLICY yourself to measure something else.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402
import torch.nn.functional as F

from eobackbones._io import git_commit
from eobackbones.models.fusion_vit import zorro_attention

WIDTHS = {'tiny': 3, 'base': 12}  # heads of 64


def make_inputs(m: int, px: int, heads: int, batch: int, device: str, grad: bool = False):
    n = (px // 16) ** 2
    lengths = (n,) * m
    g = torch.Generator(device='cpu').manual_seed(0)
    shape = (batch, heads, (m + 1) * n, 64)
    q, k, v = (torch.randn(shape, generator=g).to(device).requires_grad_(grad) for _ in range(3))
    return q, k, v, lengths


def zorro_mask(lengths, n_fusion: int, device: str) -> torch.Tensor:
    types = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((n_fusion,), -1)])
    return ((types[:, None] == types[None, :]) | (types[:, None] == -1)).to(device)


def dense(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def efficient(q, k, v, lengths):
    return zorro_attention(q, k, v, lengths)


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_setting(m: int, px: int, heads: int, batch: int, repeats: int, device: str) -> dict:
    q, k, v, lengths = make_inputs(m, px, heads, batch, device, grad=True)
    mask = zorro_mask(lengths, lengths[0], device)
    calls = {'dense': lambda: dense(q, k, v, mask), 'efficient': lambda: efficient(q, k, v, lengths)}
    with torch.no_grad():
        err = (calls['dense']() - calls['efficient']()).abs().max().item()
    out = {p: {'fwd': [], 'train': []} for p in calls}
    rounds, r = repeats + 1, 0
    while r < rounds:  # the first round warms up; millisecond settings get more rounds (at least 2 s of runs)
        start = time.perf_counter()
        for name, fn in calls.items():
            _sync(device)
            t = time.perf_counter()
            with torch.inference_mode():
                fn()
            _sync(device)
            fwd = time.perf_counter() - t
            t = time.perf_counter()
            fn().sum().backward()
            _sync(device)
            train = time.perf_counter() - t
            q.grad = k.grad = v.grad = None
            if r:
                out[name]['fwd'].append(fwd)
                out[name]['train'].append(train)
        if r == 1:
            rounds = max(rounds, min(30, 1 + math.ceil(2.0 / (time.perf_counter() - start))))
        r += 1
    med = {p: {mode: statistics.median(ts) for mode, ts in d.items()} for p, d in out.items()}
    return dict(seconds=med, max_abs_diff=err, rounds=rounds - 1)


def _memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: peak RSS growth (kB) of one call, inputs already allocated."""
    torch.set_num_threads(args.threads)
    grad = args.mode == 'train'
    q, k, v, lengths = make_inputs(args.m, args.px, args.heads, args.batch, 'cpu', grad=grad)
    if args.path == 'dense':
        fn = (lambda mask: (lambda: dense(q, k, v, mask)))(zorro_mask(lengths, lengths[0], 'cpu'))
    else:
        fn = lambda: efficient(q, k, v, lengths)  # noqa: E731
    # one small warm-up call so one-off allocator / kernel setup is not counted
    small = make_inputs(2, 64, 1, 1, 'cpu')
    efficient(*small[:3], small[3]), dense(*small[:3], zorro_mask(small[3], small[3][0], 'cpu'))

    def rss_kb(field: str) -> int:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
        raise RuntimeError(field)
    base = rss_kb('VmRSS:')
    Path('/proc/self/clear_refs').write_text('5')  # reset the peak (VmHWM) to the current RSS
    if grad:
        fn().sum().backward()
    else:
        with torch.inference_mode():
            fn()
    print(json.dumps({'peak_growth_kb': rss_kb('VmHWM:') - base}))


def memory(m: int, px: int, heads: int, batch: int, path: str, mode: str, threads: int) -> float:
    cmd = [sys.executable, __file__, '--memory-child', '--m', str(m), '--px', str(px), '--heads', str(heads),
           '--batch', str(batch), '--path', path, '--mode', mode, '--threads', str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])['peak_growth_kb'] / 1024.0


def _markdown(rows, meta) -> str:
    lines = [
        '# Zorro attention: efficient (per-modality + fusion-to-all SDPA) vs dense masked SDPA', '',
        f'{meta["device"]}, torch {meta["torch"]}, {meta["threads"]} threads (OMP_WAIT_POLICY '
        f'{meta["omp_wait_policy"]}), load average at the end {meta["load_avg"][0]:.1f}, batch {meta["batch"]}, '
        f'median of >= {meta["repeats"]} interleaved runs (more for short settings: >= 2 s, <= 30), head dim 64, '
        f'commit `{meta["commit"][:10]}`. '
        'Speed-up = dense time / efficient time (one run, same inputs). Memory: peak RSS growth of one call in a '
        'fresh process (dense includes its (L, L) mask).', '',
        '| width | M | px | tokens L | fwd dense ms | fwd efficient ms | fwd speed-up | train dense ms | '
        'train efficient ms | train speed-up | fwd mem dense MB | fwd mem efficient MB | train mem dense MB | '
        'train mem efficient MB | max abs diff |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        s = r['seconds']
        mem = r.get('memory_mb', {})

        def mm(p, mode):
            return f'{mem[p][mode]:.1f}' if mem else '-'
        lines.append(
            f'| {r["width"]} | {r["modalities"]} | {r["px"]} | {r["tokens"]} | {1e3 * s["dense"]["fwd"]:.1f} | '
            f'{1e3 * s["efficient"]["fwd"]:.1f} | {r["speedup"]["fwd"]:.2f}x | {1e3 * s["dense"]["train"]:.1f} | '
            f'{1e3 * s["efficient"]["train"]:.1f} | {r["speedup"]["train"]:.2f}x | {mm("dense", "fwd")} | '
            f'{mm("efficient", "fwd")} | {mm("dense", "train")} | {mm("efficient", "train")} | '
            f'{r["max_abs_diff"]:.1e} |')
    slow = [r for r in rows if min(r['speedup'].values()) <= 1.0]
    lines += ['', 'The efficient path is faster at every setting.' if not slow else
              f'The efficient path is NOT faster at {len(slow)} settings.', '']
    return '\n'.join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--modalities', type=int, nargs='+', default=[2, 3, 4])
    ap.add_argument('--px', type=int, nargs='+', default=[256, 512])
    ap.add_argument('--widths', nargs='+', default=list(WIDTHS), choices=list(WIDTHS))
    ap.add_argument('--no-memory', action='store_true')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results'))
    ap.add_argument('--tag', default='', help='suffix of the output file names')
    # internal: one memory measurement
    ap.add_argument('--memory-child', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--m', type=int, help=argparse.SUPPRESS)
    ap.add_argument('--heads', type=int, help=argparse.SUPPRESS)
    ap.add_argument('--path', help=argparse.SUPPRESS)
    ap.add_argument('--mode', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        args.px = args.px[0] if isinstance(args.px, list) else args.px
        return _memory_child(args)
    torch.set_num_threads(args.threads)
    rows = []
    for width in args.widths:
        for px in args.px:
            for m in args.modalities:
                heads = WIDTHS[width]
                r = time_setting(m, px, heads, args.batch, args.repeats, args.device)
                s = r['seconds']
                row = dict(width=width, heads=heads, modalities=m, px=px, tokens=(m + 1) * (px // 16) ** 2,
                           seconds=s, max_abs_diff=r['max_abs_diff'], rounds=r['rounds'],
                           speedup={mode: s['dense'][mode] / s['efficient'][mode] for mode in ('fwd', 'train')})
                if not args.no_memory and args.device == 'cpu':
                    row['memory_mb'] = {p: {mode: memory(m, px, heads, args.batch, p, mode, args.threads)
                                            for mode in ('fwd', 'train')} for p in ('dense', 'efficient')}
                rows.append(row)
                print(f'{width} M={m} {px}px: fwd {row["speedup"]["fwd"]:.2f}x train {row["speedup"]["train"]:.2f}x '
                      f'{row.get("memory_mb", "")}', flush=True)
    dev = torch.cuda.get_device_name() if args.device.startswith('cuda') else (platform.processor() or 'cpu')
    meta = dict(device=dev, torch=torch.__version__, threads=args.threads, batch=args.batch,
                repeats=args.repeats, commit=git_commit(Path(__file__).parent) or 'unknown', machine=platform.machine(),
                omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'), load_avg=os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = 'fusion_attention' + (f'-{args.tag}' if args.tag else '')
    (out / f'{name}.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + '\n')
    (out / f'{name}.md').write_text(_markdown(rows, meta))
    print(_markdown(rows, meta))


if __name__ == '__main__':
    main()
