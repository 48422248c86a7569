"""examples/pretrain_diffusion.py: DDPM pretraining of a tiny diffusion encoder on the embedded S1 + S2 data; resume
gives the uninterrupted run; the saved directory loads with true provenance and the probe takes it; under
``torchrun --nproc_per_node 2`` (gloo, CPU) it trains what one process trains."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eobackbones
import tiny_models  # noqa: F401  (registers test_diffusion_sr3)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'examples'))
import pretrain_diffusion as PD  # noqa: E402

TINY = ['--model', 'test_diffusion_sr3', '--batch-size', '8', '--no-progress']


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on 2 shared cores: more threads only wait for each other
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def run4(tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp('ddpm') / 'a'
    final = PD.main(TINY + ['--steps', '4', '--save-every', '2', '--out', str(out)])
    return out, final


def _losses(out: Path):
    return [(r['step'], r['loss']) for r in json.loads((out / 'loss.json').read_text())]


def test_run_saves_a_loadable_model_with_its_provenance(run4, capsys):
    out, final = run4
    assert final['steps'] == 4 and len(_losses(out)) == 4
    assert (out / 'loss.csv').read_text().splitlines()[0] == 'step,loss,lr,seconds'
    model = eobackbones.create_model(f'local-dir:{out / "model"}').eval()
    prov = model.provenance
    assert prov.kind == 'directory' and prov.origin.kind == 'trained'
    assert prov.origin.note == 'pretrained by the user on bigearthnet_mini for 4 steps'
    assert prov.origin.origin.kind == 'none'  # started from random initialisation
    assert 'pretrained by the user on bigearthnet_mini for 4 steps' in (out / 'model' / 'README.md').read_text()
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert state['step'] == 4 and all(torch.equal(v, model.state_dict()[k]) for k, v in state['model'].items())
    x, kw = eobackbones.transforms.example_call(model, batch_size=1, image_size=32)
    with torch.no_grad():
        assert torch.isfinite(model(x, **kw)).all()


def test_resume_gives_the_uninterrupted_run(run4, tmp_path, capsys):
    out, _ = run4
    b = tmp_path / 'b'
    PD.main(TINY + ['--steps', '2', '--out', str(b)])
    PD.main(TINY + ['--steps', '4', '--out', str(b), '--resume'])
    assert 'resumed from' in capsys.readouterr().out
    assert _losses(b) == _losses(out)
    a_w, b_w = load_file(str(out / 'model' / 'model.safetensors')), load_file(str(b / 'model' / 'model.safetensors'))
    assert a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)


def test_probe_takes_the_pretrained_directory(run4, tmp_path):
    """The segmentation probe on the real PASTIS-R smoke set, the pretrained row from the directory; timestep and
    noise seed recorded with the results."""
    from eobackbones.cli import main
    out, _ = run4
    res = tmp_path / 'probe'
    assert main(['probe', '--model', f'local-dir:{out / "model"}', '--dataset', 'pastis-mini', '--n-boot', '20',
                 '--quiet', '--no-cache', '--device', 'cpu', '--out', str(res)]) == 0
    r = json.loads((res / 'linear_probe.json').read_text())
    rows = [row for row in r['rows'] if row['row'] != 'baseline']
    assert {row['row'] for row in rows} == {'pretrained', 'random-init'}
    assert all(json.loads(row['feature_kwargs']) == {'timestep': 1, 'noise_seed': 0} for row in rows)
    assert all(0 <= row['miou'] <= 1 and row['feature_dim'] == 64 for row in rows)  # decoder level 2 of the tiny UNet
    info = next(m for m in r['models'] if m['row'] == 'pretrained')
    assert info['seg_feature_index'] == 2 and info['provenance']['origin']['kind'] == 'trained'


def test_data_errors_are_one_line(tmp_path, capsys):
    import numpy as np
    with pytest.raises(SystemExit):
        PD.main(['--dataset', 'folder', '--root', str(tmp_path)])  # no --bands
    assert 'needs --bands' in capsys.readouterr().err
    (tmp_path / 'a').mkdir()
    np.save(tmp_path / 'a' / 'x.npy', np.zeros((5, 16, 16), dtype=np.float32))
    with pytest.raises(SystemExit, match='does not hold 6 bands'):
        PD.main(TINY + ['--dataset', 'folder', '--root', str(tmp_path), '--bands', 'B04', 'B03', 'B02', 'B08', 'VH',
                        'VV', '--out', str(tmp_path / 'o')])
    with pytest.raises(SystemExit, match='conditional'):
        PD.main(['--model', 'test_diffusion_cm_cond', '--steps', '1', '--out', str(tmp_path / 'c')])


def test_folder_dataset_and_model_args(tmp_path):
    """One (H, W, C) .npy per sample, bands named in channel order, S1 recognised by name; a registered architecture
    made small with --model-args (merged into its nested arguments) saves a directory that loads back as built."""
    import numpy as np
    g = np.random.default_rng(0)
    for i in range(4):
        s2 = g.uniform(0, 4000, (16, 16, 4))
        s1 = g.uniform(-25, -5, (16, 16, 2))
        np.save(tmp_path / f'{i}.npy', np.concatenate([s1[..., ::-1], s2], -1).astype(np.float32))  # VV, VH, S2
    small = {'unet_args': {'inner_channel': 32, 'channel_mults': [1, 2], 'attn_res': [], 'res_blocks': 1, 'dropout': 0}}
    final = PD.main(['--model', 'diffusion_sr3_s2s1', '--model-args', json.dumps(small), '--dataset', 'folder',
                     '--root', str(tmp_path), '--bands', 'VV', 'VH', 'B04', 'B03', 'B02', 'B08', '--steps', '2',
                     '--batch-size', '2', '--no-progress', '--out', str(tmp_path / 'o')])
    assert final['steps'] == 2 and np.isfinite(final['loss'])
    model = eobackbones.create_model(f'local-dir:{tmp_path / "o" / "model"}')
    assert model.provenance.origin.note == f'pretrained by the user on {tmp_path.name} for 2 steps'
    args = model.model_args['unet_args']
    assert args['inner_channel'] == 32 and list(args['channel_mults']) == [1, 2] and args['norm_groups'] == 32


_DDP = TINY[:2] + ['--batch-size', '13', '--steps', '3', '--opt', 'sgd', '--lr', '0.05', '--no-progress']


@pytest.mark.slow
def test_torchrun_two_processes_train_what_one_trains(tmp_path):
    """Global batches of 13 (shares of 7 and 6), SGD: the 2-process loss log and weights are the 1-process ones."""
    env = dict(os.environ, OMP_NUM_THREADS='1', EOBACKBONES_OFFLINE='1',
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', __file__,
           '--ddp-worker', str(tmp_path / 'two')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count('FINAL ') == 1 and '2 process(es)' in proc.stdout
    PD.main(_DDP + ['--out', str(tmp_path / 'one')])
    two, one = _losses(tmp_path / 'two'), _losses(tmp_path / 'one')
    assert [s for s, _ in two] == [s for s, _ in one] == [1, 2, 3]
    for (_, a), (_, b) in zip(two, one):
        assert a == pytest.approx(b, rel=1e-5)
    wa = load_file(str(tmp_path / 'two' / 'model' / 'model.safetensors'))
    wb = load_file(str(tmp_path / 'one' / 'model' / 'model.safetensors'))
    moved = 0
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)
        moved += 1
    assert moved > 20


if __name__ == '__main__' and sys.argv[1:2] == ['--ddp-worker']:
    PD.main(_DDP + ['--out', sys.argv[2]])
