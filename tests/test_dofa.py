"""DOFA: fidelity to torchgeo, the legacy kernel layout, Hub loading, wavelength API, features, speed paths, MAE."""
import hashlib
import io
import math

import pytest
import torch
import torch.nn.functional as F

import eobackbones as eb
from eobackbones.errors import CheckpointFormatError, InvalidInputError, UnknownBandError
from eobackbones.layers import sincos_2d_pos_embed
from eobackbones.models.dofa import DEFAULT_BANDS, DOFA
from eobackbones.sensors import band_wavelengths, get_sensor

tgd = pytest.importorskip('torchgeo.models.dofa')

from tiny_models import TINY_DOFA as TINY
S2_13 = band_wavelengths(['B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B09', 'B10', 'B11', 'B12'])
_ENMAP = get_sensor('enmap')
CHANNEL_SETS = {
    3: band_wavelengths(['B04', 'B03', 'B02']),
    4: band_wavelengths(['naip:R', 'naip:G', 'naip:B', 'naip:N']),
    9: band_wavelengths(list(DEFAULT_BANDS)),
    13: S2_13,
    202: [_ENMAP.bands[b].wavelength_um for b in _ENMAP.default_subset],
}
TOL = 1e-5


def _randomize(tg: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every tensor (pos_embed, tokens and norms included) so no key can match by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in tg.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 0.1))
    return tg.eval()


def _tg(variant: str, num_classes: int = 0) -> torch.nn.Module:
    if variant == 'tiny':
        return _randomize(tgd.DOFA(num_classes=num_classes, **TINY))
    fn = {'base': tgd.dofa_base_patch16_224, 'large': tgd.dofa_large_patch16_224}[variant]
    torch.manual_seed(0)
    return _randomize(fn(num_classes=num_classes))


def _ours(variant: str, state_dict, **kwargs) -> DOFA:
    name = {'tiny': 'test_dofa', 'base': 'dofa_base', 'large': 'dofa_large'}[variant]
    m = eb.create_model(name, **kwargs)
    m.load_state_dict(state_dict, strict=True)
    return m.eval()


def _x(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def _pooled(m: DOFA, x, waves=None):
    return m.forward_head(m.forward_features(x, wavelengths=waves), pre_logits=True)


def _cos(a, b) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


# ---------------------------------------------------------------------- parity with torchgeo
@pytest.fixture(scope='module', params=['base', 'large'])
def pair(request):
    tg = _tg(request.param, num_classes=10)
    ours = _ours(request.param, tg.state_dict(), num_classes=10)
    yield request.param, tg, ours
    del tg, ours


@torch.no_grad()
def test_parity_with_torchgeo(pair):
    variant, tg, ours = pair
    batch = 2 if variant == 'base' else 1
    diffs = {}
    for c, waves in CHANNEL_SETS.items():
        x = _x(batch, c, 224, seed=c)
        ref = tg.forward_features(x, waves)
        ref_logits = tg.forward_head(ref)
        tokens = ours.forward_features(x, wavelengths=waves)
        assert tokens.shape == (batch, 197, ours.embed_dim)  # unpooled
        got = ours.forward_head(tokens, pre_logits=True)
        logits = ours.forward_head(tokens)
        diffs[c] = max((got - ref).abs().max().item(), (logits - ref_logits).abs().max().item())
    print(f'\nDOFA {variant} vs torchgeo max abs diff per channel count: {diffs}')
    assert max(diffs.values()) <= TOL, diffs


@torch.no_grad()
def test_bf16_autocast_cosine(pair):
    variant, tg, ours = pair
    if variant != 'base':
        pytest.skip('checked on base')
    x = _x(2, 13, 224, seed=5)
    ref = _pooled(ours, x, S2_13)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = _pooled(ours, x, S2_13)
    cos = _cos(got, ref)
    print(f'\nbf16 autocast pooled cosine {cos:.6f}')
    assert cos >= 0.9999


@pytest.mark.parametrize('precision', ['bf16', 'auto'])
def test_optimize_for_inference_cosine(pair, precision):
    variant, tg, ours = pair
    if variant != 'base':
        pytest.skip('checked on base')
    x = _x(2, 13, 224, seed=6)
    with torch.no_grad():
        ref = _pooled(ours, x, S2_13)
    fast = eb.optimize_for_inference(ours, precision=precision)
    got = fast.forward_head(fast.forward_features(x, wavelengths=S2_13), pre_logits=True)
    assert got.dtype == torch.float32
    assert next(ours.parameters()).dtype == torch.float32  # the original is untouched
    cos = _cos(got, ref)
    print(f'\noptimize_for_inference({precision}) -> {fast.dtype}: pooled cosine {cos:.6f}')
    assert cos >= 0.9999
    assert fast.model.patch_embed.fclayer.w1.weight.dtype == torch.float32  # hypernetwork stays fp32


def test_optimize_for_inference_compiled_matches_eager():
    torch.manual_seed(0)
    model = eb.create_model('test_dofa', bands=['B04', 'B03', 'B02']).eval()
    x = _x(2, 3, 32, seed=7)
    with torch.no_grad():
        ref = _pooled(model, x, None)
    fast = eb.optimize_for_inference(model, precision='bf16', compile=True)
    got = fast.forward_head(fast.forward_features(x), pre_logits=True)
    assert _cos(got, ref) >= 0.9999
    again = fast.forward_head(fast.forward_features(x), pre_logits=True)  # the compiled graph is reused
    assert torch.equal(got, again)


# ---------------------------------------------------------------------- legacy kernel layout
def _legacy_reference(tg, x, waves):
    """torchgeo's DOFA with the pre-Sept-2024 kernel reshape view(D, C, k, k) (no permute)."""
    pe = tg.patch_embed
    w = torch.tensor(waves).float()
    emb = pe.fclayer(tgd.position_embedding(pe.dynamic_embed_dim, w * 1000))
    weight, bias = pe.weight_generator(emb)
    kernel = weight.view(pe.embed_dim, len(waves), pe.kernel_size, pe.kernel_size) * pe.scaler
    h = F.conv2d(x, kernel, bias.view(pe.embed_dim) * pe.scaler, stride=pe.kernel_size, padding=1)
    h = h.flatten(2).transpose(1, 2) + tg.pos_embed[:, 1:]
    h = torch.cat([(tg.cls_token + tg.pos_embed[:, :1]).expand(h.shape[0], -1, -1), h], dim=1)
    for blk in tg.blocks:
        h = blk(h)
    return tg.fc_norm(h[:, 1:].mean(dim=1))


@torch.no_grad()
def test_legacy_kernel_layout():
    tg = _tg('tiny')
    legacy = _ours('tiny', tg.state_dict(), kernel_layout='legacy')
    current = _ours('tiny', tg.state_dict())
    for c in (3, 13):
        x = _x(2, c, 32, seed=c)
        ref = _legacy_reference(tg, x, CHANNEL_SETS[c])
        got = _pooled(legacy, x, CHANNEL_SETS[c])
        assert (got - ref).abs().max().item() <= TOL
        assert (_pooled(current, x, CHANNEL_SETS[c]) - ref).abs().max().item() > 1e-3  # layouts differ


# ---------------------------------------------------------------------- Hub loading, three layouts
_REPO = 'test-org/dofa'


def _register_hub_weights(hub, arch, tag, raw, layout):
    from eobackbones.hub.manifest import parse_entry
    from eobackbones.models import register_pretrained
    buf = io.BytesIO()
    torch.save(raw, buf)
    data = buf.getvalue()
    filename = f'{arch}_{tag}.pth'
    commit = hub.add_file(_REPO, filename, data)
    spec = eb.get_pretrained_cfg(arch).input_spec  # the architecture's own spec (tiny: the manifest's Satlas one)
    register_pretrained(parse_entry(f'{arch}.{tag}', dict(
        source=dict(hf_repo=_REPO, revision=commit, filename=filename, sha256=hashlib.sha256(data).hexdigest()),
        format='torch', converter='dofa', model_args=dict(kernel_layout=layout, sar_wavelength_um=3.75),
        license='MIT', paper='arXiv:2403.15356', provenance='test weights served by the local hub',
        input_spec=spec.to_dict())))
    return f'{arch}.{tag}'


@pytest.fixture
def hub_names():
    from eobackbones.models import unregister_pretrained
    names = []
    yield names
    for n in names:
        unregister_pretrained(n)


def _author_mae_file(state_dict):
    """zhu-xlab MAE layout: encoder keys + mask_token, norm.*, projector.*, wrapped under 'model'."""
    d = dict(state_dict)
    dim = d['cls_token'].shape[-1]
    d['mask_token'] = torch.zeros(1, 1, dim)
    d['norm.weight'], d['norm.bias'] = torch.ones(dim), torch.zeros(dim)
    d['projector.0.weight'], d['projector.0.bias'] = torch.randn(32, dim), torch.zeros(32)
    return {'model': d}


@pytest.mark.parametrize('layout', ['torchgeo_current', 'torchgeo_legacy', 'author_mae'])
@torch.no_grad()
def test_hub_checkpoint_layouts_tiny(local_hub, hub_names, layout):
    tg = _tg('tiny')
    sd = {k: v for k, v in tg.state_dict().items() if not k.startswith('fc_norm.')}  # torchgeo files lack it
    raw = _author_mae_file(sd) if layout == 'author_mae' else sd
    kernel_layout = 'legacy' if layout == 'torchgeo_legacy' else 'permute'
    name = _register_hub_weights(local_hub, 'test_dofa', layout, raw, kernel_layout)
    hub_names.append(name)
    model = eb.create_model('test_dofa', pretrained=layout, bands=['B04', 'B03', 'B02']).eval()
    assert model.pretrained_cfg.name == name
    tg.fc_norm.reset_parameters()  # not in the file: identity-affine on both sides
    x = _x(2, 3, 32, seed=1)
    waves = CHANNEL_SETS[3]
    ref = _legacy_reference(tg, x, waves) if kernel_layout == 'legacy' else tg.forward_features(x, waves)
    got = _pooled(model, x)
    assert (got - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_hub_checkpoint_base(local_hub, hub_names):
    tg = _tg('base')
    sd = {k: v for k, v in tg.state_dict().items() if not k.startswith(('fc_norm.', 'head.'))}
    hub_names.append(_register_hub_weights(local_hub, 'dofa_base', 'hubtest', sd, 'permute'))
    model = eb.create_model('dofa_base.hubtest', pretrained=True).eval()
    assert model.input_spec.modality().bands == DEFAULT_BANDS
    tg.fc_norm.reset_parameters()
    x = _x(1, 9, 224, seed=2)
    assert (_pooled(model, x) - tg.forward_features(x, CHANNEL_SETS[9])).abs().max().item() <= TOL
    assert not torch.equal(model.pos_embed, torch.zeros_like(model.pos_embed))


def test_converter_rejects_unknown_keys_and_fixes_zero_pos_embed():
    from eobackbones.hub.weights import get_converter
    from eobackbones.models import load_state_dict_strict
    conv = get_converter('dofa')
    tg = tgd.DOFA(num_classes=0, **TINY)  # torchgeo initialises pos_embed with zeros
    sd = conv.fn({'model': tg.state_dict()}, None)
    assert torch.equal(sd['pos_embed'], sincos_2d_pos_embed(TINY['embed_dim'], 4))
    model = eb.create_model('test_dofa')
    sd['surprise.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointFormatError, match='unexpected'):
        load_state_dict_strict(model, sd, conv.allow_missing)


def test_convert_checkpoint_roundtrip(tmp_path):
    tg = _tg('tiny')
    src = tmp_path / 'dofa_mae.pth'
    torch.save(_author_mae_file(tg.state_dict()), src)
    out = eb.convert_checkpoint('dofa', src, tmp_path / 'out', {'arch': 'test_dofa', 'layout': 'permute'})
    assert (out[0] / 'README.md').is_file() and (out[0] / 'model.safetensors').is_file()
    model = eb.create_model(f'local-dir:{out[0]}').eval()
    x = _x(1, 9, 32)
    with torch.no_grad():
        assert (_pooled(model, x) - tg.forward_features(x, CHANNEL_SETS[9])).abs().max().item() <= TOL


# ---------------------------------------------------------------------- wavelength API
def test_wavelength_binding_and_overrides():
    m = eb.create_model('test_dofa', bands=['B04', 'B03', 'B02']).eval()
    assert m.wavelengths_um == (0.665, 0.56, 0.49)
    assert 'bound_wavelengths' not in m.state_dict()  # non-persistent
    spec = m.input_spec.modality()
    assert spec.bands == ('B04', 'B03', 'B02') and spec.normalization[0]['mean'][0] == pytest.approx(114.1099739)
    x = _x(2, 3, 32)
    with torch.no_grad():
        a = m(x)
        b = m(x, wavelengths=[0.665, 0.56, 0.49])
        c = m(x, wavelengths=[0.49, 0.56, 0.665])
    assert torch.equal(a, b) and not torch.allclose(a, c)
    m2 = eb.create_model('test_dofa', wavelengths=[0.665, 0.56, 0.49])
    assert m2.wavelengths_um == m.wavelengths_um and m2.input_spec.modality().normalization == ()
    assert 'no published' in m2.input_spec.modality().notes


def test_defaults_sar_and_unknown_stats():
    m = eb.create_model('test_dofa')
    assert m.wavelengths_um == tuple(band_wavelengths(list(DEFAULT_BANDS)))  # the 9 Satlas S2 bands
    s1 = eb.create_model('test_dofa', bands=['VV', 'VH'])
    assert s1.wavelengths_um == (3.75, 3.75)  # not the catalogue's physical wavelength
    assert s1.input_spec.modality().normalization[0]['mean'] == [88.45542715, 166.36275909]
    assert eb.create_model('test_dofa', bands=['VV'], sar_wavelength_um=5.405).wavelengths_um == (5.405,)
    odd = eb.create_model('test_dofa', bands=['B01', 'B04'])
    assert odd.input_spec.modality().normalization == () and 'sentinel2:B01' in odd.input_spec.modality().notes
    naip = eb.create_model('test_dofa', bands=['R', 'G', 'B'])
    assert naip.input_spec.modality().normalization[0]['std'] == [58.395, 57.12, 57.375]


@pytest.mark.parametrize('kwargs, err', [
    (dict(wavelengths=[0.665, -0.56]), InvalidInputError),
    (dict(wavelengths=[0.665, float('nan')]), InvalidInputError),
    (dict(wavelengths=[0.665, float('inf')]), InvalidInputError),
    (dict(bands=['B04', 'NIR2']), UnknownBandError),
    (dict(bands=['B04'], wavelengths=[0.6, 0.7]), InvalidInputError),
])
def test_construction_errors(kwargs, err):
    with pytest.raises(err) as e:
        eb.create_model('test_dofa', **kwargs)
    assert '\n' not in str(e.value)


def test_nanometres_are_caught():
    with pytest.raises(InvalidInputError, match=r'must be in micrometres .*got \[665.0, 560.0, 490.0\]: if these are nanometres'):
        eb.create_model('test_dofa', wavelengths=[665, 560, 490])
    m = eb.create_model('test_dofa', bands=['B04']).eval()
    with pytest.raises(InvalidInputError, match='if these are nanometres divide by 1000'):
        m(_x(1, 1, 32), wavelengths=[665])
    # the physical C-band wavelength is not what any DOFA weights saw: bands=['VV', 'VH'] gives the convention
    with pytest.raises(InvalidInputError, match='for Sentinel-1 pass bands'):
        eb.create_model('test_dofa', wavelengths=[55465.76])
    assert eb.create_model('test_dofa', bands=['VV', 'VH']).input_spec.modality().wavelengths_um == (3.75, 3.75)


def test_call_errors():
    m = eb.create_model('test_dofa', bands=['B04', 'B03', 'B02']).eval()
    with pytest.raises(InvalidInputError, match='3 wavelengths for an input with 4 channels'):
        m(_x(1, 4, 32))
    with pytest.raises(InvalidInputError, match='must be multiples of 8, got 36x36'):
        m(_x(1, 3, 36))
    with pytest.raises(InvalidInputError):
        m(_x(1, 2, 32), wavelengths=[0.5, 0.0])


@torch.no_grad()
def test_other_image_sizes_resample_pos_embed():
    from timm.layers import resample_abs_pos_embed
    m = eb.create_model('test_dofa').eval()
    assert torch.equal(m.pos_embed, sincos_2d_pos_embed(64, 4))  # random init is sin-cos, never zeros
    x = _x(1, 9, 48)
    tokens = m.forward_features(x)
    assert tokens.shape == (1, 1 + 36, 64)
    # reference: the same model with the bicubic-resampled table as its native one
    big = eb.create_model('test_dofa', img_size=48).eval()
    sd = m.state_dict()
    sd['pos_embed'] = resample_abs_pos_embed(m.pos_embed, [6, 6], [4, 4], num_prefix_tokens=1)
    big.load_state_dict(sd)
    assert torch.allclose(big.forward_features(x), tokens, atol=1e-6)


# ---------------------------------------------------------------------- features
@torch.no_grad()
def test_features_only_pyramid():
    m = eb.create_model('test_dofa', features_only=True, bands=['B04', 'B03', 'B02'])
    feats = m(_x(2, 3, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4]
    assert [64 // f.shape[-1] for f in feats] == m.feature_info.reduction() == [2, 4, 8, 16]
    assert m.feature_info.channels() == [64] * 4
    feats2 = m(_x(2, 4, 64), wavelengths=CHANNEL_SETS[4])
    assert len(feats2) == 4
    with torch.device('meta'):  # shapes only
        base = eb.create_model('dofa_base')
        huge = eb.create_model('dofa_huge')
        large = eb.create_model('dofa_large')
    assert [f['reduction'] for f in base.feature_info] == [4, 8, 16, 32]
    assert [f['module'] for f in base.feature_info] == ['blocks.3', 'blocks.5', 'blocks.7', 'blocks.11']
    assert [f['module'] for f in large.feature_info] == ['blocks.5', 'blocks.11', 'blocks.17', 'blocks.23']
    assert [f['reduction'] for f in huge.feature_info] == [3.5, 7, 14, 28]
    assert [f['module'] for f in huge.feature_info] == ['blocks.7', 'blocks.15', 'blocks.23', 'blocks.31']


@torch.no_grad()
def test_forward_intermediates_blocks_and_final():
    m = eb.create_model('test_dofa').eval()
    x = _x(1, 9, 32)
    final, maps = m.forward_intermediates(x, indices=[0, 1], pyramid=False)
    assert [t.shape for t in maps] == [(1, 64, 4, 4)] * 2
    assert torch.allclose(final, m.forward_features(x))
    assert torch.allclose(maps[-1].flatten(2).transpose(1, 2), final[:, 1:])


# ---------------------------------------------------------------------- kernel cache
def test_kernel_cache_eval_and_training(monkeypatch):
    m = eb.create_model('test_dofa', bands=['B04', 'B03', 'B02'])
    calls = []
    orig = m.patch_embed.generate
    monkeypatch.setattr(m.patch_embed, 'generate', lambda w: calls.append(1) or orig(w))
    x = _x(2, 3, 32)
    m.eval()
    with torch.no_grad():
        a = m(x)
        b = m(x)
        m(x, wavelengths=[0.6, 0.5, 0.4])
    assert len(calls) == 2 and torch.equal(a, b)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        m.forward_head(m.forward_features(x), pre_logits=True).pow(2).mean().backward()
        g = m.patch_embed.weight_generator.fc_weight.weight.grad
        assert g is not None and g.abs().sum() > 0  # gradients reach the hypernetwork
        opt.step()
        opt.zero_grad()
    assert len(calls) == 4
    m.eval()
    with torch.no_grad():
        c = m(x)
    assert len(calls) == 5 and not torch.equal(a, c)  # weights changed: cache invalidated


# ---------------------------------------------------------------------- MAE on real data
def test_mae_loss_falls_on_bigearthnet():
    from eobackbones.data.datasets import load_bigearthnet_mini
    from eobackbones.pretrain import DOFAMAE
    data = load_bigearthnet_mini(('s2',))
    bands = data.bands['s2']
    x = torch.as_tensor(data.images['s2'][:16], dtype=torch.float32)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    size = x.shape[-1] // 8 * 8
    x = x[..., :size, :size]
    torch.manual_seed(0)
    enc = eb.create_model('test_dofa', bands=list(bands))
    mae = DOFAMAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=0.75)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        loss, pred, mask = mae(x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    n = (size // 8) ** 2
    assert pred.shape == (16, n, len(bands) * 64) and mask.sum(1).eq(round(n * 0.75)).all()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f'\nMAE loss first5 {first:.4f} -> last5 {last:.4f}')
    assert math.isfinite(last) and last < 0.95 * first


def test_set_wavelengths_and_grad_checkpointing():
    m = eb.create_model('test_dofa')
    m.set_wavelengths(bands=['B08', 'B04'])
    assert m.wavelengths_um == (0.842, 0.665) and m.input_spec.modality().bands == ('B08', 'B04')
    assert torch.equal(m.bound_wavelengths, torch.tensor([0.842, 0.665]))
    x = _x(2, 2, 32)
    m.train()
    a = m.forward_head(m.forward_features(x), pre_logits=True)
    m.set_grad_checkpointing(True)
    b = m.forward_head(m.forward_features(x), pre_logits=True)
    b.sum().backward()
    assert torch.allclose(a, b, atol=1e-6)
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad and 'head' not in n)
