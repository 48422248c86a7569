"""Preprocessing that reproduces the weights' training normalisation, built from the input spec.

``for_model(model)`` returns a module mapping raw sensor values (in the spec's ``unit``) to what the
model saw during training. Given the band names of the data (``source_bands``), it also selects and
reorders channels *by name*; a band the model needs and the data lacks is an error unless the caller
chooses ``missing_bands='zeros'`` explicitly.
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import InvalidInputError, MissingModalityError, UnknownBandError
from .spec import InputSpec, ModalitySpec

__all__ = ['NormalizeModality', 'Preprocess', 'for_model', 'example_input', 'example_call', 'spec_of']


def _vec(v: Any) -> torch.Tensor:
    """Scalar or per-band list -> tensor broadcastable over (B, C, H, W)."""
    t = torch.as_tensor(v, dtype=torch.float32)
    return t.view(-1, 1, 1) if t.ndim == 1 else t


class NormalizeModality(nn.Module):
    """Applies the ``normalization`` steps of one modality spec, in order, to ``(B, C, H, W)``."""

    def __init__(self, spec: ModalitySpec):
        super().__init__()
        self.spec = spec
        self.steps = [dict(s) for s in spec.normalization]
        for i, s in enumerate(self.steps):
            for k in ('min', 'max', 'value', 'factor', 'mean', 'std'):
                if k in s:
                    self.register_buffer(f'_{i}_{k}', _vec(s[k]), persistent=False)

    def _b(self, i: int, k: str) -> torch.Tensor:
        return getattr(self, f'_{i}_{k}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise InvalidInputError(f'{self.spec.name}: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}')
        if x.shape[1] != self.spec.in_chans:
            raise InvalidInputError(
                f'{self.spec.name}: expected {self.spec.in_chans} channels {list(self.spec.bands)}, got {x.shape[1]}')
        x = x.float() if not x.is_floating_point() else x
        for i, s in enumerate(self.steps):
            op = s['op']
            if op == 'clip':
                x = torch.minimum(torch.maximum(x, self._b(i, 'min')), self._b(i, 'max'))
            elif op == 'add':
                x = x + self._b(i, 'value')
            elif op == 'scale':
                x = x * self._b(i, 'factor')
            elif op == 'per_sample_max':
                x = x / (x.amax(dim=(-2, -1), keepdim=True) + s.get('eps', 0.0))
            elif op == 'meanstd':
                x = (x - self._b(i, 'mean')) / self._b(i, 'std')
            elif op == 'minmax':
                lo, hi = s.get('out', (0.0, 1.0))
                mn, mx = self._b(i, 'min'), self._b(i, 'max')
                x = (x - mn) / (mx - mn) * (hi - lo) + lo
        return x

    def extra_repr(self) -> str:
        return f'{self.spec.name}: unit={self.spec.unit}, steps={[s["op"] for s in self.steps]}'


def _band_index(model_bands: Sequence[str], source_bands: Sequence[str], missing: str, modality: str) -> List[int]:
    """Index into the source channels for every model band; -1 marks a band to fill with zeros."""
    lookup = {b: i for i, b in enumerate(source_bands)}
    if len(lookup) != len(source_bands):
        raise UnknownBandError(f'{modality}: duplicate band names in the data: {list(source_bands)}')
    absent = [b for b in model_bands if b not in lookup]
    if absent and missing != 'zeros':
        raise UnknownBandError(
            f'{modality}: the model needs bands {absent} that the data lacks (data has {list(source_bands)}); '
            f'choose an explicit policy (missing_bands="zeros") or a model that takes these bands')
    return [lookup.get(b, -1) for b in model_bands]


class Preprocess(nn.Module):
    """Band selection by name + the weights' normalisation, for a tensor or a modality dict."""

    def __init__(
            self,
            spec: InputSpec,
            source_bands: Optional[Union[Sequence[str], Mapping[str, Sequence[str]]]] = None,
            missing_bands: str = 'error',
    ):
        super().__init__()
        if missing_bands not in ('error', 'zeros'):
            raise ValueError(f'missing_bands must be "error" or "zeros", got {missing_bands!r}')
        self.spec = spec
        self.missing_bands = missing_bands
        self.norms = nn.ModuleDict({m.name: NormalizeModality(m) for m in spec.modalities})
        self.index: Dict[str, Optional[List[int]]] = {}
        for m in spec.modalities:
            src = source_bands
            if isinstance(source_bands, Mapping):
                src = source_bands.get(m.name)
            self.index[m.name] = None if src is None else _band_index(m.bands, list(src), missing_bands, m.name)
        self.filled = {n: [spec.modality(n).bands[j] for j, i in enumerate(idx) if i < 0]
                       for n, idx in self.index.items() if idx is not None}

    def _one(self, name: str, x: torch.Tensor) -> torch.Tensor:
        idx = self.index[name]
        norm = self.norms[name]
        if idx is None:
            return norm(x)
        n_src = max(idx) + 1 if max(idx) >= 0 else 0
        if x.ndim != 4 or x.shape[1] < n_src:
            raise InvalidInputError(f'{name}: expected (B, >= {n_src}, H, W) with the declared source bands, got {tuple(x.shape)}')
        keep = [max(i, 0) for i in idx]
        out = x[:, keep].float() if not x.is_floating_point() else x[:, keep]
        out = norm(out)
        if any(i < 0 for i in idx):
            mask = torch.tensor([i >= 0 for i in idx], device=out.device).view(1, -1, 1, 1)
            out = out * mask  # the explicitly requested zero fill, applied after normalisation
        return out

    def forward(self, x: Union[torch.Tensor, Mapping[str, torch.Tensor]]):
        if self.spec.input_format == 'tensor':
            if isinstance(x, Mapping):
                name = self.spec.modalities[0].name
                if name not in x:
                    raise MissingModalityError(f'expected modality {name!r}, got keys {list(x)}')
                x = x[name]
            return self._one(self.spec.modalities[0].name, x)
        if not isinstance(x, Mapping):
            raise InvalidInputError(f'expected a dict keyed by {list(self.spec.modality_names)}, got {type(x).__name__}')
        return {k: self._one(k, v) if k in self.norms else v for k, v in x.items()}


def spec_of(model_or_spec: Any) -> InputSpec:
    if isinstance(model_or_spec, InputSpec):
        return model_or_spec
    spec = getattr(model_or_spec, 'input_spec', None)
    if spec is None:
        raise ValueError(f'{type(model_or_spec).__name__} has no input_spec; build it with eobackbones.create_model')
    return spec


def for_model(
        model_or_spec: Any,
        source_bands: Optional[Union[Sequence[str], Mapping[str, Sequence[str]]]] = None,
        missing_bands: str = 'error',
) -> Preprocess:
    """The preprocessing the model's weights were trained with.

    Args:
        model_or_spec: a model built by ``create_model`` or an :class:`InputSpec`.
        source_bands: band names of the data's channels (per modality for dict inputs); channels are
            then selected and reordered by name. ``None``: the data is already in the model's band order.
        missing_bands: ``error`` (default) or ``zeros`` (fill bands the data lacks with 0 after normalisation).
    """
    return Preprocess(spec_of(model_or_spec), source_bands, missing_bands)


def example_input(
        model_or_spec: Any,
        batch_size: int = 1,
        image_size: Optional[Union[int, Sequence[int]]] = None,
        seed: int = 0,
        device: Optional[torch.device] = None,
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """A valid, already-normalised random input: right modalities, channels and size.

    Shared by the contract tests, the benchmark harness and users (``model(example_input(model))``).
    """
    spec = spec_of(model_or_spec)
    if image_size is None:
        h, w = spec.image_size
    elif isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = image_size
    g = torch.Generator().manual_seed(seed)
    out = {m.name: torch.randn(batch_size, m.in_chans, h, w, generator=g).to(device or 'cpu') for m in spec.modalities}
    return out if spec.input_format == 'dict' else out[spec.modalities[0].name]


def example_call(
        model_or_spec: Any,
        batch_size: int = 1,
        image_size: Optional[Union[int, Sequence[int]]] = None,
        seed: int = 0,
        device: Optional[torch.device] = None,
) -> Tuple[Union[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, Any]]:
    """A complete valid call ``(x, kwargs)``: ``model(x, **kwargs)`` runs.

    ``x`` is :func:`example_input`; ``kwargs`` holds the non-image inputs the spec declares (conditioning
    inputs, call arguments), so generic code (benchmarks, probes, tests) can call any model.
    """
    return example_input(model_or_spec, batch_size, image_size, seed, device), {}
