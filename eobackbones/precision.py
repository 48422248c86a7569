"""The precision policy of the package: which dtype ``auto`` means on a device, and how to enter it.

One rule, used by ``optimize_for_inference``, the feature extractor of the probe and the benchmark harness:

- ``auto`` is bfloat16 where the device computes it natively, else float32:
  CUDA devices with ``torch.cuda.is_bf16_supported()`` (Ampere and newer), CPUs with Intel AMX
  (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``, read from ``/proc/cpuinfo``). Everywhere else float32:
  bf16 emulated in software is slower than float32, and float16 is never chosen silently (its range
  overflows on unnormalised Earth-observation inputs).
- ``fp32`` / ``bf16`` / ``fp16`` are taken as asked; ``fp16`` only on CUDA (CPU float16 kernels are slow
  or missing), otherwise a one-line ``ValueError``.

Imports only torch and the standard library, so every layer of the package can use it.
"""
import contextlib
import functools
from typing import Callable, ContextManager, Tuple, Union

import torch

__all__ = [
    'PRECISIONS', 'DTYPE_NAMES', 'cpu_flags', 'cpu_has_native_bf16', 'resolve_precision', 'describe_precision',
    'precision_and_reason', 'autocast', 'dtype_name',
]

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
_BY_NAME = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
DTYPE_NAMES = {v: k for k, v in _BY_NAME.items()}

DeviceLike = Union[str, torch.device]


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU feature flags of ``/proc/cpuinfo`` (Linux); empty elsewhere."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('flags'):
                    return frozenset(line.split(':', 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic (Intel AMX or AVX512-BF16); Linux only, else False."""
    return bool(cpu_flags() & {'amx_bf16', 'avx512_bf16'})


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bf16'`` (``fp32`` / ``bf16`` / ``fp16``; else ``str(dtype)``)."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace('torch.', ''))


def precision_and_reason(precision: str, device: DeviceLike) -> Tuple[torch.dtype, str]:
    """``(dtype, reason)``: :func:`resolve_precision` and the sentence that explains the choice."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    if precision != 'auto':
        if precision == 'fp16' and device.type != 'cuda':
            raise ValueError(f'fp16 runs on CUDA devices only, got device {device.type!r}; use bf16 or fp32')
        return _BY_NAME[precision], f'{precision} (requested)'
    if device.type == 'cuda':
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, 'bf16 (auto: CUDA device computes bf16 natively)'
        return torch.float32, 'fp32 (auto: CUDA device without native bf16)'
    if device.type == 'cpu':
        if cpu_has_native_bf16():
            kind = 'AMX' if 'amx_bf16' in cpu_flags() else 'AVX512-BF16'
            return torch.bfloat16, f'bf16 (auto: CPU with native bf16, {kind})'
        return torch.float32, (f'fp32 (auto: CPU without native bf16, capability '
                               f'{torch.backends.cpu.get_cpu_capability()})')
    return torch.float32, f'fp32 (auto: device {device.type})'


def resolve_precision(precision: str, device: DeviceLike) -> torch.dtype:
    """``auto`` / ``fp32`` / ``bf16`` / ``fp16`` -> the dtype used on ``device`` (see the module docstring).

    Raises:
        ValueError: an unknown name, or ``fp16`` on a device other than CUDA.
    """
    return precision_and_reason(precision, device)[0]


def describe_precision(precision: str, device: DeviceLike) -> str:
    """Why ``precision`` means what it means on ``device``, for reports (e.g. ``bf16 (auto: CPU with ...)``)."""
    return precision_and_reason(precision, device)[1]


def autocast(device: DeviceLike, dtype: torch.dtype) -> Callable[[], ContextManager]:
    """A factory of autocast contexts for ``dtype`` on ``device``; float32 gives ``nullcontext``.

    Returns a factory (call it for each ``with``) because an autocast context object is not re-entrant.
    """
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext
    if dtype not in DTYPE_NAMES:
        raise ValueError(f'autocast dtype must be float32, bfloat16 or float16, got {dtype}')
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
