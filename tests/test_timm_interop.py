"""Our models inside timm: ``eob_<arch>`` entrypoints, local directories, data config, optimiser factory."""
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_model_data_config
from timm.optim import create_optimizer_v2

import eobackbones


@pytest.mark.parametrize('order', ['import timm; import eobackbones', 'import eobackbones; import timm'])
def test_eob_architectures_appear_in_timm_in_any_import_order(order):
    code = (f'{order}\nnames = timm.list_models("eob_*")\n'
            'assert "eob_dofa_base" in names and "eob_dualsimclr_resnet18" in names, names\n'
            'import sys; assert "eobackbones.models" in sys.modules')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=300)


def test_plain_import_stays_light():
    code = 'import eobackbones, sys; assert "torch" not in sys.modules and "timm" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    torch.manual_seed(0)
    m = eobackbones.create_model('dualsimclr_resnet18_s2').eval()
    d = tmp_path_factory.mktemp('m')
    m.save_pretrained(d / 'dir')
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / 'w.safetensors'))
    return m, d


@torch.no_grad()
def test_timm_create_model_loads_a_saved_directory(saved):
    ours, d = saved
    for m in (timm.create_model(f'local-dir:{d / "dir"}', pretrained=True),
              timm.create_model('eob_dualsimclr_resnet18_s2', pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(d / 'w.safetensors')))):
        m.eval()
        x = torch.randn(1, 13, 32, 32)
        torch.testing.assert_close(m.forward_features(x), ours.forward_features(x))
        assert m.provenance.kind in ('directory', 'file')


def test_timm_kwargs_reach_our_builder():
    m = timm.create_model('eob_dualsimclr_resnet18_s2', num_classes=5, features_only=True, out_indices=(1, 3))
    feats = m(torch.randn(1, 13, 64, 64))
    assert [f.shape[1] for f in feats] == m.feature_info.channels() == [128, 512]  # layer2, layer4


def test_data_config_from_our_pretrained_cfg():
    m = eobackbones.create_model('dofa_base', wavelengths=[0.49, 0.56, 0.665])
    cfg = resolve_model_data_config(m)
    assert cfg['input_size'] == (3, 224, 224)
    assert len(cfg['mean']) == 3 and len(cfg['std']) == 3


@pytest.mark.parametrize('name', ['dualsimclr_resnet18_s2', 'sslswin_tiny_s2', 'dofa_small'])
def test_layer_decay_optimizer_groups_cover_every_parameter(name):
    m = eobackbones.create_model(name, num_classes=3)
    opt = create_optimizer_v2(m, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    in_groups = {id(p) for g in opt.param_groups for p in g['params']}
    assert in_groups == {id(p) for p in m.parameters() if p.requires_grad}
    scales = {g['lr_scale'] for g in opt.param_groups}
    assert len(scales) > 2 and max(scales) == pytest.approx(1.0)


def test_checkpoint_path_and_overlay_need_consistent_arguments(saved):
    _, d = saved
    with pytest.raises(ValueError, match='pretrained=True'):
        eobackbones.create_model('dualsimclr_resnet18_s2', pretrained_cfg_overlay=dict(file=str(d / 'w.safetensors')))
    with pytest.raises(ValueError, match='only "file"'):
        eobackbones.create_model('dualsimclr_resnet18_s2', pretrained=True, pretrained_cfg_overlay=dict(url='x'))


def test_torchgeo_tasks_take_eob_names():
    """torchgeo's tasks build backbones through timm (and smp's ``tu-`` encoders): ``eob_`` names work there."""
    pytest.importorskip('torchgeo')
    from torchgeo.trainers import ClassificationTask, SemanticSegmentationTask
    torch.manual_seed(0)
    task = ClassificationTask(model='eob_dualsimclr_resnet18_s2', weights=None, in_channels=13, num_classes=5)
    assert task.model(torch.randn(2, 13, 64, 64)).shape == (2, 5)
    seg = SemanticSegmentationTask(model='unet', backbone='tu-eob_dualsimclr_resnet18_s2', weights=None,
                                   in_channels=13, num_classes=4)
    assert seg.model(torch.randn(1, 13, 64, 64)).shape == (1, 4, 64, 64)


def test_dofa_in_chans_is_checked_not_guessed():
    m = timm.create_model('eob_dofa_small', in_chans=9)  # default binding: DOFA's nine Sentinel-2 bands
    assert len(m.input_spec.modality().bands) == 9
    with pytest.raises(eobackbones.errors.InvalidInputError, match=r'in_chans=3, but DOFA is bound to 9 bands'):
        timm.create_model('eob_dofa_small', in_chans=3)
    m = timm.create_model('eob_dofa_small', in_chans=3, wavelengths=[0.665, 0.56, 0.49])
    assert len(m.input_spec.modality().bands) == 3
