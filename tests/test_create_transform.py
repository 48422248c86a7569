"""create_transform: the spec's band selection and normalisation, then one co-registered window per sample."""
import pytest
import torch

import eobackbones
from eobackbones.errors import InvalidInputError
from eobackbones.spec import InputSpec, ModalitySpec
from eobackbones.transforms import create_transform, for_model

S2 = ModalitySpec(name='s2', sensor='sentinel2', bands=('B04', 'B03'), unit='reflectance_1e4',
                  normalization=({'op': 'meanstd', 'mean': [100.0, 200.0], 'std': [10.0, 20.0]},), image_size=(8, 8))
LC = ModalitySpec(name='lc', sensor='landcover', bands=('LC',), unit='class_index',
                  normalization=({'op': 'meanstd', 'mean': [0.0], 'std': [1.0]},), image_size=(4, 4))
SPEC = InputSpec(modalities=(S2, LC), image_size=(8, 8), input_format='dict')


def test_eval_is_normalise_then_resize_to_the_spec_size():
    t = create_transform(SPEC)
    x = {'s2': torch.full((2, 2, 16, 16), 100.0), 'lc': torch.randint(0, 5, (2, 1, 8, 8)).float()}
    x['s2'][:, 1] = 220.0
    out = t(x)
    assert out['s2'].shape == (2, 2, 8, 8) and out['lc'].shape == (2, 1, 4, 4)
    torch.testing.assert_close(out['s2'][:, 0], torch.zeros(2, 8, 8))
    torch.testing.assert_close(out['s2'][:, 1], torch.ones(2, 8, 8))
    # class maps keep their class values (nearest neighbour): no blended, non-existent classes
    assert set(out['lc'].unique().tolist()) <= set(x['lc'].unique().tolist())


def test_center_crop_pct_takes_the_middle():
    t = create_transform(InputSpec(modalities=(S2,), image_size=(8, 8)),
                         crop_pct=0.5, allow_unnormalised=True)
    x = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 2, 16, 16).contiguous()
    out = t(x * 10 + 100)  # 16 px -> resized to 16 (8 / 0.5), centre 8 px kept: columns 4..11
    cols = (out[0, 0, 0] * 10 + 100 - 100) / 10
    torch.testing.assert_close(cols, torch.arange(4.0, 12.0))


def test_training_windows_are_shared_by_modalities_and_reproducible():
    t = create_transform(SPEC, is_training=True, scale=(0.2, 0.5))
    base = torch.arange(16.0).view(1, 1, 16, 1).expand(3, 1, 16, 16)
    # S2 at 16 px and the class map at 8 px describe the same ground: rows encode the ground row
    x = {'s2': torch.cat([base * 10 + 100, base * 20 + 200], 1), 'lc': torch.arange(8.0).view(1, 1, 8, 1).expand(3, 1, 8, 8)}
    a = t(x, generator=torch.Generator().manual_seed(0))
    b = t(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a['s2'], b['s2'])
    # the window is one for both modalities: mean ground row of S2 ~ twice the class map's (half the resolution)
    s2_rows = a['s2'][:, 0].mean(dim=(1, 2)) - 0.5
    lc_rows = a['lc'][:, 0].mean(dim=(1, 2))
    assert torch.allclose(s2_rows / 2, lc_rows, atol=0.75)
    assert a['s2'].shape == (3, 2, 8, 8) and a['lc'].shape == (3, 1, 4, 4)


def test_image_size_follows_the_model_size_rules():
    swin = eobackbones.create_model('sslswin_tiny_s2')
    with pytest.raises(InvalidInputError, match='exactly'):
        create_transform(swin, image_size=192)
    dofa = eobackbones.create_model('dofa_base', bands=['B04', 'B03', 'B02'])
    with pytest.raises(InvalidInputError, match='multiple of 16'):
        create_transform(dofa, image_size=100)
    t = create_transform(dofa, image_size=64, source_bands=['B02', 'B03', 'B04', 'B08'])
    x = torch.rand(2, 4, 120, 120) * 3000
    out = t(x)
    assert out.shape == (2, 3, 64, 64)
    ref = torch.nn.functional.interpolate(for_model(dofa, source_bands=['B02', 'B03', 'B04', 'B08'])(x), size=(64, 64),
                                          mode='bilinear', align_corners=False, antialias=True)
    torch.testing.assert_close(out, ref)
    assert dofa(out).shape == (2, dofa.num_features)
