"""Benchmark harness: time a model's forward (throughput, latency percentiles, peak memory).

CUDA: timed with CUDA events after a warm-up, peak memory from ``torch.cuda.max_memory_allocated``
(reset before timing). CPU: ``time.perf_counter`` per iteration, no memory figure. Inputs come from
:func:`eobackbones.example_input` (right modalities, bands and size, already normalised).

    >>> from eobackbones.bench import benchmark_model
    >>> row = benchmark_model('dofa_base', batch_size=8, dtype='bf16')   # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .models import create_model
from .transforms import example_input

__all__ = ['DTYPES', 'autocast_context', 'time_fn', 'benchmark_model', 'git_commit', 'percentile']

DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def git_commit(path: Optional[Union[str, Path]] = None) -> Optional[str]:
    """HEAD of the repository holding ``path`` (default: this package), or None outside a checkout."""
    try:
        cwd = Path(path) if path else Path(__file__).resolve().parent
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``numpy.percentile`` default) without numpy."""
    v = sorted(values)
    if not v:
        return float('nan')
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def autocast_context(device: torch.device, dtype: str) -> Callable[[], Any]:
    """A factory of autocast contexts for ``dtype`` in ``fp32`` / ``bf16`` / ``fp16`` (fp16 only on CUDA)."""
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {list(DTYPES)}, got {dtype!r}')
    if DTYPES[dtype] is None:
        return contextlib.nullcontext
    if dtype == 'fp16' and device.type != 'cuda':
        raise ValueError('fp16 autocast is benchmarked on CUDA only; use bf16 or fp32 on CPU')
    return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: Union[str, torch.device] = 'cpu', warmup: int = 3, iters: int = 10,
            min_seconds: float = 0.0) -> List[float]:
    """Latencies in milliseconds of ``iters`` calls of ``fn`` after ``warmup`` calls.

    CUDA: one pair of CUDA events per call (no host sync inside the timed region except the final one).
    CPU: ``perf_counter`` around each call. With ``min_seconds``, iterations continue until that much
    time has been measured.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    if device.type == 'cuda':
        n = 0
        while n < iters or (min_seconds and sum(times) / 1e3 < min_seconds):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for s, e in zip(starts, ends):
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize(device)
            times += [s.elapsed_time(e) for s, e in zip(starts, ends)]
            n += iters
        return times
    n = 0
    while n < iters or (min_seconds and sum(times) / 1e3 < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        n += 1
    return times


def benchmark_model(
        model: Union[str, nn.Module],
        batch_size: int = 8,
        dtype: str = 'fp32',
        device: Union[str, torch.device] = 'cpu',
        image_size: Optional[int] = None,
        warmup: int = 3,
        iters: int = 10,
        mode: str = 'forward',
        channels_last: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> Dict[str, Any]:
    """Time ``model`` on ``example_input`` and return one result row.

    Args:
        model: a registered name (built with random init; weights do not change speed) or a model.
        batch_size: images per forward.
        dtype: ``fp32``, ``bf16`` or ``fp16`` autocast.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        image_size: input size (default: the spec's native size).
        warmup, iters: untimed and timed calls.
        mode: ``forward`` (``model(x)``) or ``features`` (pooled pre-logits features).
        channels_last: convert model and input to channels-last memory format.
        model_kwargs: passed to ``create_model`` when ``model`` is a name.
        fn: custom ``fn(model, x)`` to time instead of ``mode``.

    Returns:
        dict(model, batch, dtype, device, image_size, img_per_s, latency_ms_p50, latency_ms_p90, latency_ms_mean,
        peak_mem_mb (CUDA only, else None), iters, torch, git_commit).
    """
    device = torch.device(device)
    name = model if isinstance(model, str) else getattr(getattr(model, 'pretrained_cfg', None), 'name', type(model).__name__)
    if isinstance(model, str):
        model = create_model(model, pretrained=False, **(model_kwargs or {}))
    model = model.eval().to(device)
    x = example_input(model, batch_size=batch_size, image_size=image_size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = {k: v.contiguous(memory_format=torch.channels_last) for k, v in x.items()} if isinstance(x, dict) \
            else x.contiguous(memory_format=torch.channels_last)
    ctx = autocast_context(device, dtype)
    label = 'custom' if fn is not None else mode
    if fn is None:
        if mode == 'forward':
            def fn(m, inp):
                return m(inp)
        elif mode == 'features':
            def fn(m, inp):
                return m.forward_head(m.forward_features(inp), pre_logits=True)
        else:
            raise ValueError(f'mode must be forward or features, got {mode!r}')

    def call():
        with torch.no_grad(), ctx():
            return fn(model, x)

    peak = None
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_fn(call, device, warmup=warmup, iters=iters)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    first = x if torch.is_tensor(x) else next(iter(x.values()))
    mean_ms = statistics.fmean(times)
    return dict(
        model=name, batch=batch_size, dtype=dtype, device=str(device), mode=label,
        image_size=f'{first.shape[-2]}x{first.shape[-1]}', img_per_s=batch_size / (mean_ms / 1e3),
        latency_ms_p50=percentile(times, 50), latency_ms_p90=percentile(times, 90), latency_ms_mean=mean_ms,
        peak_mem_mb=peak, iters=len(times), torch=torch.__version__, git_commit=git_commit())
