"""The model contract, checked for every registered model (timm's tests/test_models.py, for EO).

New families get these checks for free: forward, backward, unpooled features, pre_logits width,
intermediates vs feature_info, reset_classifier, input spec validity, and a safetensors round trip.
"""
import fnmatch

import pytest
import torch

import eobackbones
from eobackbones.models import list_models
from eobackbones.spec import InputSpec

MAX_FWD_SIZE = 64
# too slow for backward / save round trips on a 2-core CPU; they still get the forward + features checks
HEAVY = ['dofa_large', 'dofa_huge']
MODELS = list_models()
LIGHT = [m for m in MODELS if not any(fnmatch.fnmatch(m, p) for p in HEAVY)]


def _size(spec: InputSpec) -> int:
    if spec.fixed_size:
        return spec.image_size[0]
    if spec.size_multiple > 1:  # ViTs: a 4x4 patch grid, so every pyramid level (down to 2 * patch) exists
        return spec.size_multiple * 4
    return min(spec.image_size[0], MAX_FWD_SIZE)


def _input(model, batch_size=2):
    return eobackbones.example_input(model, batch_size=batch_size, image_size=_size(model.input_spec))


def _batch(x):
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


@pytest.mark.parametrize('name', MODELS)
@torch.no_grad()
def test_forward_features_and_intermediates(name):
    torch.manual_seed(0)
    model = eobackbones.create_model(name).eval()
    spec = model.input_spec
    assert isinstance(spec, InputSpec) and model.pretrained_cfg is not None
    x = _input(model)
    feats = model.forward_features(x)
    assert feats.ndim >= 3, 'forward_features must return tokens or maps, not a pooled vector'
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (_batch(x), model.num_features) and torch.isfinite(pooled).all()
    assert model.num_features == model.head_hidden_size

    info = model.feature_info
    inter = model.forward_intermediates(x, intermediates_only=True)
    assert len(inter) == len(info)
    size = _size(spec)
    for t, fi in zip(inter, info):
        assert t.shape[1] == fi['num_chs'], f'{fi}: {tuple(t.shape)}'
        assert t.shape[-1] == size // fi['reduction'], f'{fi}: {tuple(t.shape)} at input {size}'
    reductions = [fi['reduction'] for fi in info]
    assert reductions == sorted(reductions)

    fmodel = eobackbones.create_model(name, features_only=True, out_indices=(-2, -1)).eval()
    fmodel.load_state_dict({f'model.{k}': v for k, v in model.state_dict().items()})
    out = fmodel(x)
    assert [o.shape[1] for o in out] == fmodel.feature_info.channels() == [fi['num_chs'] for fi in info[-2:]]
    for a, b in zip(out, inter[-2:]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', LIGHT)
def test_backward_and_classifier(name):
    torch.manual_seed(0)
    model = eobackbones.create_model(name, num_classes=3).train()
    x = _input(model)
    out = model(x)
    assert out.shape == (_batch(x), 3)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad[:5]}'

    model.eval()
    model.reset_classifier(7)
    assert model(x).shape == (_batch(x), 7)
    assert model.get_classifier() is not None
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (_batch(x), model.num_features)


@pytest.mark.parametrize('name', LIGHT)
def test_model_api_helpers(name):
    model = eobackbones.create_model(name)
    assert isinstance(model.no_weight_decay(), (set, list, tuple))
    matcher = model.group_matcher()
    assert isinstance(matcher, dict) and matcher
    model.set_grad_checkpointing(True)
    spec = model.input_spec
    for m in spec.modalities:
        assert m.in_chans == len(m.bands)
        if m.wavelengths_um is not None:
            assert len(m.wavelengths_um) == m.in_chans


@pytest.mark.parametrize('name', LIGHT)
@torch.no_grad()
def test_safetensors_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = eobackbones.create_model(name, num_classes=2).eval()
    x = _input(model, batch_size=1)
    ref = model(x)
    d = model.save_pretrained(tmp_path / name)
    again = eobackbones.create_model(f'local-dir:{d}').eval()
    torch.testing.assert_close(again(x), ref, rtol=0, atol=0)
    assert again.input_spec == model.input_spec
