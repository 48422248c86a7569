"""The classification probe with missing modalities: `eobackbones probe --model fusionvit_tiny --modality-subsets all`
on the embedded BigEarthNet-mini S1 + S2 data. The fusion-token ViT takes any non-empty subset (policy `subset`), so
every subset is its own row, fed only its modalities; S1 alone gives other features than S1 + S2."""
import json

import numpy as np
import pytest

from eobackbones.cli import main


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small models, one intra-op thread


def test_probe_every_modality_subset_is_a_row(tmp_path):
    out, cache = tmp_path / 'probe', tmp_path / 'cache'
    assert main(['probe', '--model', 'fusionvit_tiny', '--modality-subsets', 'all', '--label-fractions', '1.0',
                 '--seeds', '0', '--classifiers', 'logreg', '--l2-grid', '1e-3', '1e-1', '10', '--n-boot', '0', '--cache-dir', str(cache), '--quiet',
                 '--device', 'cpu', '--amp', 'fp32', '--out', str(out)]) == 0
    r = json.loads((out / 'linear_probe.json').read_text())
    rows = [row for row in r['rows'] if row['model'] == 'fusionvit_tiny']
    assert sorted(row['modalities'] for row in rows) == ['s1', 's1+s2', 's2']  # one row per subset
    assert all(row['row'] == 'random-init' and row['feature_dim'] == 192 and 0 <= row['map_macro'] <= 1 for row in rows)
    info = {m['modalities']: m for m in r['models'] if m.get('status') == 'ok'}
    assert {k: v['plan']['modality_map'] for k, v in info.items()} == {
        's1': {'s1': 's1'}, 's2': {'s2': 's2'}, 's1+s2': {'s1': 's1', 's2': 's2'}}
    absent = [m for m in r['models'] if m['row'] == 'pretrained']
    assert absent and absent[0]['status'] == 'absent' and 'no pretrained weights' in absent[0]['reason']
    # features (train, val, test) of each subset, as the probe extracted them
    feats = {k: [np.load(f) for f in v['cache_files']] for k, v in info.items()}
    for split in range(3):
        s1, s2, both = (feats[k][split] for k in ('s1', 's2', 's1+s2'))
        assert s1.shape == both.shape and np.isfinite(both).all()
        assert np.abs(s1 - both).max() > 1e-3 * np.abs(both).max()
        assert np.abs(s2 - both).max() > 1e-3 * np.abs(both).max()
    metrics = {row['modalities']: row['map_macro'] for row in rows}
    assert metrics['s1'] != metrics['s1+s2']
