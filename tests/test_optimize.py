"""The inference fast path on every registered model, and the rules it casts by."""
from __future__ import annotations

import copy
import fnmatch
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eobackbones
from eobackbones import optimize
from eobackbones.optimize import FusedGeluMlp, PointwiseLinear, cast_for_inference, optimize_for_inference
from eobackbones.precision import resolve_precision
from eobackbones.transforms import example_call

# large variants cost minutes on a 2-core CPU and add no code path the base variants do not cover
SLOW = ('dofa_large*', 'dofa_huge*')
SMALL = 64  # input size for models that take it (a multiple of every patch / window size in the zoo)
MODELS = [n for n in eobackbones.list_models() if not any(fnmatch.fnmatch(n, p) for p in SLOW)]


def _small_model(name: str) -> nn.Module:
    """``name`` built for SMALL inputs where its constructor takes ``img_size``, else at its native size."""
    torch.manual_seed(0)
    try:
        model = eobackbones.create_model(name, img_size=SMALL)
    except TypeError:  # no img_size argument (pairs, ResNets: any size runs)
        model = eobackbones.create_model(name)
    return model.eval()


def _call(model: nn.Module):
    for size in (SMALL, None):  # a fixed-size model (a Swin pair) refuses SMALL: then its native size
        x, kwargs = example_call(model, batch_size=2, image_size=size, seed=1)
        try:
            with torch.no_grad():
                ref = model.forward_head(model.forward_features(x, **kwargs), pre_logits=True)
            return x, kwargs, ref
        except eobackbones.errors.InvalidInputError:
            if size is None:
                raise
    raise AssertionError('unreachable')


def _precisions() -> list:
    auto = resolve_precision('auto', 'cpu')
    return ['auto'] if auto == torch.bfloat16 else ['auto', 'bf16']  # forced bf16 is auto on a native-bf16 CPU


@pytest.mark.parametrize('name', MODELS)
def test_fast_path_matches_fp32_and_leaves_model_untouched(name):
    model = _small_model(name)
    x, kwargs, ref = _call(model)
    before = {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    for precision in _precisions():
        fast = optimize_for_inference(model, precision=precision)
        assert fast.dtype == resolve_precision(precision, 'cpu')
        out = fast.forward_head(fast.forward_features(x, **kwargs), pre_logits=True)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        cos = F.cosine_similarity(out, ref, dim=-1)
        assert cos.min().item() >= 0.9999, f'{name} {precision}: per-sample cosine {cos.tolist()}'
        full = fast(x, **kwargs)
        assert full.dtype == torch.float32 and torch.isfinite(full).all()
    after = model.state_dict()
    assert set(after) == set(before)
    for k, (dtype, v) in before.items():
        assert after[k].dtype == dtype and torch.equal(after[k], v), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert not model.training and all(not m.training for m in model.modules())


class _Odd(nn.Module):
    """A conv + BatchNorm, a keep_fp32 module and three kinds of float buffers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.hyper = nn.Linear(2, 2)
        self.hyper.keep_fp32 = True
        self.register_buffer('mask', torch.tensor([0.0, -100.0, 1.0]))     # exact in bf16: cast
        self.register_buffer('waves', torch.tensor([0.443, 0.665, 2.19]))   # not exact: kept
        self.register_buffer('index', torch.arange(3))                      # integer: untouched

    def forward_features(self, x):
        return self.bn(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_cast_rules():
    m = _Odd()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    waves = m.waves.clone()
    cast_for_inference(m, torch.bfloat16)
    assert m.conv.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in (m.bn.weight, m.bn.bias, m.bn.running_mean, m.bn.running_var))
    assert m.hyper.weight.dtype == torch.float32
    assert m.mask.dtype == torch.bfloat16 and m.waves.dtype == torch.float32 and m.index.dtype == torch.int64
    assert torch.equal(m.waves, waves)


def test_batchnorm_model_runs_in_bf16_with_fp32_statistics():
    m = _Odd().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    fast = optimize_for_inference(m, precision='bf16')
    assert fast.channels_last  # a 2-D convolution: NHWC chosen
    assert fast.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    cos = F.cosine_similarity(fast(x), m(x).detach(), dim=-1)
    assert cos.min() >= 0.9999


def test_dofa_wavelengths_stay_exact():
    model = eobackbones.create_model('dofa_small', img_size=SMALL).eval()
    fast = optimize_for_inference(model, precision='bf16')
    inner = fast.model
    assert inner.bound_wavelengths.dtype == torch.float32
    assert torch.equal(inner.bound_wavelengths, model.bound_wavelengths)
    assert all(p.dtype == torch.float32 for p in inner.patch_embed.parameters())
    assert inner.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    # a per-call wavelength override reaches the fp32 hypernetwork unchanged
    x = torch.randn(1, 3, SMALL, SMALL)
    waves = [0.665, 0.56, 0.49]
    ref = model.forward_head(model.forward_features(x, wavelengths=waves), pre_logits=True).detach()
    out = fast.forward_head(fast.forward_features(x, wavelengths=waves), pre_logits=True)
    assert F.cosine_similarity(out, ref).min() >= 0.9999


ONEDNN = optimize._use_onednn_linear(torch.device('cpu'), torch.bfloat16)


@pytest.mark.skipif(not ONEDNN, reason='no oneDNN fused linear on this build')
def test_onednn_swaps_match_the_modules_they_replace():
    from timm.layers import Mlp
    torch.manual_seed(0)
    ref = nn.Sequential(Mlp(64, 256), nn.Linear(64, 32)).eval()
    fast = copy.deepcopy(ref).to(torch.bfloat16)
    keys = list(fast.state_dict())
    assert optimize._swap_modules(fast, torch.device('cpu'), torch.bfloat16) == 4  # Mlp, fc1, fc2, the linear
    assert type(fast[0]) is FusedGeluMlp and isinstance(fast[0], Mlp)
    assert type(fast[0].fc2) is PointwiseLinear and type(fast[1]) is PointwiseLinear
    assert list(fast.state_dict()) == keys  # same parameters, same keys
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        out = fast(x.to(torch.bfloat16)).float()
        assert F.cosine_similarity(out.flatten(1), ref(x).flatten(1)).min() >= 0.9999
        # a non-contiguous input (a transposed view) is fine
        xt = torch.randn(2, 64, 10).transpose(1, 2)
        assert F.cosine_similarity(fast[1](xt.to(torch.bfloat16)).float().flatten(1),
                                   ref[1](xt).flatten(1)).min() >= 0.9999
        # the reordered weight follows the weight, and copies drop it (it is opaque)
        packed = fast[1].packed_weight()
        assert fast[1].packed_weight() is packed
        twin = copy.deepcopy(fast)
        assert '_packed' not in twin[1].__dict__ and torch.equal(twin(x.to(torch.bfloat16)), fast(x.to(torch.bfloat16)))
        fast[1].weight.mul_(2)
        assert fast[1].packed_weight() is not packed
        assert F.cosine_similarity(fast[1](x.to(torch.bfloat16)).float().flatten(1),
                                   2 * ref[1](x).flatten(1) - ref[1].bias.repeat(2, 10, 1).flatten(1)).min() > 0.99
    assert not optimize._fusable_gelu_mlp(Mlp(64, 256, act_layer=nn.ReLU))
    assert not optimize._fusable_gelu_mlp(Mlp(64, 256, act_layer=lambda: nn.GELU(approximate='tanh')))


def test_onednn_swaps_only_where_measured(monkeypatch):
    model = eobackbones.create_model('dofa_small', img_size=SMALL).eval()
    fp32 = optimize_for_inference(model, precision='fp32')
    assert not any(isinstance(m, (FusedGeluMlp, PointwiseLinear)) for m in fp32.modules())
    monkeypatch.setattr(optimize, '_use_onednn_linear', lambda device, dtype: True)
    bf16 = optimize_for_inference(model, precision='bf16')
    assert sum(type(m) is FusedGeluMlp for m in bf16.modules()) == len(model.blocks)
    # the hypernetwork's linears stay float32 nn.Linear (keep_fp32)
    assert not any(isinstance(m, PointwiseLinear) for m in bf16.model.patch_embed.modules())
    assert type(bf16.model.blocks[0].attn.qkv) is PointwiseLinear
    assert not any(isinstance(m, (FusedGeluMlp, PointwiseLinear)) for m in model.modules())  # original untouched


class _Float32Norm(nn.GroupNorm):
    """Computes in float32 on purpose and casts back (OpenAI's GroupNorm32)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class _Conditioned(nn.Module):
    """Declares a ``context`` condition; ``timestep`` is a call argument (not in ``conditions``) whose float32
    sinusoidal embedding (from a float32 frequency buffer) meets a low-precision linear layer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.context = nn.Linear(2, 8)
        self.time = nn.Linear(8, 8)
        self.norm = _Float32Norm(2, 8)
        self.register_buffer('freqs', torch.exp(-torch.arange(4) * 2.3))
        self.input_spec = SimpleNamespace(conditions=(SimpleNamespace(name='context'),))
        self.seen = {}

    def forward_features(self, x, context=None, timestep=None):
        self.seen = dict(x=x.dtype, context=context.dtype, timestep=timestep)
        arg = timestep.float() * self.freqs
        temb = self.time(torch.cat([arg.sin(), arg.cos()]).expand(x.shape[0], -1))
        return self.norm(self.proj(x) + self.context(context) + temb)

    def forward_head(self, x, pre_logits=False):
        return x

    def forward(self, x, context=None, timestep=None):
        return self.forward_features(x, context=context, timestep=timestep)


def test_declared_conditions_are_cast_and_call_arguments_are_not():
    m = _Conditioned().eval()
    x, ctx, t = torch.randn(3, 4), torch.randn(3, 2), torch.tensor(999.0)
    ref = m(x, context=ctx, timestep=t).detach()
    fast = optimize_for_inference(m, precision='bf16')
    assert fast.model.freqs.dtype == torch.float32 and fast.model.norm.weight.dtype == torch.float32
    out = fast.forward_features(x, context=ctx, timestep=t)
    seen = fast.model.seen
    assert seen['x'] == seen['context'] == torch.bfloat16
    assert seen['timestep'].dtype == torch.float32 and seen['timestep'].item() == 999.0  # never rounded (1000 in bf16)
    assert F.cosine_similarity(out, ref).min() >= 0.999


def test_precision_errors():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match='CUDA'):
        optimize_for_inference(m, precision='fp16')
    with pytest.raises(ValueError, match='precision must be one of'):
        optimize_for_inference(m, precision='int8')
