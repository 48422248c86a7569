"""Benchmark harness: speed, memory, FLOPs, fraction of the device's matmul peak and fidelity of every backbone.

``eobackbones bench PATTERN...`` (and ``benchmarks/throughput.py``) builds each matching model (random init:
weights do not change speed), feeds it :func:`eobackbones.transforms.example_call` inputs (every modality,
conditioning inputs and call arguments, native size or ``--img-size``) and measures, per model x batch size
x mode x precision:

- **modes**: ``infer`` = two rows, ``features`` (pooled features, ``forward_head(forward_features(x),
  pre_logits=True)``) and ``forward`` (``model(x)``); ``train`` = forward + backward + AdamW step on
  ``model(x).float().square().mean()`` (the pooled features: heads do not change the backbone's cost).
- **precisions**: ``fp32``; ``bf16`` / ``fp16`` autocast (fp16 on CUDA only, with a GradScaler in training);
  ``auto`` = ``eobackbones.optimize_for_inference(model, precision='auto')``, the package's fast path (in
  training, where there is no fast path, ``auto`` is autocast in the dtype :mod:`eobackbones.precision` picks).
- **timing**: warm-up calls, then all candidates of one (model, batch, mode) timed *interleaved* (one call
  each, round-robin), so load on a shared machine hits every candidate alike and ratios stay meaningful.
  CUDA: CUDA events around each call and ``torch.cuda.synchronize``; CPU: ``time.perf_counter``. Median,
  p90, p99 latency, samples/s = batch / median latency. ``--compile``: each candidate also runs through
  ``torch.compile``; the first call (compilation + one run) is reported as ``compile_s``, never timed.
- **memory**: measured in a separate call per candidate after warm-up, as what that one call needs on top of
  what is already resident (weights, inputs, optimizer state, other candidates): CUDA:
  ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before the call;
  CPU: growth of the process's peak RSS during the call (``/proc/self/clear_refs`` resets the high-water mark
  after ``malloc_trim`` returns freed heap to the OS). ``weights_mb`` gives the bytes of the parameters and
  buffers the candidate runs with, so weights + peak is the footprint of a process running only that row.
  Caveat on CPU: memory freed earlier and still cached by the allocator is reused without raising RSS, so the
  figure is a lower bound; where ``clear_refs`` is not writable, ``ru_maxrss`` growth is used, which only sees
  rows that exceed the process's previous peak.
- **FLOPs** per sample from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 x multiply-accumulates;
  matmuls, convolutions and attention only; elementwise ops are free), counted on the ``meta`` device (no
  memory, no compute) where the model runs there, else on one extra call; steady state (the second call, so
  caches such as DOFA's generated patch kernel are warm). Training counts forward + backward.
- **fraction of peak**: the device's matmul peak for each dtype is measured in the same run, before and after
  the models (square GEMMs and the largest GEMM / implicit-GEMM convolution shapes of the benchmarked models),
  and each row reports achieved FLOP/s (FLOPs per sample x samples/s) over the peak of its compute dtype.
- **fidelity**: cosine (per sample, min and mean) of each row's output against the float32 eager output on the
  same input (pooled features in ``features`` rows, the forward output in ``forward`` rows).
- ``--compare``: each model's peer implementation (torchgeo DOFA, timm ResNet-50/18, timm Swin-T with the same
  channel counts and, where the keys match, the same weights) timed in the same group; ``vs_peer`` = our
  samples/s over the peer's at the same mode, batch and precision.

TF32 is off by default on CUDA (``--tf32`` allows it), so ``fp32`` means float32 in both the speed and the
fidelity columns. On a shared CPU, compare rows of one run (they are interleaved) and read the load average
the report records: the peak is a best-of over short GEMMs while rows are medians of long calls, so load
lowers the fractions of peak; ``--threads 1`` keeps ratios steady where threads would wait on each other. Outputs: ``bench.json`` (environment, matmul peaks, rows), ``bench.csv``, ``bench.md`` and with
``--plot`` PNGs, under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import ctypes
import fnmatch
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ._io import git_commit
from .errors import first_line
from .models import create_model, list_models
from .optimize import optimize_for_inference
from .precision import PRECISIONS, autocast, cpu_flags, describe_precision, dtype_name, resolve_precision
from .transforms import example_call

__all__ = [
    'add_bench_args', 'main_bench', 'run_bench', 'write_report', 'markdown_report', 'plot_report',
    'measure_matmul_peak', 'count_flops', 'environment', 'time_fn', 'time_interleaved', 'percentile', 'git_commit',
    'benchmark_model', 'MODES', 'ROW_FIELDS', 'SCHEMA',
]

SCHEMA = 'eobackbones.bench/1'
MODES = ('infer', 'train')
ROW_FIELDS = (
    'model', 'impl', 'peer_arch', 'mode', 'precision', 'dtype', 'compiled', 'channels_last', 'batch', 'image_size',
    'channels', 'status', 'error', 'samples_per_s', 'latency_ms_median', 'latency_ms_p90', 'latency_ms_p99',
    'latency_ms_mean', 'iters', 'warmup', 'compile_s', 'peak_mem_mb', 'mem_kind', 'weights_mb', 'params',
    'gflops_per_sample', 'achieved_tflops', 'peak_tflops', 'fraction_of_peak', 'cosine_min', 'cosine_mean', 'vs_peer',
)
OURS = 'eobackbones'


# ----------------------------------------------------------------------------------------------- small helpers


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``numpy.percentile`` default) without numpy."""
    v = sorted(values)
    if not v:
        return float('nan')
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        'out of memory' in msg or "can't allocate memory" in msg or isinstance(e, MemoryError))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _tree_map(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_map(fn, v) for v in x)
    return x


def _channels_last(x: Any) -> Any:
    return _tree_map(lambda t: t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t, x)


def _batch_of(x: Any) -> int:
    t = x if isinstance(x, torch.Tensor) else next(iter(x.values()))
    return int(t.shape[0])


def _channels_of(x: Any) -> str:
    """Input channels: ``13`` for a tensor, ``s1:2+s2:13`` for a dict of modalities."""
    if isinstance(x, torch.Tensor):
        return str(x.shape[1])
    return '+'.join(f'{k}:{v.shape[1]}' for k, v in x.items())


def _size_of(x: Any) -> str:
    t = x if isinstance(x, torch.Tensor) else next(iter(x.values()))
    return f'{t.shape[-2]}x{t.shape[-1]}'


# ----------------------------------------------------------------------------------------------- timing


def time_fn(fn: Callable[[], Any], device: Union[str, torch.device] = 'cpu', warmup: int = 3, iters: int = 10,
            min_seconds: float = 0.0) -> List[float]:
    """Latencies in milliseconds of ``iters`` calls of ``fn`` after ``warmup`` calls (one candidate)."""
    return time_interleaved({'fn': fn}, device, warmup=warmup, iters=iters, min_seconds=min_seconds)['fn']


def time_interleaved(fns: Dict[str, Callable[[], Any]], device: Union[str, torch.device] = 'cpu', warmup: int = 3,
                     iters: int = 10, min_seconds: float = 0.0) -> Dict[str, List[float]]:
    """Latencies (ms) of each function, called round-robin: ``warmup`` untimed rounds, then ``iters`` timed ones.

    CUDA: a pair of CUDA events around each call and one ``synchronize`` per round. CPU: ``perf_counter``
    around each call. With ``min_seconds``, rounds continue until every function has that much measured time.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    n = 0
    while n < iters or (min_seconds and min(sum(t) for t in times.values()) / 1e3 < min_seconds):
        if device.type == 'cuda':
            events = {}
            for k, fn in fns.items():
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                events[k] = (s, e)
            torch.cuda.synchronize(device)
            for k, (s, e) in events.items():
                times[k].append(s.elapsed_time(e))
        else:
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
        n += 1
    return times


# ----------------------------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _CpuPeak:
    """Peak RSS growth of this process over one region (see the module docstring for the caveats)."""

    def __enter__(self) -> '_CpuPeak':
        _malloc_trim()
        self.kind = 'cpu_rss_growth'
        try:
            with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
                f.write('5')  # reset VmHWM to the current RSS
            self.base_kb = _proc_status_kb('VmRSS')
            if self.base_kb is None:
                raise OSError
        except OSError:
            self.kind = 'cpu_maxrss_growth'
            self.base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mb: Optional[float] = None
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = _proc_status_kb('VmHWM') if self.kind == 'cpu_rss_growth' else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mb = max(0, (peak or 0) - self.base_kb) / 1024.0


def _measure_memory(fn: Callable[[], Any], device: torch.device) -> Tuple[Optional[float], str]:
    """(peak MB of one call of ``fn``, kind)."""
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20, 'cuda_peak_growth'
    with _CpuPeak() as p:
        fn()
    return p.mb, p.kind


# ----------------------------------------------------------------------------------------------- FLOPs and shapes


class _GemmShapes(TorchDispatchMode):
    """Records (m, k, n) -> FLOPs of every matmul and convolution (as its implicit GEMM) that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: Dict[Tuple[int, int, int], float] = {}

    def _add(self, m: int, k: int, n: int, times: int = 1) -> None:
        key = (int(m), int(k), int(n))
        self.flops[key] = self.flops.get(key, 0.0) + 2.0 * m * k * n * times

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        try:
            if name == 'mm':
                self._add(args[0].shape[0], args[0].shape[1], args[1].shape[1])
            elif name == 'addmm':
                self._add(args[1].shape[0], args[1].shape[1], args[2].shape[1])
            elif name in ('bmm', 'baddbmm'):
                a, b = (args[0], args[1]) if name == 'bmm' else (args[1], args[2])
                self._add(a.shape[1], a.shape[2], b.shape[2], a.shape[0])
            elif name == 'convolution':
                w = args[1]
                groups = args[8] if len(args) > 8 else 1
                o = out
                self._add(o.shape[0] * math.prod(o.shape[2:]), w.shape[1] * math.prod(w.shape[2:]),
                          w.shape[0] // groups, groups)
        except (IndexError, AttributeError, TypeError):
            pass
        return out


def _flop_mapping() -> Dict[Any, Any]:
    """Formulas FlopCounterMode lacks: the CPU flash-attention kernels count as the fused ones do."""
    fc = flop_counter
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = fc.sdpa_flop
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu_backward'):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = fc.sdpa_backward_flop
    return out


def count_flops(fn: Callable[[], Any], repeat: int = 2) -> Tuple[int, Dict[Tuple[int, int, int], float]]:
    """FLOPs (2 x MACs) of the last of ``repeat`` calls of ``fn`` (steady state) and its GEMM shapes."""
    for _ in range(repeat - 1):
        fn()
    shapes = _GemmShapes()
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter, shapes:
        fn()
    return int(counter.get_total_flops()), shapes.flops


# ----------------------------------------------------------------------------------------------- matmul peak


def _default_square_sizes(device: torch.device) -> Tuple[int, ...]:
    return (4096, 8192) if device.type == 'cuda' else (2048,)


def measure_matmul_peak(
        device: Union[str, torch.device],
        dtypes: Sequence[str] = ('fp32', 'bf16'),
        shapes: Sequence[Tuple[int, int, int]] = (),
        min_seconds: float = 0.25,
        square_sizes: Optional[Sequence[int]] = None,
) -> Dict[str, Dict[str, Any]]:
    """The device's matmul rate per dtype: square GEMMs plus ``shapes`` (m, k, n); the peak is the best of them.

    Each GEMM is timed for about ``min_seconds`` (CPU: best single call; CUDA: CUDA events around a loop).

    Returns:
        ``{dtype: {'tflops': peak, 'shapes': [{'m', 'k', 'n', 'kind', 'tflops'}, ...]}}``.
    """
    device = torch.device(device)
    squares = tuple(square_sizes) if square_sizes is not None else _default_square_sizes(device)
    todo = [(s, s, s, 'square') for s in squares] + [(m, k, n, 'model') for m, k, n in shapes]
    out: Dict[str, Dict[str, Any]] = {}
    for name in dtypes:
        dtype = resolve_precision(name, device)
        res = []
        for m, k, n, kind in todo:
            try:
                a = torch.randn(m, k, device=device).to(dtype)
                b = torch.randn(k, n, device=device).to(dtype)
                sec = _time_gemm(a, b, device, min_seconds)
                res.append(dict(m=m, k=k, n=n, kind=kind, tflops=2.0 * m * k * n / sec / 1e12))
            except Exception as e:  # noqa: BLE001 - an OOM or unsupported dtype on one shape is a recorded result
                res.append(dict(m=m, k=k, n=n, kind=kind, tflops=None, error=first_line(e)))
                _free(device)
            finally:
                a = b = None
        good = [r['tflops'] for r in res if r['tflops']]
        out[name] = dict(tflops=max(good) if good else None, dtype=str(dtype).replace('torch.', ''), shapes=res)
    return out


def _time_gemm(a: torch.Tensor, b: torch.Tensor, device: torch.device, min_seconds: float) -> float:
    with torch.inference_mode():
        torch.mm(a, b)
        _sync(device)
        if device.type == 'cuda':
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            one = max(time.perf_counter() - t0, 1e-6)
            n = max(3, min(1000, int(min_seconds / one)))
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                torch.mm(a, b)
            e.record()
            torch.cuda.synchronize(device)
            return s.elapsed_time(e) / 1e3 / n
        best, spent = float('inf'), 0.0
        while spent < min_seconds or best == float('inf'):
            t0 = time.perf_counter()
            torch.mm(a, b)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
        return best


def _model_gemm_shapes(all_shapes: Dict[Tuple[int, int, int], float], top: int,
                       max_m: int) -> List[Tuple[int, int, int]]:
    picked = sorted(all_shapes.items(), key=lambda kv: -kv[1])[:top]
    return [(min(m, max_m), k, n) for (m, k, n), _ in picked]


# ----------------------------------------------------------------------------------------------- environment


def _load_avg() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages (how busy the machine was: CPU timings depend on it)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, 'getloadavg') else None


def environment(device: Union[str, torch.device]) -> Dict[str, Any]:
    """Device, driver / CUDA, library versions, CPU model and flags, threads, git commit, load."""
    device = torch.device(device)
    flags = cpu_flags()
    cpu_model = None
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            cpu_model = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), None)
    except OSError:
        pass
    env: Dict[str, Any] = dict(
        time=time.strftime('%Y-%m-%dT%H:%M:%S%z'), device=str(device), python=platform.python_version(),
        platform=platform.platform(), torch=torch.__version__, cuda_build=torch.version.cuda,
        cpu_model=cpu_model or platform.processor() or platform.machine(),
        cpu_flags={f: f in flags for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16',
                                            'avx512_fp16')},
        cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(), cpu_count=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
        mkldnn=torch.backends.mkldnn.is_available(), git_commit=git_commit(),
        auto_precision=describe_precision('auto', device),
        load_avg_start=_load_avg(),
    )
    for mod in ('timm', 'torchgeo', 'eobackbones'):
        try:
            env[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            env[mod] = None
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_capability=f'{props.major}.{props.minor}',
                   device_memory_gb=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
        try:
            env['driver'] = subprocess.run(
                ['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader', f'--id={device.index or 0}'],
                capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env['driver'] = None
    else:
        env['device_name'] = env['cpu_model']
    return env


# ----------------------------------------------------------------------------------------------- peers


@dataclass
class _Peer:
    """A peer implementation: ``apply(module, x)`` gives pooled features, ``forward(module, x)`` the forward."""
    arch: str
    module: nn.Module
    apply: Callable[[nn.Module, Any], torch.Tensor]
    forward_apply: Callable[[nn.Module, Any], torch.Tensor]
    same_weights: bool

    def features(self, x: Any) -> torch.Tensor:
        return self.apply(self.module, x)

    def forward(self, x: Any) -> torch.Tensor:
        return self.forward_apply(self.module, x)


class _PerModality(nn.Module):
    """One peer network per modality of a dict input; outputs concatenated in the input's modality order."""

    def __init__(self, nets: Dict[str, nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(nets)

    def forward(self, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.nets[k](v) for k, v in x.items()], dim=1)


def _copy_weights(peer: nn.Module, state: Dict[str, torch.Tensor]) -> bool:
    """Load ``state`` into ``peer`` by key where every peer key is present with its shape; True when done."""
    own = peer.state_dict()
    if any(k not in state or state[k].shape != v.shape for k, v in own.items()):
        return False
    peer.load_state_dict({k: state[k] for k in own})
    return True


def _timm_peer(arch: str, model: nn.Module, x: Any, device: torch.device) -> _Peer:
    spec = model.input_spec
    size = tuple(int(s) for s in _size_of(x).split('x'))
    state = model.state_dict()
    kw = dict(img_size=size) if 'swin' in arch else {}
    nets, same = {}, True
    for mod in spec.modalities:
        net = timm.create_model(arch, pretrained=False, in_chans=mod.in_chans, num_classes=0, **kw)
        prefix = f'{mod.name}.' if spec.input_format == 'dict' else ''
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        same = _copy_weights(net, sub) and same
        nets[mod.name] = net
    module = (_PerModality(nets) if spec.input_format == 'dict' else nets[spec.modalities[0].name]).to(device).eval()
    return _Peer(arch, module, lambda m, inp: m(inp), lambda m, inp: m(inp), same)


def _torchgeo_dofa_peer(model: nn.Module, x: Any, device: torch.device) -> _Peer:
    import torchgeo.models.dofa as tgd  # optional dependency: without it the DOFA peer is a skipped row
    size = {768: 'base', 1024: 'large', 1280: 'huge', 384: 'small'}[model.embed_dim]
    arch = f'dofa_{size}_patch{model.patch_size}_224'
    net = getattr(tgd, arch)(num_classes=0)
    same = _copy_weights(net, model.state_dict())
    net = net.to(device).eval()
    waves = list(model.wavelengths_um)
    return _Peer(f'torchgeo.{arch}', net, lambda m, inp: m.forward_features(inp, waves), lambda m, inp: m(inp, waves),
                 same)


# fnmatch pattern of our architecture -> peer builder(model, x, device). The only family-specific table here.
PEERS: List[Tuple[str, Callable[[nn.Module, Any, torch.device], _Peer]]] = [
    ('dofa_*', _torchgeo_dofa_peer),
    ('dualsimclr_resnet50*', lambda m, x, d: _timm_peer('resnet50', m, x, d)),
    ('dualsimclr_resnet18*', lambda m, x, d: _timm_peer('resnet18', m, x, d)),
    ('sslswin_tiny*', lambda m, x, d: _timm_peer('swin_tiny_patch4_window7_224', m, x, d)),
]


def _peer_builder(name: str) -> Optional[Callable[[nn.Module, Any, torch.device], _Peer]]:
    arch = name.split('.')[0]
    return next((b for pat, b in PEERS if fnmatch.fnmatch(arch, pat)), None)


# ----------------------------------------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    """What :func:`run_bench` measures (the ``eobackbones bench`` options, validated)."""
    models: List[str]
    batch_sizes: Union[List[int], str] = field(default_factory=lambda: [1, 8, 32])
    img_size: Optional[int] = None
    precisions: List[str] = field(default_factory=lambda: ['fp32', 'auto'])
    modes: List[str] = field(default_factory=lambda: ['infer'])
    channels_last: bool = False
    compile: bool = False
    compare: bool = False
    device: str = 'cpu'
    warmup: int = 2
    iters: int = 10
    min_seconds: float = 0.0
    peak: bool = True
    peak_seconds: float = 0.25
    peak_square_sizes: Optional[Tuple[int, ...]] = None
    tf32: bool = False
    max_batch: int = 4096
    budget_s: Optional[float] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    threads: Optional[int] = None
    quiet: bool = False


@dataclass
class _Candidate:
    impl: str
    precision: str
    dtype: torch.dtype
    compiled: bool
    fn: Callable[[], Any]
    peer_arch: Optional[str] = None
    status: str = 'ok'
    error: Optional[str] = None
    compile_s: Optional[float] = None
    weights_mb: Optional[float] = None
    out: Any = None
    mem: Tuple[Optional[float], Optional[str]] = (None, None)

    @property
    def key(self) -> str:
        return f'{self.impl}|{self.precision}|{int(self.compiled)}'


# ----------------------------------------------------------------------------------------------- the run


def _build(name: str, img_size: Optional[int], device: Optional[torch.device] = None,
           model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    torch.manual_seed(0)
    ctx = torch.device(device) if device is not None and torch.device(device).type == 'meta' else \
        contextlib.nullcontext()
    kw = dict(model_kwargs or {})
    with ctx:
        if img_size and 'img_size' not in kw:
            try:  # timm convention: models whose tables depend on the size take img_size
                return create_model(name, pretrained=False, img_size=img_size, **kw)
            except TypeError:
                pass
        return create_model(name, pretrained=False, **kw)


def _features_fn(m: Any, x: Any, kw: Dict[str, Any]) -> Callable[[], torch.Tensor]:
    return lambda: m.forward_head(m.forward_features(x, **kw), pre_logits=True)


def _forward_fn(m: Any, x: Any, kw: Dict[str, Any]) -> Callable[[], torch.Tensor]:
    return lambda: m(x, **kw)


class _Runner:
    """Builds candidates and rows for one model; shares the fp32 model and the fast path across batches."""

    def __init__(self, cfg: BenchConfig, name: str, device: torch.device, log: Callable[[str], None]) -> None:
        self.cfg, self.name, self.device, self.log = cfg, name, device, log
        self.model = _build(name, cfg.img_size, model_kwargs=cfg.model_kwargs).to(device).eval()
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = sum(p.numel() for p in self.model.parameters())
        self._fast: Dict[bool, Any] = {}
        self._meta: Optional[nn.Module] = None
        self._meta_failed = False
        self._peer: Optional[Tuple[Optional[_Peer], Optional[str]]] = None
        self._meta_peer: Optional[nn.Module] = None
        self._train: Dict[str, Tuple[nn.Module, torch.optim.Optimizer, Dict[str, Any]]] = {}
        self.gemm_shapes: Dict[Tuple[int, int, int], float] = {}
        self.flops: Dict[Tuple[str, str, int], Optional[int]] = {}

    # -- inputs
    def example(self, batch: int) -> Tuple[Any, Dict[str, Any]]:
        x, kw = example_call(self.model, batch_size=batch, image_size=self.cfg.img_size, seed=0, device=self.device)
        if self.cfg.channels_last:
            x = _channels_last(x)
        return x, kw

    # -- FLOPs (meta first)
    def count(self, impl: str, mode: str, batch: int,
              make_fn: Callable[[torch.device], Callable[[], Any]]) -> Optional[int]:
        key = (impl, mode, batch)
        if key not in self.flops:
            flops = None
            for dev in (torch.device('meta'), self.device):
                try:
                    flops, shapes = count_flops(make_fn(dev))
                    if impl == OURS:
                        for s, f in shapes.items():
                            self.gemm_shapes[s] = max(self.gemm_shapes.get(s, 0.0), f)
                    break
                except Exception:  # noqa: BLE001 - a model that does not run on meta is counted on its device
                    continue
            self.flops[key] = flops
        return self.flops[key]

    def peer(self, x: Any) -> Tuple[Optional[_Peer], Optional[str]]:
        """(the peer implementation or None, why not); built once per model."""
        if self._peer is None:
            builder = _peer_builder(self.name)
            if builder is None:
                self._peer = (None, 'no peer implementation known for this model')
            else:
                try:
                    peer = builder(self.model, x, self.device)
                    if self.cfg.channels_last:
                        peer.module.to(memory_format=torch.channels_last)
                    peer.module.requires_grad_(False)
                    self._peer = (peer, None)
                except Exception as e:  # noqa: BLE001 - e.g. torchgeo not installed
                    self._peer = (None, f'peer: {first_line(e)}')
        return self._peer

    def meta_peer(self, peer: _Peer) -> nn.Module:
        if self._meta_peer is None:
            self._meta_peer = copy.deepcopy(peer.module).to('meta')
        return self._meta_peer

    def meta_model(self) -> Optional[nn.Module]:
        if self._meta is None and not self._meta_failed:
            try:
                self._meta = _build(self.name, self.cfg.img_size, torch.device('meta'), self.cfg.model_kwargs).eval()
            except Exception:  # noqa: BLE001
                self._meta_failed = True
        return self._meta

    # -- candidates
    def fast(self, compiled: bool) -> Any:
        if compiled not in self._fast:
            self._fast[compiled] = optimize_for_inference(
                self.model, precision='auto', compile=compiled, channels_last=True if self.cfg.channels_last else None)
        return self._fast[compiled]

    def infer_candidates(self, mode: str, x: Any, kw: Dict[str, Any], peer: Optional[_Peer]) -> List[_Candidate]:
        make = _features_fn if mode == 'features' else _forward_fn
        out = []
        compiled_opts = (False, True) if self.cfg.compile else (False,)
        ours_mb = _module_mb(self.model)
        for compiled in compiled_opts:
            for prec in self.cfg.precisions:
                dtype = resolve_precision(prec, self.device)
                if prec == 'auto':
                    fast = self.fast(compiled)
                    out.append(_Candidate(OURS, prec, fast.dtype, compiled, make(fast, x, kw),
                                          weights_mb=_module_mb(fast)))
                else:
                    out.append(_Candidate(OURS, prec, dtype, compiled,
                                          self._wrap_infer(make(self.model, x, kw), dtype, compiled),
                                          weights_mb=ours_mb))
                if peer is not None:
                    pfn = peer.features if mode == 'features' else peer.forward
                    out.append(_Candidate(peer.arch, prec, dtype, compiled,
                                          self._wrap_infer(lambda f=pfn: f(x), dtype, compiled), peer_arch=peer.arch,
                                          weights_mb=_module_mb(peer.module)))
        return out

    def _wrap_infer(self, fn: Callable[[], Any], dtype: torch.dtype, compiled: bool) -> Callable[[], Any]:
        ctx = autocast(self.device, dtype)
        if compiled:
            fn = torch.compile(fn)

        def call():
            with torch.inference_mode(), ctx():
                return fn()
        return call

    def train_net(self, impl: str, peer: Optional[_Peer]) -> Tuple[nn.Module, torch.optim.Optimizer, Dict[str, Any]]:
        """The training copy of ``impl`` and its optimizer, shared by every precision (speed does not depend
        on the values, and one copy keeps memory to one model + AdamW state per implementation)."""
        if impl not in self._train:
            m = copy.deepcopy(self.model if impl == OURS else peer.module).train()
            for p in m.parameters():
                p.requires_grad_(True)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
            self._train[impl] = (m, opt, {})
        return self._train[impl]

    def train_candidates(self, x: Any, kw: Dict[str, Any], peer: Optional[_Peer]) -> List[_Candidate]:
        out = []
        impls = [OURS] + ([peer.arch] if peer is not None else [])
        compiled_opts = (False, True) if self.cfg.compile else (False,)
        for compiled in compiled_opts:
            for prec in self.cfg.precisions:
                dtype = resolve_precision(prec, self.device)
                for impl in impls:
                    m, opt, cache = self.train_net(impl, peer)
                    if compiled and 'compiled' not in cache:
                        cache['compiled'] = torch.compile(m)
                    net = cache['compiled'] if compiled else m
                    if impl == OURS:
                        fwd = lambda net=net: net(x, **kw)  # noqa: E731
                    else:
                        fwd = lambda net=net: peer.apply(net, x)  # noqa: E731
                    out.append(_Candidate(impl, prec, dtype, compiled, _train_step(opt, fwd, dtype, self.device),
                                          peer_arch=None if impl == OURS else impl, weights_mb=_module_mb(m)))
        return out


def _module_mb(m: Any) -> Optional[float]:
    if not isinstance(m, nn.Module):
        return None
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) / 2 ** 20


def _train_step(opt: torch.optim.Optimizer, fwd: Callable[[], torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> Callable[[], None]:
    ctx = autocast(device, dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            out = fwd()
        loss = out.float().square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    return step


def _cosines(out: Any, ref: Any) -> Tuple[Optional[float], Optional[float]]:
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor) or out.shape != ref.shape:
        return None, None
    c = F.cosine_similarity(out.detach().float().flatten(1), ref.detach().float().flatten(1), dim=1)
    return c.min().item(), c.mean().item()


def run_bench(cfg: BenchConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the report (``env``, ``config``, ``matmul_peak``, ``rows``)."""
    log = log or (lambda s: None if cfg.quiet else print(s, file=sys.stderr, flush=True))
    device = torch.device(cfg.device)
    tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    threads_before = torch.get_num_threads()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        env = environment(device)
        rows: List[Dict[str, Any]] = []
        shapes: Dict[Tuple[int, int, int], float] = {}
        peak_dtypes = sorted({dtype_name(resolve_precision(p, device)) for p in cfg.precisions} | {'fp32'},
                             key=['fp32', 'bf16', 'fp16'].index)
        deadline = time.monotonic() + cfg.budget_s if cfg.budget_s else None
        peak_before = measure_matmul_peak(device, peak_dtypes, (), cfg.peak_seconds,
                                          square_sizes=cfg.peak_square_sizes) if cfg.peak else {}
        for name in cfg.models:
            log(f'== {name}')
            if deadline is not None and time.monotonic() > deadline:
                rows.append(_row(cfg, name, OURS, None, '-', '-', torch.float32, False, 0, '-', status='skipped',
                                 error=f'time budget of {cfg.budget_s:g} s spent'))
                continue
            try:
                runner = _Runner(cfg, name, device, log)
            except Exception as e:  # noqa: BLE001 - one model that does not build is a row, not the end of the run
                if _is_oom(e):
                    _free(device)
                rows.append(_row(cfg, name, OURS, None, '-', '-', torch.float32, False, 0, '-', status='error',
                                 error=f'build: {first_line(e)}'))
                log(f'   build failed: {first_line(e)}')
                continue
            rows += _run_model(cfg, runner, device, log, deadline)
            shapes.update({k: max(v, shapes.get(k, 0.0)) for k, v in runner.gemm_shapes.items()})
            del runner
            _free(device)
        max_m = 65536 if device.type == 'cuda' else 8192
        model_shapes = _model_gemm_shapes(shapes, top=4, max_m=max_m)
        peak_after = measure_matmul_peak(device, peak_dtypes, model_shapes, cfg.peak_seconds,
                                         square_sizes=()) if cfg.peak else {}
        peak = _merge_peaks(peak_before, peak_after)
        _fill_fractions(rows, peak, device)
        _fill_peer_ratios(rows)
        env['load_avg_end'] = _load_avg()
        return dict(schema=SCHEMA, env=env, config=_config_dict(cfg), matmul_peak=peak, rows=rows,
                    notes=_NOTES)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
        torch.set_num_threads(threads_before)


_NOTES = [
    'FLOPs = 2 x multiply-accumulates (torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions, attention).',
    'fraction_of_peak = gflops_per_sample x samples_per_s / the matmul peak of the row\'s compute dtype, measured in '
    'the same run (best of square and model-shaped GEMMs, before and after the models).',
    'cosine_* = cosine similarity per sample of the row\'s output to the float32 eager output on the same input.',
    'peak_mem_mb: what one call needs on top of what is resident (CUDA: max_memory_allocated growth; CPU: peak RSS '
    'growth, a lower bound); weights_mb: parameters and buffers of the network the row runs.',
    'train rows: forward + backward + AdamW step; auto in training = autocast in the dtype the precision policy picks.',
]


def _config_dict(cfg: BenchConfig) -> Dict[str, Any]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def _merge_peaks(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for d in sorted(set(before) | set(after)):
        b, a = before.get(d, {}), after.get(d, {})
        vals = [v for v in (b.get('tflops'), a.get('tflops')) if v]
        out[d] = dict(tflops=max(vals) if vals else None, square_tflops_start=b.get('tflops'),
                      model_shapes_tflops_end=a.get('tflops'), shapes=b.get('shapes', []) + a.get('shapes', []))
    return out


def _fill_fractions(rows: List[Dict[str, Any]], peak: Dict[str, Any], device: torch.device) -> None:
    for r in rows:
        if r['status'] != 'ok' or not r.get('gflops_per_sample') or not r.get('samples_per_s'):
            continue
        r['achieved_tflops'] = r['gflops_per_sample'] * r['samples_per_s'] / 1e3
        p = peak.get(r['dtype'], {}).get('tflops')
        if p:
            r['peak_tflops'] = p
            r['fraction_of_peak'] = r['achieved_tflops'] / p


def _fill_peer_ratios(rows: List[Dict[str, Any]]) -> None:
    peers = {(r['model'], r['mode'], r['batch'], r['precision'], r['compiled']): r for r in rows
             if r['impl'] != OURS and r['status'] == 'ok'}
    for r in rows:
        if r['impl'] == OURS and r['status'] == 'ok':
            p = peers.get((r['model'], r['mode'], r['batch'], r['precision'], r['compiled']))
            if p and p.get('samples_per_s'):
                r['vs_peer'] = r['samples_per_s'] / p['samples_per_s']


def _row(cfg: BenchConfig, model: str, impl: str, peer_arch: Optional[str], mode: str, precision: str,
         dtype: torch.dtype, compiled: bool, batch: int, image_size: str, **kw: Any) -> Dict[str, Any]:
    row = {k: None for k in ROW_FIELDS}
    row.update(model=model, impl=impl, peer_arch=peer_arch, mode=mode, precision=precision, dtype=dtype_name(dtype),
               compiled=compiled, channels_last=cfg.channels_last, batch=batch, image_size=image_size, status='ok')
    row.update(kw)
    return row


def _batch_plan(cfg: BenchConfig, device: torch.device) -> Tuple[List[int], bool]:
    """(batch sizes to try, grow-until-done); ``auto``: powers of two, on CUDA until OOM, on CPU until the
    throughput saturates (< 5 % gain) or 64."""
    if cfg.batch_sizes != 'auto':
        return list(cfg.batch_sizes), False
    cap = cfg.max_batch if device.type == 'cuda' else min(cfg.max_batch, 64)
    return [2 ** i for i in range(int(math.log2(cap)) + 1)], True


def _run_model(cfg: BenchConfig, runner: _Runner, device: torch.device, log: Callable[[str], None],
               deadline: Optional[float] = None) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    sizes, auto = _batch_plan(cfg, device)
    dead: Dict[Tuple[str, str], int] = {}  # (candidate key, mode) -> batch at which it ran out of memory
    best_prev = 0.0
    modes = [m for mode in cfg.modes for m in (('features', 'forward') if mode == 'infer' else ('train',))]
    for batch in sizes:
        batch_rows: List[Dict[str, Any]] = []
        if deadline is not None and time.monotonic() > deadline:
            rows.append(_row(cfg, runner.name, OURS, None, '-', '-', torch.float32, False, batch, '-',
                             status='skipped', error=f'time budget of {cfg.budget_s:g} s spent'))
            continue
        try:
            x, kw = runner.example(batch)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            _free(device)
            rows.append(_row(cfg, runner.name, OURS, None, '-', '-', torch.float32, False, batch, '-',
                             status='oom', error=first_line(e)))
            break
        size = _size_of(x)
        peer, peer_error = runner.peer(x) if cfg.compare else (None, None)
        for mode in modes:
            batch_rows += _run_group(cfg, runner, device, mode, batch, x, kw, size, peer, dead, log)
            if peer_error and batch == sizes[0]:
                batch_rows.append(_row(cfg, runner.name, 'peer', None, mode, '-', torch.float32, False, batch, size,
                                       status='skipped', error=peer_error))
        rows += batch_rows
        del x, kw
        if device.type == 'cuda':
            torch.cuda.empty_cache()
        if auto:
            ok = [r['samples_per_s'] for r in batch_rows if r['status'] == 'ok' and r['samples_per_s']]
            if not ok:
                break  # every candidate out of memory: the sweep is done
            best = max(ok)
            if device.type != 'cuda' and best < 1.05 * best_prev:
                break
            best_prev = max(best, best_prev)
    return rows


def _run_group(cfg: BenchConfig, runner: _Runner, device: torch.device, mode: str, batch: int, x: Any,
               kw: Dict[str, Any], size: str, peer: Optional[_Peer], dead: Dict[Tuple[str, str], int],
               log: Callable[[str], None]) -> List[Dict[str, Any]]:
    name = runner.name
    try:
        cands = runner.train_candidates(x, kw, peer) if mode == 'train' else runner.infer_candidates(mode, x, kw, peer)
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            _free(device)
        return [_row(cfg, name, OURS, None, mode, '-', torch.float32, False, batch, size,
                     status='oom' if _is_oom(e) else 'error', error=first_line(e))]
    # reference: float32 eager output on the same input (inference modes)
    ref = None
    if mode != 'train':
        try:
            with torch.inference_mode():
                ref = (_features_fn if mode == 'features' else _forward_fn)(runner.model, x, kw)()
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                return [_row(cfg, name, OURS, None, mode, '-', torch.float32, False, batch, size, status='error',
                             error=first_line(e))]
            _free(device)
    # FLOPs (once per impl, mode, batch; on meta when possible)
    flops = {OURS: runner.count(OURS, mode, batch, lambda dev: _flop_fn(runner, mode, dev, x, kw))}
    if peer is not None:
        flops[peer.arch] = runner.count(peer.arch, mode, batch, lambda dev: _peer_flop_fn(runner, peer, mode, dev, x))
    # first call (compilation for compiled candidates), warm-up, memory; out-of-memory is a row
    for c in cands:
        if (c.key, mode) in dead:
            c.status, c.error = 'skipped', f'out of memory at batch {dead[(c.key, mode)]}'
            continue
        try:
            t0 = time.perf_counter()
            c.out = c.fn()
            _sync(device)
            if c.compiled:
                c.compile_s = time.perf_counter() - t0
            for _ in range(max(0, cfg.warmup - 1)):
                c.fn()
            c.mem = _measure_memory(c.fn, device)
        except Exception as e:  # noqa: BLE001
            c.out = None
            if _is_oom(e):
                c.status, c.error = 'oom', first_line(e)
                dead[(c.key, mode)] = batch
                _free(device)
            else:
                c.status, c.error = 'error', first_line(e)
    live = {c.key: c.fn for c in cands if c.status == 'ok'}
    times: Dict[str, List[float]] = {}
    if live:
        try:
            times = time_interleaved(live, device, warmup=0, iters=cfg.iters, min_seconds=cfg.min_seconds)
        except Exception as e:  # noqa: BLE001 - OOM while several candidates are resident: retry one by one
            if not _is_oom(e):
                raise
            _free(device)
            for c in cands:
                if c.status != 'ok':
                    continue
                try:
                    times[c.key] = time_fn(c.fn, device, warmup=0, iters=cfg.iters, min_seconds=cfg.min_seconds)
                except Exception as e2:  # noqa: BLE001
                    if not _is_oom(e2):
                        raise
                    c.status, c.error = 'oom', first_line(e2)
                    dead[(c.key, mode)] = batch
                    _free(device)
    rows = []
    for c in cands:
        r = _row(cfg, name, c.impl, c.peer_arch, mode, c.precision, c.dtype, c.compiled, batch, size,
                 status=c.status, error=c.error, params=runner.params if c.impl == OURS else
                 (sum(p.numel() for p in peer.module.parameters()) if peer is not None else None),
                 compile_s=c.compile_s, warmup=cfg.warmup, weights_mb=c.weights_mb, channels=_channels_of(x))
        f = flops.get(c.impl)
        r['gflops_per_sample'] = f / batch / 1e9 if f else None
        if c.status == 'ok' and c.key in times:
            t = times[c.key]
            med = statistics.median(t)
            r.update(samples_per_s=batch / (med / 1e3), latency_ms_median=med, latency_ms_p90=percentile(t, 90),
                     latency_ms_p99=percentile(t, 99), latency_ms_mean=statistics.fmean(t), iters=len(t))
            r['peak_mem_mb'], r['mem_kind'] = c.mem
            if ref is not None and (c.impl == OURS or (peer is not None and peer.same_weights)):
                r['cosine_min'], r['cosine_mean'] = _cosines(c.out, ref)
        rows.append(r)
        log('   ' + _log_line(r))
        c.out = None
    return rows


def _flop_fn(runner: _Runner, mode: str, dev: torch.device, x: Any, kw: Dict[str, Any]) -> Callable[[], Any]:
    if dev.type == 'meta':
        m = runner.meta_model()
        if m is None:
            raise RuntimeError('model does not build on meta')
        xm = _tree_map(lambda t: t.to('meta'), x)
        kwm = _tree_map(lambda t: t.to('meta'), kw)
    else:  # training updates BatchNorm statistics: count on a copy, the shared model stays as it is
        m, xm, kwm = (copy.deepcopy(runner.model) if mode == 'train' else runner.model), x, kw
    if mode == 'train':
        return _train_flop_fn(m, lambda: m(xm, **kwm))
    m = m.eval()
    f = _features_fn(m, xm, kwm) if mode == 'features' else _forward_fn(m, xm, kwm)

    def infer():
        with torch.no_grad():
            return f()
    return infer


def _train_flop_fn(m: nn.Module, fwd: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """Forward + backward of ``m`` in training mode; leaves it in eval mode without gradients."""
    def fn():
        m.train()
        for p in m.parameters():
            p.requires_grad_(True)
        try:
            fwd().float().square().mean().backward()
        finally:
            for p in m.parameters():
                p.requires_grad_(False)
                p.grad = None
            m.eval()
    return fn


def _peer_flop_fn(runner: _Runner, peer: _Peer, mode: str, dev: torch.device, x: Any) -> Callable[[], Any]:
    # on meta (free), or on the device: a copy for training (which updates BatchNorm statistics)
    if dev.type == 'meta':
        module = runner.meta_peer(peer)
    else:
        module = copy.deepcopy(peer.module) if mode == 'train' else peer.module
    xm = _tree_map(lambda t: t.to(dev), x)
    apply = peer.forward_apply if mode == 'forward' else peer.apply
    if mode == 'train':
        return _train_flop_fn(module, lambda: apply(module, xm))

    def infer():
        with torch.no_grad():
            return apply(module, xm)
    return infer


def _log_line(r: Dict[str, Any]) -> str:
    head = f'{r["impl"]:<28s} {r["mode"]:<8s} {r["precision"]:<5s}{"+c" if r["compiled"] else "  "} b={r["batch"]:<4}'
    if r['status'] != 'ok':
        return f'{head} {r["status"]}: {r["error"]}'
    s = f'{head} {r["samples_per_s"]:9.2f}/s  p50 {r["latency_ms_median"]:8.2f} ms'
    if r.get('cosine_min') is not None:
        s += f'  cos {r["cosine_min"]:.6f}'
    return s


# ----------------------------------------------------------------------------------------------- outputs


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return ''
    if isinstance(v, bool):
        return 'yes' if v else ''
    if isinstance(v, float):
        if math.isnan(v):
            return ''
        return f'{v:.{nd}f}'
    return str(v)


def markdown_report(report: Dict[str, Any]) -> str:
    """The report as Markdown: environment, matmul peaks, one table of rows, the peer comparison."""
    env, rows = report['env'], report['rows']
    flags = ', '.join(f for f, on in env.get('cpu_flags', {}).items() if on) or 'none'
    lines = [
        f'# eobackbones bench ({env.get("device")}: {env.get("device_name")})', '',
        f'- torch {env.get("torch")} (CUDA build {env.get("cuda_build")}), timm {env.get("timm")}, '
        f'torchgeo {env.get("torchgeo")}, Python {env.get("python")}; git {env.get("git_commit")}',
        f'- CPU: {env.get("cpu_model")}; flags: {flags}; capability {env.get("cpu_capability")}; '
        f'{env.get("threads")} threads of {env.get("cpu_affinity") or env.get("cpu_count")} CPUs',
        f'- load average at start / end: {env.get("load_avg_start")} / {env.get("load_avg_end")}',
        f'- auto precision: {env.get("auto_precision")}; TF32: {"on" if report["config"].get("tf32") else "off"}',
    ]
    if env.get('driver') or env.get('device_capability'):
        lines.append(f'- GPU: {env.get("device_name")} (sm {env.get("device_capability")}, '
                     f'{env.get("device_memory_gb")} GB), driver {env.get("driver")}, cuDNN {env.get("cudnn")}')
    peak = report.get('matmul_peak') or {}
    if peak:
        lines += ['', '## Matmul peak (measured in this run)', '', '| dtype | shape (m, k, n) | kind | TFLOP/s |',
                  '|---|---|---|---:|']
        for d, p in peak.items():
            for s in p['shapes']:
                lines.append(f'| {d} | {s["m"]}, {s["k"]}, {s["n"]} | {s["kind"]} | '
                             f'{_fmt(s["tflops"], 3) or s.get("error", "")} |')
            lines.append(f'| **{d} peak** | | | **{_fmt(p["tflops"], 3)}** |')
    lines += ['', '## Results', '',
              '| model | impl | mode | precision | batch | image | samples/s | p50 ms | p90 ms | p99 ms | '
              'GFLOP/sample | % of peak | cos min | peak MB | vs peer | compile s | status |',
              '|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
    for r in rows:
        frac = r.get('fraction_of_peak')
        prec = r['precision'] + (' +compile' if r.get('compiled') else '') + (' NHWC' if r.get('channels_last') else '')
        lines.append('| ' + ' | '.join([
            r['model'], r['impl'], r['mode'], prec, str(r['batch']),
            f'{r["channels"]} x {r["image_size"]}' if r.get('channels') else (r['image_size'] or ''),
            _fmt(r['samples_per_s']), _fmt(r['latency_ms_median']), _fmt(r['latency_ms_p90']),
            _fmt(r['latency_ms_p99']), _fmt(r['gflops_per_sample']), _fmt(None if frac is None else 100 * frac, 1),
            _fmt(r['cosine_min'], 6), _fmt(r['peak_mem_mb'], 0), _fmt(r['vs_peer']), _fmt(r['compile_s'], 1),
            r['status'] if r['status'] == 'ok' else f'{r["status"]}: {r["error"]}']) + ' |')
    cmp_rows = [r for r in rows if r.get('vs_peer') is not None]
    if cmp_rows:
        lines += ['', '## Against the peer implementation (same process, same input, interleaved)', '',
                  '| model | peer | mode | precision | batch | ours samples/s | peer samples/s | ours / peer |',
                  '|---|---|---|---|---:|---:|---:|---:|']
        peers = {(r['model'], r['mode'], r['batch'], r['precision'], r['compiled']): r for r in rows
                 if r['impl'] != OURS and r['status'] == 'ok'}
        for r in cmp_rows:
            p = peers[(r['model'], r['mode'], r['batch'], r['precision'], r['compiled'])]
            lines.append(f'| {r["model"]} | {p["impl"]} | {r["mode"]} | {r["precision"]} | {r["batch"]} | '
                         f'{_fmt(r["samples_per_s"])} | {_fmt(p["samples_per_s"])} | **{_fmt(r["vs_peer"])}x** |')
    lines += ['', '## Notes', ''] + [f'- {n}' for n in report.get('notes', [])]
    return '\n'.join(lines) + '\n'


def write_report(report: Dict[str, Any], out: Union[str, Path], plot: bool = False) -> List[Path]:
    """``bench.json``, ``bench.csv``, ``bench.md`` (and the ``--plot`` PNGs) under ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / 'bench.json', out / 'bench.csv', out / 'bench.md']
    paths[0].write_text(json.dumps(report, indent=1, default=str) + '\n', encoding='utf-8')
    with paths[1].open('w', newline='', encoding='utf-8') as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS), extrasaction='ignore')
        w.writeheader()
        w.writerows(report['rows'])
    paths[2].write_text(markdown_report(report), encoding='utf-8')
    if plot:
        paths += plot_report(report, out)
    return paths


def plot_report(report: Dict[str, Any], out: Union[str, Path]) -> List[Path]:
    """samples/s vs batch, memory vs batch (per model, precision, impl), and fraction of peak (bar chart)."""
    import matplotlib  # optional dependency (--plot)
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out = Path(out)
    rows = [r for r in report['rows'] if r['status'] == 'ok' and r.get('samples_per_s')]
    paths = []
    modes = sorted({r['mode'] for r in rows})
    for key, ylabel, fname in (('samples_per_s', 'samples / s', 'throughput.png'),
                               ('peak_mem_mb', 'peak memory (MB)', 'memory.png')):
        if not modes:
            break
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            series: Dict[str, List[Tuple[int, float]]] = {}
            for r in rows:
                if r['mode'] == mode and r.get(key) is not None:
                    label = f'{r["model"]} {r["precision"]}' + ('' if r['impl'] == OURS else f' [{r["impl"]}]') + \
                        (' compiled' if r['compiled'] else '')
                    series.setdefault(label, []).append((r['batch'], r[key]))
            for label, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=label)
            ax.set_xscale('log', base=2)
            ax.set_xlabel('batch size')
            ax.set_ylabel(ylabel)
            ax.set_title(mode)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        paths.append(out / fname)
    best: Dict[str, Tuple[int, float]] = {}
    for r in rows:
        if r.get('fraction_of_peak') is None:
            continue
        label = f'{r["model"]} {r["mode"]} {r["precision"]}' + ('' if r['impl'] == OURS else f' [{r["impl"]}]') + \
            (' compiled' if r['compiled'] else '')
        if label not in best or r['batch'] > best[label][0]:
            best[label] = (r['batch'], r['fraction_of_peak'])
    if best:
        labels = sorted(best)
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.5))
        ax.barh(labels, [100 * best[k][1] for k in labels])
        ax.set_xlabel('% of the measured matmul peak (largest batch that ran)')
        ax.tick_params(axis='y', labelsize=7)
        ax.grid(axis='x', alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / 'fraction_of_peak.png', dpi=120)
        plt.close(fig)
        paths.append(out / 'fraction_of_peak.png')
    return paths


# ----------------------------------------------------------------------------------------------- command line


def _csv_choices(choices: Sequence[str], what: str) -> Callable[[str], List[str]]:
    def parse(s: str) -> List[str]:
        items = [v.strip() for v in s.split(',') if v.strip()]
        bad = [v for v in items if v not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f'{what} must be a comma-separated subset of {",".join(choices)}, got {s!r}')
        return list(dict.fromkeys(items))
    return parse


def _batch_sizes(s: str) -> Union[List[int], str]:
    if s.strip() == 'auto':
        return 'auto'
    try:
        vals = [int(v) for v in s.split(',') if v.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f'--batch-sizes must be positive integers like 1,8,32 or "auto", got {s!r}')
    return list(dict.fromkeys(vals))


def _positive_int(what: str) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f'{what} must be a positive integer, got {s!r}')
        return v
    return parse


def _non_negative_float(what: str) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            v = -1.0
        if not v >= 0 or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f'{what} must be a number >= 0, got {s!r}')
        return v
    return parse


def _model_arg(s: str) -> Tuple[str, Any]:
    key, sep, value = s.partition('=')
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f'--model-arg must be KEY=VALUE (e.g. bands=B04,B03,B02), got {s!r}')
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = [v.strip() for v in value.split(',')] if ',' in value else value
    return key.strip(), parsed


def _device(s: str) -> str:
    try:
        d = torch.device(s)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f'--device must be cpu, cuda or cuda:N, got {s!r}')
    return str(d)


def add_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``eobackbones bench`` (also used by ``benchmarks/throughput.py``); all validated at parse time."""
    parser.add_argument('patterns', nargs='+', metavar='PATTERN', help='model names or fnmatch patterns (dofa_*)')
    parser.add_argument('--batch-sizes', type=_batch_sizes, default=[1, 8, 32], metavar='1,8,32|auto',
                        help='batch sizes; auto: powers of two, on CUDA until out of memory, on CPU until the '
                             'throughput saturates (at most 64)')
    parser.add_argument('--img-size', type=_positive_int('--img-size'), default=None,
                        help='input size (default: each model\'s native size)')
    parser.add_argument('--precision', type=_csv_choices(PRECISIONS, '--precision'), default=['fp32', 'auto'],
                        metavar='fp32,bf16,fp16,auto',
                        help='fp32; bf16/fp16 autocast (fp16: CUDA only); '
                             'auto: optimize_for_inference(precision="auto")')
    parser.add_argument('--mode', type=_csv_choices(MODES, '--mode'), default=['infer'], metavar='infer,train',
                        help='infer: pooled features and full forward; train: forward + backward + AdamW step')
    parser.add_argument('--channels-last', action='store_true', help='NHWC weights and inputs for every candidate')
    parser.add_argument('--compile', action='store_true',
                        help='also time each candidate through torch.compile (compile time reported apart)')
    parser.add_argument('--compare', action='store_true',
                        help='time the peer implementation (torchgeo DOFA, timm ResNet / Swin) in the same run')
    parser.add_argument('--device', type=_device, default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default=None, help='output folder (default: bench-<device>-<time>)')
    parser.add_argument('--plot', action='store_true', help='also write PNG plots (matplotlib)')
    parser.add_argument('--warmup', type=_positive_int('--warmup'), default=2, help='untimed calls per candidate')
    parser.add_argument('--iters', type=_positive_int('--iters'), default=10, help='timed calls per candidate')
    parser.add_argument('--min-seconds', type=_non_negative_float('--min-seconds'), default=0.0,
                        help='keep timing until each candidate has this much measured time')
    parser.add_argument('--max-batch', type=_positive_int('--max-batch'), default=4096,
                        help='upper bound of --batch-sizes auto')
    parser.add_argument('--model-arg', type=_model_arg, action='append', default=[], metavar='KEY=VALUE',
                        help='constructor argument for every model (JSON value, or a comma list of strings), e.g. '
                             'bands=B01,B02,B03 or "wavelengths=[0.665,0.56,0.49]"; repeatable')
    parser.add_argument('--budget-s', type=_non_negative_float('--budget-s'), default=None,
                        help='time budget of the run: batch sizes and models not started by then become skipped rows')
    parser.add_argument('--threads', type=_positive_int('--threads'), default=None,
                        help='CPU threads for the run (torch.set_num_threads; default: torch\'s); on a shared, loaded '
                             'machine 1 thread gives far steadier ratios than threads that wait on each other')
    parser.add_argument('--no-peak', action='store_true', help='skip the matmul peak measurement')
    parser.add_argument('--tf32', action='store_true', help='allow TF32 on CUDA (default off: fp32 means fp32)')
    parser.add_argument('--quiet', action='store_true', help='no progress lines, no table on stdout')
    return parser


def _bench_error(msg: str) -> int:
    print(f'error: {msg}', file=sys.stderr)
    return 2


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The validated :class:`BenchConfig` of parsed arguments; ValueError with one line for what parsing cannot see."""
    device = torch.device(args.device)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'--device {args.device}: CUDA is not available on this machine '
                             f'(torch {torch.__version__}, CUDA build {torch.version.cuda})')
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f'--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)')
    if 'fp16' in args.precision and device.type != 'cuda':
        raise ValueError(f'--precision fp16 runs on CUDA only, got --device {args.device}; use bf16 or fp32')
    names: List[str] = []
    for pat in args.patterns:
        found = list_models(pat) if any(ch in pat for ch in '*?[') else \
            ([pat] if pat.split('.')[0] in list_models() else [])
        if not found:
            raise ValueError(f'no model matches {pat!r}; see `eobackbones list`')
        names += [n for n in found if n not in names]
    return BenchConfig(
        models=names, batch_sizes=args.batch_sizes, img_size=args.img_size, precisions=list(args.precision),
        modes=list(args.mode), channels_last=args.channels_last, compile=args.compile, compare=args.compare,
        device=str(device), warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds,
        peak=not args.no_peak, tf32=args.tf32, max_batch=args.max_batch, budget_s=args.budget_s or None,
        model_kwargs=dict(args.model_arg), threads=args.threads, quiet=args.quiet)


def main_bench(args: argparse.Namespace) -> int:
    """Run ``eobackbones bench``; user errors are one line on stderr and exit status 2."""
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        return _bench_error(first_line(e))
    report = run_bench(cfg)
    out = Path(args.out) if args.out else Path(f'bench-{cfg.device.replace(":", "")}-{time.strftime("%Y%m%d-%H%M%S")}')
    paths = write_report(report, out, plot=args.plot)
    if not cfg.quiet:
        print(markdown_report(report), end='')
        print(f'wrote {", ".join(str(p) for p in paths)}', file=sys.stderr)
    bad = [r for r in report['rows'] if r['status'] == 'error']
    return 1 if bad and len(bad) == len(report['rows']) else 0


# ----------------------------------------------------------------------------------------------- one row (API)


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
    """Time one model at one batch size and autocast dtype; returns one small row (a quick API for scripts).

    Args:
        model: a registered name (built with random init) or a model.
        batch_size: samples per call.
        dtype: ``fp32``, ``bf16`` or ``fp16`` autocast (the precision policy's names; ``auto`` too).
        device: ``cpu``, ``cuda``, ``cuda:N``.
        image_size: input size (default: the spec's native size).
        warmup, iters: untimed and timed calls.
        mode: ``forward`` (``model(x)``) or ``features`` (pooled pre-logits features).
        channels_last: NHWC model and input.
        model_kwargs: passed to ``create_model`` when ``model`` is a name.
        fn: custom ``fn(model, x)`` to time instead of ``mode``.
    """
    device = torch.device(device)
    name = model if isinstance(model, str) else \
        getattr(getattr(model, 'pretrained_cfg', None), 'name', type(model).__name__)
    if isinstance(model, str):
        model = create_model(model, pretrained=False, **(model_kwargs or {}))
    if mode not in ('forward', 'features'):
        raise ValueError(f'mode must be forward or features, got {mode!r}')
    ctx = autocast(device, resolve_precision(dtype, device))
    model = model.eval().to(device)
    x, kw = example_call(model, batch_size=batch_size, image_size=image_size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = _channels_last(x)
    if fn is None:
        call = (_features_fn if mode == 'features' else _forward_fn)(model, x, kw)
    else:
        call = lambda: fn(model, x)  # noqa: E731

    def run():
        with torch.inference_mode(), ctx():
            return call()

    peak = None
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_fn(run, device, warmup=warmup, iters=iters)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    med = statistics.median(times)
    return dict(model=name, batch=batch_size, dtype=dtype, device=str(device), mode='custom' if fn else mode,
                image_size=_size_of(x), img_per_s=batch_size / (med / 1e3), latency_ms_p50=med,
                latency_ms_p90=percentile(times, 90), latency_ms_mean=statistics.fmean(times), peak_mem_mb=peak,
                iters=len(times), torch=torch.__version__, git_commit=git_commit())
