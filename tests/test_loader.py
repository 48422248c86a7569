"""The Hub loader end to end: real huggingface_hub against the local Hub server (tests/hubserver.py)."""
import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import eobackbones
from eobackbones.errors import ChecksumMismatchError, CheckpointFormatError, WeightsNotFoundError
from eobackbones import env
from eobackbones.hub import download
from tiny_models import TINY_SPEC, upstream_checkpoint

REPO = 'eo-test/tiny'
TESTS = Path(__file__).parent


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _source_model(seed: int = 0):
    torch.manual_seed(seed)
    return eobackbones.create_model('test_tiny_cnn')


def _entry(commit: str, filename: str, data: bytes, fmt: str = 'torch', prefix_only: bool = False) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    src = dict(hf_repo=REPO, revision=commit, filename=filename, size=len(data))
    src.update({'sha256_prefix': digest[:8]} if prefix_only else {'sha256': digest})
    entry = dict(source=src, format=fmt, license='MIT', paper='none (test weights)', provenance='built by the test',
                 input_spec=TINY_SPEC.to_dict())
    if fmt == 'torch':
        entry['converter'] = 'test_tiny.upstream'
    return entry


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _blobs() -> list:
    d = Path(os.environ['HF_HUB_CACHE']) / f'models--{REPO.replace("/", "--")}' / 'blobs'
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _converted_files() -> list:
    """Converted weight files (each has its .sha256 record beside it; locks and records are not counted)."""
    d = env.cache_home() / 'converted'
    files = sorted(str(p.relative_to(d)) for p in d.rglob('*.safetensors') if p.is_file())
    assert all((d / f).with_name(Path(f).name + '.sha256').is_file() for f in files)
    assert not [p for p in d.rglob('*.tmp')]  # no half-written leftovers
    return files


def test_first_download_then_cache_hit_with_server_stopped(local_hub, register_weights, monkeypatch):
    src = _source_model()
    data = _torch_bytes(upstream_checkpoint(src))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))

    model = eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    assert _same_weights(model, src)
    assert model.pretrained_cfg.name == 'test_tiny_cnn.hubtest'
    assert len(local_hub.downloads(REPO, 'tiny.pth')) == 1
    assert len(_converted_files()) == 1

    # second load: converted safetensors only; neither the server nor the converter is used
    local_hub.stop()
    from eobackbones.hub import weights
    conv = weights._converters['test_tiny.upstream']
    monkeypatch.setitem(weights._converters, 'test_tiny.upstream',
                        dataclasses.replace(conv, fn=lambda raw, cfg: pytest.fail('re-converted')))
    again = eobackbones.create_model('test_tiny_cnn', pretrained='hubtest')
    assert _same_weights(again, src)


def test_pretrained_model_is_built_without_random_init(local_hub, register_weights, monkeypatch):
    src = _source_model()
    data = _torch_bytes(upstream_checkpoint(src))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))
    inits = []
    monkeypatch.setattr(torch.nn.Conv2d, 'reset_parameters', lambda self: inits.append(self.weight.is_meta))
    eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    assert inits == [True] * 3  # built on the meta device: no real random init, weights come from the file
    inits.clear()
    eobackbones.create_model('test_tiny_cnn')
    assert inits == [False] * 3


def test_new_head_is_initialised_when_num_classes_differs(local_hub, register_weights):
    src = _source_model()
    data = _torch_bytes(upstream_checkpoint(src))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))
    model = eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True, num_classes=5)
    assert model.head.weight.shape == (5, 32) and not model.head.weight.is_meta
    assert torch.isfinite(model.head.weight).all() and model.head.weight.abs().sum() > 0
    assert torch.equal(model.stem.weight, src.stem.weight)


def test_pinned_revision_is_used_not_main(local_hub, register_weights):
    old, new = _source_model(0), _source_model(1)
    data_old = _torch_bytes(upstream_checkpoint(old))
    commit_old = local_hub.add_file(REPO, 'tiny.pth', data_old)
    local_hub.add_file(REPO, 'tiny.pth', _torch_bytes(upstream_checkpoint(new)))  # main moves on
    register_weights('test_tiny_cnn.hubtest', _entry(commit_old, 'tiny.pth', data_old))
    model = eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    assert _same_weights(model, old)
    assert all(commit_old in p for m, p in local_hub.requests if '/resolve/' in p)


def test_sha256_mismatch_is_an_error_and_nothing_is_cached(local_hub, register_weights):
    data = _torch_bytes(upstream_checkpoint(_source_model()))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))
    local_hub.corrupt(REPO, 'tiny.pth')
    with pytest.raises(ChecksumMismatchError, match=r'sha256 .* does not match the manifest .*removed from the cache'):
        eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    assert _blobs() == [] and _converted_files() == []


def test_published_prefix_is_checked(local_hub, register_weights):
    data = _torch_bytes(upstream_checkpoint(_source_model()))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    entry = _entry(commit, 'tiny.pth', data, prefix_only=True)
    entry['source']['sha256_prefix'] = ('0' if entry['source']['sha256_prefix'][0] != '0' else '1') + \
        entry['source']['sha256_prefix'][1:]
    register_weights('test_tiny_cnn.hubtest', entry)
    with pytest.raises(ChecksumMismatchError, match='does not match the manifest'):
        eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    assert _blobs() == []


def test_size_mismatch_is_reported(local_hub, register_weights):
    data = _torch_bytes(upstream_checkpoint(_source_model()))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    entry = _entry(commit, 'tiny.pth', data)
    entry['source']['size'] = len(data) + 1
    register_weights('test_tiny_cnn.hubtest', entry)
    with pytest.raises(ChecksumMismatchError, match=f'has {len(data)} bytes, the manifest expects {len(data) + 1}'):
        eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)


def test_interrupted_transfer_leaves_nothing_and_retry_succeeds(local_hub, register_weights, no_retry_sleep):
    src = _source_model()
    data = _torch_bytes(upstream_checkpoint(src))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))
    local_hub.truncate_next(REPO, 'tiny.pth', len(data) // 3, times=20)  # more than huggingface_hub retries
    with pytest.raises(WeightsNotFoundError, match='download of .* failed .*run the same command again'):
        eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    cache = Path(os.environ['HF_HUB_CACHE'])
    assert _blobs() == [] and _converted_files() == []
    assert not [p for p in cache.rglob('*.incomplete')]
    local_hub.truncate_next(REPO, 'tiny.pth', 0, times=0)  # the network recovers
    model = eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    assert _same_weights(model, src)


def test_checkpoint_with_pickled_object_is_refused(local_hub, register_weights):
    import argparse
    ckpt = upstream_checkpoint(_source_model())
    ckpt['args'] = argparse.Namespace(lr=0.1)  # an arbitrary object: must never be unpickled
    data = _torch_bytes(ckpt)
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))
    with pytest.raises(CheckpointFormatError, match='refused to load tiny.pth: it contains pickled objects other than tensors'):
        eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    assert _converted_files() == []


def test_unexpected_key_fails_the_strict_load(local_hub, register_weights):
    ckpt = upstream_checkpoint(_source_model())
    ckpt['model']['module.extra.weight'] = torch.zeros(3)
    data = _torch_bytes(ckpt)
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))
    with pytest.raises(CheckpointFormatError, match=r'test_tiny_cnn.hubtest: 1 unexpected keys: extra.weight'):
        eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)


def test_missing_key_fails_the_strict_load(local_hub, register_weights):
    ckpt = upstream_checkpoint(_source_model())
    del ckpt['model']['module.stages.1.1.running_var']
    data = _torch_bytes(ckpt)
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))
    with pytest.raises(CheckpointFormatError, match=r'1 missing keys: stages.1.1.running_var'):
        eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)


def test_offline_with_cache_works_and_without_cache_names_the_file(local_hub, register_weights, monkeypatch):
    src = _source_model()
    data = _torch_bytes(upstream_checkpoint(src))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    register_weights('test_tiny_cnn.hubtest', _entry(commit, 'tiny.pth', data))
    sdata = st_save(dict(src.state_dict()))
    scommit = local_hub.add_file(REPO, 'tiny.safetensors', sdata)
    register_weights('test_tiny_cnn.hubtest_st', _entry(scommit, 'tiny.safetensors', sdata, fmt='safetensors'))

    monkeypatch.setenv('EOBACKBONES_OFFLINE', '1')
    with pytest.raises(WeightsNotFoundError) as e:
        eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    msg = str(e.value)
    assert REPO in msg and commit in msg and 'tiny.pth' in msg and 'offline mode is on' in msg
    assert '`eobackbones download test_tiny_cnn.hubtest`' in msg
    assert local_hub.requests == [m for m in local_hub.requests if m[0] != 'GET']  # nothing was fetched

    monkeypatch.delenv('EOBACKBONES_OFFLINE')
    eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    eobackbones.create_model('test_tiny_cnn.hubtest_st', pretrained=True)
    local_hub.stop()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    for name in ('test_tiny_cnn.hubtest', 'test_tiny_cnn.hubtest_st'):
        assert _same_weights(eobackbones.create_model(name, pretrained=True), src)


def test_upstream_safetensors_go_through_the_converter(local_hub, register_weights):
    src = _source_model()
    data = st_save({'module.' + k: v.contiguous() for k, v in src.state_dict().items()})
    commit = local_hub.add_file(REPO, 'upstream.safetensors', data)
    entry = _entry(commit, 'upstream.safetensors', data, fmt='safetensors')
    entry['converter'] = 'test_tiny.prefixed'
    register_weights('test_tiny_cnn.hubtest', entry)
    assert _same_weights(eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True), src)
    assert len(_converted_files()) == 1


def test_manual_source_explains_how_to_get_the_weights(register_weights):
    entry = dict(source={'manual': 'gdrive:FILEID'}, format='torch', converter='test_tiny.upstream', license='NOASSERTION',
                 paper='test', provenance='test', input_spec=TINY_SPEC.to_dict())
    register_weights('test_tiny_cnn.manual', entry)
    with pytest.raises(WeightsNotFoundError, match=r'only outside the Hub \(gdrive:FILEID\).*eobackbones convert test_tiny'):
        eobackbones.create_model('test_tiny_cnn.manual', pretrained=True)


_WORKER = textwrap.dedent('''
    import sys, hashlib
    sys.path.insert(0, {tests!r})
    import tiny_models, torch, eobackbones
    from eobackbones.hub.manifest import parse_entry
    from eobackbones.models import register_pretrained
    import json
    register_pretrained(parse_entry('test_tiny_cnn.hubtest', json.loads({entry!r})))
    m = eobackbones.create_model('test_tiny_cnn.hubtest', pretrained=True)
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode()); h.update(v.numpy().tobytes())
    print(h.hexdigest())
''')


def test_four_processes_load_the_same_weights_at_once(local_hub, register_weights):
    import json
    src = _source_model()
    data = _torch_bytes(upstream_checkpoint(src))
    commit = local_hub.add_file(REPO, 'tiny.pth', data)
    entry = _entry(commit, 'tiny.pth', data)
    code = _WORKER.format(tests=str(TESTS), entry=json.dumps(entry))
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    digests = {out.strip() for out, _ in outs}
    assert len(digests) == 1
    assert len(local_hub.downloads(REPO, 'tiny.pth')) == 1  # one transfer, the others waited on the lock
    files = _converted_files()
    assert len(files) == 1, files  # one converted file, no temporary leftovers
    from safetensors.torch import load_file
    loaded = load_file(str(env.cache_home() / 'converted' / files[0]))
    assert all(torch.equal(loaded[k], v) for k, v in src.state_dict().items())


def test_save_pretrained_round_trip_local_dir_and_hf_hub(local_hub, tmp_path):
    torch.manual_seed(0)
    model = eobackbones.create_model('test_tiny_cnn', num_classes=3, width=4).eval()
    out = model.save_pretrained(tmp_path / 'saved')
    assert {p.name for p in out.iterdir()} == {'config.json', 'model.safetensors', 'README.md'}
    x = eobackbones.example_input(model, 2)
    again = eobackbones.create_model(f'local-dir:{out}').eval()
    assert torch.equal(model(x), again(x))
    assert again.input_spec == model.input_spec
    for f in ('config.json', 'model.safetensors'):
        commit = local_hub.add_file('eo-test/saved', f, (out / f).read_bytes())
    from_hub = eobackbones.create_model(f'hf-hub:eo-test/saved@{commit}').eval()
    assert torch.equal(model(x), from_hub(x))
    with pytest.raises(WeightsNotFoundError, match='expected config.json'):
        eobackbones.create_model(f'local-dir:{tmp_path / "nowhere"}')
