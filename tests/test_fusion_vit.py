"""Fusion-token ViT (Chen, Zhao, Bruzzone): upstream parity, Zorro attention, subsets, converter, pretraining.

Parity vectors (tests/data/parity/chen_fusionvit_tiny_*, see README_chen_fusionvit.md there): outputs of the
upstream code (Yusin2Chen/incomplete_multimodal_fusion@283ac12, no licence: only its outputs are used) under a
synthetic checkpoint that tests/parity_synth.py rebuilds from the upstream key list. Tolerance per tensor:
max|out - ref| <= 1e-4 * max|ref| (required); the strict 1e-5 bound is reported (warning when missed).
"""
import argparse
import itertools
import json
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import parity_synth as synth
from eobackbones.errors import CheckpointFormatError, InvalidInputError, MissingModalityError
from eobackbones.layers import ViTPyramid
from eobackbones.models._builder import load_state_dict_strict
from eobackbones.models.fusion_vit import (
    FusionViT, convert_chen_state_dict, fusionvit_from_chen, fusionvit_input_spec, read_chen_checkpoint,
    sincos_table, zorro_attention)
from eobackbones.pretrain.fusion_mae import (
    FusionMAE, ModalityCombinationSampler, dino_loss, generate_masks)

PARITY = Path(__file__).parent / 'data' / 'parity'
KEYS, VECTORS = 'chen_fusionvit_tiny_keys.json', 'chen_fusionvit_tiny_vectors.safetensors'
REQUIRED, STRICT = 1e-4, 1e-5
REPORT = {}
MODS3 = OrderedDict(s1=1, s2=3, dem=1)




pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small models, one intra-op thread


# ----------------------------------------------------------------------------------------------- upstream
_CACHE = {}


def _vectors():
    if 'vec' not in _CACHE:
        _CACHE['vec'] = load_file(str(PARITY / VECTORS))
    return _CACHE['vec']


def _quad(n):
    i = torch.arange(n, dtype=torch.int64)
    return ((i * i) % (2 ** 31 - 1)).to(torch.float64)


def upstream_state_dict(variant: str = ''):
    """The synthetic upstream state dict (union of both models' keys) of the main checkpoint or variant g1 / q."""
    if variant in _CACHE:
        return _CACHE[variant]
    vec = _vectors()
    kl = synth.load_keylist(PARITY / KEYS)
    if variant == '':
        computed = {k[len('computed_buffer.'):]: v for k, v in vec.items() if k.startswith('computed_buffer.')}
        sd = synth.state_dict(kl, computed)
    elif variant == 'g1':  # sharp attention: every LayerNorm scale 1 + 0.1 v instead of 0.1 v (same seeds)
        sd = dict(upstream_state_dict('')[0])
        for k, v in sd.items():
            if k.endswith('.gamma'):
                w = torch.sin(0.7 * _quad(v.numel()) + 0.001 * (zlib.crc32(k.encode('utf-8')) % 10007))
                sd[k] = (1 + 0.1 * w).reshape(v.shape).float()
    elif variant == 'q':  # other channel counts (s1 2, s2 4): 6 shapes change
        info = json.loads(load_file_metadata()['info'])
        sd = dict(upstream_state_dict('')[0])
        for k, shape in info['variants']['q']['shape_overrides'].items():
            sd[k] = synth.tensor(k, shape)
    else:
        raise ValueError(variant)
    models = {e['key']: e['models'] for e in kl}
    _CACHE[variant] = sd, models
    return _CACHE[variant]


def load_file_metadata():
    from safetensors import safe_open
    with safe_open(str(PARITY / VECTORS), 'pt') as f:
        return f.metadata()


def _layout(variant: str, model: str):
    sd, models = upstream_state_dict(variant)
    return {k: v for k, v in sd.items() if model in models[k]}


def inputs(variant: str = ''):
    key = ('inputs', variant)
    if key not in _CACHE:
        ch = dict(s1=2, s2=4, dem=1) if variant == 'q' else dict(MODS3)
        x = {m: synth.image((2, c, 256, 256), c0) for (m, c), c0 in zip(ch.items(), (0.0, 1.0, 2.0))}
        vec = _vectors()
        for m, t in x.items():
            pre = 'q.input' if variant == 'q' and m != 'dem' else 'input'
            assert torch.equal(t.flatten()[:256], vec[f'{pre}.{m}.first256']), m
            torch.testing.assert_close(synth.fp64_sums(t), vec[f'{pre}.{m}.fp64_sums'], rtol=1e-12, atol=0)
        _CACHE[key] = x
    return _CACHE[key]


def vitbaseline(variant: str = '') -> FusionViT:
    key = ('vitb', variant)
    if key not in _CACHE:
        ck = convert_chen_state_dict(_layout(variant, 'vitbaseline'))
        assert ck.layout == 'vitbaseline'
        _CACHE[key] = fusionvit_from_chen(ck).eval()
    return _CACHE[key]


def pretraining(variant: str = '') -> FusionMAE:
    key = ('mae', variant)
    if key not in _CACHE:
        _CACHE[key] = FusionMAE.from_chen_checkpoint(_layout(variant, 'pretrain')).eval()
    return _CACHE[key]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).abs().max()) / float(ref.abs().max())


def _compare(prefix: str, outputs: dict, levels: str = 'exclude') -> float:
    """Every stored tensor named ``prefix.*`` against ``outputs``; returns the worst ratio.

    ``levels``: ``exclude`` / ``only`` / ``include`` the ViTBaseline pyramid levels ``prefix.vitb.*``."""
    vec = _vectors()
    names = [k[len(prefix) + 1:] for k in vec if k.startswith(prefix + '.') and '.mask.' not in k]
    if levels != 'include':
        names = [n for n in names if n.startswith('vitb.') == (levels == 'only')]
    assert names, prefix
    worst = 0.0
    for name in names:
        ref = vec[f'{prefix}.{name}']
        out = _select(outputs, name).reshape(ref.shape)
        r = _rel(out, ref)
        worst = max(worst, r)
        assert r <= REQUIRED, f'{prefix}.{name}: max rel diff {r:.2e} > {REQUIRED}'
    REPORT[prefix + ('' if levels == 'exclude' else ' (ViTBaseline)')] = worst
    if worst > STRICT:
        warnings.warn(f'{prefix}: max rel diff {worst:.2e} above the strict bound {STRICT}')
    return worst


def _reduce(t: torch.Tensor, spec: str) -> torch.Tensor:
    """Apply a stored reduction (``tokmean``, ``b0``, ``b0.tok0_63``, ``chmean``, ``b0.crop8``, ``pix_r7c11``)."""
    if spec == 'tokmean':
        return t.double().mean(1).float()
    if spec == 'chmean':
        return t.double().mean((2, 3)).float()
    if spec == 'b0':
        return t[0]
    if spec.startswith('b0.tok0_'):
        return t[0, :int(spec[len('b0.tok0_'):]) + 1]
    if spec.startswith('b0.crop'):
        s = int(spec[len('b0.crop'):])
        return t[0, :, :s, :s]
    if spec.startswith('pix_r'):
        r, c = spec[len('pix_r'):].split('c')
        return t[:, :, int(r)::16, int(c)::16]
    raise KeyError(spec)


def _select(outputs: dict, name: str) -> torch.Tensor:
    parts = name.split('.')
    if parts[0] == 'fusion':  # fusion.final.<red> / fusion.blk<i>.<red>
        return _reduce(outputs[f'fusion.{parts[1]}'], '.'.join(parts[2:]))
    if parts[0] in ('s1', 's2', 'dem'):  # <m>.final.<red>
        return _reduce(outputs[parts[0]], '.'.join(parts[2:]))
    if parts[0] == 'return_tokens':
        return outputs['return_tokens']
    if parts[0].startswith('return_token_'):
        return outputs['contrast'][parts[0][len('return_token_'):]]
    if parts[0] == 'pred':
        return _reduce(outputs['pred'][parts[1]], '.'.join(parts[2:]))
    if parts[0] == 'vitb':
        return _reduce(outputs['vitb'][int(parts[1][len('level'):])], '.'.join(parts[2:]))
    raise KeyError(name)


def _pretraining_outputs(variant, x, masks):
    out = pretraining(variant)(x, masks, intermediates=(2, 5, 8, 11))
    tok = out.tokens
    res = {'fusion.final': tok.fusion, 'return_tokens': tok.return_tokens, 'pred': out.preds,
           'contrast': {m: t[:, None] for m, t in out.contrast_tokens.items()}}
    res.update({f'fusion.blk{i}': t for i, t in tok.intermediates.items()})
    res.update(tok.modalities)
    return res


def _vitbaseline_outputs(variant, x, public_api: bool):
    """Fusion tokens per block and final, and the pyramid: through ``forward_intermediates`` (``public_api``) or,
    to save a pass, from the same run's block outputs (``test_contract_intermediates_feature_info_stop_early``
    checks that the two agree)."""
    model = vitbaseline(variant)
    if public_api:
        final, levels = model.forward_intermediates(x)
        return {'fusion.final': final[:, 1:], 'vitb': levels}
    tok = model.forward_tokens(x, intermediates=model.feature_blocks)
    res = {'fusion.final': tok.fusion}
    res.update({f'fusion.blk{i}': t for i, t in tok.intermediates.items()})
    maps = [model.norm(tok.intermediates[b]).transpose(1, 2).reshape(2, -1, *tok.grid) for b in model.feature_blocks]
    res['vitb'] = [model.pyramid.forward_level(m, i) for i, m in enumerate(maps)]
    return res


def _masks(case: str):
    z, o = torch.zeros(256, dtype=torch.long), torch.ones(256, dtype=torch.long)
    vec = _vectors()
    return {'a': {m: z for m in MODS3}, 'bm_s2': {'s1': o, 's2': z, 'dem': o},
            'bm_s1dem': {'s1': z, 'dem': z},  # dem / s1 given, s2 absent: filled in as fully hidden
            'c': {m: vec[f'c.mask.{m}'] for m in MODS3}}[case]


_PRESENT = {'a': ('s1', 's2', 'dem'), 'bm_s2': ('s2',), 'bm_s1dem': ('s1', 'dem'), 'c': ('s1', 's2', 'dem'),
            'b_s2': ('s2',), 'b_s1dem': ('s1', 'dem')}

PRETRAIN_CASES = [('', 'a'), ('', 'bm_s2'), ('', 'bm_s1dem'), ('', 'c'), ('g1', 'a'), ('g1', 'bm_s2'),
                  ('g1', 'c'), ('q', 'a')]
VITB_CASES = [('', 'a'), ('', 'b_s2'), ('', 'b_s1dem'), ('g1', 'b_s2'), ('g1', 'b_s1dem'), ('q', 'b_s2')]


@pytest.mark.parametrize('variant,case', PRETRAIN_CASES, ids=[f'{v or "main"}-{c}' for v, c in PRETRAIN_CASES])
@torch.no_grad()
def test_parity_pretraining(variant, case):
    """MultiMAE pretraining forward (fixed masks as stored): tokens, return tokens, contrastive tokens, decoders."""
    x = {m: t for m, t in inputs(variant).items() if m in _PRESENT[case]}
    outs = _pretraining_outputs(variant, x, _masks(case))
    prefix = f'{variant}.{case}' if variant else case
    worst = _compare(prefix, outs)
    print(f'parity {prefix}: worst max|out-ref|/max|ref| = {worst:.2e}')


@pytest.mark.parametrize('variant,case', VITB_CASES, ids=[f'{v or "main"}-{c}' for v, c in VITB_CASES])
@torch.no_grad()
def test_parity_vitbaseline(variant, case):
    """ViTBaseline (inference path, absent modalities dropped): fusion tokens per block, final, pyramid."""
    x = {m: t for m, t in inputs(variant).items() if m in _PRESENT[case]}
    outs = _vitbaseline_outputs(variant, x, public_api=case == 'a')
    prefix = f'{variant}.{case}' if variant else case
    # a.: only the pyramid (a.vitb.*) comes from ViTBaseline; a.'s tokens are checked by test_parity_pretraining
    worst = _compare(prefix, outs, 'only' if case == 'a' else 'include')
    print(f'parity {prefix} (vitbaseline): worst max|out-ref|/max|ref| = {worst:.2e}')


def test_every_stored_output_is_checked():
    prefixes = {f'{v}.{c}' if v else c for v, c in PRETRAIN_CASES + VITB_CASES}
    outputs = [k for k in _vectors() if not k.startswith(('computed_buffer.', 'input.', 'q.input.')) and '.mask.' not in k]
    assert len(outputs) > 150
    assert all(any(k.startswith(p + '.') for p in prefixes) for k in outputs)


@torch.no_grad()
def test_forward_is_the_upstream_fusion_return_token():
    """forward_head(forward_features(x), pre_logits=True) = upstream return_tokens[:, FUSION] (forward(x) is the same
    composition; test_convert_checkpoint_writes_a_loadable_directory calls it)."""
    model, x = vitbaseline(''), inputs('')
    ref = _vectors()['a.return_tokens'][:, 3]
    feats = model.forward_features(x)
    assert feats.shape == (2, 257, 192)
    assert _rel(model.forward_head(feats, pre_logits=True), ref) <= STRICT
    assert _rel(feats[:, 1:].mean(1), _vectors()['a.fusion.final.tokmean']) <= STRICT


# ----------------------------------------------------------------------------------------------- Zorro attention
def dense_zorro(q, k, v, lengths):
    """The reference's dense masked attention: logits of disallowed pairs set to -finfo.max before the softmax."""
    types = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((q.shape[2] - sum(lengths),), -1)])
    allowed = (types[:, None] == types[None, :]) | (types[:, None] == -1)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    logits = logits.masked_fill(~allowed, -torch.finfo(logits.dtype).max)
    return logits.softmax(-1) @ v


@pytest.mark.parametrize('lengths,batch', [((16, 16, 16), 1), ((16, 16, 16), 2), ((5, 7, 0, 5), 2), ((9,), 1),
                                           ((0, 0), 2)], ids=str)
def test_zorro_attention_equals_dense_masked_reference_with_gradients(lengths, batch):
    g = torch.Generator().manual_seed(0)
    shape = (batch, 3, sum(lengths) + 11, 8)
    q, k, v = (torch.randn(shape, generator=g, requires_grad=True) for _ in range(3))
    out, ref = zorro_attention(q, k, v, lengths), dense_zorro(q, k, v, lengths)
    assert _rel(out, ref) <= 1e-5
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, refs):
        assert _rel(a, b) <= 1e-5


def _ln(x, w, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, None, eps)


def _dense_attention(attn, x, allowed=None, context=None):
    """Upstream Attention from its description: own LN on the query input, to_kv halves, (h d) heads."""
    h = _ln(x, attn.norm.weight)
    q = h @ attn.to_q.weight.T
    k, v = ((h if context is None else context) @ attn.to_kv.weight.T).chunk(2, -1)
    heads = attn.num_heads

    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(-3, -2)
    logits = split(q * attn.scale) @ split(k).transpose(-2, -1)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -torch.finfo(logits.dtype).max)
    o = (logits.softmax(-1) @ split(v)).transpose(-3, -2).flatten(-2)
    return o @ attn.to_out.weight.T


def dense_reference(model: FusionViT, x: dict):
    """An independent dense re-implementation of the inference path (absent modalities dropped): a full
    (total x total) Zorro mask, Block_Fusion on stacked slot tokens. Returns (fusion tokens, {m: tokens}, pooled)."""
    present = [m for m in model.modalities if m in x]
    pos = model.pos_embed
    toks = [model.patch_embed[m].proj(x[m]).flatten(2).transpose(1, 2) + pos for m in present]
    b, n, d = toks[0].shape
    seq = torch.cat(toks + [(model.fusion_tokens + pos).expand(b, -1, -1)], 1)
    types = torch.arange(len(present) + 1).repeat_interleave(n)
    fus_type = len(present)
    allowed = (types[:, None] == types[None, :]) | (types[:, None] == fus_type)
    for layer in model.blocks:
        fb, blk = layer.fuse, layer.block
        slots = seq.reshape(b, len(present) + 1, n, d).transpose(1, 2)  # (B, N, S, D): every slot, fusion last
        s = slots + _dense_attention(fb.attn, _ln(slots, fb.norm1.weight))
        f = s[:, :, -1]
        f = f + _geglu(fb.mlp, _ln(f, fb.norm2.weight))
        seq = torch.cat([seq[:, :len(present) * n], f], 1)
        seq = seq + _dense_attention(blk.attn, _ln(seq, blk.norm1.weight), allowed)
        seq = seq + _geglu(blk.mlp, _ln(seq, blk.norm2.weight))
    seq = _ln(seq, model.norm.weight)
    r = _dense_attention(model.attn_pool, model.return_tokens[:, -1:].expand(b, -1, -1), context=seq)[:, 0]
    r = r + model.pool_mlp(_ln(r, model.norm.weight))
    mods = {m: seq[:, i * n:(i + 1) * n] for i, m in enumerate(present)}
    return seq[:, len(present) * n:], mods, r


def _geglu(mlp, x):
    a, g = (_ln(x, mlp.norm.weight) @ mlp.fc1.weight.T).chunk(2, -1)
    return (a * F.gelu(g)) @ mlp.fc2.weight.T


def _small(depth=2, img=64, **kw):
    torch.manual_seed(0)
    return FusionViT(MODS3, img_size=img, depth=depth, **kw).eval()


def _images(img=64, batch=2, seed=1, mods=MODS3):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, c, img, img, generator=g) for m, c in mods.items()}


@pytest.mark.parametrize('present', [('s1', 's2', 'dem'), ('s2',), ('s1', 'dem')], ids='+'.join)
def test_model_equals_dense_reference_including_gradients(present):
    """The efficient model (per-modality + fusion-to-all SDPA) = the dense masked reference, values and gradients;
    a subset equals the reference with the absent modalities' tokens removed, not zero-filled."""
    model = _small(depth=2, img=48)
    model.return_tokens.data.normal_()  # random init puts tokens near 0; make pooling non-trivial
    x = {m: t for m, t in _images(48).items() if m in present}
    tok = model.forward_tokens(x)
    fus, mods, pooled = dense_reference(model, x)
    assert _rel(tok.fusion, fus) <= 1e-5 and _rel(tok.return_token('fusion'), pooled) <= 1e-5
    for m in present:
        assert _rel(tok.modalities[m], mods[m]) <= 1e-5
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.randn(fus.shape, generator=torch.Generator().manual_seed(3))
    g_eff = torch.autograd.grad((tok.fusion * w).sum() + tok.return_token('fusion').sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((fus * w).sum() + pooled.sum(), params, allow_unused=True)
    for p, a, b in zip(params, g_eff, g_ref):
        if b is None:
            assert a is None or not a.any()
            continue
        assert _rel(a, b) <= 1e-4, [n for n, q in model.named_parameters() if q is p]
    if len(present) < 3:
        zero = {m: x.get(m, torch.zeros(2, c, 48, 48)) for m, c in MODS3.items()}
        with torch.no_grad():
            assert _rel(model.forward_tokens(zero).fusion, fus) > 1e-3


@torch.no_grad()
def test_modality_tokens_independent_of_other_modalities():
    """Changing modality B's input leaves modality A's final tokens bit-identical; the fusion tokens change."""
    model = _small(depth=3)
    x = _images()
    a = model.forward_tokens(x)
    y = dict(x, s2=x['s2'] + 1.0)
    b = model.forward_tokens(y)
    assert torch.equal(a.modalities['s1'], b.modalities['s1']) and torch.equal(a.modalities['dem'], b.modalities['dem'])
    assert not torch.equal(a.modalities['s2'], b.modalities['s2'])
    assert (a.fusion - b.fusion).abs().max() > 1e-3


@torch.no_grad()
def test_every_subset_runs_and_policy():
    model = _small(depth=2)
    x = _images()
    outs = {}
    for r in range(1, 4):
        for sub in itertools.combinations(MODS3, r):
            y = model({m: x[m] for m in sub})
            assert y.shape == (2, 192) and torch.isfinite(y).all()
            outs[sub] = y
    assert len({tuple(v.flatten()[:4].tolist()) for v in outs.values()}) == 7
    # None means absent
    torch.testing.assert_close(model({'s1': None, 's2': x['s2'], 'dem': None}), outs[('s2',)], rtol=0, atol=0)
    spec = fusionvit_input_spec(MODS3, 256)
    assert spec.missing_modality == 'subset' and spec.input_format == 'dict' and spec.modality_names == tuple(MODS3)


def test_input_errors_are_typed_one_liners():
    model = _small(depth=1)
    x = _images()
    cases = [
        ({}, MissingModalityError), ({'s1': None}, MissingModalityError), (x['s2'], InvalidInputError),
        (dict(x, s3=x['s1']), InvalidInputError), (dict(x, s2=x['s1']), InvalidInputError),
        ({'s1': torch.zeros(2, 1, 60, 64)}, InvalidInputError), (dict(x, dem=torch.zeros(2, 1, 32, 32)), InvalidInputError),
        (dict(x, dem=torch.zeros(3, 1, 64, 64)), InvalidInputError), ({'s1': torch.zeros(1, 64, 64)}, InvalidInputError),
    ]
    for inp, err in cases:
        with pytest.raises(err) as e:
            model(inp)
        assert '\n' not in str(e.value)
    with pytest.raises(MissingModalityError):  # visible tokens of a modality that is not in the input
        model({'s1': x['s1']}, masks={'s2': torch.zeros(16)})
    with pytest.raises(InvalidInputError):  # one mask per batch
        model(x, masks={'s1': torch.tensor([[0] * 16, [1] * 16])})


@torch.no_grad()
def test_other_image_sizes_and_resampling():
    model = _small(depth=1, img=64)
    for size in ((128, 128), (320, 320), (32, 48)):
        x = {m: torch.randn(2, c, *size) for m, c in MODS3.items()}
        feats = model.forward_features(x)
        n = (size[0] // 16) * (size[1] // 16)
        assert feats.shape == (2, 1 + n, 192) and torch.isfinite(feats).all()
        levels = model.forward_intermediates(x, intermediates_only=True)
        assert [lv.shape[-2:] for lv in levels] == [(size[0] // r, size[1] // r) for r in (4, 8, 16, 32)]
    # the native size uses the tables as they are; the sin-cos table is the upstream one (bit-identical)
    ref = _vectors()['computed_buffer.pos_emb.enc']
    assert torch.equal(sincos_table(192, (16, 16)).transpose(1, 2).reshape(ref.shape), ref)


def test_grad_checkpointing_same_outputs_and_gradients():
    model = _small(depth=2)
    model.train()
    x = _images()
    masks = {'s2': torch.arange(16) % 3 == 0}
    outs, grads = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        y = model(x, masks=masks)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and 'mask_embedding' in grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-6, atol=1e-7)


@torch.no_grad()
def test_contract_intermediates_feature_info_stop_early():
    model = _small(depth=12, img=64, pyramid='interpolate', embed_dim=64, num_heads=1)
    d = model.embed_dim
    x = _images()
    info = model.feature_info
    assert [f['reduction'] for f in info] == [4, 8, 16, 32] and [f['module'] for f in info] == [
        'blocks.2', 'blocks.5', 'blocks.8', 'blocks.11']
    calls = []
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, blk in enumerate(model.blocks)]
    one = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert calls == list(range(6)) and len(one) == 1 and one[0].shape == (2, d, 8, 8)
    calls.clear()
    final, levels = model.forward_intermediates(x)
    assert calls == list(range(12))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(levels[1], one[0], rtol=0, atol=0)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    raw = model.forward_intermediates(x, indices=[5], pyramid=False, intermediates_only=True, output_fmt='NLC')
    fmap = model.norm(raw[0]).transpose(1, 2).reshape(2, d, 4, 4)
    assert torch.equal(F.interpolate(fmap, scale_factor=2.0, mode='bilinear', align_corners=False), levels[1])
    # head, pooling, pruning
    assert model.num_features == model.head_hidden_size == d and model.num_prefix_tokens == 1
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0, 'avg')
    torch.testing.assert_close(model(x), model.forward_features(x)[:, 1:].mean(1))
    take = model.prune_intermediate_layers([0, 1])
    assert take == [0, 1] and len(model.blocks) == 6


def test_pyramid_modes():
    x = torch.randn(2, 192, 4, 4)
    free = ViTPyramid(192, 'interpolate')
    assert not list(free.parameters())
    # the parameter-free mode is bit-identical to what DOFA computed before this layer (models/dofa.py _rescale)
    expected = [F.interpolate(x, scale_factor=4.0, mode='bilinear', align_corners=False),
                F.interpolate(x, scale_factor=2.0, mode='bilinear', align_corners=False),
                x.contiguous(), F.max_pool2d(x, kernel_size=2)]
    for i, e in enumerate(expected):
        assert torch.equal(free.forward_level(x, i), e)
    try:
        from eobackbones.models.dofa import _LEVEL_SCALES, _rescale
    except ImportError:  # DOFA moved onto ViTPyramid
        pass
    else:
        for i, s in enumerate(_LEVEL_SCALES):
            assert torch.equal(free.forward_level(x, i), _rescale(x, s))
    learned = ViTPyramid(192, 'learned')
    assert sorted(n for n, _ in learned.named_parameters()) == [
        'up2.bias', 'up2.weight', 'up4.0.bias', 'up4.0.weight', 'up4.1.bias', 'up4.1.weight', 'up4.3.bias',
        'up4.3.weight']
    assert [t.shape[-1] for t in learned([x] * 4)] == [16, 8, 4, 2]
    assert ViTPyramid(64, 'interpolate', scales=(3.5, 1.75, 1, 0.5)).reductions(14) == [4, 8, 14, 28]
    with pytest.raises(ValueError):
        ViTPyramid(192, 'learned', scales=(2, 1, 0.5, 0.25))


def test_layer_decay_groups_and_no_weight_decay():
    from timm.models._manipulate import group_parameters
    model = _small(depth=3)
    groups = group_parameters(model, model.group_matcher())
    names = {n for g in groups.values() for n in g}
    assert names == {n for n, _ in model.named_parameters()}
    ordinal = {n: i for i, g in enumerate(groups.values()) for n in g}
    assert ordinal['patch_embed.s1.proj.weight'] < ordinal['blocks.0.fuse.attn.to_q.weight'] == ordinal[
        'blocks.0.block.mlp.fc1.weight'] < ordinal['blocks.2.block.norm1.weight'] == ordinal['norm.weight']
    assert len(groups) == 4  # stem, one group per layer (the final norm and pooling join the last, as timm's ViT)
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}


# ----------------------------------------------------------------------------------------------- converter
def test_converter_layouts_and_strictness(tmp_path):
    pre, vb = _layout('', 'pretrain'), _layout('', 'vitbaseline')
    ck = convert_chen_state_dict(pre)
    assert ck.layout == 'pretrain' and ck.modalities == dict(MODS3)
    assert ck.model_args['img_size'] == [256, 256] and ck.model_args['num_heads'] == 3
    assert ck.objective_args == dict(decoder_dim=256, decoder_depth=2, decoder_heads=8)
    assert len([k for k in ck.dropped if k.endswith('.beta')]) == 98 and not any(k.startswith('pyramid') for k in ck.encoder)
    assert {k.split('.')[0] for k in ck.objective} == {'decoders', 'contrast_tokens'}
    # the pretraining file without decoders (upstream built without output adapters) converts too
    bare = {k: v for k, v in pre.items() if not k.startswith('output_adapters.')}
    assert not any(k.startswith('decoders.') for k in convert_chen_state_dict(bare).objective)
    # q variant: channel counts from the patch embedding
    assert convert_chen_state_dict(_layout('q', 'vitbaseline')).modalities == dict(s1=2, s2=4, dem=1)
    # DDP-saved keys
    assert convert_chen_state_dict({'module.' + k: v for k, v in vb.items()}).layout == 'vitbaseline'

    def fails(sd, match):
        with pytest.raises(CheckpointFormatError, match=match) as e:
            convert_chen_state_dict(sd)
        assert '\n' not in str(e.value)
    fails(dict(vb, extra=torch.zeros(1)), 'unknown keys')
    fails(dict(vb, **{'norm.beta': torch.ones(192)}), 'not zero')
    fails(dict(vb, **{'input_adapters.s1.pos_emb': vb['input_adapters.s1.pos_emb'].flip(2)}), 'sin-cos table')
    fails(dict(vb, **{'output_adapters.s1.out_proj.bias': torch.zeros(256)}), 'not an upstream layout')
    fails({'a': torch.zeros(1)}, 'not a fusion-token ViT')
    ck = convert_chen_state_dict(vb)
    model = FusionViT(**ck.model_args)
    missing = {k: v for k, v in ck.encoder.items() if k != 'blocks.3.fuse.mlp.fc1.weight'}
    with pytest.raises(CheckpointFormatError, match='missing keys'):
        load_state_dict_strict(model, missing)


def test_checkpoint_reader_allows_only_namespace(tmp_path):
    vb = _truncated()
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    args = argparse.Namespace(model='pretrain_multimae_tiny', num_encoded_tokens=384, in_domains=['s1', 's2', 'dem'],
                              lr=1e-4, output_dir='out', resume=None)
    good = tmp_path / 'checkpoint-99.pth'
    torch.save({'model': vb, 'optimizer': opt.state_dict(), 'epoch': 99, 'scaler': {'scale': 65536.0}, 'args': args},
               good)
    sd = read_chen_checkpoint(good)
    assert sd.keys() == vb.keys()
    bare = tmp_path / 'bare.pth'
    torch.save(vb, bare)
    assert read_chen_checkpoint(bare).keys() == vb.keys()
    evil = tmp_path / 'evil.pth'
    torch.save({'model': vb, 'args': args, 'hook': _NotAllowed()}, evil)
    with pytest.raises(CheckpointFormatError, match='refused') as e:
        read_chen_checkpoint(evil)
    assert 'weights_only' not in str(e.value) and '\n' not in str(e.value)
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointFormatError, match='not a (readable )?torch checkpoint') as e:
        read_chen_checkpoint(tmp_path / 'junk.pth')
    assert 'weights_only' not in str(e.value)


class _NotAllowed:
    def __reduce__(self):
        return (print, ('this must never run',))


def _truncated(layout: str = 'vitbaseline', depth: int = 2):
    """The upstream state dict cut to its first ``depth`` layers (a smaller file; still a complete checkpoint)."""
    keep = tuple(f'{p}.{i}.' for p in ('blocks', 'fus_blocks') for i in range(depth))
    return {k: v for k, v in _layout('', layout).items()
            if not k.startswith(('blocks.', 'fus_blocks.')) or k.startswith(keep)}


def _save_upstream(path, layout, depth=2):
    torch.save({'model': _truncated(layout, depth) if depth < 12 else _layout('', layout), 'epoch': 1,
                'args': argparse.Namespace(model='pretrain_multimae_tiny')}, path)
    return path


def test_eobackbones_convert_fusionvit_writes_loadable_directories(tmp_path, capsys):
    """`eobackbones convert fusionvit --checkpoint FILE --out DIR`: both upstream layouts; the directory loads with
    create_model('local-dir:...') and equals the direct conversion; a pretraining file gets the parameter-free
    pyramid; the spec does not claim sensors the file does not state."""
    import eobackbones
    from eobackbones.cli import main
    x = {m: t[..., :64, :64] for m, t in inputs('').items()}
    for layout in ('vitbaseline', 'pretrain'):
        src = _save_upstream(tmp_path / f'{layout}.pth', layout)
        # a 2-layer file matches no architecture by its shapes: refused in one line, then forced with arch=
        assert main(['convert', 'fusionvit', '--checkpoint', str(src), '--out', str(tmp_path / 'x')]) == 2
        assert 'pass --option arch=NAME' in capsys.readouterr().err
        out = tmp_path / layout
        assert main(['convert', 'fusionvit', '--checkpoint', str(src), '--out', str(out),
                     '--option', 'arch=fusionvit_tiny']) == 0
        d = out / 'fusionvit_tiny'
        conf = json.loads((d / 'config.json').read_text())
        assert conf['model_args']['modalities'] == dict(MODS3) and conf['model_args']['depth'] == 2
        assert conf['model_args']['pyramid'] == ('learned' if layout == 'vitbaseline' else 'interpolate')
        model = eobackbones.create_model(f'local-dir:{d}').eval()
        assert {m.sensor for m in model.input_spec.modalities} == {'unknown'}
        assert model.provenance.root.kind == 'file'
        assert any(k.startswith('pyramid.') for k in model.state_dict()) == (layout == 'vitbaseline')
        direct = fusionvit_from_chen(_truncated(layout)).eval()
        with torch.no_grad():
            assert torch.equal(model(x), direct(x))
            for a, b in zip(model.forward_intermediates(x, intermediates_only=True),
                            direct.forward_intermediates(x, intermediates_only=True)):
                assert torch.equal(a, b)
    bad = tmp_path / 'extra.pth'
    torch.save(dict(_truncated(), extra_key=torch.zeros(1)), bad)
    assert main(['convert', 'fusionvit', '--checkpoint', str(bad), '--out', str(tmp_path / 'y'),
                 '--option', 'arch=fusionvit_tiny']) == 2
    assert 'unknown keys: extra_key' in capsys.readouterr().err and not (tmp_path / 'y').exists()


def test_create_model_checkpoint_path_upstream_file(tmp_path):
    """create_model(arch, checkpoint_path=FILE) on upstream files: the full ViTBaseline file equals the parity
    model bit for bit; a pretraining file is built with pyramid='interpolate' (never random transposed convs);
    a pyramid or shape the file cannot fill is one line naming what to pass."""
    import eobackbones
    x = {m: t[..., :64, :64] for m, t in inputs('').items()}
    full = _save_upstream(tmp_path / 'vitb.pth', 'vitbaseline', depth=12)
    model = eobackbones.create_model('fusionvit_tiny', checkpoint_path=str(full)).eval()
    assert model.model_args['pyramid'] == 'learned' and model.provenance.kind == 'file'
    with torch.no_grad():
        assert torch.equal(model(x), vitbaseline('')(x))
    pre = _save_upstream(tmp_path / 'pre.pth', 'pretrain')
    model = eobackbones.create_model('fusionvit_tiny', checkpoint_path=str(pre), depth=2).eval()
    assert model.model_args['pyramid'] == 'interpolate' and not any(k.startswith('pyramid.') for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), fusionvit_from_chen(_truncated('pretrain')).eval()(x))
    cases = [(dict(depth=2, pyramid='learned'), 'pyramid="interpolate"'), ({}, 'depth=2'),
             (dict(depth=2, embed_dim=384), 'embed_dim=192')]
    for kwargs, match in cases:
        with pytest.raises(CheckpointFormatError, match=match) as e:
            eobackbones.create_model('fusionvit_tiny', checkpoint_path=str(pre), **kwargs)
        assert '\n' not in str(e.value)
    with pytest.raises(CheckpointFormatError, match='pyramid="learned"'):
        eobackbones.create_model('fusionvit_tiny', checkpoint_path=str(_save_upstream(tmp_path / 'b.pth', 'vitbaseline')),
                                 depth=2, pyramid='interpolate')
    # the converter refuses a pretraining file for a learned pyramid whatever the path (no silent random init)
    from eobackbones.hub.weights import get_converter
    from eobackbones.cfg import PretrainedCfg
    with pytest.raises(CheckpointFormatError, match='no learned pyramid'):
        get_converter('fusionvit').fn(_truncated('pretrain'), PretrainedCfg('fusionvit_tiny'))


def test_band_adaptation_by_name_per_modality(tmp_path):
    """create_model(dir, bands={'s2': [...]}) maps the pretrained s2 patch-embedding filters by band name; the other
    modalities keep theirs. A subset of s2 equals the full model with the left-out band zeroed."""
    import eobackbones
    torch.manual_seed(0)
    full = eobackbones.create_model('fusionvit_tiny', depth=2, img_size=64).eval()
    d = full.save_pretrained(tmp_path / 'full')
    sub = eobackbones.create_model(f'local-dir:{d}', bands={'s2': ['B04', 'B02']}).eval()
    assert sub.input_spec.modality('s2').bands == ('B04', 'B02') and sub.input_spec.modality('s1').bands == ('VV',)
    assert sub.modalities == {'s1': 1, 's2': 2, 'dem': 1}
    assert [r['source'] for r in sub.band_adaptation['s2']] == ['B04', 'B02'] and 's1' not in sub.band_adaptation
    assert 'adapted by band name' in sub.provenance.note
    g = torch.Generator().manual_seed(1)
    x = {m: torch.randn(2, c, 64, 64, generator=g) for m, c in full.modalities.items()}
    zeroed = dict(x, s2=x['s2'].clone())
    zeroed['s2'][:, 1] = 0  # B03
    with torch.no_grad():
        ref = full(zeroed)
        for present in (('s1', 's2', 'dem'), ('s2',)):  # any subset of the modalities as well
            got = sub({m: x[m][:, [0, 2]] if m == 's2' else x[m] for m in present})
            want = full({m: zeroed[m] for m in present}) if present != ('s1', 's2', 'dem') else ref
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a new band takes the nearest pretrained filter, shared (halved) with the band it copies
    both = eobackbones.create_model(f'local-dir:{d}', bands={'s1': ['VV', 'VH']})
    w, w0 = both.state_dict()['patch_embed.s1.proj.weight'], full.state_dict()['patch_embed.s1.proj.weight']
    torch.testing.assert_close(w[:, 0] + w[:, 1], w0[:, 0])
    assert both.input_spec.modality('s1').bands == ('VV', 'VH')
    # without weights, bands= just builds the model on those bands (any channel count per modality)
    fresh = eobackbones.create_model('fusionvit_tiny', depth=1, bands={'s2': ['B02', 'B03', 'B04', 'B08', 'B11']})
    assert fresh.modalities['s2'] == 5 and fresh.input_spec.modality('s2').sensor == 'sentinel2'


def test_architectures_and_parameter_counts():
    import eobackbones
    counts = {}
    for name in ('fusionvit_tiny', 'fusionvit_small', 'fusionvit_base'):
        with torch.device('meta'):
            m = eobackbones.create_model(name)
        counts[name] = sum(p.numel() for p in m.parameters())
    # tiny = the reference encoder: its 336 shared upstream keys hold exactly these values (+ the learned pyramid)
    vb = _layout('', 'vitbaseline')
    upstream = sum(v.numel() for k, v in vb.items() if not k.endswith(('.beta', 'pos_emb')))
    assert counts['fusionvit_tiny'] == upstream
    assert counts['fusionvit_tiny'] < counts['fusionvit_small'] < counts['fusionvit_base']
    print('parameters:', counts)


# ----------------------------------------------------------------------------------------------- pretraining
def test_generate_masks_budget_and_sampler():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        masks = generate_masks(['s1', 's2', 'dem'], 256, 384, g)
        assert sum(int((~m).sum()) for m in masks.values()) == 384
        seen.add(tuple(int((~m).sum()) for m in masks.values()))
    assert len(seen) > 10  # Dirichlet shares differ from draw to draw
    with pytest.raises(ValueError):
        generate_masks(['s1'], 16, 17)
    sampler = ModalityCombinationSampler(16, 0.9, torch.Generator().manual_seed(1))
    x = _images()
    subsets = set()
    for _ in range(40):
        sub, masks = sampler(x)
        assert sub and set(sub) == set(masks)
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * 16 * len(sub))
        subsets.add(tuple(sub))
    assert len(subsets) == 7
    model = _small(depth=1)
    assert torch.isfinite(model(sub, masks=masks)).all()


def test_dino_loss_is_cross_entropy_of_normalised_vectors():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(4, 8, generator=g, requires_grad=True)
    loss = dino_loss(s, t)
    p = F.softmax(F.normalize(t, dim=-1) / 0.04, -1)
    ref = -(p * F.log_softmax(F.normalize(s, dim=-1) / 0.1, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert t.grad is None and s.grad is not None  # teacher side without gradient


def _bigearthnet():
    from eobackbones.data.datasets import load_bigearthnet_mini
    data = load_bigearthnet_mini(('s1', 's2'))
    s1, s2 = data.images['s1'], data.images['s2']
    ok = np.isfinite(s1).reshape(len(s1), -1).all(1)
    train = data.split == 'train'

    def z(a, rows):
        mean = a[rows].mean((0, 2, 3), keepdims=True)
        std = a[rows].std((0, 2, 3), keepdims=True) + 1e-6
        return torch.from_numpy(((a - mean) / std).astype(np.float32))
    return z(s1, ok & train), z(s2, train), torch.from_numpy(ok), data.bands


def _pretrain_model(bands, depth=2, seed=0):
    torch.manual_seed(seed)
    enc = FusionViT({'s1': list(bands['s1']), 's2': list(bands['s2'])}, img_size=48, depth=depth, pyramid='interpolate')
    return FusionMAE(enc)


def test_pretraining_on_bigearthnet_s1_s2_loss_falls():
    """20 steps on the real S1 + S2 pairs (48 px: a 3x3 patch grid at patch 16). S1 patches that are NaN are a
    missing modality: those samples form S2-only batches (masks are per batch, as upstream)."""
    s1, s2, ok, bands = _bigearthnet()
    assert (~ok).sum() > 0  # the embedded data has missing S1
    model = _pretrain_model(bands)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    both, s2_only = torch.nonzero(ok).flatten(), torch.nonzero(~ok).flatten()
    probe = {'s1': s1[both[:16]], 's2': s2[both[:16]]}
    probe_masks = generate_masks(['s1', 's2'], 9, 9, torch.Generator().manual_seed(123))

    def probe_loss():
        model.eval()
        with torch.no_grad():
            out = model(probe, probe_masks)
        model.train()
        return float(sum(out.recon_losses.values()))

    before = probe_loss()
    losses = []
    for step in range(20):
        if step % 5 == 4:  # a batch of the samples without S1
            idx = s2_only[torch.randperm(len(s2_only), generator=g)[:8]]
            batch = {'s2': s2[idx]}
        else:
            idx = both[torch.randperm(len(both), generator=g)[:16]]
            batch = {'s1': s1[idx], 's2': s2[idx]}
        out = model(batch, generator=g)
        assert torch.isfinite(out.loss)
        if 's1' not in batch:
            assert out.masks['s1'].all() and 's1' not in out.recon_losses and 's1' not in out.contrast_tokens
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    after = probe_loss()
    print(f'pretraining: probe reconstruction loss {before:.4f} -> {after:.4f}; step losses {losses[0]:.3f} .. '
          f'{losses[-1]:.3f}')
    assert after < 0.8 * before
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_report_parity():
    """Prints the worst ratio per parity case (run with -s)."""
    if REPORT:
        print('\n'.join(f'{k}: {v:.2e}' for k, v in sorted(REPORT.items())))
