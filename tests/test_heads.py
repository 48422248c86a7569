"""Task heads: the classifier over pooled (pair) features and the Swin-UNet decoder over forward_intermediates."""
import pytest
import torch

import eobackbones
from eobackbones.heads import ClassifierHead, PatchExpand, SwinUNetDecoder


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
