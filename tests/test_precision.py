"""The one precision policy: what ``auto`` means per device, and the autocast factory."""
import contextlib

import pytest
import torch
from torch import nn

from eobackbones import precision
from eobackbones.precision import autocast, describe_precision, dtype_name, resolve_precision


@pytest.mark.parametrize('flags, dtype, kind', [
    ({'avx512f', 'amx_bf16', 'amx_tile', 'avx512_bf16'}, torch.bfloat16, 'AMX'),
    ({'avx512f', 'avx512_bf16'}, torch.bfloat16, 'AVX512-BF16'),
    ({'avx2', 'fma', 'avx512f'}, torch.float32, 'without native bf16'),
    (set(), torch.float32, 'without native bf16'),
])
def test_auto_on_cpu_follows_the_cpu_flags(monkeypatch, flags, dtype, kind):
    monkeypatch.setattr(precision, 'cpu_flags', lambda: frozenset(flags))
    assert precision.cpu_has_native_bf16() == (dtype == torch.bfloat16)
    assert resolve_precision('auto', 'cpu') == dtype
    assert kind in describe_precision('auto', 'cpu')


@pytest.mark.parametrize('bf16, dtype', [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_is_bf16_only_where_native(monkeypatch, bf16, dtype):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16)
    assert resolve_precision('auto', 'cuda') == dtype  # never fp16 silently
    assert resolve_precision('auto', torch.device('cuda', 1)) == dtype


def test_explicit_precisions_and_errors():
    assert resolve_precision('fp32', 'cpu') == torch.float32
    assert resolve_precision('bf16', 'cpu') == torch.bfloat16
    assert resolve_precision('fp16', 'cuda') == torch.float16
    assert describe_precision('bf16', 'cpu') == 'bf16 (requested)'
    with pytest.raises(ValueError, match="fp16 runs on CUDA devices only, got device 'cpu'"):
        resolve_precision('fp16', 'cpu')
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'float32'"):
        resolve_precision('float32', 'cpu')
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ['fp32', 'bf16', 'fp16']


def test_autocast_factory():
    assert autocast('cpu', torch.float32) is contextlib.nullcontext
    ctx = autocast('cpu', torch.bfloat16)
    for _ in range(2):  # a factory: one fresh context per `with`
        with ctx():
            y = nn.Linear(4, 4)(torch.randn(2, 4))
        assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match='autocast dtype'):
        autocast('cpu', torch.int8)
