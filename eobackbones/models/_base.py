"""What every eobackbones model shares beyond its forward: the contract in code, spec, cfg, provenance, saving."""
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Set, Tuple, Union, runtime_checkable

import torch
from torch import nn

from .._io import atomic_dir
from ..cfg import PretrainedCfg, Provenance
from ..hub.card import model_card
from ..hub.download import write_safetensors
from ..hub.weights import CONFIG_NAME, WEIGHTS_NAME
from ..spec import InputSpec

__all__ = ['EOModelMixin', 'EOBackbone', 'CONFIG_NAME', 'WEIGHTS_NAME', 'CONFIG_FORMAT', 'TIMM_PREFIX', 'count_flops']

_logger = logging.getLogger(__name__)

CONFIG_FORMAT = 'eobackbones/2'
TIMM_PREFIX = 'eob_'  # our architectures in timm's registry: eob_<arch>


@runtime_checkable
class EOBackbone(Protocol):
    """The model contract every registered backbone keeps (timm's, plus the Earth-observation input contract).

    Inputs are a tensor ``(B, C, H, W)`` or, for multimodal models, ``dict[str, Tensor]`` keyed by modality;
    ``**kwargs`` carry the conditioning inputs and call arguments the ``input_spec`` declares.
    """
    num_classes: int
    num_features: int
    head_hidden_size: int
    feature_info: List[Dict[str, Any]]
    input_spec: Optional[InputSpec]
    pretrained_cfg: Optional[PretrainedCfg]
    provenance: Provenance

    def forward(self, x: Any, **kwargs: Any) -> torch.Tensor: ...
    def forward_features(self, x: Any, **kwargs: Any) -> torch.Tensor:
        """Unpooled features: NLC tokens (ViTs), NCHW maps (CNNs) or NHWC (``output_fmt``); never a pooled vector."""
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (+ head). ``pre_logits=True``: the pooled vector of width ``num_features``."""
    def forward_intermediates(self, x: Any, indices: Any = None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False, **kwargs: Any) -> Any:
        """Multi-scale NCHW maps at ``feature_info``; with ``stop_early`` only what is asked is computed."""
    def prune_intermediate_layers(self, indices: Any = 1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop what ``forward_intermediates(indices)`` does not need (the features wrapper calls it)."""
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None: ...
    def get_classifier(self) -> nn.Module: ...
    def set_grad_checkpointing(self, enable: bool = True) -> None: ...
    def no_weight_decay(self) -> Set[str]: ...
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]: ...
    def save_pretrained(self, save_dir: Union[str, Path], note: Optional[str] = None) -> Path: ...


def count_flops(model_cls: Any, model_args: Dict[str, Any], spec: InputSpec) -> Optional[float]:
    """FLOPs of one sample at the spec's native size (FLOPs = 2 x MACs), counted on the ``meta`` device (no memory,
    no compute); None when the model cannot run on meta."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with torch.device('meta'):
            twin = model_cls(**model_args)
        twin.input_spec = spec
        twin.eval()
        x, kwargs = spec.example_call(1, device='meta')
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            twin(x, **kwargs)
        return float(fc.get_total_flops())
    except Exception as e:  # counting is informative only: a card without GFLOPs beats no card
        _logger.info('FLOP count skipped (%s: %s)', type(e).__name__, e)
        return None


class EOModelMixin:
    """Mixed into every model class. The builder sets ``pretrained_cfg``, ``input_spec``, ``model_args`` and
    ``provenance`` (which weights the instance holds)."""
    pretrained_cfg: Optional[PretrainedCfg] = None
    input_spec: Optional[InputSpec] = None
    model_args: Dict[str, Any] = {}
    # state-dict prefix of the classification head (re-initialised when num_classes differs from the weights)
    classifier_prefix: str = 'head'
    _provenance: Provenance = Provenance()
    _weights_stamp: Optional[Dict[str, Tuple[int, int]]] = None
    _builder: Optional[Tuple[Any, Dict[str, Any]]] = None  # (constructor, kwargs) recorded by the builder

    # ------------------------------------------------------------------ provenance
    def _stamp(self) -> Dict[str, Tuple[int, int]]:
        return {n: (id(p), p._version) for n, p in self.named_parameters()}

    def mark_weights(self, provenance: Provenance) -> None:
        """Record which weights the model holds now (the builder calls this after loading)."""
        self._provenance = provenance
        self._weights_stamp = self._stamp()

    @property
    def provenance(self) -> Provenance:
        """The weights this instance holds; ``trained`` once any parameter changed (or a new one appeared) after they
        were recorded. Removing parameters (pruning to a feature pyramid) changes no weight."""
        stamp = self._weights_stamp
        if stamp is not None and any(stamp.get(n) != v for n, v in self._stamp().items()):
            return Provenance('trained', origin=self._provenance, note='modified after loading (trained or fine-tuned)')
        return self._provenance

    # ------------------------------------------------------------------ input checks
    def _param_dtype(self) -> Optional[torch.dtype]:
        p = next(iter(self.parameters()), None)
        return p.dtype if p is not None and p.is_floating_point() else None

    def check_input(self, x: Any, **kwargs: Any) -> Dict[str, Any]:
        """Validate a call against ``input_spec`` (see :meth:`InputSpec.check`); returns the full keyword arguments."""
        if self.input_spec is None:
            return kwargs
        return self.input_spec.check(x, dtype=self._param_dtype(), **kwargs)

    # ------------------------------------------------------------------ saving
    def config_dict(self, provenance: Optional[Provenance] = None, weights_sha256: Optional[str] = None) -> Dict[str, Any]:
        """``config.json``: timm's keys (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``) so
        ``timm.create_model('local-dir:...')`` opens it, and the Earth-observation metadata at the top level."""
        cfg = self.pretrained_cfg
        arch = cfg.architecture if cfg else type(self).__name__
        spec = self.input_spec
        prov = provenance or self.provenance
        timm_cfg: Dict[str, Any] = dict(num_classes=int(getattr(self, 'num_classes', 0)), classifier=self.classifier_prefix,
                                        interpolation='bilinear', crop_pct=1.0)
        if spec is not None:
            m = spec.modalities[0]
            timm_cfg.update(input_size=[sum(x.in_chans for x in spec.modalities), *m.image_size],
                            fixed_input_size=bool(m.fixed_size))
            steps = m.normalization
            if len(spec.modalities) == 1 and len(steps) == 1 and steps[0]['op'] == 'meanstd':
                timm_cfg.update(mean=list(steps[0]['mean']), std=list(steps[0]['std']))
        if cfg is not None and cfg.license:
            timm_cfg['license'] = cfg.license
        if cfg is not None and cfg.paper:
            timm_cfg['paper_ids'] = cfg.paper
        return dict(
            architecture=TIMM_PREFIX + arch,
            num_classes=int(getattr(self, 'num_classes', 0)),
            model_args=dict(self.model_args),
            pretrained_cfg=timm_cfg,
            format=CONFIG_FORMAT,
            input_spec=spec.to_dict() if spec else None,
            provenance=prov.to_dict(),
            weights=cfg.name if cfg is not None and cfg.tag and prov.root.kind == 'manifest' else None,
            band_adaptation=getattr(self, 'band_adaptation', None) or None,
            weights_sha256=weights_sha256,
            license=cfg.license if cfg else None,
            paper=cfg.paper if cfg else None,
        )

    def save_pretrained(self, save_dir: Union[str, Path], note: Optional[str] = None, card: bool = True,
                        conversion: str = '') -> Path:
        """Write ``model.safetensors``, ``config.json`` (with the weights' sha256 and provenance) and a model card.

        The directory loads back with ``create_model('local-dir:<dir>')`` (or ``timm.create_model``) or, once pushed,
        ``create_model('hf-hub:org/repo')``. Written atomically: a failure leaves no half-written directory.

        Args:
            save_dir: the directory (replaced if it exists).
            note: what was done to the weights (e.g. "pretrained by the user on X for N steps"); recorded in the
                provenance when the weights changed since they were loaded or initialised.
            card: also write ``README.md``.
            conversion: what a converter kept and dropped (model card).
        """
        save_dir = Path(save_dir)
        prov = self.provenance
        if note and prov.kind == 'trained':
            prov = dataclasses.replace(prov, note=note)
        conf = self.config_dict(prov)
        json.dumps(conf)  # fail before writing anything if the kwargs are not JSON data
        with atomic_dir(save_dir) as tmp:
            sd = {k: v for k, v in self.state_dict().items()}
            digest = write_safetensors(sd, tmp / WEIGHTS_NAME, {'format': 'pt', 'architecture': conf['architecture']})
            conf['weights_sha256'] = digest
            (tmp / CONFIG_NAME).write_text(json.dumps(conf, indent=2) + '\n', encoding='utf-8')
            if card:
                builder = self._builder
                flops = count_flops(builder[0], builder[1], self.input_spec) if builder and self.input_spec else None
                (tmp / 'README.md').write_text(model_card(
                    self.pretrained_cfg.architecture if self.pretrained_cfg else type(self).__name__, self.input_spec,
                    prov, cfg=self.pretrained_cfg if prov.base.kind == 'manifest' else None,
                    num_params=sum(p.numel() for p in self.parameters()), gflops=flops / 1e9 if flops else None,
                    num_classes=int(getattr(self, 'num_classes', 0)), conversion=conversion), encoding='utf-8')
        return save_dir
