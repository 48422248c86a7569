"""The eobackbones command and torch.hub entry points."""
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import torch

from eobackbones.cli import main
from tiny_models import TINY_SPEC, upstream_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_and_filters(capsys):
    code, out, _ = _run(capsys, 'list')
    assert code == 0 and 'test_tiny_cnn' in out.split()
    code, out, _ = _run(capsys, 'list', 'test_*', '--modality', 's2')
    assert out.split() == ['test_diffusion_cm_cond', 'test_diffusion_sr3', 'test_dofa', 'test_tiny_cnn',
                           'test_trimodal']
    code, out, _ = _run(capsys, 'list', '--sensor', 'sentinel1')
    assert 'dofa_base' in out.split() and 'dualsimclr_resnet50_s1' in out.split() and 'dualsimclr_resnet50_s2' not in out.split()
    code, _, err = _run(capsys, 'list', 'nothing*')
    assert code == 1 and "no models match 'nothing*'" in err


def test_info_without_weights(capsys):
    code, out, _ = _run(capsys, 'info', 'test_tiny_cnn')
    assert code == 0
    assert 'weights: none published: test model' in out
    assert 'parameters: ' in out and 'bands: B04 (0.665 um), B03 (0.56 um), B02 (0.49 um)' in out
    assert 'norm: op=meanstd' in out


def test_errors_are_one_line_with_nonzero_exit(capsys):
    code, out, err = _run(capsys, 'info', 'test_tiny_cn')
    assert code == 2 and err.strip().count('\n') == 0
    assert err.startswith("error: unknown model 'test_tiny_cn'; did you mean: test_tiny_cnn")
    code, _, err = _run(capsys, 'convert', 'nofamily', '--checkpoint', 'x', '--out', 'y')
    assert code == 2 and "unknown family 'nofamily'" in err
    code, _, err = _run(capsys, 'download', 'zzz*')
    assert code == 2 and "no weights match 'zzz*'" in err


def test_console_script_has_no_traceback_unless_debug():
    exe = Path(sys.executable).with_name('eobackbones')
    r = subprocess.run([str(exe), 'info', 'no_such_model'], capture_output=True, text=True)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and r.stderr.startswith('error: unknown model')
    r = subprocess.run([str(exe), '--debug', 'info', 'no_such_model'], capture_output=True, text=True)
    assert r.returncode != 0 and 'Traceback' in r.stderr


def test_download_then_verify_detects_corruption(local_hub, register_weights, capsys):
    torch.manual_seed(0)
    import eobackbones
    buf = io.BytesIO()
    torch.save(upstream_checkpoint(eobackbones.create_model('test_tiny_cnn')), buf)
    data = buf.getvalue()
    commit = local_hub.add_file('eo-test/tiny', 'tiny.pth', data)
    register_weights('test_tiny_cnn.clitest', dict(
        source=dict(hf_repo='eo-test/tiny', revision=commit, filename='tiny.pth', sha256=hashlib.sha256(data).hexdigest()),
        format='torch', converter='test_tiny.upstream', license='MIT', paper='test', provenance='test',
        input_spec=TINY_SPEC.to_dict()))
    code, out, _ = _run(capsys, 'verify', 'test_tiny_cnn.clitest')
    assert code == 0 and 'missing' in out
    code, out, _ = _run(capsys, 'download', 'test_tiny_cnn.clitest')
    assert code == 0 and out.startswith('test_tiny_cnn.clitest: ') and out.strip().endswith('.safetensors')
    code, out, _ = _run(capsys, 'verify', 'test_tiny_cnn.clitest')
    assert code == 0 and ' ok ' in out
    blob = next((Path(os.environ['HF_HUB_CACHE']) / 'models--eo-test--tiny' / 'blobs').iterdir())
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    code, out, _ = _run(capsys, 'verify', 'test_tiny_cnn.clitest')
    assert code == 1 and 'corrupt' in out and 'does not match the manifest' in out


def test_torch_hub_local(tmp_path):
    model = torch.hub.load(str(ROOT), 'test_tiny_cnn', source='local', num_classes=4, trust_repo=True)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    model = torch.hub.load(str(ROOT), 'create_model', 'test_tiny_cnn', source='local', trust_repo=True)
    assert model.num_classes == 0
    # torch.hub.help reads the entry's docstring (it only takes GitHub repos, so read it as it does)
    hubconf = torch.hub._import_module('hubconf', str(ROOT / 'hubconf.py'))
    assert 'A tiny 3-stage CNN' in hubconf.test_tiny_cnn.__doc__
    assert hubconf.dependencies == ['torch', 'timm', 'huggingface_hub', 'safetensors']
    entries = [f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith('_')]  # as torch.hub.list
    assert {'create_model', 'test_tiny_cnn'} <= set(entries)


def test_bench_subcommand_is_wired(capsys, tmp_path):
    code, _, err = _run(capsys, 'bench', 'no_such_model*', '--out', str(tmp_path))
    assert code == 2 and err.strip() == "error: no model matches 'no_such_model*'; see `eobackbones list`"
    code, _, err = _run(capsys, 'bench', 'test_tiny_cnn', '--precision', 'fp16', '--device', 'cpu', '--out', str(tmp_path))
    assert code == 2 and 'fp16' in err and err.strip().count('\n') == 0
