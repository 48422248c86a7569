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

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / 'examples'
sys.path.insert(0, str(EXAMPLES))
import finetune_classification as CLS  # noqa: E402
import finetune_segmentation as SEG  # noqa: E402


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small models, one intra-op thread


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
    model = eobackbones.create_model(f'local-dir:{out}').eval()
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


# both examples on a ResNet-18 (BatchNorm) backbone; SGD: Adam's per-element normalisation would amplify rounding
# differences between the runs (see examples/_common.py)
_DDP_ARGS = {
    'segmentation': ['--model', 'dualsimclr_resnet18_s2', '--missing-bands', 'zeros', '--decoder', 'unet',
                     '--epochs', '2', '--batch-size', '2', '--max-steps', '3', '--lr', '0.01', '--opt', 'sgd'],
    'classification': ['--model', 'dualsimclr_resnet18_s2', '--epochs', '2', '--batch-size', '8', '--max-steps', '3',
                       '--lr', '0.05', '--opt', 'sgd'],
}
_MAINS = {'segmentation': SEG.main, 'classification': CLS.main}


def test_torchrun_two_processes_equal_one(tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU) gives the final metrics of one process, for both examples.

    Segmentation: 5 train patches in batches of 2 and 3, so the processes get shares of 1 and 2 samples; flips
    on. Both runs execute in one torchrun launch (this file is the worker script, as in test_linear_probe.py).
    """
    env = dict(os.environ, OMP_NUM_THREADS='1', EOBACKBONES_OFFLINE='1',
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    out = tmp_path / 'ddp.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', __file__,
           '--ddp-worker', str(out), str(tmp_path / 'ddp')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errors = '\n'.join(ln for ln in proc.stderr.splitlines() if ln.startswith('[rank'))
    assert proc.returncode == 0, proc.stdout[-2000:] + (errors or proc.stderr)[-4000:]
    ddp = json.loads(out.read_text())
    assert proc.stdout.count('FINAL ') == 2 and proc.stdout.count('2 process(es)') == 2  # rank 0 prints, once each
    for example, args in _DDP_ARGS.items():
        one = _MAINS[example](args + ['--out', str(tmp_path / f'one_{example}'), '--no-progress'])
        got = ddp[example]
        assert got.keys() == one.keys() and got['steps'] == one['steps'] == 3
        for k in one:
            if k.endswith('loss'):  # continuous in the weights: rounding-level agreement
                assert got[k] == pytest.approx(one[k], rel=1e-4), (example, k)
            else:  # argmax / ranking metrics: equal unless a near-tie flips
                assert got[k] == pytest.approx(one[k], abs=2e-3), (example, k)


def _ddp_worker(out: str, out_dir: str) -> None:
    """Run both examples under torchrun in one process group; rank 0 writes their final metrics to ``out``."""
    import torch.distributed as dist
    dist.init_process_group('gloo')  # once: the examples use a group that exists and leave it to its owner
    try:
        finals = {ex: _MAINS[ex](args + ['--out', f'{out_dir}_{ex}', '--no-progress'])
                  for ex, args in _DDP_ARGS.items()}
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(finals))
    finally:
        dist.destroy_process_group()


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


if __name__ == '__main__' and sys.argv[1:2] == ['--ddp-worker']:
    _ddp_worker(*sys.argv[2:4])
