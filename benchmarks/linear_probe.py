#!/usr/bin/env python
"""Linear-probe sweeps over many models: the same entry point as ``eobackbones probe``.

    python benchmarks/linear_probe.py --model dofa_base dualsimclr_resnet50_s2 --norm dataset-zscore \
        --out benchmarks/results/probe-ben-mini
    torchrun --nproc_per_node 2 benchmarks/linear_probe.py --model dofa_base --norm dataset-zscore --out DIR

Options: ``python benchmarks/linear_probe.py --help`` (eobackbones.eval.linear_probe.add_probe_args).
"""
from __future__ import annotations

import argparse
import sys

from eobackbones.eval.linear_probe import add_probe_args, main_probe


def main(argv=None) -> int:
    parser = add_probe_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return main_probe(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
