"""No silent wrong results: the spec follows the model, by-name preprocessing checks what it gets, the bytes that are
loaded are the bytes that were written, and the CLI fails in one line, leaving nothing half-written.

Every case feeds a real-world mistake and asserts the one-line message (expected vs given) and, where files are
involved, the state of the cache and of the output folder afterwards.
"""
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import eobackbones as eb
from eobackbones import transforms
from eobackbones.cli import main
from eobackbones.errors import (
    ChecksumMismatchError, CheckpointFormatError, InvalidInputError, ManifestError, NormalisationError,
    UnknownBandError, WeightsNotFoundError)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> bool:
    return err.startswith('error: ') and err.count('\n') == 1


# ----------------------------------------------------------------------------------------------- 1. the spec follows


def test_saved_dofa_rebound_with_bands_gets_the_new_spec(tmp_path):
    torch.manual_seed(0)
    saved = eb.create_model('test_dofa', bands=['B04', 'B03', 'B02']).save_pretrained(tmp_path / 'd')
    m = eb.create_model(f'local-dir:{saved}', bands=['B08', 'B04'])
    mod = m.input_spec.modality()
    assert mod.bands == ('B08', 'B04') and m.wavelengths_um == (0.842, 0.665)
    assert mod.normalization[0]['mean'] == pytest.approx([101.435633, 114.1099739])  # by band name, from the manifest
    w = eb.create_model(f'local-dir:{saved}', wavelengths=[0.6, 0.7])  # wavelengths= replaces the saved bands=
    assert w.wavelengths_um == (0.6, 0.7) and w.input_spec.modality().normalization == ()
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        pre = transforms.for_model(m, source_bands=['B04', 'B08'])
        assert pre(x).shape == (1, 2, 32, 32)


def test_bands_and_contradicting_wavelengths_are_refused():
    with pytest.raises(InvalidInputError, match=r"bands=\['B04'\] mean wavelengths \[0.665\].*wavelengths=\[0.7\]"):
        eb.create_model('test_dofa', bands=['B04'], wavelengths=[0.7])
    assert eb.create_model('test_dofa', bands=['B04'], wavelengths=[0.665]).wavelengths_um == (0.665,)


def test_channel_and_size_arguments_update_the_spec():
    m = eb.create_model('dualsimclr_resnet18_s2', in_chans=4)
    mod = m.input_spec.modality()
    assert mod.bands == ('c0', 'c1', 'c2', 'c3') and mod.normalization == () and 'instead of' in mod.notes
    with pytest.raises(NormalisationError, match='states no normalisation'):
        transforms.for_model(m)
    with torch.no_grad():
        eb.create_model('dualsimclr_resnet18_s2', in_chans=4).eval()(eb.example_input(m, 1, 32))
    sw = eb.create_model('sslswin_tiny_s1', img_size=112)
    assert sw.input_spec.modality().image_size == (112, 112)
    with torch.no_grad():
        sw.eval()(eb.example_input(sw, 1))  # the spec's size is the size the windows are built for
    pair = eb.create_model('sslswin_tiny', encoder_args={'img_size': 112})
    assert {m.image_size for m in pair.input_spec.modalities} == {(112, 112)}


# ----------------------------------------------------------------------------------------------- 2. by-name preprocessing


def _s2_model():
    return eb.create_model('test_tiny_cnn')  # B04, B03, B02 with clip + meanstd


def test_source_band_count_is_checked_on_every_call():
    pre = transforms.for_model(_s2_model(), source_bands=['B02', 'B03', 'B04', 'B08'])
    with pytest.raises(InvalidInputError, match=r"4 source band names .* for an input of shape \(1, 3, 8, 8\)"):
        pre(torch.rand(1, 3, 8, 8) * 1000)  # one name too many: would feed a neighbouring band silently
    assert pre(torch.rand(1, 4, 8, 8) * 1000).shape == (1, 3, 8, 8)


@pytest.mark.parametrize('bands, hint', [
    (['b02', 'B03', 'B04'], "did you mean B02"),
    (['B2', 'B3', 'B4'], "did you mean B02"),
    (['B02', 'B03', 'B04', 'B8'], "did you mean B08"),
])
def test_band_names_are_checked_against_the_catalogue(bands, hint):
    with pytest.raises(UnknownBandError, match=hint) as e:
        transforms.for_model(_s2_model(), source_bands=bands)
    assert '\n' not in str(e.value)


def test_no_normalisation_is_an_error_unless_asked_for():
    dofa = eb.create_model('test_dofa', bands=['B01', 'B04'])  # no published statistics for B01
    with pytest.raises(NormalisationError, match=r"states no normalisation .*B01.*allow_unnormalised=True"):
        transforms.for_model(dofa)
    pre = transforms.for_model(dofa, allow_unnormalised=True)
    x = torch.rand(1, 2, 8, 8)
    assert torch.equal(pre(x), x)


def test_nan_rule_error_or_fill_never_a_silent_nan_channel():
    pre = transforms.for_model(eb.create_model('dualsimclr_resnet18_s1'))  # clip, +25, per-sample max
    x = torch.full((1, 2, 4, 4), -10.0)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(InvalidInputError, match=r"s1: 1 non-finite pixels .*nan=\"fill\""):
        pre(x)
    fill = transforms.for_model(eb.create_model('dualsimclr_resnet18_s1'), nan='fill')
    y = fill(x)
    assert torch.isfinite(y).all() and y[0, 0, 0, 0] == 0 and fill.last_filled == {'s1': 1}
    # the statistic ignores the NaN pixel: the rest of the channel is normalised by the valid maximum
    assert torch.allclose(y[0, 0].flatten()[1:], torch.full((15,), 15.0 / (15.0 + 1e-5)))


# ----------------------------------------------------------------------------------------------- 4. integrity


def test_flipped_bytes_in_a_saved_directory_fail_the_load(tmp_path):
    torch.manual_seed(0)
    d = eb.create_model('test_tiny_cnn').save_pretrained(tmp_path / 'saved')
    conf = json.loads((d / 'config.json').read_text())
    assert len(conf['weights_sha256']) == 64
    w = d / 'model.safetensors'
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x40  # one bit of one weight
    w.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r'model.safetensors is damaged or was replaced') as e:
        eb.create_model(f'local-dir:{d}')
    assert '\n' not in str(e.value)


def test_corrupt_config_and_header_are_one_line_with_the_path(tmp_path):
    d = eb.create_model('test_tiny_cnn').save_pretrained(tmp_path / 'saved')
    (d / 'config.json').write_text('{"format": "eobackbones/2", "architecture": ')
    with pytest.raises(ManifestError, match=r'config.json is not valid JSON'):
        eb.create_model(f'local-dir:{d}')
    d2 = eb.create_model('test_tiny_cnn').save_pretrained(tmp_path / 'saved2')
    conf = json.loads((d2 / 'config.json').read_text())
    conf['weights_sha256'] = None  # an older directory: no checksum to catch it, the reader must
    (d2 / 'config.json').write_text(json.dumps(conf))
    (d2 / 'model.safetensors').write_bytes(b'\xff' * 16)
    with pytest.raises(CheckpointFormatError, match=r'model.safetensors is not a readable safetensors file'):
        eb.create_model(f'local-dir:{d2}')


def test_converted_cache_is_rehashed_on_load_and_by_verify(local_hub, register_weights, capsys):
    import hashlib
    from eobackbones.hub.weights import converted_path
    from tiny_models import TINY_SPEC, upstream_checkpoint
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(upstream_checkpoint(eb.create_model('test_tiny_cnn')), buf)
    data = buf.getvalue()
    commit = local_hub.add_file('eo-test/tiny', 'tiny.pth', data)
    cfg = register_weights('test_tiny_cnn.integrity', dict(
        source=dict(hf_repo='eo-test/tiny', revision=commit, filename='tiny.pth',
                    sha256=hashlib.sha256(data).hexdigest()),
        format='torch', converter='test_tiny.upstream', license='MIT', paper='test', provenance='test',
        input_spec=TINY_SPEC.to_dict()))
    eb.create_model('test_tiny_cnn.integrity', pretrained=True)
    conv = converted_path(cfg)
    assert conv.is_file() and conv.with_name(conv.name + '.sha256').is_file()
    assert _run(capsys, 'verify', 'test_tiny_cnn.integrity')[0] == 0
    # a planted file in place of the converted one
    other = eb.create_model('test_tiny_cnn')
    from safetensors.torch import save_file
    save_file({k: v.contiguous() + 1 for k, v in other.state_dict().items()}, str(conv))
    with pytest.raises(ChecksumMismatchError, match=r'damaged or was replaced.*delete it and load'):
        eb.create_model('test_tiny_cnn.integrity', pretrained=True)
    code, out, _ = _run(capsys, 'verify', 'test_tiny_cnn.integrity')
    assert code == 1 and 'corrupt' in out and 'damaged or was replaced' in out
    conv.write_bytes(conv.read_bytes()[:100])  # truncated
    code, out, _ = _run(capsys, 'verify', 'test_tiny_cnn.integrity')
    assert code == 1 and 'corrupt' in out


# ----------------------------------------------------------------------------------------------- 6. DDP on features_only

_DDP_WORKER = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import tiny_models, eobackbones as eb
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group('gloo')
    torch.manual_seed(0)
    for name, x in (('test_dofa', torch.randn(2, 9, 32, 32)), ('dualsimclr_resnet18_s2', torch.randn(2, 13, 32, 32))):
        model = eb.create_model(name, features_only=True, out_indices=(1, 2))
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        for step in range(2):  # the second step fails when some parameters got no gradient in the first
            opt.zero_grad()
            sum(f.square().mean() for f in ddp(x)).backward()
            opt.step()
    if dist.get_rank() == 0:
        print('ok')
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_features_only_models_train_under_ddp(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(_DDP_WORKER.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- 7. CLI


def test_convert_on_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / 'notes.txt'
    bad.write_text('hello, not a checkpoint\n' * 20)
    code, _, err = _run(capsys, 'convert', 'dofa', '--checkpoint', str(bad), '--out', str(tmp_path / 'out'))
    assert code == 2 and _one_line(err) and 'not a readable torch checkpoint' in err
    assert 'weights_only=False' not in err and 'pickled' not in err  # never the unsafe advice
    assert not (tmp_path / 'out').exists()


def test_convert_options_are_validated_before_any_work(tmp_path, capsys):
    ckpt = tmp_path / 'x.pth'
    torch.save({'a': torch.zeros(1)}, ckpt)
    code, _, err = _run(capsys, 'convert', 'dofa', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'o'),
                        '--option', 'sar_wavelength_um=abc')
    assert code == 2 and _one_line(err) and "sar_wavelength_um='abc': expected float" in err
    code, _, err = _run(capsys, 'convert', 'dofa', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'o'),
                        '--option', 'colour=red')
    assert code == 2 and "unknown options ['colour']" in err
    code, _, err = _run(capsys, 'convert', 'dofa', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'o'),
                        '--option', 'layout=sideways')
    assert code == 2 and "expected one of ['permute', 'legacy']" in err
    assert not (tmp_path / 'o').exists()


def test_convert_that_fails_half_way_leaves_no_output(tmp_path, capsys):
    """A checkpoint whose keys do not fit fails the strict load before anything is written."""
    torch.manual_seed(0)
    sd = eb.create_model('test_dofa').state_dict()
    sd['blocks.0.attn.qkv.weight'] = sd['blocks.0.attn.qkv.weight'][:-1]  # one shape off
    ckpt = tmp_path / 'dofa.pth'
    torch.save({'model': sd}, ckpt)
    code, _, err = _run(capsys, 'convert', 'dofa', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'out'),
                        '--option', 'arch=test_dofa')
    assert code == 2 and _one_line(err) and 'shape mismatches' in err
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())


def test_convert_help_lists_every_converter_and_its_options(capsys):
    code, out, _ = _run(capsys, 'convert', '--help')
    assert code == 0
    assert 'dofa (needs --out)' in out and 'sar_wavelength_um=float' in out
    assert 'sslrs (without --out: installs into the cache)' in out and 'tag=str' in out


@pytest.mark.parametrize('argv, pattern', [
    (('probe', '--model', 'test_tiny_cnn', '--batch-size', '0'), r'--batch-size: expected a positive integer'),
    (('probe', '--model', 'test_tiny_cnn', '--bands', 'B04'), r'--bands does not apply to --dataset bigearthnet-mini'),
    (('probe', '--model', 'test_tiny_cnn', '--root', '/data'), r'--root does not apply'),
    (('probe', '--model', 'test_tiny_cnn', '--device', 'cuda:3'), r'CUDA is not available'),
    (('list', '--modality', 'foo'), r"--modality 'foo' is not a modality of any model; known: "),
    (('list', '--sensor', 'sentinel3'), r"--sensor 'sentinel3' is not in the sensor catalogue"),
    (('info', 'test_tiny_cnn', '--bogus'), r'unrecognized arguments: --bogus'),
])
def test_options_are_validated_in_one_line(capsys, argv, pattern):
    import re
    code, out, err = _run(capsys, *argv)
    assert code == 2 and _one_line(err) and re.search(pattern, err), err


def test_folder_dataset_without_validation_samples(tmp_path, capsys):
    import numpy as np
    root = tmp_path / 'folder'
    for c in ('a', 'b'):
        (root / c).mkdir(parents=True)
        np.save(root / c / '0.npy', np.zeros((3, 8, 8), dtype=np.float32))  # one sample per class: no val split
    code, _, err = _run(capsys, 'probe', '--model', 'test_tiny_cnn', '--dataset', 'folder', '--root', str(root),
                        '--bands', 'B04', 'B03', 'B02', '--quiet', '--pretrained', 'none')
    assert code == 2 and _one_line(err) and 'val' in err


def test_debug_after_the_subcommand_shows_the_traceback():
    exe = Path(sys.executable).with_name('eobackbones')
    r = subprocess.run([str(exe), 'info', 'no_such_model', '--debug'], capture_output=True, text=True)
    assert r.returncode != 0 and 'Traceback' in r.stderr


def test_a_closed_pipe_ends_quietly():
    exe = Path(sys.executable).with_name('eobackbones')
    p = subprocess.Popen([str(exe), 'list'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(5)
    p.stdout.close()  # `eobackbones list | head -c 5`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert 'Traceback' not in err and 'BrokenPipe' not in err and 'error' not in err


# ----------------------------------------------------------------------------------------------- 8. offline


def test_unreachable_endpoint_fails_fast_with_the_offline_message(monkeypatch, register_weights, tmp_path):
    """No network and no HF_HUB_OFFLINE: one short connection probe, then the same message as offline mode."""
    from huggingface_hub import constants
    from eobackbones.hub import download
    from tiny_models import TINY_SPEC
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    endpoint = f'http://127.0.0.1:{port}'
    monkeypatch.setenv('HF_ENDPOINT', endpoint)
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setenv('EOBACKBONES_HOME', str(tmp_path / 'eob'))
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.delenv('EOBACKBONES_OFFLINE', raising=False)
    monkeypatch.setattr(download, '_REACHABLE', {})
    probes = []
    real = socket.create_connection

    def spy(*a, **k):  # count our reachability probes (huggingface_hub opens its own connections too)
        if sys._getframe(1).f_globals.get('__name__') == 'eobackbones.hub.download':
            probes.append(a)
        return real(*a, **k)
    monkeypatch.setattr(socket, 'create_connection', spy)
    register_weights('test_tiny_cnn.offline', dict(
        source=dict(hf_repo='eo-test/tiny', revision='1' * 40, filename='tiny.pth', sha256='a' * 64),
        format='torch', converter='test_tiny.upstream', license='MIT', paper='t', provenance='t',
        input_spec=TINY_SPEC.to_dict()))
    for _ in range(2):
        with pytest.raises(WeightsNotFoundError, match=r'is not in the local cache and the Hub .* is unreachable.*'
                                                      r'eobackbones download test_tiny_cnn.offline'):
            eb.create_model('test_tiny_cnn.offline', pretrained=True)
    assert len(probes) == 1  # probed once per process, not per load (and no retries against a dead endpoint)
