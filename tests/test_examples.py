"""The fine-tuning examples run end to end on a tiny configuration, save loadable models, and give the same
final metrics under ``torchrun --nproc_per_node 2`` (gloo, CPU) as in one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eobackbones
import tiny_models  # noqa: F401  (registers test_dofa / test_tiny_cnn for the in-process runs)
from eobackbones.heads import load_segmentation_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / 'examples'
sys.path.insert(0, str(EXAMPLES))
import finetune_classification as CLS  # noqa: E402
import finetune_segmentation as SEG  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    # small models: one intra-op thread avoids oversubscribing the 2 shared cores (torchrun does the same)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_segmentation_example_runs_and_saves(tmp_path, capsys):
    out = tmp_path / 'seg'
    final = SEG.main(['--model', 'test_dofa', '--decoder', 'upernet', '--epochs', '2', '--max-steps', '3',
                      '--out', str(out), '--no-progress'])
    assert final['steps'] == 3
    assert 0 <= final['test_miou'] <= 1 and 0 <= final['val_balanced_acc'] <= 1 and final['train_loss'] > 0
    printed = capsys.readouterr().out
    assert 'val loss' in printed and 'not a benchmark' in printed and "'image': 'dataset-zscore" in printed
    metrics = json.loads((out / 'metrics.json').read_text())
    assert len(metrics['history']) == 2 and metrics['final'] == final
    model = load_segmentation_model(out).eval()
    assert model.input_spec.modality().bands == ('B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B11', 'B12')
    with torch.no_grad():
        assert model(torch.randn(1, 10, 32, 32)).shape == (1, 3, 32, 32)


def test_classification_example_runs_and_saves(tmp_path, capsys):
    out = tmp_path / 'cls'
    final = CLS.main(['--model', 'test_tiny_cnn', '--epochs', '1', '--max-steps', '2', '--batch-size', '8',
                      '--freeze-until', '1', '--out', str(out), '--no-progress'])
    assert final['steps'] == 2 and 0 <= final['test_map_macro'] <= 1 and final['val_loss'] > 0
    assert 'map_macro' in capsys.readouterr().out
    model = eobackbones.create_model(f'local-dir:{out}').eval()  # the backbone's own head: a plain model dir
    assert model.num_classes == 19
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 19)

    out2 = tmp_path / 'cls_mlp'
    CLS.main(['--model', 'test_dofa', '--head', 'mlp', '--hidden', '16', '--epochs', '1', '--max-steps', '1',
              '--batch-size', '8', '--out', str(out2), '--no-progress'])
    assert (out2 / 'head.safetensors').is_file() and (out2 / 'model.safetensors').is_file()


def _torchrun(script, args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', EOBACKBONES_OFFLINE='1',
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
           *args, '--out', str(tmp_path / 'ddp'), '--no-progress']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('FINAL ')]
    assert len(line) == 1, proc.stdout[-2000:]  # printed by rank 0 only
    assert '2 process(es)' in proc.stdout
    return json.loads(line[0][len('FINAL '):])


@pytest.mark.parametrize('example,args', [
    ('segmentation', ['--model', 'dualsimclr_resnet18_s2', '--missing-bands', 'zeros', '--decoder', 'unet',
                      '--epochs', '2', '--batch-size', '2', '--max-steps', '3', '--lr', '0.01', '--opt', 'sgd']),
    ('classification', ['--model', 'dualsimclr_resnet18_s2', '--epochs', '2', '--batch-size', '8', '--max-steps', '3',
                        '--lr', '0.05', '--opt', 'sgd']),
], ids=['segmentation', 'classification'])
def test_torchrun_two_processes_equal_one(example, args, tmp_path):
    """BatchNorm backbone (ResNet-18), uneven shares (5 train patches in batches of 2 and 3), flips: the same
    final metrics. SGD: Adam's per-element normalisation would amplify rounding differences (see _common.py)."""
    ddp = _torchrun(EXAMPLES / f'finetune_{example}.py', args, tmp_path)
    one = (SEG if example == 'segmentation' else CLS).main(args + ['--out', str(tmp_path / 'one'), '--no-progress'])
    assert ddp.keys() == one.keys() and ddp['steps'] == one['steps'] == 3
    for k in one:
        if k.endswith('loss'):  # continuous in the weights: rounding-level agreement
            assert ddp[k] == pytest.approx(one[k], rel=1e-4), k
        else:  # argmax / ranking metrics: equal unless a near-tie flips
            assert ddp[k] == pytest.approx(one[k], abs=2e-3), k


def test_torchgeo_tasks_train_eobackbones_models():
    pytest.importorskip('torchgeo.trainers')
    import torchgeo_tasks as TG
    torch.manual_seed(0)
    cls = TG.EOClassificationTask(model='test_tiny_cnn', num_classes=5, in_channels=3)
    assert type(cls.model).__name__ == 'TinyCNN' and cls.model.num_classes == 5
    loss = cls.training_step(dict(image=torch.randn(4, 3, 32, 32), label=torch.tensor([0, 1, 4, 2])), 0)
    loss.backward()
    assert torch.isfinite(loss) and cls.model.head.weight.grad is not None
    seg = TG.EOSegmentationTask(model='unet', backbone='test_dofa', num_classes=3, ignore_index=255,
                                backbone_kwargs=dict(bands=['B04', 'B03', 'B02']), freeze_backbone=True)
    mask = torch.randint(0, 3, (2, 32, 32))
    mask[:, :4] = 255
    loss = seg.training_step(dict(image=torch.randn(2, 3, 32, 32), mask=mask), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in seg.model.backbone.parameters())  # frozen by freeze_backbone
    assert all(p.grad is not None for p in seg.model.decoder.parameters())
