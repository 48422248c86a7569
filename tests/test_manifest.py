"""weights_manifest.yaml: every entry follows the schema and fits its model."""
import dataclasses
import copy
from pathlib import Path

import pytest
import yaml

import eobackbones
from eobackbones.errors import ManifestError
from eobackbones.hub.manifest import load_manifest, manifest_path, parse_entry, parse_manifest
from eobackbones.models import list_models
from eobackbones.cfg import HubSource, ManualSource
from eobackbones.hub.weights import _converters

ROOT = Path(__file__).resolve().parents[1]
ARCHS, ENTRIES = load_manifest()


def test_packaged_manifest_is_the_top_level_file():
    assert manifest_path().resolve() == (ROOT / 'weights_manifest.yaml').resolve()
    assert len(ENTRIES) >= 4


@pytest.mark.parametrize('cfg', ENTRIES, ids=lambda c: c.name)
def test_entry_is_complete_and_consistent(cfg):
    assert cfg.architecture in list_models(), f'{cfg.name}: architecture is not registered'
    assert isinstance(cfg.source, (HubSource, ManualSource))
    if isinstance(cfg.source, HubSource):
        assert len(cfg.source.revision) == 40
        assert cfg.source.sha256 or cfg.source.sha256_prefix
    if cfg.format == 'torch':
        assert cfg.converter in _converters, f'{cfg.name}: converter {cfg.converter!r} is not registered'
    spec = cfg.input_spec
    for m in spec.modalities:
        assert m.unit != 'unknown', f'{cfg.name}: modality {m.name} has no unit'
        if m.wavelengths_um is not None:
            assert len(m.wavelengths_um) == len(m.bands)
    assert cfg.paper and cfg.provenance and cfg.license


@pytest.mark.parametrize('cfg', ENTRIES, ids=lambda c: c.name)
def test_entry_builds_a_model_with_matching_input_channels(cfg):
    import torch
    with torch.device('meta'):
        model = eobackbones.create_model(cfg.name)  # cfg and model_args of the tag, no weights
    # the model's cfg is the tag's, describing this instance's inputs (timm's data config reads it)
    assert dataclasses.replace(model.pretrained_cfg, input_spec=cfg.input_spec) == cfg
    assert model.pretrained_cfg.input_spec == model.input_spec
    x = eobackbones.example_input(model, image_size=cfg.input_spec.image_size, device='meta')
    with torch.no_grad():
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    assert out.shape[-1] == model.num_features


def _raw():
    with open(manifest_path(), encoding='utf-8') as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize('mutate, message', [
    (lambda e: e['source'].update(revision='main'), 'revision must be a pinned 40-hex commit'),
    (lambda e: e['source'].pop('sha256_prefix'), 'needs sha256 or sha256_prefix'),
    (lambda e: e['source'].update(sha256_prefix='XYZ'), 'sha256_prefix must be'),
    (lambda e: e.update(license='MIT License'), 'not a known SPDX id'),
    (lambda e: e.pop('provenance'), r"missing keys \['provenance'\]"),
    (lambda e: e.update(colour='red'), r"unknown keys \['colour'\]"),
    (lambda e: e.pop('converter'), 'format "torch" needs a converter'),
    (lambda e: e.update(format='pickle'), 'format must be'),
    (lambda e: e.update(input_spec='nope'), "input_spec 'nope' is not defined"),
    (lambda e: e.update(fingerprint={'mean': 0}), 'fingerprint must be a mapping with at least mean and std'),
])
def test_schema_rejects_bad_entries(mutate, message):
    raw = _raw()
    name = 'dofa_base.torchgeo_v1'
    entry = copy.deepcopy(raw['weights'][name])
    mutate(entry)
    with pytest.raises(ManifestError, match=message):
        parse_entry(name, entry, raw['specs'])


def test_schema_rejects_bad_names_and_versions():
    raw = _raw()
    with pytest.raises(ManifestError, match='"arch.tag"'):
        parse_entry('DOFA-base', raw['weights']['dofa_base.torchgeo_v1'], raw['specs'])
    with pytest.raises(ManifestError, match='version: 1'):
        parse_manifest(dict(raw, version=2))


def test_every_package_architecture_has_a_manifest_entry():
    """Weight-less defaults (input spec, notes) are data too: one `architectures:` entry per registered model."""
    named = {c.architecture for c in ARCHS}
    package = [m for m in list_models() if not m.startswith('test_')]
    assert sorted(set(package) - named) == []
    assert sorted(named - set(package)) == []


def test_a_new_weight_of_an_existing_architecture_is_yaml_only(tmp_path, monkeypatch):
    """Adding weights needs no code: a manifest with one more entry gives a loadable, listed model."""
    import hashlib
    import torch
    from safetensors.torch import save_file
    from eobackbones.models import _registry
    raw = _raw()
    torch.manual_seed(0)
    src = eobackbones.create_model('dualsimclr_resnet18_s2').eval()
    weights = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    installed = tmp_path / 'home' / 'manual' / 'dualsimclr_resnet18_s2.my_run'
    src.save_pretrained(installed)
    raw['weights']['dualsimclr_resnet18_s2.my_run'] = dict(
        source={'manual': 'my lab share', 'sha256': digest}, format='safetensors', license='CC-BY-4.0',
        paper='none', provenance='trained by us on our data')  # input_spec: inherited from the architecture
    path = tmp_path / 'manifest.yaml'
    path.write_text(yaml.safe_dump(raw), encoding='utf-8')
    archs, weights_cfgs = load_manifest(path)
    cfg = next(c for c in weights_cfgs if c.name == 'dualsimclr_resnet18_s2.my_run')
    assert cfg.input_spec == eobackbones.get_pretrained_cfg('dualsimclr_resnet18_s2').input_spec
    monkeypatch.setenv('EOBACKBONES_HOME', str(tmp_path / 'home'))
    _registry.register_pretrained(cfg)
    try:
        assert 'dualsimclr_resnet18_s2.my_run' in eobackbones.list_pretrained('dualsimclr_resnet18_s2*')
        model = eobackbones.create_model('dualsimclr_resnet18_s2.my_run', pretrained=True).eval()
        x = eobackbones.example_input(model, 1, 64)
        with torch.no_grad():
            assert torch.equal(model(x), src(x))
        assert model.provenance.base.kind == 'none'  # what the installed directory says it holds
    finally:
        _registry.unregister_pretrained('dualsimclr_resnet18_s2.my_run')
