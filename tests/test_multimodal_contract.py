"""Issue "multimodal contract", done-when: a tiny three-modality model with a conditioning input goes through the
probe (classification and segmentation, every modality subset) and the benchmark harness with no family code."""
import json

import pytest

import tiny_models  # noqa: F401  (registers test_trimodal)
from eobackbones.cli import main

pytestmark = pytest.mark.usefixtures('one_thread')


def _rows(out):
    return json.loads((out / 'linear_probe.json').read_text())['rows']


@pytest.mark.parametrize('dataset, metric', [('bigearthnet-mini', 'map_macro'), ('pastis-mini', 'miou')])
def test_probe_reports_one_row_per_modality_subset(tmp_path, dataset, metric):
    out = tmp_path / dataset
    rc = main(['probe', '--model', 'test_trimodal', '--dataset', dataset, '--modality-subsets', 'all',
               '--label-fractions', '1.0', '--seeds', '0', '--classifiers', 'logreg', '--out', str(out)])
    assert rc == 0
    rows = [r for r in _rows(out) if r['row'] != 'baseline']
    # the data has S2 and S1 (no DEM): the model runs on every non-empty subset of what the data holds
    assert sorted(r['modalities'] for r in rows) == ['s1', 's2', 's2+s1']
    assert all(r[metric] == r[metric] for r in rows)  # a number, not NaN
    # the declared call argument reached the forward call with its default (recorded per row)
    assert all(json.loads(r['feature_kwargs']) == {'timestep': 1} for r in rows)
    by = {r['modalities']: r[metric] for r in rows}
    assert len(set(by.values())) > 1  # absent modalities change the features


def test_bench_harness_runs_the_dict_model_with_its_condition(tmp_path):
    rc = main(['bench', 'test_trimodal', '--batch-sizes', '2', '--precision', 'fp32,auto', '--iters', '2',
               '--warmup', '1', '--no-peak', '--out', str(tmp_path), '--quiet'])
    assert rc == 0
    rows = json.loads((tmp_path / 'bench.json').read_text())['rows']
    assert {r['status'] for r in rows} == {'ok'} and rows[0]['channels'] == 's2:3+s1:2+dem:1'
    assert min(r['cosine_min'] for r in rows) > 0.999
