"""Sensor catalogue, input spec validation, and the preprocessing built from specs."""
import math

import pytest
import torch

import eobackbones
from eobackbones import sensors, transforms
from eobackbones.errors import InvalidInputError, ManifestError, MissingModalityError, UnknownBandError
from eobackbones.spec import InputSpec, ModalitySpec


def test_sentinel2_catalogue_has_all_13_bands_in_micrometres():
    s2 = sensors.get_sensor('sentinel2')
    assert s2.band_names == ('B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B09', 'B10', 'B11', 'B12')
    assert sensors.band_wavelengths(['B04', 'B8A', 'B10']) == [0.665, 0.865, 1.375]
    assert all(0.4 < b.wavelength_um < 2.3 and b.bandwidth_um > 0 for b in s2.bands.values())


def test_other_sensors():
    assert sensors.get_sensor('sentinel1').bands['VV'].frequency_ghz == 5.405
    # physical C-band wavelength c / f = 5.547 cm, in micrometres
    assert math.isclose(sensors.get_sensor('sentinel1').bands['VH'].wavelength_um, 299792458 / 5.405e9 * 1e6, rel_tol=1e-6)
    l8 = sensors.get_sensor('landsat8')
    assert l8.bands['B10'].wavelength_um > 10 and len(l8.bands) == 11
    assert set(sensors.get_sensor('naip').band_names) == {'R', 'G', 'B', 'N'}
    assert len(sensors.get_sensor('gaofen2').bands) == 5
    enmap = sensors.get_sensor('enmap')
    wl = [b.wavelength_um for b in enmap.bands.values()]
    assert len(wl) == 224 and len(enmap.default_subset) == 202 and 0.41 < wl[0] and wl[-1] < 2.46
    # two detectors (VNIR, SWIR) whose ranges overlap: the table rises except once, at the detector switch
    assert sum(b < a for a, b in zip(wl, wl[1:])) == 1


def test_band_lookup_errors():
    with pytest.raises(UnknownBandError, match="ambiguous between landsat8:B1, gaofen2:B1, enmap:B1"):
        sensors.resolve_band('B1')
    assert sensors.resolve_band('landsat8:B1').wavelength_um == 0.443
    # Sentinel names win unqualified; the Landsat band of the same name needs its sensor
    assert sensors.resolve_band('B11').sensor == 'sentinel2'
    assert sensors.resolve_band('landsat8:B11').wavelength_um == 12.005
    with pytest.raises(UnknownBandError, match="unknown band name 'B8B'; did you mean"):
        sensors.resolve_band('B8B')
    with pytest.raises(UnknownBandError, match="sensor 'sentinel2' has no band 'VV'"):
        sensors.resolve_band('VV', sensor='sentinel2')
    with pytest.raises(UnknownBandError, match='got the string'):
        sensors.resolve_bands('B04')


def _mod(**kw):
    base = dict(name='s2', sensor='sentinel2', bands=('B04', 'B03'), unit='reflectance_1e4')
    base.update(kw)
    return ModalitySpec(**base)


def test_spec_validation_errors():
    with pytest.raises(ManifestError, match='1 wavelengths for 2 bands'):
        _mod(wavelengths_um=(0.6,))
    with pytest.raises(ManifestError, match="op 'meanstd' key 'mean' has 3 values for 2 bands"):
        _mod(normalization=({'op': 'meanstd', 'mean': [1, 2, 3], 'std': [1, 1]},))
    with pytest.raises(ManifestError, match="unknown normalisation op 'zscore'"):
        _mod(normalization=({'op': 'zscore'},))
    with pytest.raises(ManifestError, match='duplicate band names'):
        _mod(bands=('B04', 'B04'))
    with pytest.raises(ManifestError, match='a tensor input has one modality'):
        InputSpec(modalities=(_mod(), _mod(name='s1')))
    with pytest.raises(ManifestError, match='unknown keys'):
        InputSpec.from_dict({'modalities': [], 'colour': 1})


def test_spec_round_trips_through_dict():
    spec = InputSpec(modalities=(_mod(normalization=({'op': 'clip', 'min': 0, 'max': 1e4},)), _mod(name='s1', sensor='sentinel1', bands=('VV', 'VH'), unit='dB')),
                     input_format='dict', image_size=(128, 128))
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert spec.modality('s1').in_chans == 2 and spec.sensors == ('sentinel2', 'sentinel1')


def test_normalisation_ops_in_order():
    spec = InputSpec(modalities=(_mod(normalization=(
        {'op': 'clip', 'min': -25, 'max': 0}, {'op': 'add', 'value': 25}, {'op': 'per_sample_max', 'eps': 1e-5})),))
    x = torch.tensor([[-30.0, -10.0], [-5.0, 3.0]]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    x[:, 1] *= 0.5
    y = transforms.for_model(spec)(x)
    ref0 = (x[0, 0].clamp(-25, 0) + 25)
    assert torch.allclose(y[0, 0], ref0 / (ref0.max() + 1e-5))
    ref1 = (x[0, 1].clamp(-25, 0) + 25)
    assert torch.allclose(y[0, 1], ref1 / (ref1.max() + 1e-5))
    mm = InputSpec(modalities=(_mod(normalization=({'op': 'minmax', 'min': [0, 0], 'max': [100, 200], 'out': [-1, 1]},)),))
    y = transforms.for_model(mm)(torch.tensor([0.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 1, 1).clone())
    assert y.flatten().tolist() == [-1.0, 0.0]
    ms = InputSpec(modalities=(_mod(normalization=({'op': 'meanstd', 'mean': [1, 2], 'std': [2, 4]},)),))
    assert transforms.for_model(ms)(torch.full((1, 2, 1, 1), 5.0)).flatten().tolist() == [2.0, 0.75]
    # integer rasters are accepted and converted
    assert transforms.for_model(ms)(torch.full((1, 2, 1, 1), 5, dtype=torch.int32)).dtype == torch.float32


def test_band_selection_by_name():
    spec = InputSpec(modalities=(_mod(normalization=({'op': 'scale', 'factor': 1.0},)),))
    data_bands = ['B02', 'B03', 'B04', 'B08']
    x = torch.arange(4.0).view(1, 4, 1, 1)
    pre = transforms.for_model(spec, source_bands=data_bands)
    assert pre(x).flatten().tolist() == [2.0, 1.0]  # B04, B03 picked by name, not position
    with pytest.raises(UnknownBandError, match=r"needs bands \['B04'\] that the data lacks .*missing_bands=\"zeros\""):
        transforms.for_model(spec, source_bands=['B02', 'B03'])
    filled = transforms.for_model(spec, source_bands=['B02', 'B03'], missing_bands='zeros')
    assert filled(torch.tensor([7.0, 9.0]).view(1, 2, 1, 1)).flatten().tolist() == [0.0, 9.0]
    assert filled.filled == {'s2': ['B04']}


def test_preprocess_errors_and_dicts():
    scale = ({'op': 'scale', 'factor': 1.0},)
    spec = InputSpec(modalities=(_mod(normalization=scale), _mod(name='s1', sensor='sentinel1', bands=('VV', 'VH'),
                                                                  unit='dB', normalization=scale)), input_format='dict')
    pre = transforms.for_model(spec)
    with pytest.raises(InvalidInputError, match=r"s2: expected 2 channels \['B04', 'B03'\], got 3"):
        pre({'s2': torch.zeros(1, 3, 4, 4), 's1': torch.zeros(1, 2, 4, 4)})
    with pytest.raises(InvalidInputError, match='expected a dict keyed by'):
        pre(torch.zeros(1, 2, 4, 4))
    single = InputSpec(modalities=(_mod(normalization=scale),))
    with pytest.raises(MissingModalityError, match="expected modality 's2', got keys \\['s1'\\]"):
        transforms.for_model(single)({'s1': torch.zeros(1, 2, 4, 4)})


def test_example_input_follows_the_spec():
    spec = InputSpec(modalities=(_mod(), _mod(name='s1', sensor='sentinel1', bands=('VV', 'VH'), unit='dB')),
                     input_format='dict', image_size=(16, 24))
    x = eobackbones.example_input(spec, batch_size=3)
    assert set(x) == {'s2', 's1'} and x['s2'].shape == (3, 2, 16, 24)
    assert eobackbones.example_input(spec, image_size=8)['s1'].shape == (1, 2, 8, 8)
    assert torch.equal(eobackbones.example_input(spec, seed=1)['s2'], eobackbones.example_input(spec, seed=1)['s2'])


def test_finite_check_catches_every_nan_and_inf_and_no_finite_input():
    """The input check's one-sum shortcut: non-finite anywhere (any float dtype) fails, finite values whose sum
    overflows pass (the exact check decides)."""
    from eobackbones.spec import _all_finite
    x = torch.randn(3, 4)
    assert _all_finite(x) and _all_finite(torch.arange(5))
    for bad in (float('nan'), float('inf'), -float('inf')):
        y = x.clone()
        y[1, 2] = bad
        for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            assert not _all_finite(y.to(dt)), (bad, dt)
    assert not _all_finite(torch.tensor([float('inf'), -float('inf')]))
    assert _all_finite(torch.full((4,), 3e38)) and _all_finite(torch.full((10,), 6e4, dtype=torch.float16))
