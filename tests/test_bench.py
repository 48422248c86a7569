"""Benchmark harness: structure and bookkeeping only (no timed assertions)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eobackbones.bench import autocast_context, benchmark_model, percentile, time_fn
from eobackbones.models import EOModelMixin, build_model_with_cfg, register_arch_cfg, register_model
from eobackbones.cfg import PretrainedCfg
from eobackbones.spec import InputSpec, ModalitySpec

REPO = Path(__file__).resolve().parents[1]


class _BenchTiny(EOModelMixin, nn.Module):
    def __init__(self, num_classes: int = 0, **_):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.num_classes, self.num_features = num_classes, 8

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def tbtiny(pretrained=False, **kw):
    return build_model_with_cfg(_BenchTiny, 'tbtiny', pretrained, **kw)


@pytest.fixture(autouse=True, scope='module')
def _tiny_model():
    """Registered only while this module runs, so other tests' model lists stay clean."""
    from eobackbones.models import _registry as R
    register_arch_cfg(PretrainedCfg('tbtiny', input_spec=InputSpec(
        (ModalitySpec('s2', 'sentinel2', ('B04', 'B03', 'B02'), unit='reflectance_1e4'),), image_size=(32, 32))))
    register_model(tbtiny)
    yield
    for table in (R._model_entrypoints, R._model_to_module, R._arch_cfgs):
        table.pop('tbtiny', None)


def test_time_fn_cpu_counts_calls_and_returns_ms():
    calls = []
    times = time_fn(lambda: calls.append(1), 'cpu', warmup=2, iters=5)
    assert len(calls) == 7 and len(times) == 5 and all(t >= 0 for t in times)


def test_time_fn_cuda_path_with_fake_events(monkeypatch):
    """The CUDA branch (events + synchronize) run on CPU with stand-in events."""
    synced = []

    class FakeEvent:
        clock = 0.0

        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            FakeEvent.clock += 1.5
            self.t = FakeEvent.clock

        def elapsed_time(self, other):
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, 'Event', FakeEvent)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *a, **k: synced.append(1))
    calls = []
    times = time_fn(lambda: calls.append(1), 'cuda', warmup=1, iters=4)
    assert len(calls) == 5 and times == [1.5] * 4 and len(synced) == 2


def test_percentile_matches_numpy():
    v = list(np.random.default_rng(0).random(17))
    for q in (0, 50, 90, 100):
        assert percentile(v, q) == pytest.approx(float(np.percentile(v, q)))


def test_autocast_context_choices():
    assert autocast_context(torch.device('cpu'), 'fp32')() is not None
    with autocast_context(torch.device('cpu'), 'bf16')():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match='CUDA only'):
        autocast_context(torch.device('cpu'), 'fp16')
    with pytest.raises(ValueError):
        autocast_context(torch.device('cpu'), 'int8')


def test_benchmark_model_row():
    row = benchmark_model('tbtiny', batch_size=4, dtype='fp32', warmup=1, iters=3)
    assert row['model'] == 'tbtiny' and row['batch'] == 4 and row['device'] == 'cpu' and row['image_size'] == '32x32'
    assert row['img_per_s'] > 0 and row['latency_ms_p90'] >= row['latency_ms_p50'] > 0 and row['iters'] == 3
    assert row['peak_mem_mb'] is None and row['torch'] == torch.__version__ and 'git_commit' in row
    feats = benchmark_model('tbtiny', batch_size=2, dtype='bf16', image_size=64, mode='features', warmup=1, iters=2)
    assert feats['image_size'] == '64x64' and feats['mode'] == 'features' and feats['dtype'] == 'bf16'


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / 'benchmarks' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_cli_writes_json_csv_md(tmp_path, capsys):
    mod = _load_script('throughput')
    rc = mod.main(['--models', 'tbtiny', '--batch-sizes', '1', '2', '--dtypes', 'fp32', 'fp16', '--device', 'cpu',
                   '--warmup', '1', '--iters', '2', '--out', str(tmp_path), '--stem', 't'])
    assert rc == 0
    rows = json.loads((tmp_path / 't.json').read_text())
    assert len(rows) == 4
    assert [r.get('error') is None for r in rows] == [True, False, True, False]  # fp16 on CPU is reported, not fatal
    assert (tmp_path / 't.csv').read_text().startswith('model,batch,dtype')
    assert '| tbtiny | 1 | fp32 | cpu |' in (tmp_path / 't.md').read_text()
