"""Task heads: the classifier over pooled (pair) features and the Swin-UNet decoder over forward_intermediates."""
import json
import math

import pytest
import torch

import eobackbones
from eobackbones.heads import ClassifierHead, PatchExpand, SwinUNetDecoder

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small models, one intra-op thread


def test_classifier_head_linear_mlp_multilabel():
    torch.manual_seed(0)
    x = torch.randn(4, 1024)
    lin = ClassifierHead(1024, 10)
    assert lin(x).shape == (4, 10) and isinstance(lin.mlp, torch.nn.Identity)
    torch.testing.assert_close(lin.predict(x).sum(-1), torch.ones(4))
    assert torch.isfinite(lin.loss(lin(x), torch.tensor([0, 1, 2, 9])))

    mlp = ClassifierHead(1024, 19, hidden_dim=256, dropout=0.1, multilabel=True)
    logits = mlp(x)
    assert logits.shape == (4, 19) and mlp.fc.in_features == 256
    p = mlp.predict(x)
    assert ((p > 0) & (p < 1)).all() and not torch.allclose(p.sum(-1), torch.ones(4))
    target = (torch.rand(4, 19) > 0.7).long()
    torch.testing.assert_close(mlp.loss(logits, target),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float()))
    with pytest.raises(ValueError, match='1024'):
        lin(torch.randn(4, 512))


def test_classifier_head_on_pair_features():
    """Upstream fine-tuning: a classifier over concat(pooled S1, pooled S2)."""
    torch.manual_seed(0)
    model = eobackbones.create_model('dualsimclr_resnet18').eval()
    head = ClassifierHead.for_model(model, 19, multilabel=True)
    assert head.in_features == 1024
    x = {'s1': torch.randn(2, 2, 64, 64), 's2': torch.randn(2, 13, 64, 64)}
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    assert head(feats).shape == (2, 19)


def test_patch_expand_layout():
    """Channel (p1, p2, c) of the expanded vector lands at pixel (2h + p1, 2w + p2), as Swin-UNet's rearrange."""
    pe = PatchExpand(8, 2)
    with torch.no_grad():
        pe.expand.weight.copy_(torch.eye(16, 8))  # channels 0..7 pass through, 8..15 are zero
    pe.norm = torch.nn.Identity()
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(1, 2, 3, 8)
    y = pe(x)
    assert y.shape == (1, 4, 6, 4)
    e = pe.expand(x)  # (1, 2, 3, 16) = (p1, p2, c) with c = 4
    for p1 in range(2):
        for p2 in range(2):
            torch.testing.assert_close(y[0, 1 * 2 + p1, 2 * 2 + p2], e[0, 1, 2, (p1 * 2 + p2) * 4:(p1 * 2 + p2 + 1) * 4])
    assert PatchExpand(96, 4)(torch.randn(1, 2, 2, 96)).shape == (1, 8, 8, 96)


def test_swin_unet_on_swin_pair():
    torch.manual_seed(0)
    model = eobackbones.create_model('sslswin_tiny').eval()
    chs = [fi['num_chs'] for fi in model.feature_info]
    assert chs == [192, 384, 768, 1536]  # S1 + S2 concatenated at every scale
    dec = SwinUNetDecoder(chs, num_classes=10, img_size=224, depths=(1, 1, 1))
    x = {'s1': torch.randn(1, 2, 224, 224), 's2': torch.randn(1, 13, 224, 224)}
    with torch.no_grad():
        feats = model.forward_intermediates(x, norm=True, intermediates_only=True)
    out = dec(feats)
    assert out.shape == (1, 10, 224, 224) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in dec.parameters())


def test_swin_unet_on_resnet_pair_and_missing_modality():
    torch.manual_seed(0)
    model = eobackbones.create_model('dualsimclr_resnet18', missing='zeros').eval()
    dec = SwinUNetDecoder([fi['num_chs'] for fi in model.feature_info], num_classes=3, img_size=128, depths=(1, 1, 0))
    with torch.no_grad():
        feats = model.forward_intermediates({'s2': torch.randn(2, 13, 128, 128)}, intermediates_only=True)
        out = dec(feats)
    assert out.shape == (2, 3, 128, 128)
    with pytest.raises(ValueError, match='channels'):
        dec([f[:, :8] for f in feats])


# ---------------------------------------------------------------- ClassificationHead, dense decoders, SegmentationModel
import tiny_models  # noqa: E402,F401  (registers test_tiny_cnn / test_dofa)
from eobackbones.errors import InvalidInputError  # noqa: E402
from eobackbones.heads import ClassificationHead, FPNHead, LinearSegHead, UNetHead, UPerNetHead  # noqa: E402
from eobackbones import create_segmentation_model  # noqa: E402


def _trainable_without_grad(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_classification_head_linear_and_mlp():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    lin = ClassificationHead(64, 7)
    assert lin(x).shape == (3, 7) and lin.hidden is None
    mlp = ClassificationHead(64, 19, hidden=32, dropout=0.2).eval()
    assert mlp(x).shape == (3, 19) and mlp.fc1.out_features == 32 and mlp.fc.in_features == 32
    mlp(x).sum().backward()
    assert not _trainable_without_grad(mlp)
    with pytest.raises(InvalidInputError, match=r'\(B, 64\)'):
        lin(torch.randn(3, 65))
    with pytest.raises(ValueError):
        ClassificationHead(64, 0)
    model = eobackbones.create_model('test_tiny_cnn').eval()
    head = ClassificationHead.for_model(model, 4)
    assert head(model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True)).shape == (2, 4)


def _maps(chs, sizes, batch=2):
    return [torch.randn(batch, c, s, s) for c, s in zip(chs, sizes)]


@pytest.mark.parametrize('reductions,sizes', [
    ((4, 8, 16, 32), (16, 8, 4, 2)),
    ((3.5, 7, 14, 28), (16, 8, 4, 2)),   # DOFA-huge pyramid on a 56 px input
    ((16, 16, 16, 16), (4, 4, 4, 4)),    # a plain ViT's blocks share one stride
])
@pytest.mark.parametrize('cls', [FPNHead, UPerNetHead, UNetHead, LinearSegHead])
def test_dense_heads_any_reductions(cls, reductions, sizes):
    torch.manual_seed(0)
    chs = (8, 16, 24, 32)
    kw = dict(channels=32) if cls in (FPNHead, UPerNetHead) else {}
    head = cls(chs, reductions, 5, **kw)
    out = head(_maps(chs, sizes))
    # logits at output_reduction: the finest level for FPN / UPerNet, finer still for the UNet's extra blocks
    side = 56 if reductions[0] == 3.5 else 64
    assert out.shape[:2] == (2, 5)
    assert out.shape[-1] == round(side / head.output_reduction) if cls is not LinearSegHead else out.shape[-1] == sizes[-1]
    if cls is UNetHead:
        assert head.extra_upsample == int(math.floor(math.log2(min(reductions))))
    out.square().mean().backward()
    assert not _trainable_without_grad(head)


def test_dense_head_errors():
    head = FPNHead((8, 16), (4, 8), 3, channels=16)
    with pytest.raises(InvalidInputError, match='channels'):
        head(_maps((8, 8), (8, 4)))
    with pytest.raises(InvalidInputError, match='2 feature maps'):
        head(_maps((8,), (8,)))
    with pytest.raises(ValueError, match='same length'):
        FPNHead((8, 16), (4,), 3)
    with pytest.raises(ValueError, match='positive'):
        UNetHead((8,), (0,), 3)


def test_linear_seg_head_level_and_feature_stats():
    head = LinearSegHead((8, 16), (4, 8), 3, level=-1)
    maps = _maps((8, 16), (8, 4))
    assert head(maps).shape == (2, 3, 4, 4) and head.output_reduction == 8
    torch.testing.assert_close(head(maps[1]), head(maps))  # the level's map alone works too
    mean, std = maps[1].mean((0, 2, 3)), maps[1].std((0, 2, 3))
    head.set_feature_stats(mean, std)
    ref = head.conv((maps[1] - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
    torch.testing.assert_close(head(maps), ref)
    assert {'feat_mean', 'feat_std'} <= set(head.state_dict())
    with pytest.raises(InvalidInputError):
        head.set_feature_stats(mean[:3], std)


_SEG_CASES = [
    # backbone, kwargs, decoders, input sizes
    ('test_tiny_cnn', {}, ('fpn', 'upernet', 'unet', 'linear'), (32, 40, 52)),
    ('test_dofa', {}, ('fpn', 'upernet', 'unet'), (32, 48)),
    ('test_dofa', dict(patch_size=14, img_size=28), ('upernet', 'unet'), (28, 56)),  # reductions 3.5 / 7 / 14 / 28
    ('dualsimclr_resnet18_s2', {}, ('fpn', 'unet'), (32, 48)),
    ('dualsimclr_resnet18', dict(missing='zeros'), ('upernet',), (32,)),
    ('test_diffusion_sr3', {}, ('fpn', 'linear'), (32, 40)),  # decoder-ordered levels; linear reads level 2 only
    ('test_trimodal', {}, ('fpn', 'unet', 'linear'), (32,)),
]


@pytest.mark.parametrize('name,kwargs,decoders,sizes', _SEG_CASES, ids=[c[0] + str(i) for i, c in enumerate(_SEG_CASES)])
def test_segmentation_model_shapes_and_backward(name, kwargs, decoders, sizes):
    for decoder in decoders:
        torch.manual_seed(0)
        model = create_segmentation_model(name, 4, decoder, **kwargs)
        assert model.num_classes == 4 and model.input_spec is model.backbone.input_spec
        assert model.pretrained_cfg.architecture == name
        for s in sizes:
            x, kw = eobackbones.example_call(model.input_spec, batch_size=2, image_size=s)  # + conditions
            out = model(x, **kw)
            assert out.shape == (2, 4, s, s), (decoder, s)
        out.square().mean().backward()
        assert not _trainable_without_grad(model), decoder


def test_segmentation_model_swin_and_swinunet():
    torch.manual_seed(0)
    model = create_segmentation_model('sslswin_tiny_s2', 3, 'swinunet', decoder_kwargs=dict(depths=(1, 1, 0)))
    assert isinstance(model.decoder, SwinUNetDecoder)
    out = model(torch.randn(1, 13, 224, 224))
    assert out.shape == (1, 3, 224, 224)
    out.square().mean().backward()
    assert not _trainable_without_grad(model)
    assert 'backbone.norm.weight' not in dict(model.named_parameters())  # final norm: pruned, not on the path
    with pytest.raises(ValueError, match='SSL-Swin'):
        create_segmentation_model('test_tiny_cnn', 3, 'swinunet')
    with pytest.raises(ValueError, match='decoder must be one of'):
        create_segmentation_model('test_tiny_cnn', 3, 'deeplab')


def test_segmentation_model_dict_input_and_call_keywords():
    torch.manual_seed(0)
    pair = create_segmentation_model('dualsimclr_resnet18', 2, 'fpn', missing='zeros').eval()
    with torch.no_grad():
        out = pair({'s2': torch.randn(1, 13, 40, 40)})  # one modality present: size from it
        assert out.shape == (1, 2, 40, 40)
        assert pair({'s1': torch.randn(1, 2, 32, 32), 's2': torch.randn(1, 13, 32, 32)}, output_size=(8, 8)).shape \
            == (1, 2, 8, 8)
    dofa = create_segmentation_model('test_dofa', 3, 'fpn', bands=['B04', 'B03', 'B02']).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = dofa(x), dofa(x, wavelengths=[0.842, 0.665, 0.56])  # passed through to forward_intermediates
    assert a.shape == b.shape == (1, 3, 32, 32) and not torch.allclose(a, b)


def test_segmentation_save_pretrained_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = create_segmentation_model('test_dofa', 3, 'upernet', bands=['B04', 'B03', 'B02', 'B08'],
                                      decoder_kwargs=dict(channels=32)).eval()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        ref = model(x)
    model.save_pretrained(tmp_path / 'seg', note='fine-tuned on nothing (test)')
    conf = json.loads((tmp_path / 'seg' / 'config.json').read_text())
    assert conf['task'] == 'segmentation' and conf['architecture'] == 'eob_segmentation'
    assert conf['segmentation'] == dict(backbone='test_dofa', num_classes=3, decoder='upernet',
                                        decoder_kwargs=dict(channels=32), out_indices=[0, 1, 2, 3])
    assert (tmp_path / 'seg' / 'README.md').is_file()
    loaded = eobackbones.create_model(f'local-dir:{tmp_path / "seg"}').eval()  # the one loading path
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    assert loaded.input_spec.modality().bands == ('B04', 'B03', 'B02', 'B08')
    assert loaded.provenance.kind == 'directory' and loaded.provenance.origin.kind == 'none'
    five = eobackbones.create_model(f'local-dir:{tmp_path / "seg"}', num_classes=5)  # the one head rule: new decoder
    assert five.num_classes == 5 and five(x).shape == (2, 5, 32, 32)

