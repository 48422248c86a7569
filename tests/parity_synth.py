"""Synthetic upstream-format checkpoints and inputs for the parity vectors in tests/data/parity.

Our implementation of the published formula (tests/data/parity/README.md): every float entry of an upstream
key list is ``sin(0.7 * q + 0.001 * s)`` over the squared index ``q = i*i mod (2**31 - 1)`` with a per-key
phase ``s = crc32(key) mod 10007``, scaled by kind; inputs are ``sin(0.3 * q + c)``. Computed in float64,
cast to float32 once.
"""
import json
import math
import zlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

P = 2 ** 31 - 1


def _q(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.int64)
    return ((i * i) % P).to(torch.float64)


def tensor(key: str, shape: Sequence[int]) -> torch.Tensor:
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    v = torch.sin(0.7 * _q(n) + 0.001 * (zlib.crc32(key.encode('utf-8')) % 10007)).reshape(shape)
    if key.endswith('running_var'):
        t = 1.0 + 0.5 * v.abs()
    elif key.endswith('running_mean'):
        t = 0.1 * v
    elif len(shape) >= 2:
        t = v / math.sqrt(n / shape[0])
    elif key.endswith('weight'):
        t = 1.0 + 0.1 * v
    else:
        t = 0.1 * v
    return t.to(torch.float32)


def image(shape: Sequence[int], c: float) -> torch.Tensor:
    shape = tuple(int(d) for d in shape)
    return torch.sin(0.3 * _q(math.prod(shape)) + c).reshape(shape).to(torch.float32)


def load_keylist(path: Path) -> List[Dict[str, Any]]:
    return json.loads(Path(path).read_text(encoding='utf-8'))


def state_dict(keylist: List[Dict[str, Any]], computed: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The upstream state dict, in upstream order; ``buffer_computed`` entries from ``computed[value_ref]`` (or left out)."""
    out = {}
    for e in keylist:
        key, shape, kind = e['key'], tuple(e['shape']), e['kind']
        if kind == 'buffer_computed':
            if computed is not None:
                out[key] = computed[e.get('value_ref', key)].clone()
        elif kind == 'buffer_zero':
            out[key] = torch.zeros(shape, dtype=torch.int64)
        elif kind in ('param', 'buffer'):
            out[key] = tensor(key, shape)
        else:
            raise ValueError(f'{key}: unknown kind {kind!r}')
    return out


def fp64_sums(x: torch.Tensor) -> torch.Tensor:
    f = x.reshape(-1).to(torch.float64)
    return torch.stack([f.sum(), f.abs().sum(), (f * f).sum()])
