#!/usr/bin/env python
"""eobackbones DOFA vs torchgeo DOFA: same weights, same 13-band Sentinel-2 input, one run, ratios.

    python benchmarks/dofa_vs_torchgeo.py [--arch base] [--batch 8] [--compile] [--out DIR] [-- BENCH OPTIONS]

A preset of the benchmark harness (``eobackbones bench``): ``dofa_<arch>`` bound to the 13 Sentinel-2 centre
wavelengths, ``--compare`` (torchgeo's DOFA with our weights copied in), precisions fp32 / bf16 autocast /
auto (``optimize_for_inference``), pooled features and full forward, all candidates timed interleaved in
one process. The report has torchgeo fp32 and torchgeo under bf16 autocast in the same table as ours, the
fraction of the bf16 matmul peak measured in the same run, and the pooled-feature cosine to float32.
Writes ``bench.{json,csv,md}`` under ``--out`` (default ``benchmarks/results/dofa_vs_torchgeo``).
"""
import argparse
import json
import sys
from pathlib import Path

from eobackbones.bench import add_bench_args, main_bench

S2_13 = [0.443, 0.49, 0.56, 0.665, 0.705, 0.74, 0.783, 0.842, 0.865, 0.945, 1.375, 1.61, 2.19]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--arch', default='base', choices=('small', 'base', 'large', 'huge'))
    ap.add_argument('--batch', default='8', help='batch size(s), e.g. 8 or 1,8')
    ap.add_argument('--iters', default='7')
    ap.add_argument('--compile', action='store_true', help='also the torch.compile variant of every candidate')
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'dofa_vs_torchgeo'))
    a, rest = ap.parse_known_args(argv)
    bench_argv = [f'dofa_{a.arch}', '--model-arg', f'wavelengths={json.dumps(S2_13)}', '--batch-sizes', a.batch,
                  '--precision', 'fp32,bf16,auto', '--mode', 'infer', '--compare', '--iters', a.iters,
                  '--out', a.out] + (['--compile'] if a.compile else []) + [r for r in rest if r != '--']
    parser = argparse.ArgumentParser(prog='dofa_vs_torchgeo.py')
    add_bench_args(parser)
    return main_bench(parser.parse_args(bench_argv))


if __name__ == '__main__':
    sys.exit(main())
