"""The SSLTransformerRS release converter, shared by the Dual-SimCLR ResNets and the SSL Swin-T pairs.

Both papers' released checkpoints are ``torch.save({epoch, arch, state_dict, optimizer})`` with
``state_dict = {backbone1.* (Sentinel-1), backbone2.* (Sentinel-2)}`` (HSG-AIML/SSLTransformerRS; Google Drive
only). One file yields three models: the S1 encoder, the S2 encoder and the pair.
"""
import re
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..cfg import PretrainedCfg
from ..errors import CheckpointFormatError
from ..hub.weights import ConverterOption, ConvertTarget, register_converter

__all__ = ['RELEASE_ARCHS', 'detect_release']

_PREFIX = {'backbone1.': 's1', 'backbone2.': 's2'}
# architecture -> (release, modality or None for the pair)
RELEASE_ARCHS = {
    'dualsimclr_resnet50_s1': ('resnet50', 's1'), 'dualsimclr_resnet50_s2': ('resnet50', 's2'),
    'dualsimclr_resnet50': ('resnet50', None),
    'dualsimclr_resnet18_s1': ('resnet18', 's1'), 'dualsimclr_resnet18_s2': ('resnet18', 's2'),
    'dualsimclr_resnet18': ('resnet18', None),
    'sslswin_tiny_s1': ('swin_tiny', 's1'), 'sslswin_tiny_s2': ('swin_tiny', 's2'), 'sslswin_tiny': ('swin_tiny', None),
}


def _upstream_state_dict(raw: Any, what: str) -> Mapping[str, Any]:
    sd = raw.get('state_dict', raw) if isinstance(raw, Mapping) else None
    if not isinstance(sd, Mapping) or not any(isinstance(k, str) and k.startswith(tuple(_PREFIX)) for k in sd):
        keys = list(raw)[:6] if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointFormatError(
            f'{what}: expected an SSLTransformerRS checkpoint ({{"state_dict": {{"backbone1.*", "backbone2.*"}}}}), got keys {keys}')
    return sd


def detect_release(raw: Any, what: str = 'checkpoint') -> str:
    """Which released model a checkpoint is (``resnet50``, ``resnet18``, ``swin_tiny``), from its keys.

    The ``arch`` field, when it names one of them, must agree.

    Raises:
        CheckpointFormatError: not an SSLTransformerRS checkpoint, or ``arch`` contradicts the keys.
    """
    sd = _upstream_state_dict(raw, what)
    if 'backbone1.patch_embed.proj.weight' in sd:
        release = 'swin_tiny'
    elif 'backbone1.layer4.0.conv3.weight' in sd:
        release = 'resnet50'
    elif 'backbone1.layer4.0.conv2.weight' in sd:
        release = 'resnet18'
    else:
        raise CheckpointFormatError(f'{what}: backbone keys match neither the ResNet-50, ResNet-18 nor Swin-T release')
    arch = raw.get('arch') if isinstance(raw, Mapping) else None
    if isinstance(arch, str):
        a = arch.lower().replace('-', '')
        named = 'resnet50' if 'resnet50' in a else 'resnet18' if 'resnet18' in a else 'swin_tiny' if 'swin' in a else None
        if named is not None and named != release:
            raise CheckpointFormatError(f'{what}: "arch" says {arch!r} but the weights are the {release} release')
    return release


def _rename(key: str, release: str) -> Optional[str]:
    """Upstream key of one backbone (prefix stripped) -> ours; None for what we drop by name."""
    if release == 'swin_tiny':
        if key.endswith(('.relative_position_index', '.attn_mask')):
            return None  # recomputed by timm (non-persistent buffers)
        if key in ('head.weight', 'head.bias'):
            return None  # unused 1000-class head of the original Swin
        # original Swin merges patches at the END of stage i, timm at the start of stage i + 1
        return re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', key)
    if key.startswith(('fc.0.', 'fc.2.')):
        return 'proj.' + key[3:]  # projection head Linear-ReLU-Linear
    return key


def _targets(raw: Any, options: Dict[str, Any]) -> List[ConvertTarget]:
    release = detect_release(raw)
    return [ConvertTarget(a, options['tag']) for a, (r, _) in RELEASE_ARCHS.items() if r == release]


@register_converter(
    'sslrs', archs=tuple(RELEASE_ARCHS), installable=True, targets=_targets,
    options={'tag': ConverterOption(str, 'sen12ms', 'manifest tag whose facts (spec, licence, provenance) the '
                                                    'converted models take')},
    description='every backbone weight kept (ResNet projection heads as `proj`); dropped: optimizer state and epoch, '
                'the other modality for single encoders, the unused 1000-class Swin `head` and Swin '
                '`relative_position_index` / `attn_mask` buffers (recomputed); Swin patch merging moved to the start of '
                'the next stage (timm layout)')
def _convert_sslrs(raw: Any, cfg: PretrainedCfg) -> Dict[str, torch.Tensor]:
    """SSLTransformerRS checkpoint -> one encoder (``*_s1`` / ``*_s2``) or the pair (``s1.*``, ``s2.*``).

    Keys without a ``backbone1.`` / ``backbone2.`` prefix are left as they are, so the strict load fails on them.
    """
    if cfg.architecture not in RELEASE_ARCHS:
        raise CheckpointFormatError(f'converter sslrs does not build {cfg.architecture}; it builds {list(RELEASE_ARCHS)}')
    want, modality = RELEASE_ARCHS[cfg.architecture]
    release = detect_release(raw, cfg.name)
    if release != want:
        raise CheckpointFormatError(f'{cfg.name}: the checkpoint is the {release} release, this model needs the {want} one')
    out = {}
    for k, v in _upstream_state_dict(raw, cfg.name).items():
        prefix = next((p for p in _PREFIX if k.startswith(p)), None)
        if prefix is None:
            out[k] = v
            continue
        m = _PREFIX[prefix]
        if modality is not None and m != modality:
            continue
        new = _rename(k[len(prefix):], release)
        if new is not None:
            out[new if modality else f'{m}.{new}'] = v
    return out
