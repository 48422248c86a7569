"""What every eobackbones model shares beyond its forward: spec, cfg, and saving."""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..spec import InputSpec
from ._pretrained import PretrainedCfg

__all__ = ['EOModelMixin', 'CONFIG_NAME', 'WEIGHTS_NAME', 'CONFIG_FORMAT']

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CONFIG_FORMAT = 'eobackbones/1'


class EOModelMixin:
    """Mixed into every model class. The builder sets ``pretrained_cfg``, ``input_spec`` and ``model_args``."""
    pretrained_cfg: Optional[PretrainedCfg] = None
    input_spec: Optional[InputSpec] = None
    model_args: Dict[str, Any] = {}
    # state-dict prefix of the classification head (re-initialised when num_classes differs from the weights)
    classifier_prefix: str = 'head'

    def config_dict(self) -> Dict[str, Any]:
        cfg = self.pretrained_cfg
        return dict(
            format=CONFIG_FORMAT,
            architecture=cfg.architecture if cfg else type(self).__name__,
            model_args=dict(self.model_args),
            input_spec=self.input_spec.to_dict() if self.input_spec else None,
            weights=cfg.name if cfg and cfg.tag else None,
            license=cfg.license if cfg else None,
            paper=cfg.paper if cfg else None,
        )

    def save_pretrained(self, save_dir: Union[str, Path]) -> Path:
        """Write ``config.json`` (architecture, constructor kwargs, input spec) and ``model.safetensors``.

        The directory loads back with ``create_model('local-dir:<dir>')`` or, once pushed,
        ``create_model('hf-hub:org/repo')``.
        """
        from safetensors.torch import save_model
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        conf = self.config_dict()
        json.dumps(conf)  # fail before writing anything if the kwargs are not JSON data
        tmp = save_dir / (WEIGHTS_NAME + '.tmp')
        save_model(self, str(tmp), metadata={'format': 'pt', 'architecture': conf['architecture']})
        tmp.replace(save_dir / WEIGHTS_NAME)
        (save_dir / CONFIG_NAME).write_text(json.dumps(conf, indent=2) + '\n', encoding='utf-8')
        return save_dir
