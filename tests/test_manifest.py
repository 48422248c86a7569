"""weights_manifest.yaml: every entry follows the schema and fits its model."""
import copy
from pathlib import Path

import pytest
import yaml

import eobackbones
from eobackbones.errors import ManifestError
from eobackbones.hub.manifest import load_manifest, manifest_path, parse_entry, parse_manifest
from eobackbones.models import list_models
from eobackbones.models._builder import _converters
from eobackbones.models._pretrained import HubSource, ManualSource

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = load_manifest()


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
    assert model.pretrained_cfg == cfg
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
