"""Linear-probe benchmark: band mapping, normalisation, NaN policy, cache reuse, DDP equality, CLI errors.

Tiny models are registered here only (never in the package): a fixed-band CNN, a wavelength-conditioned
model (DOFA-like, unit ``satlas_8bit``) and an S1+S2 pair model taking a dict. Data is the embedded real
BigEarthNet-mini unless said otherwise. This file doubles as the DDP worker script
(``python -m torch.distributed.run --nproc_per_node 2 tests/test_linear_probe.py --ddp-worker OUT ARGS...``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eobackbones.errors import UnknownBandError
from eobackbones.models import EOModelMixin, build_model_with_cfg, register_arch_cfg, register_model
from eobackbones.cfg import ManualSource, PretrainedCfg
from eobackbones.spec import InputSpec, ModalitySpec

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------- tiny models

S2_BANDS = ('B08', 'B04', 'B03', 'B02')  # deliberately not the data's order
S2_SPEC = ModalitySpec('s2', 'sentinel2', S2_BANDS, unit='reflectance_1e4', normalization=(
    {'op': 'meanstd', 'mean': [2500.0, 600.0, 700.0, 500.0], 'std': [1200.0, 500.0, 400.0, 400.0]},))
S1_SPEC = ModalitySpec('s1', 'sentinel1', ('VV', 'VH'), unit='dB', normalization=(
    {'op': 'meanstd', 'mean': [-12.0, -19.0], 'std': [4.0, 4.0]},))
CALLS = {'forward_features': 0}


class _Tiny(EOModelMixin, nn.Module):
    """Conv stem (stride 4) + conv (stride 4) = stride-16 NCHW map; pooled head."""

    def __init__(self, in_chans: int = 4, width: int = 16, num_classes: int = 0, **_):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 4, stride=4)
        self.body = nn.Conv2d(8, width, 4, stride=4)
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, width, width
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self.feature_info = [dict(num_chs=8, reduction=4, module='stem'), dict(num_chs=width, reduction=16, module='body')]

    def _maps(self, x):
        a = torch.relu(self.stem(x))
        return [a, torch.relu(self.body(a))]

    def forward_features(self, x):
        CALLS['forward_features'] += 1
        return self._maps(x)[-1]

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt='NCHW',
                              intermediates_only=False, **kw):
        maps = self._maps(x)
        idx = range(len(maps)) if indices is None else indices
        out = [maps[i] for i in idx]
        return out if intermediates_only else (maps[-1], out)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class _TinyAny(_Tiny):
    """Wavelength-conditioned: the first conv's weights are generated from the bound bands' wavelengths."""

    def __init__(self, bands=('B04', 'B03', 'B02'), **kw):
        from eobackbones.sensors import band_wavelengths
        super().__init__(in_chans=len(bands), **kw)
        self.bands = tuple(bands)
        self.wl = torch.tensor(band_wavelengths(list(bands)))
        self.gen = nn.Linear(1, 8 * 16)

    def _maps(self, x):
        w = self.gen(self.wl[:, None].to(x)).view(len(self.bands), 8, 4, 4).transpose(0, 1)
        a = torch.relu(nn.functional.conv2d(x, w, stride=4))
        return [a, torch.relu(self.body(a))]


class _TinyPair(_Tiny):
    def __init__(self, **kw):
        super().__init__(in_chans=6, **kw)

    def _maps(self, x):
        return super()._maps(torch.cat([x['s2'], x['s1']], 1))


ANY_DEFAULT = ModalitySpec('image', 'sentinel2', ('B04', 'B03', 'B02'), wavelengths_um=(0.665, 0.56, 0.49),
                           unit='satlas_8bit', normalization=({'op': 'meanstd', 'mean': 100.0, 'std': 60.0},))


def _any_spec(model, cfg):
    from eobackbones.sensors import band_wavelengths
    b = list(model.bands)
    return InputSpec((ModalitySpec('image', 'sentinel2', b, wavelengths_um=band_wavelengths(b), unit='satlas_8bit',
                                   normalization=({'op': 'meanstd', 'mean': 100.0, 'std': 60.0},)),),
                     image_size=(48, 48), any_bands=True, size_multiple=16)


def tptiny(pretrained=False, **kw):
    return build_model_with_cfg(_Tiny, 'tptiny', pretrained, **kw)


def tptinyfixed(pretrained=False, **kw):
    return build_model_with_cfg(_Tiny, 'tptinyfixed', pretrained, **kw)


def tptinyany(pretrained=False, **kw):
    return build_model_with_cfg(_TinyAny, 'tptinyany', pretrained, spec_fn=_any_spec, **kw)


def tptinypair(pretrained=False, **kw):
    return build_model_with_cfg(_TinyPair, 'tptinypair', pretrained, **kw)


def tptinyb10(pretrained=False, **kw):
    return build_model_with_cfg(_Tiny, 'tptinyb10', pretrained, in_chans=2, **kw)


_ENTRYPOINTS = (tptiny, tptinyfixed, tptinyany, tptinypair, tptinyb10)


def _register() -> None:
    """Register the tiny models (only while this module's tests run, so other tests' model lists stay clean)."""
    register_arch_cfg(PretrainedCfg('tptiny', input_spec=InputSpec((S2_SPEC,), image_size=(48, 48), size_multiple=16)))
    register_arch_cfg(PretrainedCfg('tptinyfixed', input_spec=InputSpec((S2_SPEC,), image_size=(64, 64),
                                                                        fixed_size=True)))
    register_arch_cfg(PretrainedCfg('tptinyany', input_spec=InputSpec((ANY_DEFAULT,), image_size=(48, 48),
                                                                      any_bands=True, size_multiple=16)))
    register_arch_cfg(PretrainedCfg('tptinypair', input_spec=InputSpec((S2_SPEC, S1_SPEC), input_format='dict')))
    register_arch_cfg(PretrainedCfg('tptinyb10', input_spec=InputSpec((ModalitySpec(
        's2', 'sentinel2', ('B02', 'B10'), unit='reflectance_1e4'),))))
    for fn in _ENTRYPOINTS:
        register_model(fn)


def _unregister() -> None:
    from eobackbones.models import unregister_model
    for fn in _ENTRYPOINTS:
        unregister_model(fn.__name__)


@pytest.fixture(autouse=True, scope='module')
def _tiny_models():
    _register()
    yield
    _unregister()


# ----------------------------------------------------------------------------------------------- helpers


def _args(*argv: str) -> argparse.Namespace:
    from eobackbones.eval.linear_probe import add_probe_args
    return add_probe_args(argparse.ArgumentParser()).parse_args(list(argv))


FAST = ('--label-fractions', '1.0', '--seeds', '0', '--classifiers', 'logreg', '--n-boot', '20', '--quiet',
        '--l2-grid', '0.01', '1.0')


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv('EOBACKBONES_HOME', str(tmp_path / 'home'))
    monkeypatch.setenv('EOBACKBONES_OFFLINE', '1')
    return tmp_path


# ----------------------------------------------------------------------------------------------- band mapping


def test_fixed_band_model_selects_and_reorders_by_name():
    from eobackbones import create_model
    from eobackbones.data import load_bigearthnet_mini
    from eobackbones.eval.features import plan_inputs
    data = load_bigearthnet_mini()
    model = create_model('tptiny')
    plan = plan_inputs(model, data, norm='model-native')
    assert plan.model_bands == {'s2': S2_BANDS} and plan.filled_bands == {}
    x = plan.preprocess(torch.from_numpy(data.images['s2'][:3]))
    mean, std = S2_SPEC.normalization[0]['mean'], S2_SPEC.normalization[0]['std']
    for i, b in enumerate(S2_BANDS):
        raw = data.images['s2'][:3, data.bands['s2'].index(b)]
        np.testing.assert_allclose(x[:, i].numpy(), (raw - mean[i]) / std[i], rtol=1e-5, atol=1e-5)
    assert plan.image_size == (48, 48) and plan.resized_from is None


def test_zscore_uses_train_split_statistics_and_fixed_size_resizes():
    from eobackbones import create_model
    from eobackbones.data import load_bigearthnet_mini
    from eobackbones.eval.features import extract_features, plan_inputs
    data = load_bigearthnet_mini()
    model = create_model('tptinyfixed')
    plan = plan_inputs(model, data, norm='dataset-zscore')
    train = data.indices('train')
    b08 = data.images['s2'][train, data.bands['s2'].index('B08')].astype(np.float64)
    assert plan.zscore_stats['s2']['mean'][0] == pytest.approx(b08.mean())
    assert plan.zscore_stats['s2']['std'][0] == pytest.approx(b08.std())
    assert plan.image_size == (64, 64) and plan.resized_from == (48, 48)
    f = extract_features(model, plan, data, train[:5], progress=False)
    assert f.shape == (5, 16)


def test_missing_band_policies():
    from eobackbones import create_model
    from eobackbones.data import load_bigearthnet_mini
    from eobackbones.eval.features import plan_inputs
    data = load_bigearthnet_mini()  # S2 without B10
    model = create_model('tptinyb10')
    with pytest.raises(UnknownBandError, match=r"B10.*--missing-bands zeros"):
        plan_inputs(model, data, norm='dataset-zscore')
    with pytest.raises(UnknownBandError, match='only for wavelength-conditioned'):
        plan_inputs(model, data, norm='dataset-zscore', missing_bands='drop-model-bands')
    plan = plan_inputs(model, data, norm='dataset-zscore', missing_bands='zeros')
    assert plan.filled_bands == {'s2': ['B10']}
    x = plan.preprocess(torch.from_numpy(data.images['s2'][:4]))
    assert torch.all(x[:, 1] == 0) and x[:, 0].abs().sum() > 0


def test_wavelength_model_is_built_on_the_data_bands_and_model_native_unit_mismatch_fails():
    from eobackbones.data import load_bigearthnet_mini
    from eobackbones.errors import NormalisationError
    from eobackbones.eval.features import plan_inputs
    from eobackbones.eval.linear_probe import build_for_data
    from eobackbones.models import resolve_model
    data = load_bigearthnet_mini()
    model, dropped, notes = build_for_data(resolve_model('tptinyany'), False, data, 'error', 0)
    assert model.input_spec.modalities[0].bands == data.bands['s2'] and dropped == {}
    with pytest.raises(NormalisationError, match=r"satlas_8bit.*reflectance_1e4.*dataset-zscore"):
        plan_inputs(model, data, norm='model-native')
    plan = plan_inputs(model, data, norm='dataset-zscore')
    assert plan.modality_map == {'image': 's2'}
    # default bands absent from the data: error unless drop-model-bands
    sub = data.subset(np.arange(len(data)))
    keep = [b for b in sub.bands['s2'] if b != 'B04']
    sub.images['s2'] = sub.select_bands('s2', keep)
    sub.bands['s2'] = tuple(keep)
    with pytest.raises(UnknownBandError, match='drop-model-bands'):
        build_for_data(resolve_model('tptinyany'), False, sub, 'error', 0)
    model, dropped, _ = build_for_data(resolve_model('tptinyany'), False, sub, 'drop-model-bands', 0)
    assert dropped == {'image': ['B04']} and 'B04' not in model.input_spec.modalities[0].bands


# ----------------------------------------------------------------------------------------------- runs


def test_pair_model_uses_both_modalities_and_nan_policy(home):
    from eobackbones.eval.linear_probe import run_probe
    r = run_probe(_args('--model', 'tptinypair', '--pretrained', 'none', '--norm', 'dataset-zscore', *FAST))
    info = [m for m in r['models'] if m['status'] == 'ok'][0]
    assert info['plan']['modality_map'] == {'s2': 's2', 's1': 's1'}
    assert r['dataset']['n'] == {'train': 40, 'val': 23, 'test': 29}  # 9 S1-NaN patches dropped
    assert r['dataset']['nan_report']['s2+s1']['nan_samples'] == {'train': 4, 'val': 3, 'test': 2}
    assert {row['row'] for row in r['rows']} == {'random-init', 'baseline'}
    assert any(row['model'] == 'band-stats (s2+s1)' for row in r['rows'])
    assert 'pretrained row absent: --pretrained none' in r['markdown']
    filled = run_probe(_args('--model', 'tptinypair', '--pretrained', 'none', '--norm', 'dataset-zscore',
                             '--nan', 'fill', *FAST))
    assert filled['dataset']['n'] == {'train': 44, 'val': 26, 'test': 31}
    assert 'val 3' in filled['markdown'] and '(fill)' in filled['markdown']
    for row in filled['rows']:
        assert row['nan'] == 'fill' and math.isfinite(row['map_macro'])


def test_saved_directory_is_probed_as_the_pretrained_row(home):
    from eobackbones.eval.linear_probe import run_probe
    torch.manual_seed(123)
    from eobackbones import create_model
    saved = create_model('tptiny').save_pretrained(home / 'saved')
    r = run_probe(_args('--model', f'local-dir:{saved}', '--norm', 'dataset-zscore', *FAST))
    rows = {row['row']: row for row in r['rows'] if row['model'] == 'tptiny'}
    assert set(rows) == {'pretrained', 'random-init'}
    assert rows['pretrained']['weights'] == f'local-dir:{saved}' and rows['random-init']['weights'] == 'seed 0'
    none = run_probe(_args('--model', f'local-dir:{saved}', '--pretrained', 'none', '--norm', 'dataset-zscore', *FAST))
    assert {row['row'] for row in none['rows']} == {'random-init', 'baseline'}


def test_cache_reuse_counts_forward_calls(home):
    from eobackbones.eval.linear_probe import run_probe
    CALLS['forward_features'] = 0
    r1 = run_probe(_args('--model', 'tptiny', '--pretrained', 'none', '--batch-size', '16', *FAST))
    first = CALLS['forward_features']
    assert first == 3 + 2 + 2  # ceil(44/16) + ceil(26/16) + ceil(31/16)
    assert list((home / 'home' / 'features').glob('*.npy'))
    CALLS['forward_features'] = 0
    r2 = run_probe(_args('--model', 'tptiny', '--pretrained', 'none', '--batch-size', '16', '--label-fractions', '1.0',
                         '--seeds', '0', '--classifiers', 'knn', '--n-boot', '0', '--quiet'))
    assert CALLS['forward_features'] == 0  # another classifier re-uses the cached features
    assert r2['models'][-1]['cache_hits'] == 3 and r1['models'][-1]['cache_hits'] == 0
    r3 = run_probe(_args('--model', 'tptiny', '--pretrained', 'none', '--norm', 'dataset-zscore', *FAST))
    assert CALLS['forward_features'] > 0 and r3['models'][-1]['cache_hits'] == 0  # preprocessing is in the key
    CALLS['forward_features'] = 0
    run_probe(_args('--model', 'tptiny', '--pretrained', 'none', '--init-seed', '1', *FAST))
    assert CALLS['forward_features'] > 0  # other weights, other key


def test_report_outputs_and_plot(home):
    from eobackbones.eval.linear_probe import run_probe
    out = home / 'out'
    r = run_probe(_args('--model', 'tptiny', '--pretrained', 'none', '--out', str(out), '--plot',
                        '--label-fractions', '0.5', '1.0', '--seeds', '0', '1', '--n-boot', '20', '--quiet',
                        '--l2-grid', '1.0'))
    for ext in ('json', 'csv', 'md', 'png'):
        assert (out / f'linear_probe.{ext}').stat().st_size > 0
    j = json.loads((out / 'linear_probe.json').read_text())
    kinds = {(row['row'], row['classifier'], row['label_fraction']) for row in j['rows']}
    assert ('random-init', 'knn', 0.5) in kinds and ('baseline', 'logreg', 1.0) in kinds
    assert sum(1 for row in j['rows'] if row['row'] == 'random-init' and row['label_fraction'] == 0.5) == 4  # 2 clf x 2 seeds
    # a one-value grid is always "at the top": the report says the classifier had nothing to choose
    assert 'L2 chosen at the top of the grid (1)' in r['markdown'] and 'band-stats (s2) baseline' in r['markdown']
    for row in j['rows']:
        assert row['norm'] and row['missing_bands'] and row['amp'] and row['nan'] == 'drop'
        if row['label_fraction'] == 1.0:
            assert row['map_macro_ci_lo'] <= row['map_macro'] <= row['map_macro_ci_hi']
    md = (out / 'linear_probe.md').read_text()
    assert '| tptiny | random-init (seed 0) | logreg | 100% |' in md and 'band-stats (s2)' in md
    assert ' ± ' in md  # several seeds at 50%
    csv_head = (out / 'linear_probe.csv').read_text().splitlines()[0]
    assert 'map_macro' in csv_head and 'label_fraction' in csv_head


def test_pretrained_row_absent_when_weights_unavailable(home):
    from eobackbones.eval.linear_probe import run_probe
    from eobackbones.models import register_pretrained, unregister_pretrained
    register_pretrained(PretrainedCfg('tptiny', tag='manualonly', source=ManualSource(manual='https://example.org/w'),
                                      input_spec=InputSpec((S2_SPEC,), image_size=(48, 48), size_multiple=16)))
    try:
        r = run_probe(_args('--model', 'tptiny', *FAST))
    finally:
        unregister_pretrained('tptiny.manualonly')
    absent = [m for m in r['models'] if m['status'] == 'absent']
    assert absent and absent[0]['row'] == 'pretrained' and absent[0]['reason']
    assert '\n' not in absent[0]['reason']
    assert 'tptiny pretrained row absent:' in r['markdown']
    assert {row['row'] for row in r['rows']} == {'random-init', 'baseline'}


def test_pretrained_row_from_local_hub(local_hub, tmp_path):
    """Real loader path: safetensors on the (local) Hub -> pretrained row next to random-init and baseline."""
    import hashlib
    from safetensors.torch import save
    from eobackbones import create_model
    from eobackbones.eval.linear_probe import run_probe
    from eobackbones.models import register_pretrained, unregister_pretrained
    from eobackbones.cfg import HubSource
    torch.manual_seed(123)
    blob = save(create_model('tptiny').state_dict())
    sha = local_hub.add_file('test/tptiny', 'model.safetensors', blob)
    register_pretrained(PretrainedCfg('tptiny', tag='hubtest', source=HubSource(
        'test/tptiny', sha, 'model.safetensors', sha256=hashlib.sha256(blob).hexdigest()),
        input_spec=InputSpec((S2_SPEC,), image_size=(48, 48), size_multiple=16), license='MIT'))
    try:
        r = run_probe(_args('--model', 'tptiny', '--cache-dir', str(tmp_path / 'feat'), *FAST))
    finally:
        unregister_pretrained('tptiny.hubtest')
    rows = {row['row']: row for row in r['rows']}
    assert set(rows) == {'pretrained', 'random-init', 'baseline'} and rows['pretrained']['weights'] == 'tptiny.hubtest'
    assert rows['pretrained']['map_macro'] != rows['random-init']['map_macro']


def test_folder_dataset_bands_from_cli_and_unreadable_files(home, capsys):
    from eobackbones.data import load_bigearthnet_mini
    from eobackbones.eval.linear_probe import main_probe, run_probe
    data = load_bigearthnet_mini()
    root = home / 'folder'
    # 3 classes by the dominant of two labels (real images, a synthetic single-label task)
    forest = data.labels[:, data.label_names.index('Mixed forest')] > 0
    water = data.labels[:, data.label_names.index('Inland waters')] > 0
    cls = np.where(water, 'water', np.where(forest, 'forest', 'other'))
    bands = list(data.bands['s2'])
    for i, c in enumerate(cls):
        (root / c).mkdir(parents=True, exist_ok=True)
        np.save(root / c / f'{i:03d}.npy', data.images['s2'][i])
    (root / 'other' / 'broken.npy').write_bytes(b'not an array')
    r = run_probe(_args('--model', 'tptiny', '--pretrained', 'none', '--dataset', 'folder', '--root', str(root),
                        '--bands', *bands, *FAST))
    assert r['dataset']['unreadable'] and r['dataset']['unreadable'][0][0] == 'other/broken.npy'
    assert not r['dataset']['multilabel'] and 'accuracy' in r['rows'][0]
    assert 'unreadable files: 1' in r['markdown']
    rc = main_probe(_args('--model', 'tptiny', '--pretrained', 'none', '--dataset', 'folder', '--root', str(root),
                          '--bands', *bands, '--strict', *FAST))
    err = capsys.readouterr().err
    assert rc == 2 and 'broken.npy' in err and err.count('\n') == 1


@pytest.mark.parametrize('argv, pattern', [
    (('--model', 'tptinyy'), 'unknown model'),
    (('--model', 'tptinyany', '--pretrained', 'none', '--norm', 'model-native'), 'model-native is impossible.*dataset-zscore'),
    (('--model', 'tptinyb10', '--pretrained', 'none', '--norm', 'dataset-zscore'), 'B10'),
    (('--model', 'tptiny', '--dataset', 'folder', '--root', '.'), 'needs --bands'),
    (('--model', 'tptiny', '--dataset', 'eurosat'), 'needs --root'),
    (('--model', 'tptiny', '--plot'), 'needs --out'),
    (('--model', 'tptiny', '--label-fractions', '0'), r'\(0, 1\]'),
])
def test_cli_error_paths_are_one_line(home, capsys, argv, pattern):
    import re
    from eobackbones.cli import main
    rc = main(['probe', *FAST, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1 and re.search(pattern, err), err


def test_plot_without_matplotlib_is_a_clear_error(home, capsys, monkeypatch):
    import builtins
    from eobackbones.eval.linear_probe import main_probe
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith('matplotlib'):
            raise ImportError('no matplotlib')
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, '__import__', fake)
    rc = main_probe(_args('--model', 'tptiny', '--out', str(home / 'o'), '--plot', *FAST))
    assert rc == 2 and "pip install 'eobackbones[plot]'" in capsys.readouterr().err


def test_amp_dtype_choice(monkeypatch):
    from eobackbones import precision
    from eobackbones.eval.features import amp_dtype
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: True)
    dt, why = amp_dtype(torch.device('cpu'), 'auto')
    assert dt is torch.bfloat16 and why.startswith('bf16 (auto: CPU with native bf16, ')
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: False)
    dt, why = amp_dtype(torch.device('cpu'), 'auto')
    assert dt is None and why.startswith('fp32 (auto: CPU without native bf16')
    assert amp_dtype(torch.device('cpu'), 'fp32')[0] is None
    assert amp_dtype(torch.device('cpu'), 'bf16')[0] is torch.bfloat16
    with pytest.raises(ValueError):
        amp_dtype(torch.device('cpu'), 'fp16')


# ----------------------------------------------------------------------------------------------- torchgeo adapter


def test_eurosat_adapter_band_order_from_torchgeo(tmp_path):
    """torchgeo's EuroSAT on a root built from 4 real EuroSAT-MS GeoTIFFs: B8A is the 13th channel, by name."""
    pytest.importorskip('torchgeo')
    pytest.importorskip('rasterio')
    import tifffile
    from eobackbones.data.torchgeo import load_torchgeo
    src = REPO / 'tests' / 'data' / 'eurosat-ms-4'
    base = tmp_path / 'ds' / 'images' / 'remote_sensing' / 'otherDatasets' / 'sentinel_2' / 'tif'
    # torchvision's ImageFolder wants every class in every split: each real file is copied once per split
    files = sorted(p.relative_to(src) for p in src.glob('*/*.tif'))
    for k, split in enumerate(('train', 'val', 'test')):
        names = []
        for f in files:
            dst = base / f.parent / f'{f.stem}{k}.tif'
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / f, dst)
            names.append(dst.name.replace('.tif', '.jpg'))
        (tmp_path / f'eurosat-{split}.txt').write_text(''.join(n + '\n' for n in names))
    data = load_torchgeo('eurosat', tmp_path)
    assert data.bands['s2'][-1] == 'B8A' and data.bands['s2'][8] == 'B09' and len(data.bands['s2']) == 13
    assert list(data.split) == ['train'] * 4 + ['val'] * 4 + ['test'] * 4
    assert data.label_names[data.labels[2]] == 'Pasture' and str(data.ids[2]) == 'train/2'
    raw = tifffile.imread(src / 'Pasture' / 'Pasture_300.tif')
    raw = raw if raw.shape[0] == 13 else np.moveaxis(raw, -1, 0)
    np.testing.assert_array_equal(data.select_bands('s2', ['B8A'])[2, 0], raw[12])
    np.testing.assert_array_equal(data.select_bands('s2', ['B08'])[2, 0], raw[7])
    assert data.units == {'s2': 'reflectance_1e4'} and data.images['s2'].dtype == np.uint16


# ----------------------------------------------------------------------------------------------- segmentation


def test_segmentation_probe_on_synthetic_labels_from_real_images():
    """No embedded segmentation set exists: labels = NDVI > train median on real S2 patches (synthetic task)."""
    from eobackbones import create_model
    from eobackbones.data import load_bigearthnet_mini
    from eobackbones.eval.linear_probe import fit_segmentation_probe, segmentation_probe
    from eobackbones.eval.metrics import miou
    data = load_bigearthnet_mini()
    s2 = data.images['s2']
    nir, red = s2[:, data.bands['s2'].index('B08')], s2[:, data.bands['s2'].index('B04')]
    ndvi = (nir - red) / (nir + red + 1e-6)
    masks = (ndvi > np.median(ndvi[data.indices('train')])).astype(np.int64)
    torch.manual_seed(0)
    out = segmentation_probe(create_model('tptiny'), data, masks, 2, norm='dataset-zscore', epochs=60, n_boot=50)
    assert out['feature_shape'] == [16, 3, 3]
    test = data.indices('test')
    assert out['miou'] == pytest.approx(miou(out['pred'], masks[test], 2))
    assert out['miou_ci_lo'] <= out['miou'] <= out['miou_ci_hi']
    majority = miou(np.full_like(masks[test], np.bincount(masks[data.indices('train')].ravel()).argmax()), masks[test], 2)
    assert out['miou'] > majority
    # oracle features (the mask pooled to stride 16) must be nearly perfectly decodable
    pooled = {s: torch.nn.functional.avg_pool2d(torch.from_numpy(masks[data.indices(s)]).float()[:, None], 16).numpy()
              for s in ('train', 'val', 'test')}
    oracle = fit_segmentation_probe(pooled, {s: masks[data.indices(s)] for s in pooled}, 2, epochs=100, n_boot=0)
    assert oracle['miou'] > 0.6 and oracle['miou'] > out['miou'] - 0.05


# ----------------------------------------------------------------------------------------------- DDP


def _rows_key(rows):
    return {(r['model'], r['row'], r['classifier'], r['label_fraction'], r['seed']): r for r in rows}


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    argv = ['--model', 'tptiny', '--pretrained', 'none', '--label-fractions', '0.5', '1.0', '--seeds', '0', '1',
            '--classifiers', 'logreg', 'knn', '--n-boot', '20', '--quiet', '--batch-size', '8', '--amp', 'fp32',
            '--no-cache', '--device', 'cpu', '--l2-grid', '0.1', '1.0']
    env = dict(os.environ, EOBACKBONES_OFFLINE='1', EOBACKBONES_HOME=str(tmp_path / 'home'), OMP_NUM_THREADS='1',
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    out = tmp_path / 'ddp.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(Path(__file__)), '--ddp-worker', str(out), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(out.read_text())
    single = tmp_path / 'single.json'
    proc = subprocess.run([sys.executable, str(Path(__file__)), '--ddp-worker', str(single), *argv], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads(single.read_text())
    assert ddp['world_size'] == 2 and one['world_size'] == 1
    np.testing.assert_allclose(np.array(ddp['features']), np.array(one['features']), rtol=1e-5, atol=1e-6)
    a, b = _rows_key(ddp['rows']), _rows_key(one['rows'])
    assert a.keys() == b.keys()
    for k in a:
        for m in ('map_macro', 'map_micro', 'f1_macro', 'f1_micro'):
            assert a[k][m] == pytest.approx(b[k][m], abs=1e-6, nan_ok=True), (k, m)


def _ddp_worker(argv):
    """Run the probe under torchrun (or alone) and dump rows + the test features from rank 0."""
    out = Path(argv[0])
    from eobackbones.eval import features as feat
    from eobackbones.eval.linear_probe import run_probe
    captured = {}
    real = feat.extract_features

    def spy(*a, **k):
        arr = real(*a, **k)
        captured.setdefault('test', arr)  # overwritten below for the last split; keep all
        captured.setdefault('all', []).append(arr)
        return arr
    import eobackbones.eval.linear_probe as lp
    lp.extract_features = spy
    r = run_probe(_args(*argv[1:]))
    if r is not None:
        feats = np.concatenate(captured['all'])
        out.write_text(json.dumps(dict(world_size=r['settings']['world_size'], rows=r['rows'],
                                       features=feats.tolist()), default=str))


if __name__ == '__main__' and len(sys.argv) > 2 and sys.argv[1] == '--ddp-worker':
    _register()
    _ddp_worker(sys.argv[2:])


def test_bigearthnet_adapter_maps_bands_by_file_name(tmp_path):
    """torchgeo's BigEarthNet v1 layout, written from real embedded patches: bands come out by name, S1 as VH, VV."""
    rasterio = pytest.importorskip('rasterio')
    from eobackbones.data import load_bigearthnet_mini
    from eobackbones.data.torchgeo import load_torchgeo
    real = load_bigearthnet_mini(('s1', 's2'))
    valid = [i for i in range(len(real)) if np.isfinite(real.images['s1'][i]).all()][:6]
    s2_names, s1_names = list(real.bands['s2']), list(real.bands['s1'])

    def tif(path, arr):
        with rasterio.open(path, 'w', driver='GTiff', height=arr.shape[0], width=arr.shape[1], count=1,
                           dtype=arr.dtype) as f:
            f.write(arr, 1)

    for split, rows in (('train', valid[:2]), ('val', valid[2:4]), ('test', valid[4:])):
        lines = []
        for i in rows:
            s2n, s1n = f'S2_patch_{i}', f'S1_patch_{i}'
            for folder, name, arrs in (('BigEarthNet-v1.0', s2n, zip(s2_names, real.images['s2'][i])),
                                       ('BigEarthNet-S1-v1.0', s1n, zip(s1_names, real.images['s1'][i]))):
                d = tmp_path / folder / name
                d.mkdir(parents=True)
                for band, arr in arrs:
                    # torchgeo reads int32 (so dB loses its decimals): store dB x 100 to keep the test exact
                    tif(d / f'{name}_{band}.tif', (arr * (100 if band in ('VV', 'VH') else 1)).astype(np.int32))
                (d / f'{name}_labels_metadata.json').write_text(json.dumps({'labels': ['Mixed forest']}))
            lines.append(f'{s2n},{s1n}')
        (tmp_path / f'bigearthnet-{split}.csv').write_text('\n'.join(lines) + '\n')

    data = load_torchgeo('bigearthnet', tmp_path, modalities=('s1', 's2'))
    assert data.bands['s1'] == ('VH', 'VV')  # torchgeo sorts the S1 files: VH before VV
    assert 'B10' not in data.bands['s2'] and data.bands['s2'][8] == 'B8A'
    order = [int(s.split('/')[1]) for s in data.ids]
    assert len(order) == 6 and list(data.split).count('train') == 2
    assert data.images['s2'].shape[-2:] == (120, 120)  # torchgeo resamples every band to 120 px

    def down(a):  # back to the 48 px the files were written at
        return torch.nn.functional.interpolate(torch.as_tensor(a, dtype=torch.float32)[None, None], size=(48, 48),
                                               mode='area')[0, 0].numpy()

    for j, sid in enumerate(data.ids):
        i = valid[{'train': 0, 'val': 2, 'test': 4}[data.split[j]] + int(sid.split('/')[1])]
        for m, scale in (('s2', 1.0), ('s1', 100.0)):
            src = real.images[m][i].astype(np.float32) * scale
            for c, band in enumerate(data.bands[m]):
                # every output channel is closest to the source band of the same name
                errs = [np.abs(down(data.images[m][j][c]) - src[k]).mean() for k in range(len(src))]
                assert real.bands[m][int(np.argmin(errs))] == band, (m, band, errs)
    assert data.labels.shape == (6, 19) and data.labels[:, data.label_names.index('Mixed forest')].all()


def test_so2sat_adapter_converts_units_and_maps_bands(tmp_path):
    """torchgeo's So2Sat v2 files, written from real embedded patches: S1 = Lee-filtered VH, VV intensities -> dB,
    S2 = reflectance -> reflectance x 1e4, bands by So2Sat's names."""
    h5py = pytest.importorskip('h5py')
    from eobackbones.data import load_bigearthnet_mini
    from eobackbones.data.torchgeo import load_torchgeo
    real = load_bigearthnet_mini(('s1', 's2'))
    valid = [i for i in range(len(real)) if np.isfinite(real.images['s1'][i]).all()][:6]
    so2sat_s2 = ['B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B11', 'B12']
    s2_idx = [list(real.bands['s2']).index(b) for b in so2sat_s2]
    vh, vv = list(real.bands['s1']).index('VH'), list(real.bands['s1']).index('VV')
    rng = np.random.default_rng(0)
    for split, fname, rows in (('train', 'training.h5', valid[:2]), ('val', 'validation.h5', valid[2:4]),
                               ('test', 'testing.h5', valid[4:])):
        n = len(rows)
        sen1 = rng.normal(size=(n, 32, 32, 8))  # complex parts and covariance: not used by the adapter
        sen2 = np.zeros((n, 32, 32, 10))
        label = np.zeros((n, 17))
        for j, i in enumerate(rows):
            s1 = real.images['s1'][i][:, :32, :32].astype(np.float64)
            sen1[j, :, :, 4] = 10 ** (s1[vh] / 10)  # S1_B5: Lee-filtered VH intensity
            sen1[j, :, :, 5] = 10 ** (s1[vv] / 10)  # S1_B6: Lee-filtered VV intensity
            sen2[j] = np.moveaxis(real.images['s2'][i][s2_idx, :32, :32] / 1e4, 0, -1)
            label[j, (3 * i) % 17] = 1
        with h5py.File(tmp_path / fname, 'w') as f:
            f['sen1'], f['sen2'], f['label'] = sen1, sen2, label

    data = load_torchgeo('so2sat', tmp_path)
    assert data.bands == {'s1': ('VH', 'VV'), 's2': tuple(so2sat_s2)} and not data.multilabel
    assert data.units == {'s1': 'dB', 's2': 'reflectance_1e4'}
    for j, sid in enumerate(data.ids):
        i = valid[{'train': 0, 'val': 2, 'test': 4}[data.split[j]] + int(sid.split('/')[1])]
        np.testing.assert_allclose(data.images['s1'][j], real.images['s1'][i][[vh, vv], :32, :32], atol=2e-4)
        np.testing.assert_allclose(data.images['s2'][j], real.images['s2'][i][s2_idx, :32, :32], atol=0.01)
        assert data.labels[j] == (3 * i) % 17


def test_norm_auto_records_its_choice_per_model_in_rows_and_report(home):
    """--norm auto (the default): the weights' own statistics where the units match, a z-score where they do not;
    the choice is in every row and in the Markdown report, never only in the settings."""
    from eobackbones.eval.linear_probe import run_probe
    from eobackbones.eval.report import to_markdown
    r = run_probe(_args('--model', 'tptinyany', 'tptinypair', '--pretrained', 'none', *FAST))
    norms = {(row['model'], row['row']): row['norm'] for row in r['rows']}
    assert norms[('tptinyany', 'random-init')] == 'dataset-zscore'  # satlas_8bit weights, reflectance data
    assert norms[('tptinypair', 'random-init')] == 'model-native'   # reflectance / dB, as the spec
    md = to_markdown(r)
    assert 'tptinyany random-init: bands image: B01,' in md and 'norm image dataset-zscore' in md
    assert 'norm s2 model-native, s1 model-native' in md
