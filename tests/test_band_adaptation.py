"""Fixed-band models on other bands: filters follow band identity (``create_model(..., bands=[...])``)."""
import logging

import pytest
import torch
from safetensors.torch import save_file

import eobackbones
from eobackbones.errors import UnknownBandError

S2 = ('B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B09', 'B10', 'B11', 'B12')


@pytest.fixture(scope='module')
def resnet_file(tmp_path_factory):
    """Random weights of the 13-band Dual-SimCLR S2 encoder in our own keys, and the model itself."""
    torch.manual_seed(0)
    model = eobackbones.create_model('dualsimclr_resnet18_s2').eval()
    path = tmp_path_factory.mktemp('w') / 'resnet.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _load(path, **kw):
    return eobackbones.create_model('dualsimclr_resnet18_s2', checkpoint_path=str(path), **kw).eval()


def test_pretrained_bands_are_s2(resnet_file):
    model, _ = resnet_file
    assert model.input_spec.modalities[0].bands == S2


@torch.no_grad()
def test_subset_is_the_pretrained_model_on_those_bands(resnet_file):
    full, path = resnet_file
    sub = _load(path, bands=['B04', 'B03', 'B02'])
    assert sub.input_spec.modalities[0].bands == ('B04', 'B03', 'B02')
    x = torch.randn(2, 3, 32, 32)
    x_full = torch.zeros(2, 13, 32, 32)
    for i, b in enumerate(('B04', 'B03', 'B02')):
        x_full[:, S2.index(b)] = x[:, i]
    torch.testing.assert_close(sub.forward_features(x), full.forward_features(x_full), atol=1e-5, rtol=1e-5)
    rows = sub.band_adaptation['s2']
    assert [r['source'] for r in rows] == ['B04', 'B03', 'B02'] and all(r['scale'] == 1.0 for r in rows)


@torch.no_grad()
def test_permutation_follows_the_bands(resnet_file):
    full, path = resnet_file
    order = list(reversed(S2))
    perm = _load(path, bands=order)
    x = torch.randn(1, 13, 32, 32)
    torch.testing.assert_close(perm.forward_features(x.flip(1)), full.forward_features(x), atol=1e-5, rtol=1e-5)
    assert perm.input_spec.modalities[0].bands == tuple(order)


def test_unseen_band_takes_the_nearest_wavelength_filter(resnet_file):
    full, path = resnet_file
    m = _load(path, bands=['B12', 'landsat8:B10'])  # thermal 10.9 um: nearest (log-wavelength) is B12 at 2.19 um
    rows = m.band_adaptation['s2']
    assert rows[1]['source'] == 'B12' and rows[1]['how'].startswith('nearest wavelength')
    # B12's filter is shared by two bands: each copy carries half of it, so a scene where both read the same
    # value gives the activation B12 alone gave
    w_full = full.state_dict()['conv1.weight'][:, S2.index('B12')]
    w = m.state_dict()['conv1.weight']
    torch.testing.assert_close(w[:, 0] + w[:, 1], w_full)
    spec = m.input_spec.modalities[0]
    assert spec.bands == ('B12', 'landsat8:B10') and spec.qualified('landsat8:B10') == 'landsat8:B10'


def test_provenance_and_config_record_the_adaptation(resnet_file, tmp_path):
    _, path = resnet_file
    m = _load(path, bands=['B02', 'B03', 'B04', 'B08'])
    cfg = m.config_dict()
    assert [r['band'] for r in cfg['band_adaptation']['s2']] == ['B02', 'B03', 'B04', 'B08']
    assert 'adapted by band name' in m.provenance.note
    m.save_pretrained(tmp_path / 'rgbn')
    again = eobackbones.create_model(f'local-dir:{tmp_path / "rgbn"}').eval()
    assert again.input_spec.modalities[0].bands == ('B02', 'B03', 'B04', 'B08')
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(x), m.forward_features(x))


def test_pair_model_adapts_one_modality(resnet_file, tmp_path):
    torch.manual_seed(1)
    pair = eobackbones.create_model('dualsimclr_resnet18').eval()
    path = tmp_path / 'pair.safetensors'
    save_file({k: v.contiguous() for k, v in pair.state_dict().items()}, str(path))
    m = eobackbones.create_model('dualsimclr_resnet18', checkpoint_path=str(path), bands={'s2': ['B08', 'B04']})
    assert set(m.band_adaptation) == {'s2'}
    sd, ref = m.state_dict(), pair.state_dict()
    torch.testing.assert_close(sd['s1.conv1.weight'], ref['s1.conv1.weight'])
    torch.testing.assert_close(sd['s2.conv1.weight'], ref['s2.conv1.weight'][:, [S2.index('B08'), S2.index('B04')]])


@pytest.mark.parametrize('bands, match', [
    (['B02', 'DEM'], 'no centre wavelength'),
    (['B02', 'B02'], 'duplicate'),
    (['B4'], 'B04'),  # did-you-mean
    ('B02', 'list of band names'),
])
def test_bad_bands_are_one_line_errors(resnet_file, bands, match):
    _, path = resnet_file
    bands = ['B02', 'dem:DEM'] if bands == ['B02', 'DEM'] else bands
    with pytest.raises(UnknownBandError, match=match) as e:
        _load(path, bands=bands)
    assert '\n' not in str(e.value)


def test_pair_model_needs_bands_per_modality():
    with pytest.raises(UnknownBandError, match='dict per modality'):
        eobackbones.create_model('dualsimclr_resnet18', bands=['B02'])


def test_count_only_adaptation_warns_and_is_recorded(resnet_file, caplog):
    full, path = resnet_file
    with caplog.at_level(logging.WARNING):
        m = _load(path, in_chans=4)
    assert any('by count' in r.getMessage() for r in caplog.records)
    assert m.band_adaptation == {'s2': dict(by='count', pretrained_channels=13, channels=4)}
    w, w_full = m.state_dict()['conv1.weight'], full.state_dict()['conv1.weight']
    torch.testing.assert_close(w, w_full[:, :4] * (13 / 4))  # timm's rule: repeat cyclically, scale by old / new


def test_bands_without_weights_builds_a_fresh_model_on_those_bands():
    m = eobackbones.create_model('dualsimclr_resnet18_s2', bands=['B04', 'B03', 'B02'])
    assert m.input_spec.modalities[0].bands == ('B04', 'B03', 'B02')
    assert m.state_dict()['conv1.weight'].shape[1] == 3
    assert m.provenance.kind == 'none'


@pytest.mark.parametrize('name, in_key, out_key', [
    ('test_diffusion_sr3', 'unet.init_conv.weight', 'unet.final_conv.block.3.weight'),
    ('test_diffusion_cm_cond', 'unet.input_blocks.0.0.weight', 'unet.out.2.weight'),
])
def test_diffusion_stacked_input_and_noise_output_follow_the_bands(tmp_path, name, in_key, out_key):
    import tiny_models  # noqa: F401  (registers the tiny diffusion variants)
    ref = eobackbones.create_model(name).eval()
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    m = eobackbones.create_model(name, checkpoint_path=str(path), bands={'s2': ['B08', 'B04'], 's1': ['VV']})
    assert m.model_args['modalities'] == (('s2', 2), ('s1', 1))
    sd, rsd = m.state_dict(), ref.state_dict()
    # stacked S2 [B04, B03, B02, B08] + S1 [VH, VV]: the new channels B08, B04, VV are columns / rows 3, 0, 5;
    # input filters keep their scale (each used once), noise-prediction rows are copied
    torch.testing.assert_close(sd[in_key], rsd[in_key][:, [3, 0, 5]])
    torch.testing.assert_close(sd[out_key], rsd[out_key][[3, 0, 5]])
    x, kw = eobackbones.example_call(m)
    assert m(x, **kw).shape == (1, m.num_features)
