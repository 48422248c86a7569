"""The model contract, checked for every registered model (timm's tests/test_models.py, for EO).

New families get these checks for free: forward, backward, unpooled features, pre_logits width, intermediates vs
feature_info, features_only (pruned) vs the full model, gradient checkpointing, reset_classifier, the classifier key,
the input spec (dict keys, conditioning inputs), the missing-modality policy, bad inputs (one-line errors), the
`EOBackbone` protocol, and a safetensors round trip with provenance. Inputs come from `example_call` (the spec).
"""
import fnmatch
import itertools

import pytest
import torch

import eobackbones
from eobackbones.errors import InvalidInputError, MissingModalityError
from eobackbones.models import EOBackbone, list_models
from eobackbones.spec import InputSpec
from eobackbones.transforms import example_call

pytestmark = pytest.mark.usefixtures('one_thread')

MAX_FWD_SIZE = 64
# too slow for backward / save round trips on a 2-core CPU; they still get the forward + features checks
HEAVY = ['dofa_large', 'dofa_huge']
HEAVY += ['fusionvit_base']  # 185 M; fusionvit_tiny / _small run every check
# full-size models too large to build even once per test here (their tiny variants in tiny_models.py cover them)
EXCLUDE = ['diffusion_sr3_s2s1', 'diffusion_cm_s2s1*']  # 391-547 M; test_diffusion_* cover the family
MODELS = [m for m in list_models() if not any(fnmatch.fnmatch(m, p) for p in EXCLUDE)]
LIGHT = [m for m in MODELS if not any(fnmatch.fnmatch(m, p) for p in HEAVY)]
DICT_MODELS = [m for m in LIGHT if eobackbones.get_pretrained_cfg(m).input_spec.input_format == 'dict']


def _size(spec: InputSpec) -> int:
    m = spec.modalities[0]
    if m.fixed_size:
        return m.image_size[0]
    mult = max(x.size_multiple for x in spec.modalities)
    if mult > 1:  # ViTs: a 4x4 patch grid, so every pyramid level (down to 2 * patch) exists
        return mult * 4
    return min(m.image_size[0], MAX_FWD_SIZE)


def _call(model, batch_size=2, seed=0):
    return example_call(model, batch_size=batch_size, image_size=_size(model.input_spec), seed=seed)


def _batch(x):
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


@pytest.mark.parametrize('name', MODELS)
@torch.no_grad()
def test_forward_features_and_intermediates(name):
    torch.manual_seed(0)
    model = eobackbones.create_model(name).eval()
    spec = model.input_spec
    assert isinstance(spec, InputSpec) and model.pretrained_cfg is not None
    assert isinstance(model, EOBackbone)
    x, kw = _call(model)
    if spec.input_format == 'dict':
        assert set(x) == set(spec.modality_names)
    assert set(kw) == {c.name for c in spec.conditions}
    feats = model.forward_features(x, **kw)
    assert feats.ndim >= 3, 'forward_features must return tokens or maps, not a pooled vector'
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (_batch(x), model.num_features) and torch.isfinite(pooled).all()
    assert model.num_features == model.head_hidden_size

    info = model.feature_info
    inter = model.forward_intermediates(x, intermediates_only=True, **kw)
    assert len(inter) == len(info)
    size = _size(spec)
    for t, fi in zip(inter, info):
        assert t.shape[1] == fi['num_chs'], f'{fi}: {tuple(t.shape)}'
        assert t.shape[-1] == size // fi['reduction'], f'{fi}: {tuple(t.shape)} at input {size}'
    reductions = [fi['reduction'] for fi in info]
    assert reductions == sorted(reductions)
    last = model.forward_intermediates(x, indices=1, stop_early=True, intermediates_only=True, **kw)
    torch.testing.assert_close(last[0], inter[-1])

    # features_only prunes what the maps do not need; what is left equals the full model's intermediates
    fmodel = eobackbones.create_model(name, features_only=True, out_indices=(-2, -1)).eval()
    own = fmodel.state_dict()
    assert {k[len('model.'):] for k in own} <= set(model.state_dict())
    fmodel.load_state_dict({f'model.{k}': v for k, v in model.state_dict().items() if f'model.{k}' in own})
    out = fmodel(x, **kw)
    assert [o.shape[1] for o in out] == fmodel.feature_info.channels() == [fi['num_chs'] for fi in info[-2:]]
    for a, b in zip(out, inter[-2:]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', LIGHT)
def test_backward_and_classifier(name):
    torch.manual_seed(0)
    model = eobackbones.create_model(name, num_classes=3).train()
    prefix = model.classifier_prefix + '.'
    assert any(k.startswith(prefix) for k in model.state_dict()), f'no classifier key under {prefix!r}'
    x, kw = _call(model)
    out = model(x, **kw)
    assert out.shape == (_batch(x), 3)
    out.square().mean().backward()
    # a family may declare parameters its forward never reaches (trained through other paths, e.g. the fusion ViT's
    # mask embedding and pyramid): fnmatch patterns in `forward_unused_params`
    unused = getattr(model, 'forward_unused_params', ())
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
               and not any(fnmatch.fnmatch(n, u) for u in unused)]
    assert not no_grad, f'parameters without gradient: {no_grad[:5]}'

    model.eval()
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x, **kw).shape == (_batch(x), 7)
    assert model.get_classifier() is not None
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x, **kw).shape == (_batch(x), model.num_features)


@pytest.mark.parametrize('name', LIGHT)
def test_grad_checkpointing_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    model = eobackbones.create_model(name, num_classes=2).eval()  # eval: no dropout / drop-path randomness
    x, kw = _call(model)

    def run():
        model.zero_grad()
        out = model(x, **kw)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    a, ga = run()
    model.set_grad_checkpointing(True)
    b, gb = run()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('name', LIGHT)
def test_model_api_helpers(name):
    model = eobackbones.create_model(name)
    assert isinstance(model.no_weight_decay(), (set, list, tuple))
    matcher = model.group_matcher()
    assert isinstance(matcher, dict) and matcher
    from timm.models._manipulate import group_parameters
    groups = group_parameters(model, matcher)  # timm's layer-decay grouping understands the matcher
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))
    spec = model.input_spec
    for m in spec.modalities:
        assert m.in_chans == len(m.bands)
        if m.wavelengths_um is not None:
            assert len(m.wavelengths_um) == m.in_chans


@pytest.mark.parametrize('name', LIGHT)
def test_bad_inputs_are_one_line_errors(name):
    """Raw integers, float64, a dtype the weights do not have, empty images, an empty batch: one clear line each."""
    model = eobackbones.create_model(name).eval()
    x, kw = _call(model, batch_size=1)

    def first(v):
        return next(iter(v.values())) if isinstance(v, dict) else v

    def swap(fn):
        if isinstance(x, dict):
            k = next(iter(x))
            return dict(x, **{k: fn(x[k])})
        return fn(x)

    cases = {
        'uint16': (swap(lambda t: (t.abs() * 1000).to(torch.int32).to(torch.uint16)), r'uint16.*transforms\.for_model'),
        'float64': (swap(lambda t: t.double()), r'float64 does not match'),
        'empty batch': (swap(lambda t: t[:0]), 'empty batch'),
        'empty image': (swap(lambda t: t[..., :0, :0]), r'empty image|multiples of|expected \d+x\d+'),
    }
    for what, (bad, pattern) in cases.items():
        with pytest.raises(InvalidInputError, match=pattern) as e, torch.no_grad():
            model(bad, **kw)
        assert '\n' not in str(e.value), what
    bf16 = eobackbones.create_model(name).eval().to(torch.bfloat16)
    with pytest.raises(InvalidInputError, match='does not match the model'), torch.no_grad():
        bf16(x, **kw)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.isfinite(model(x, **kw).float()).all()  # fp32 weights + autocast: accepted
    assert first(x).dtype == torch.float32


POLICY_CASES = [(m, {}) for m in DICT_MODELS] + [('dualsimclr_resnet18', {'missing': 'zeros'})]


@pytest.mark.parametrize('name, kwargs', POLICY_CASES, ids=[f'{n}{"-" + ",".join(k) if k else ""}' for n, k in POLICY_CASES])
@torch.no_grad()
def test_declared_missing_modality_policy(name, kwargs):
    model = eobackbones.create_model(name, **kwargs).eval()
    spec = model.input_spec
    policy = spec.missing_modality
    x, kw = _call(model)
    full = model(x, **kw)
    names = spec.modality_names
    subsets = [s for n in range(1, len(names)) for s in itertools.combinations(names, n)]
    with pytest.raises(MissingModalityError):
        model({}, **kw)
    for sub in subsets:
        part = {m: x[m] for m in sub}
        absent = [m for m in names if m not in sub]
        if policy == 'error':
            with pytest.raises(MissingModalityError, match=repr(absent[0])):
                model(part, **kw)
        else:
            out = model(part, **kw)
            assert out.shape == full.shape and torch.isfinite(out).all()  # zeros: widths kept; subset: runs
    with pytest.raises(InvalidInputError, match='unknown modality'):
        model(dict(x, bogus=next(iter(x.values()))), **kw)


@pytest.mark.parametrize('name', LIGHT)
@torch.no_grad()
def test_safetensors_round_trip_with_provenance(name, tmp_path):
    torch.manual_seed(0)
    model = eobackbones.create_model(name, num_classes=2).eval()
    assert model.provenance.kind == 'none'
    x, kw = _call(model, batch_size=1)
    ref = model(x, **kw)
    d = model.save_pretrained(tmp_path / name)
    assert (d / 'README.md').is_file()
    again = eobackbones.create_model(f'local-dir:{d}').eval()
    torch.testing.assert_close(again(x, **kw), ref, rtol=0, atol=0)
    assert again.input_spec == model.input_spec
    assert again.provenance.kind == 'directory' and again.provenance.origin.kind == 'none'
