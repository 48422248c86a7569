"""Benchmark harness: report structure, modes, precisions, peers, out-of-memory rows, peak, CLI errors.

Tiny configurations (1-2 timed calls); no assertion on timings.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tiny_models
from eobackbones import bench
from eobackbones.bench import (ROW_FIELDS, SCHEMA, BenchConfig, add_bench_args, count_flops, main_bench,
                               measure_matmul_peak, percentile, run_bench, time_fn, time_interleaved, write_report)

REPO = Path(__file__).resolve().parents[1]
TINY = 'test_tiny_cnn'  # tests/tiny_models.py: conv stem + 2 conv/BatchNorm stages, 3 x 32 x 32 input
CPU_PRECISIONS = ['fp32', 'bf16', 'auto']


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small models, one intra-op thread


def _cfg(**kw) -> BenchConfig:
    base = dict(models=[TINY], batch_sizes=[2], precisions=['fp32'], modes=['infer'], warmup=1, iters=2,
                peak=False, quiet=True)
    base.update(kw)
    return BenchConfig(**base)


def _tiny_flops_per_sample() -> int:
    """2 x MACs of TinyCNN (width 8) on 3 x 32 x 32: three 3x3 stride-2 convolutions."""
    macs = 16 * 16 * 8 * 3 * 9 + 8 * 8 * 16 * 8 * 9 + 4 * 4 * 32 * 16 * 9
    return 2 * macs


# ----------------------------------------------------------------------------------------------- timing


def test_time_fn_cpu_counts_calls_and_returns_ms():
    calls = []
    times = time_fn(lambda: calls.append(1), 'cpu', warmup=2, iters=5)
    assert len(calls) == 7 and len(times) == 5 and all(t >= 0 for t in times)


def test_time_interleaved_round_robin():
    order = []
    times = time_interleaved({'a': lambda: order.append('a'), 'b': lambda: order.append('b')}, 'cpu', warmup=1,
                             iters=3)
    assert order == ['a', 'b'] * 4 and len(times['a']) == len(times['b']) == 3


def test_time_interleaved_cuda_path_with_fake_events(monkeypatch):
    """The CUDA branch (events + one synchronize per round) run on CPU with stand-in events."""
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
    times = time_interleaved({'a': lambda: calls.append(1), 'b': lambda: calls.append(2)}, 'cuda', warmup=1, iters=4)
    assert len(calls) == 10 and times['a'] == [1.5] * 4 and times['b'] == [1.5] * 4
    assert len(synced) == 5  # after the warm-up, then once per round


def test_percentile_matches_numpy():
    v = list(np.random.default_rng(0).random(17))
    for q in (0, 50, 90, 99, 100):
        assert percentile(v, q) == pytest.approx(float(np.percentile(v, q)))


# ----------------------------------------------------------------------------------------------- measurements


def test_count_flops_linear_and_conv_shapes():
    lin = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    flops, shapes = count_flops(lambda: lin(x))
    assert flops == 2 * 4 * 32 * 16 and shapes == {(4, 32, 16): 2.0 * 4 * 32 * 16}
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.device('meta'):  # shapes only: counted without memory or compute
        meta_conv = nn.Conv2d(3, 8, 3, padding=1)
    flops_meta, shapes = count_flops(lambda: meta_conv(torch.empty(2, 3, 10, 10, device='meta')))
    flops_cpu, _ = count_flops(lambda: conv(torch.randn(2, 3, 10, 10)))
    assert flops_meta == flops_cpu == 2 * 2 * 100 * 8 * 27
    assert shapes == {(200, 27, 8): float(flops_cpu)}  # the convolution as its implicit GEMM


def test_measure_matmul_peak_structure():
    peak = measure_matmul_peak('cpu', ['fp32', 'bf16'], shapes=[(64, 32, 16)], min_seconds=0.005,
                               square_sizes=(64,))
    assert set(peak) == {'fp32', 'bf16'}
    for d, p in peak.items():
        assert [(s['m'], s['k'], s['n'], s['kind']) for s in p['shapes']] == [(64, 64, 64, 'square'),
                                                                              (64, 32, 16, 'model')]
        assert p['tflops'] == max(s['tflops'] for s in p['shapes']) > 0
    assert peak['bf16']['dtype'] == 'bfloat16'


def test_cpu_peak_rss_growth_sees_an_allocation():
    with bench._CpuPeak() as p:
        t = torch.ones(64 * 2 ** 20 // 4)  # 64 MB, touched
        del t
    assert p.kind in ('cpu_rss_growth', 'cpu_maxrss_growth')
    if p.kind == 'cpu_rss_growth':
        assert 48 <= p.mb <= 512


# ----------------------------------------------------------------------------------------------- the run


def test_run_bench_all_cpu_modes_and_precisions(tmp_path):
    cfg = _cfg(batch_sizes=[1, 2], precisions=CPU_PRECISIONS, modes=['infer', 'train'], peak=True,
               peak_seconds=0.005, peak_square_sizes=(64,))
    report = run_bench(cfg)
    assert report['schema'] == SCHEMA and report['config']['precisions'] == CPU_PRECISIONS
    env = report['env']
    for key in ('device', 'torch', 'cpu_model', 'cpu_flags', 'threads', 'git_commit', 'load_avg_start',
                'load_avg_end', 'auto_precision'):
        assert key in env
    assert {'amx_bf16', 'avx512_bf16'} <= set(env['cpu_flags'])
    rows = report['rows']
    assert len(rows) == 2 * 3 * 3  # batch x (features, forward, train) x precision
    assert {(r['batch'], r['mode'], r['precision']) for r in rows} == {
        (b, m, p) for b in (1, 2) for m in ('features', 'forward', 'train') for p in CPU_PRECISIONS}
    for r in rows:
        assert tuple(r) == ROW_FIELDS and r['status'] == 'ok', r
        assert r['samples_per_s'] > 0 and r['iters'] == 2 and r['image_size'] == '32x32' and r['channels'] == '3'
        assert r['latency_ms_p99'] >= r['latency_ms_p90'] >= r['latency_ms_median'] > 0
        assert r['params'] == sum(p.numel() for p in tiny_models.TinyCNN().parameters())
        assert r['mem_kind'] in ('cpu_rss_growth', 'cpu_maxrss_growth') and r['peak_mem_mb'] >= 0
        assert 0 < r['fraction_of_peak'] == pytest.approx(r['achieved_tflops'] / r['peak_tflops'])
        assert r['dtype'] == ('fp32' if r['precision'] == 'fp32' else 'bf16')  # native-bf16 CPU: auto is bf16
        if r['mode'] == 'train':
            assert r['cosine_min'] is None and r['gflops_per_sample'] * 1e9 > 1.5 * _tiny_flops_per_sample()
        else:
            assert r['gflops_per_sample'] * 1e9 == pytest.approx(_tiny_flops_per_sample())
            assert r['cosine_min'] >= (0.999999 if r['precision'] == 'fp32' else 0.999)
            assert r['cosine_mean'] >= r['cosine_min']
    w = {(r['mode'], r['precision']): r['weights_mb'] for r in rows}
    assert w[('features', 'auto')] < w[('features', 'fp32')] == w[('features', 'bf16')]  # bf16 weights, fp32 BN
    assert set(report['matmul_peak']) == {'fp32', 'bf16'}
    assert any(s['kind'] == 'model' for s in report['matmul_peak']['fp32']['shapes'])  # the model's GEMMs
    paths = write_report(report, tmp_path, plot=True)
    assert {p.name for p in paths} == {'bench.json', 'bench.csv', 'bench.md', 'throughput.png', 'memory.png',
                                       'fraction_of_peak.png'}
    back = json.loads((tmp_path / 'bench.json').read_text())
    assert back['rows'] == json.loads(json.dumps(rows)) and back['schema'] == SCHEMA
    with (tmp_path / 'bench.csv').open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ROW_FIELDS and len(list(reader)) == len(rows)
    md = (tmp_path / 'bench.md').read_text()
    assert '## Matmul peak' in md and '| test_tiny_cnn | eobackbones | train | auto | 2 | 3 x 32x32 |' in md


def _copy_peer(model, x, device):
    """A stand-in peer: an independent copy of the model, called through the peer interface."""
    import copy
    net = copy.deepcopy(model).eval()
    return bench._Peer('copy_peer', net, lambda m, inp: m.forward_head(m.forward_features(inp), pre_logits=True),
                       lambda m, inp: m(inp), True)


def test_compare_runs_peer_interleaved_and_reports_ratio(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, 'PEERS', [(TINY, _copy_peer)])
    report = run_bench(_cfg(precisions=['fp32', 'auto'], modes=['infer', 'train'], compare=True))
    rows = report['rows']
    ours = [r for r in rows if r['impl'] == 'eobackbones']
    peers = [r for r in rows if r['impl'] == 'copy_peer']
    assert len(ours) == len(peers) == 6
    assert all(r['status'] == 'ok' and r['vs_peer'] > 0 for r in ours)
    assert all(r['peer_arch'] == 'copy_peer' and r['vs_peer'] is None for r in peers)
    for r in peers:
        if r['mode'] != 'train':
            assert r['cosine_min'] >= 0.999  # same weights: the peer agrees with our float32 output
    assert '## Against the peer implementation' in bench.markdown_report(report)


def test_compare_without_a_known_peer_is_a_skipped_row():
    rows = run_bench(_cfg(compare=True))['rows']
    skipped = [r for r in rows if r['status'] == 'skipped']
    assert skipped and all('no peer' in r['error'] for r in skipped)
    assert all(r['status'] == 'ok' for r in rows if r['impl'] == 'eobackbones')


def test_real_peer_table_resolves_every_family():
    assert bench._peer_builder('dofa_base') is bench._torchgeo_dofa_peer
    for name in ('dualsimclr_resnet50_s2', 'dualsimclr_resnet18', 'sslswin_tiny_s1'):
        assert bench._peer_builder(name) is not None
    assert bench._peer_builder('test_tiny_cnn') is None


def test_timm_peer_copies_weights_of_a_pair():
    import eobackbones
    model = eobackbones.create_model('dualsimclr_resnet18').eval()
    from eobackbones.transforms import example_call
    x, _ = example_call(model, batch_size=1, image_size=32)
    peer = bench._peer_builder('dualsimclr_resnet18')(model, x, torch.device('cpu'))
    assert peer.arch == 'resnet18' and peer.same_weights
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(peer.features(x), ref, atol=1e-5)


def _oom_above_2(monkeypatch):
    real = tiny_models.TinyCNN.forward_features

    def forward_features(self, x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB (simulated)')
        return real(self, x)
    monkeypatch.setattr(tiny_models.TinyCNN, 'forward_features', forward_features)


def test_out_of_memory_is_a_row_and_the_sweep_goes_on(monkeypatch):
    _oom_above_2(monkeypatch)
    rows = run_bench(_cfg(models=[TINY, 'test_dofa'], batch_sizes=[1, 4, 8], precisions=['fp32', 'auto'],
                          modes=['infer'], iters=1))['rows']
    tiny = {(r['batch'], r['mode'], r['precision']): r for r in rows if r['model'] == TINY}
    for mode in ('features', 'forward'):
        for p in ('fp32', 'auto'):
            assert tiny[(1, mode, p)]['status'] == 'ok'
            assert tiny[(4, mode, p)]['status'] == 'oom' and 'out of memory' in tiny[(4, mode, p)]['error']
            assert tiny[(8, mode, p)]['status'] == 'skipped' and 'batch 4' in tiny[(8, mode, p)]['error']
    assert all(r['status'] == 'ok' for r in rows if r['model'] == 'test_dofa')  # the next model still runs


def test_auto_batch_sizes_stop_when_everything_is_out_of_memory(monkeypatch):
    _oom_above_2(monkeypatch)
    rows = run_bench(_cfg(batch_sizes='auto'))['rows']
    batches = sorted({r['batch'] for r in rows})
    assert batches[:2] == [1, 2] and batches[-1] <= 4
    if 4 in batches:
        assert all(r['status'] == 'oom' for r in rows if r['batch'] == 4)


def test_time_budget_turns_the_rest_into_skipped_rows():
    rows = run_bench(_cfg(models=[TINY, 'test_dofa'], batch_sizes=[1, 2], budget_s=1e-9))['rows']
    assert [(r['model'], r['status']) for r in rows] == [(TINY, 'skipped'), ('test_dofa', 'skipped')]
    assert all('time budget' in r['error'] for r in rows)


def test_compile_reports_compile_time(monkeypatch):
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: fn)  # the harness path, without Inductor's cost
    rows = run_bench(_cfg(compile=True, modes=['infer', 'train']))['rows']
    assert {r['compiled'] for r in rows} == {False, True}
    assert all(r['compile_s'] > 0 for r in rows if r['compiled']) and all(
        r['compile_s'] is None for r in rows if not r['compiled'])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_train_step_updates_weights(dtype):
    """One training step per precision; fp16 goes through a GradScaler (the CUDA path, run here on CPU)."""
    torch.manual_seed(0)
    m = nn.Linear(8, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    w0 = m.weight.detach().clone()
    step = bench._train_step(opt, lambda: m(torch.randn(3, 8)), dtype, torch.device('cpu'))
    step()
    step()
    assert not torch.equal(w0, m.weight) and m.weight.dtype == torch.float32


def test_threads_option_is_recorded_and_restored():
    before = torch.get_num_threads()
    report = run_bench(_cfg(threads=2))
    assert report['env']['threads'] == 2 and report['config']['threads'] == 2
    assert torch.get_num_threads() == before
    assert _parser().parse_args(['x', '--threads', '3']).threads == 3


def test_channels_last_and_img_size():
    rows = run_bench(_cfg(channels_last=True, img_size=48, precisions=['fp32', 'auto']))['rows']
    assert all(r['status'] == 'ok' and r['channels_last'] and r['image_size'] == '48x48' for r in rows)


# ----------------------------------------------------------------------------------------------- command line


def _parser():
    return add_bench_args(argparse.ArgumentParser(prog='eobackbones bench'))


@pytest.mark.parametrize('argv, msg', [
    (['x', '--batch-sizes', '0,8'], '--batch-sizes must be positive integers'),
    (['x', '--batch-sizes', 'lots'], '--batch-sizes must be positive integers'),
    (['x', '--precision', 'fp8'], '--precision must be a comma-separated subset of auto,fp32,bf16,fp16'),
    (['x', '--mode', 'infer,eval'], '--mode must be a comma-separated subset of infer,train'),
    (['x', '--img-size', '-3'], '--img-size must be a positive integer'),
    (['x', '--device', 'tpu'], '--device must be cpu, cuda or cuda:N'),
    (['x', '--iters', '1.5'], '--iters must be a positive integer'),
    (['x', '--min-seconds', 'nan'], '--min-seconds must be a number >= 0'),
    (['x', '--model-arg', 'bands'], '--model-arg must be KEY=VALUE'),
])
def test_bad_options_fail_at_parse_time_with_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert msg in err[-1] and len([l for l in err if l.startswith('eobackbones bench: error')]) == 1


def test_parse_good_options():
    a = _parser().parse_args(['dofa_*', '--batch-sizes', 'auto', '--precision', 'fp32,auto,fp32', '--mode',
                              'infer,train', '--device', 'cpu'])
    assert a.batch_sizes == 'auto' and a.precision == ['fp32', 'auto'] and a.mode == ['infer', 'train']
    assert _parser().parse_args(['x', '--batch-sizes', '1,8,32']).batch_sizes == [1, 8, 32]
    a = _parser().parse_args(['x', '--model-arg', 'bands=B04,B03', '--model-arg', 'wavelengths=[0.665, 0.56]',
                              '--model-arg', 'missing=zeros'])
    assert a.model_arg == [('bands', ['B04', 'B03']), ('wavelengths', [0.665, 0.56]), ('missing', 'zeros')]


def test_model_kwargs_reach_the_constructor():
    rows = run_bench(_cfg(models=['test_dofa'], model_kwargs={'bands': ['B04', 'B03']}, precisions=['fp32', 'auto'],
                          compare=False))['rows']
    assert all(r['status'] == 'ok' and r['channels'] == '2' for r in rows)
    bad = run_bench(_cfg(model_kwargs={'no_such_argument': 1}))['rows']
    assert len(bad) == 1 and bad[0]['status'] == 'error' and bad[0]['error'].startswith('build: ')


@pytest.mark.parametrize('argv, msg', [
    (['test_tiny_cnn', '--device', 'cuda'], '--device cuda: CUDA is not available'),
    (['no_such_model*'], "no model matches 'no_such_model*'"),
    (['no_such_model'], "no model matches 'no_such_model'"),
    (['test_tiny_cnn', '--precision', 'fp16'], '--precision fp16 runs on CUDA only'),
])
def test_main_bench_user_errors_exit_2(argv, msg, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    rc = main_bench(_parser().parse_args(argv + ['--out', str(tmp_path / 'o')]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith('error: ') and msg in err[0]
    assert not (tmp_path / 'o').exists()


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / 'benchmarks' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_script_writes_json_csv_md(tmp_path, capsys):
    mod = _load_script('throughput')
    rc = mod.main([TINY, '--batch-sizes', '1,2', '--precision', 'fp32,bf16', '--device', 'cpu', '--warmup', '1',
                   '--iters', '1', '--no-peak', '--out', str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / 'bench.json').read_text())['rows']
    assert len(rows) == 2 * 2 * 2 and all(r['status'] == 'ok' for r in rows)
    assert (tmp_path / 'bench.csv').read_text().startswith(','.join(ROW_FIELDS[:3]))
    assert '| test_tiny_cnn | eobackbones | features | fp32 | 1 | 3 x 32x32 |' in capsys.readouterr().out


def test_benchmark_model_row():
    row = bench.benchmark_model(TINY, batch_size=4, dtype='fp32', warmup=1, iters=3)
    assert row['model'] == TINY and row['batch'] == 4 and row['image_size'] == '32x32' and row['iters'] == 3
    assert row['img_per_s'] > 0 and row['latency_ms_p90'] >= row['latency_ms_p50'] > 0
    feats = bench.benchmark_model(TINY, batch_size=2, dtype='bf16', image_size=64, mode='features', warmup=1,
                                  iters=2)
    assert feats['image_size'] == '64x64' and feats['mode'] == 'features'


def test_out_of_memory_while_timing_is_retried_one_by_one_then_a_row(monkeypatch):
    """The first calls fit, timing all candidates together does not: each is timed alone, and one that still does
    not fit becomes an 'oom' row (the others keep their times)."""
    import eobackbones.bench as bench_mod
    real_interleaved, calls = bench_mod.time_interleaved, []

    def interleaved(fns, *a, **k):
        if len(fns) > 1:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated, all candidates resident)')
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated, alone)')
        return real_interleaved(fns, *a, **k)
    monkeypatch.setattr(bench_mod, 'time_interleaved', interleaved)
    rows = run_bench(_cfg(models=[TINY], batch_sizes=[1], precisions=['fp32', 'auto'], modes=['infer'],
                          iters=1))['rows']
    status = sorted((r['status'], r.get('error') or '') for r in rows)
    assert status[0] == ('ok', '') and any(s == 'oom' and 'alone' in e for s, e in status), status
