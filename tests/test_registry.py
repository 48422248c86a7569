"""Registry and factory: names, tags, patterns, errors."""
import pytest
import torch

import eobackbones
from eobackbones.errors import UnknownModelError
from eobackbones.models import get_pretrained_cfg, is_model, list_models, list_pretrained
from eobackbones.models._registry import _natural_key, default_tag
from tiny_models import TINY_SPEC


def test_list_models_patterns_and_natural_sort():
    names = list_models()
    assert 'test_tiny_cnn' in names
    assert names == sorted(names, key=_natural_key)
    tests = ['test_diffusion_cm_cond', 'test_diffusion_sr3', 'test_dofa', 'test_tiny_cnn', 'test_trimodal']
    assert list_models('test_*') == tests
    assert list_models('test_*', exclude='*tiny*') == [n for n in tests if n != 'test_tiny_cnn']
    assert sorted(['m10', 'm2', 'm1'], key=_natural_key) == ['m1', 'm2', 'm10']


def test_list_models_filters_by_modality_and_sensor():
    assert 'test_tiny_cnn' in list_models(modality='s2')
    assert 'test_tiny_cnn' not in list_models(modality='s1')
    assert 'test_dofa' in list_models(modality='s1')
    assert 'test_tiny_cnn' in list_models(sensor='sentinel2')
    assert 'test_tiny_cnn' not in list_models(sensor='landsat8')
    assert 'test_dofa' in list_models(sensor='landsat8')  # any-band models match every sensor


def test_pretrained_listing_and_default_tag(register_weights):
    entry = dict(source={'manual': 'x'}, format='safetensors', license='MIT', paper='p', provenance='p',
                 input_spec=TINY_SPEC.to_dict())
    register_weights('test_tiny_cnn.b_manual', entry)
    hub = dict(entry, source=dict(hf_repo='a/b', revision='0' * 40, filename='w.safetensors', sha256_prefix='deadbeef'))
    register_weights('test_tiny_cnn.a_hub', hub)
    assert list_pretrained('test_tiny_cnn*') == ['test_tiny_cnn.a_hub', 'test_tiny_cnn.b_manual']
    # first tag WITH a Hub source wins, even when a manual-only tag is listed before it
    assert default_tag('test_tiny_cnn') == 'a_hub'
    assert get_pretrained_cfg('test_tiny_cnn').name == 'test_tiny_cnn.a_hub'
    assert is_model('test_tiny_cnn.a_hub') and not is_model('test_tiny_cnn.nope')


def test_arch_without_weights():
    cfg = get_pretrained_cfg('test_tiny_cnn')
    assert cfg.tag == '' and not cfg.has_weights and cfg.input_spec == TINY_SPEC
    with pytest.raises(UnknownModelError, match='no pretrained weights exist for test_tiny_cnn: test model; use pretrained=False'):
        eobackbones.create_model('test_tiny_cnn', pretrained=True)


def test_unknown_names_give_close_matches():
    with pytest.raises(UnknownModelError, match="unknown model 'test_tiny_cn'; did you mean: test_tiny_cnn"):
        eobackbones.create_model('test_tiny_cn')
    with pytest.raises(UnknownModelError, match="no weights tagged 'nope' for test_tiny_cnn"):
        eobackbones.create_model('test_tiny_cnn.nope')
    with pytest.raises(UnknownModelError, match='conflicting tags'):
        eobackbones.create_model('test_tiny_cnn.a', pretrained='b')


@pytest.mark.parametrize('name', ['org/repo', 'hf_hub:org/repo', 'http://x/y', 'C:/models/x', 'timm/resnet50'])
def test_uris_without_a_known_prefix_are_errors(name):
    with pytest.raises(UnknownModelError, match='a source needs a prefix: "hf-hub:org/repo'):
        eobackbones.create_model(name)


def test_none_kwargs_are_dropped_and_model_args_recorded():
    m = eobackbones.create_model('test_tiny_cnn', num_classes=None, width=4)
    assert m.num_classes == 0 and m.stem.out_channels == 4
    assert m.model_args == {'width': 4}
    assert m.input_spec == TINY_SPEC


def test_features_only_wrapper():
    m = eobackbones.create_model('test_tiny_cnn', features_only=True, out_indices=(1, 2))
    feats = m(torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in feats] == m.feature_info.channels() == [16, 32]
    assert m.feature_info.reduction() == [4, 8]
    assert [32 // f.shape[-1] for f in feats] == [4, 8]
