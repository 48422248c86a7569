"""torch.hub entry points: one per registered architecture, plus ``create_model``.

    model = torch.hub.load('<owner>/eobackbones', 'dofa_base', pretrained=True, bands=['B04', 'B03', 'B02'])
    model = torch.hub.load('<owner>/eobackbones', 'create_model', 'dualsimclr_resnet50_s2')
"""
dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']

from eobackbones import create_model  # noqa: E402
from eobackbones.models import list_models as _list_models, model_entrypoint as _model_entrypoint  # noqa: E402


def _make_entry(name):
    def entry(pretrained=False, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)
    doc = (_model_entrypoint(name).__doc__ or name).strip()
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f'{doc}\n\n    Args:\n        pretrained: False, True (default weights) or a weights tag.\n'
                     f'        **kwargs: passed to eobackbones.create_model("{name}", ...).')
    return entry


for _name in _list_models():
    globals()[_name] = _make_entry(_name)
del _name
