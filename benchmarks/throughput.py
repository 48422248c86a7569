#!/usr/bin/env python
"""Scripted entry of ``eobackbones bench``: speed, memory, FLOPs, fraction of peak and fidelity per model.

    python benchmarks/throughput.py 'dofa_*' dualsimclr_resnet50_s2 --batch-sizes 1,8,32 \\
        --precision fp32,bf16,auto --mode infer,train --compare --out benchmarks/results/cpu --plot

Same options as ``eobackbones bench`` (``--help``); see ``eobackbones.bench`` for what each column means.
"""
import argparse
import sys

from eobackbones.bench import add_bench_args, main_bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='throughput.py', description=__doc__.splitlines()[0])
    add_bench_args(parser)
    return main_bench(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
