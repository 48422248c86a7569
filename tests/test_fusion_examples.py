"""examples/pretrain_fusionvit.py: FusionMAE pretraining of a tiny fusion-token ViT on the embedded S1 + S2 data
(S2-only batches for the patches without S1); a stopped and resumed run is the uninterrupted run bit for bit
(weights, optimiser state, loss log); the saved encoder loads with create_model('local-dir:...') with its provenance;
under ``torchrun --nproc_per_node 2`` (gloo, CPU) it trains what one process trains."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eobackbones

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'examples'))
import pretrain_fusionvit as PF  # noqa: E402

# 1 layer of width 64, decoders of width 64: seconds per run on 2 cores
TINY = ['--model-args', json.dumps(dict(depth=1, embed_dim=64, num_heads=2, dim_head=32)), '--decoder-dim', '64',
        '--decoder-depth', '1', '--decoder-heads', '2', '--batch-size', '8', '--no-progress']


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small models, one intra-op thread


@pytest.fixture(scope='module')
def run3(tmp_path_factory):
    """An uninterrupted 3-step run (seed 0: step 3 is the S2-only batch)."""
    out = tmp_path_factory.mktemp('fusion') / 'a'
    final = PF.main(TINY + ['--steps', '3', '--out', str(out)])
    return out, final


def _log(out: Path):
    return [{k: v for k, v in r.items() if k != 'seconds'} for r in json.loads((out / 'loss.json').read_text())]


def test_run_covers_missing_s1_and_saves_a_loadable_encoder(run3):
    out, final = run3
    log = _log(out)
    assert final['steps'] == 3 and [r['modalities'] for r in log] == ['s1+s2', 's1+s2', 's2']
    assert all(r['loss'] > 0 and r['recon'] > 0 and r['contrast'] > 0 for r in log)
    model = eobackbones.create_model(f'local-dir:{out / "model"}').eval()
    prov = model.provenance
    assert prov.kind == 'directory' and prov.origin.kind == 'trained' and prov.origin.origin.kind == 'none'
    assert 'pretrained by the user (FusionMAE) on bigearthnet_mini train for 3 steps' in prov.origin.note
    assert model.model_args['pyramid'] == 'interpolate' and model.img_size == (48, 48)
    assert model.input_spec.modality('s1').bands == ('VH', 'VV') and len(model.input_spec.modality('s2').bands) == 12
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    enc = {k[len('encoder.'):]: v for k, v in state['model'].items() if k.startswith('encoder.')}
    assert state['step'] == 3 and enc.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in enc.items())
    x, _ = eobackbones.transforms.example_call(model, batch_size=2)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all() and torch.isfinite(model({'s2': x['s2']})).all()


def test_stopped_and_resumed_run_is_the_uninterrupted_run(run3, tmp_path, capsys):
    out, _ = run3
    b = tmp_path / 'b'
    stopped = PF.main(TINY + ['--steps', '3', '--stop-after', '2', '--out', str(b)])
    assert stopped == dict(stopped, steps=2, stopped=True) and not (b / 'model').exists()
    PF.main(TINY + ['--steps', '3', '--out', str(b), '--resume'])
    text = capsys.readouterr().out
    assert 'resumed from' in text and 'WARNING' not in text
    assert _log(b) == _log(out)
    sa, sb = (torch.load(d / 'checkpoint.pt', weights_only=True) for d in (out, b))
    assert sa['model'].keys() == sb['model'].keys() and all(torch.equal(sa['model'][k], sb['model'][k]) for k in sa['model'])
    oa, ob = sa['optimizer'], sb['optimizer']
    assert oa['param_groups'] == ob['param_groups'] and oa['state'].keys() == ob['state'].keys()
    for i in oa['state']:
        assert all(torch.equal(oa['state'][i][k], ob['state'][i][k]) for k in oa['state'][i])
    wa, wb = (load_file(str(d / 'model' / 'model.safetensors')) for d in (out, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_setting_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        PF.main(['--mask-ratio', '1.5'])
    assert 'mask-ratio' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='--model-args applies to architectures'):
        PF.main(['--model', f'local-dir:{tmp_path}', '--model-args', '{"depth": 1}', '--out', str(tmp_path / 'o')])


_DDP = TINY + ['--steps', '3', '--opt', 'sgd', '--lr', '0.05', '--no-augment']


def test_torchrun_two_processes_train_what_one_trains(tmp_path):
    """Global batches of 8 (4 + 4) and the S2-only batch of 4 (2 + 2), SGD: the 2-process loss log and weights are
    the 1-process ones (DDP with the unused S1 branch of the S2-only step)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', EOBACKBONES_OFFLINE='1',
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(REPO / 'examples' / 'pretrain_fusionvit.py')] + _DDP + ['--out', str(tmp_path / 'two')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count('FINAL ') == 1 and '2 process(es)' in proc.stdout
    PF.main(_DDP + ['--out', str(tmp_path / 'one')])
    two, one = _log(tmp_path / 'two'), _log(tmp_path / 'one')
    assert [r['modalities'] for r in two] == [r['modalities'] for r in one] == ['s1+s2', 's1+s2', 's2']
    for a, b in zip(two, one):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)
    wa = load_file(str(tmp_path / 'two' / 'model' / 'model.safetensors'))
    wb = load_file(str(tmp_path / 'one' / 'model' / 'model.safetensors'))
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)
    sa = torch.load(tmp_path / 'two' / 'checkpoint.pt', weights_only=True)['model']
    sb = torch.load(tmp_path / 'one' / 'checkpoint.pt', weights_only=True)['model']
    for k in sb:  # the decoders too
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)
