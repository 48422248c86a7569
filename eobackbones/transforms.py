"""Preprocessing that reproduces the weights' training normalisation, built from the input spec.

``for_model(model)`` returns a module mapping raw sensor values (in the spec's ``unit``) to what the model saw
during training. Given the band names of the data (``source_bands``), it selects and reorders channels *by name*;
the names are checked against the sensor catalogue ("did you mean B08?") and their number against the data's
channels on every call. A band the model needs and the data lacks is an error unless the caller chooses
``missing_bands='zeros'`` explicitly. A spec without a normalisation (e.g. DOFA bound to bands without published
statistics) is an error unless ``allow_unnormalised=True`` is passed: no silent identity transform.

NaN rule (the same in the probe): ``nan='error'`` (default) refuses non-finite pixels, naming the modality and the
count; ``nan='fill'`` computes per-sample statistics over the finite pixels only and sets the non-finite pixels to
0 *after* normalisation (the mean under a z-score, mid-range under min-max to [-1, 1]); ``last_filled`` counts them.
A NaN never silently turns a whole channel into NaN.

``create_transform(model)`` is the tensor counterpart of timm's ``create_transform``: the above, then resizing and
cropping every modality to the size the spec states, with one window for all modalities of a sample (they stay
co-registered) and nearest-neighbour resampling for categorical layers (class maps).
"""
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError, MissingModalityError, NormalisationError, UnknownBandError
from .sensors import get_sensor, resolve_band, suggest_band
from .spec import ConditionSpec, InputSpec, ModalitySpec

__all__ = ['NormalizeModality', 'NormalizeCondition', 'Preprocess', 'for_model', 'example_input', 'example_call',
           'spec_of', 'check_source_bands', 'NAN_POLICIES', 'SpatialTransform', 'create_transform']

NAN_POLICIES = ('error', 'fill')


def _vec(v: Any, nd: int = 3) -> torch.Tensor:
    """Scalar or per-band list -> tensor broadcastable over (B, C, H, W) (``nd=3``) or (B, C) (``nd=1``)."""
    t = torch.as_tensor(v, dtype=torch.float32)
    return t.view(-1, *([1] * (nd - 1))) if t.ndim == 1 else t


def _apply_steps(module: nn.Module, steps: Sequence[Dict[str, Any]], x: torch.Tensor) -> torch.Tensor:
    for i, s in enumerate(steps):
        op = s['op']
        b = lambda k: getattr(module, f'_{i}_{k}')  # noqa: E731
        if op == 'clip':
            x = torch.minimum(torch.maximum(x, b('min')), b('max'))
        elif op == 'add':
            x = x + b('value')
        elif op == 'scale':
            x = x * b('factor')
        elif op == 'per_sample_max':
            # statistics over finite pixels only (NaN / inf never spread over a channel)
            mx = torch.where(torch.isfinite(x), x, torch.full_like(x, float('-inf'))).amax(dim=(-2, -1), keepdim=True)
            x = x / (mx + s.get('eps', 0.0))
        elif op == 'meanstd':
            x = (x - b('mean')) / b('std')
        elif op == 'minmax':
            lo, hi = s.get('out', (0.0, 1.0))
            mn, mx = b('min'), b('max')
            x = (x - mn) / (mx - mn) * (hi - lo) + lo
    return x


def _register(module: nn.Module, steps: Sequence[Dict[str, Any]], nd: int) -> None:
    for i, s in enumerate(steps):
        for k in ('min', 'max', 'value', 'factor', 'mean', 'std'):
            if k in s:
                module.register_buffer(f'_{i}_{k}', _vec(s[k], nd), persistent=False)


class NormalizeModality(nn.Module):
    """Applies the ``normalization`` steps of one modality spec, in order, to ``(B, C, H, W)``."""

    def __init__(self, spec: ModalitySpec, nan: str = 'error'):
        super().__init__()
        if nan not in NAN_POLICIES:
            raise ValueError(f'nan must be one of {NAN_POLICIES}, got {nan!r}')
        self.spec = spec
        self.nan = nan
        self.steps = [dict(s) for s in spec.normalization]
        self.last_filled = 0
        _register(self, self.steps, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise InvalidInputError(f'{self.spec.name}: expected a (B, C, H, W) tensor, got '
                                    f'{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}')
        if x.shape[1] != self.spec.in_chans:
            raise InvalidInputError(
                f'{self.spec.name}: expected {self.spec.in_chans} channels {list(self.spec.bands)}, got {x.shape[1]}')
        x = x.float() if not x.is_floating_point() or x.dtype == torch.float64 else x
        bad = ~torch.isfinite(x)
        n_bad = int(bad.sum()) if not x.is_meta else 0
        if n_bad and self.nan == 'error':
            raise InvalidInputError(
                f'{self.spec.name}: {n_bad} non-finite pixels (NaN / inf) in the input; drop those samples or pass '
                f'nan="fill" (statistics over valid pixels, 0 after normalisation)')
        x = _apply_steps(self, self.steps, x)
        if n_bad:
            x = x.masked_fill(bad, 0.0)
        self.last_filled = n_bad
        return x

    def extra_repr(self) -> str:
        return f'{self.spec.name}: unit={self.spec.unit}, steps={[s["op"] for s in self.steps]}, nan={self.nan}'


class NormalizeCondition(nn.Module):
    """Applies a :class:`ConditionSpec`'s steps to ``(B, len(features))`` raw values."""

    def __init__(self, spec: ConditionSpec):
        super().__init__()
        self.spec = spec
        self.steps = [dict(s) for s in spec.normalization]
        _register(self, self.steps, 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v, dtype=torch.float32)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[1] != self.spec.size:
            raise InvalidInputError(f'{self.spec.name}: expected (B, {self.spec.size}) values '
                                    f'[{", ".join(self.spec.features)}], got shape {tuple(v.shape)}')
        if not bool(torch.isfinite(v).all()):
            raise InvalidInputError(f'{self.spec.name}: non-finite values (NaN / inf)')
        return _apply_steps(self, self.steps, v)


def check_source_bands(mspec: ModalitySpec, source_bands: Sequence[str]) -> List[str]:
    """Validate the data's band names against the sensor catalogue; returns them as given.

    Names must be bands of the modality's sensor (qualified ``sensor:band`` names also work; wavelength-conditioned
    modalities accept any catalogue band). Unknown names fail with a suggestion (lower case, ``B8`` vs ``B08``,
    Earth Engine ``B2``), duplicates fail.
    """
    if isinstance(source_bands, str):
        raise UnknownBandError(f'{mspec.name}: source_bands must be a list of band names, got the string {source_bands!r}')
    names = list(source_bands)
    dup = sorted({b for b in names if names.count(b) > 1})
    if dup:
        raise UnknownBandError(f'{mspec.name}: duplicate band names in the data: {dup}')
    try:
        sensor = get_sensor(mspec.sensor) if mspec.sensor not in ('any', 'unknown', '') else None
    except UnknownBandError:
        sensor = None
    for b in names:
        if b in mspec.bands:
            continue  # the model's own names (placeholders included) are always fine
        if sensor is not None and ':' not in b:
            if b not in sensor.bands:
                close = suggest_band(b, sensor.key)
                hint = f'; did you mean {", ".join(close)}?' if close else ''
                raise UnknownBandError(f'{mspec.name}: {b!r} is not a {sensor.title} band{hint} (its bands: '
                                       f'{", ".join(sensor.band_names[:16])})')
        else:
            resolve_band(b)
    return names


def _band_index(mspec: ModalitySpec, source_bands: Sequence[str], missing: str) -> List[int]:
    """Index into the source channels for every model band; -1 marks a band to fill with zeros."""
    names = check_source_bands(mspec, source_bands)
    lookup = {b: i for i, b in enumerate(names)}
    lookup.update({mspec.qualified(b): i for i, b in enumerate(names)})
    absent = [b for b in mspec.bands if b not in lookup and mspec.qualified(b) not in lookup]
    if absent and missing != 'zeros':
        raise UnknownBandError(
            f'{mspec.name}: the model needs bands {absent} that the data lacks (data has {names}); '
            f'choose an explicit policy (missing_bands="zeros") or a model that takes these bands')
    return [lookup.get(b, lookup.get(mspec.qualified(b), -1)) for b in mspec.bands]


class Preprocess(nn.Module):
    """Band selection by name + the weights' normalisation, for a tensor or a modality dict; conditions too."""

    def __init__(
            self,
            spec: InputSpec,
            source_bands: Optional[Union[Sequence[str], Mapping[str, Sequence[str]]]] = None,
            missing_bands: str = 'error',
            allow_unnormalised: bool = False,
            nan: str = 'error',
    ):
        super().__init__()
        if missing_bands not in ('error', 'zeros'):
            raise ValueError(f'missing_bands must be "error" or "zeros", got {missing_bands!r}')
        if not allow_unnormalised:
            bare = [m for m in spec.modalities if not m.normalization]
            if bare:
                m = bare[0]
                why = m.notes or f'unit {m.unit}; normalise the data yourself (e.g. dataset z-score)'
                raise NormalisationError(
                    f'{m.name}: the model\'s input spec states no normalisation for bands {list(m.bands)} ({why}); '
                    f'then pass allow_unnormalised=True to feed the values unchanged')
        self.spec = spec
        self.missing_bands = missing_bands
        self.norms = nn.ModuleDict({m.name: NormalizeModality(m, nan) for m in spec.modalities})
        self.cond_norms = nn.ModuleDict({c.name: NormalizeCondition(c) for c in spec.conditions})
        self.index: Dict[str, Optional[List[int]]] = {}
        self.source_bands: Dict[str, Optional[Tuple[str, ...]]] = {}
        for m in spec.modalities:
            src = source_bands
            if isinstance(source_bands, Mapping):
                unknown = [k for k in source_bands if k not in spec.modality_names]
                if unknown:
                    raise InvalidInputError(f'source_bands has unknown modalities {unknown}; the model takes '
                                            f'{list(spec.modality_names)}')
                src = source_bands.get(m.name)
            elif source_bands is not None and len(spec.modalities) > 1:
                raise InvalidInputError(f'source_bands must be a dict keyed by {list(spec.modality_names)} for this '
                                        f'multimodal model')
            self.source_bands[m.name] = None if src is None else tuple(src)
            self.index[m.name] = None if src is None else _band_index(m, src, missing_bands)
        self.filled = {n: [spec.modality(n).bands[j] for j, i in enumerate(idx) if i < 0]
                       for n, idx in self.index.items() if idx is not None}

    @property
    def last_filled(self) -> Dict[str, int]:
        """Non-finite pixels set to 0 in the last call, per modality (``nan='fill'``)."""
        return {k: n.last_filled for k, n in self.norms.items()}

    def _one(self, name: str, x: torch.Tensor) -> torch.Tensor:
        idx = self.index[name]
        norm = self.norms[name]
        if idx is None:
            return norm(x)
        src = self.source_bands[name]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != len(src):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidInputError(f'{name}: {len(src)} source band names {list(src)} for an input of shape {shape}; '
                                    f'give one name per channel, in channel order')
        keep = [max(i, 0) for i in idx]
        out = norm(x[:, keep])
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
        unknown = [k for k in x if k not in self.norms]
        if unknown:
            raise InvalidInputError(f'unknown modality keys {unknown}; expected {list(self.spec.modality_names)}')
        return {k: self._one(k, v) if v is not None else None for k, v in x.items()}

    def conditions(self, **raw: Any) -> Dict[str, torch.Tensor]:
        """Normalise raw conditioning values (``context=...``) as the spec says; returns the keyword arguments."""
        unknown = [k for k in raw if k not in self.cond_norms]
        if unknown:
            raise InvalidInputError(f'unknown conditioning inputs {unknown}; the model takes {list(self.cond_norms)}')
        return {k: self.cond_norms[k](v) for k, v in raw.items()}


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
        allow_unnormalised: bool = False,
        nan: str = 'error',
) -> Preprocess:
    """The preprocessing the model's weights were trained with.

    Args:
        model_or_spec: a model built by ``create_model`` or an :class:`InputSpec`.
        source_bands: band names of the data's channels, one per channel in channel order (per modality for dict
            inputs); channels are then selected and reordered by name. ``None``: the data is already in the model's
            band order.
        missing_bands: ``error`` (default) or ``zeros`` (fill bands the data lacks with 0 after normalisation).
        allow_unnormalised: accept a spec that states no normalisation (values pass unchanged).
        nan: ``error`` or ``fill`` (see the module docstring).

    Raises:
        NormalisationError: the spec states no normalisation and ``allow_unnormalised`` is False.
        UnknownBandError: unknown, duplicate or missing band names.
    """
    return Preprocess(spec_of(model_or_spec), source_bands, missing_bands, allow_unnormalised, nan)


def example_call(
        model_or_spec: Any,
        batch_size: int = 1,
        image_size: Optional[Union[int, Sequence[int]]] = None,
        seed: int = 0,
        device: Optional[torch.device] = None,
) -> Tuple[Union[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, Any]]:
    """A complete valid call ``(x, kwargs)``: ``model(x, **kwargs)`` runs.

    ``x`` is already normalised random data of the right modalities, channels and size; ``kwargs`` holds the
    conditioning inputs the spec declares (call arguments keep their defaults), so generic code (benchmarks,
    probes, tests) can call any model.
    """
    return spec_of(model_or_spec).example_call(batch_size, image_size, seed, device)


def example_input(
        model_or_spec: Any,
        batch_size: int = 1,
        image_size: Optional[Union[int, Sequence[int]]] = None,
        seed: int = 0,
        device: Optional[torch.device] = None,
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """The image part of :func:`example_call` (``model(example_input(model))`` runs for models without conditions)."""
    return example_call(model_or_spec, batch_size, image_size, seed, device)[0]


class SpatialTransform(nn.Module):
    """Resize / crop every modality of a batch to its target size with one window per sample (co-registered).

    Eval (timm's rule): resize the short side to ``size / crop_pct``, centre-crop ``size``. Training: a random
    window of ``scale`` x the area and aspect ``ratio``, resized to ``size``, then random horizontal and vertical
    flips (overhead imagery has no "up"). The window is drawn in relative coordinates once per sample and applied
    to every modality at its own resolution. Categorical modalities (class maps) are resampled nearest-neighbour.
    """

    def __init__(
            self,
            sizes: Mapping[str, Tuple[int, int]],
            categorical: Sequence[str] = (),
            is_training: bool = False,
            crop_pct: float = 1.0,
            scale: Tuple[float, float] = (0.08, 1.0),
            ratio: Tuple[float, float] = (3 / 4, 4 / 3),
            hflip: float = 0.5,
            vflip: float = 0.5,
            interpolation: str = 'bilinear',
    ):
        super().__init__()
        if not 0 < crop_pct <= 1:
            raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
        if interpolation not in ('bilinear', 'bicubic', 'nearest', 'area'):
            raise ValueError(f'interpolation must be bilinear, bicubic, nearest or area, got {interpolation!r}')
        self.sizes = {k: tuple(v) for k, v in sizes.items()}
        self.categorical = set(categorical)
        self.is_training = is_training
        self.crop_pct, self.scale, self.ratio = crop_pct, scale, ratio
        self.hflip, self.vflip, self.interpolation = hflip, vflip, interpolation

    def _window(self, h: int, w: int, out: Tuple[int, int], generator: Optional[torch.Generator]):
        """(top, left, height, width) as fractions of the image, and the flips."""
        if not self.is_training:
            # resize so the target is crop_pct of the short side (aspect kept), then take the centre
            th, tw = out
            s = max(th / h, tw / w) / self.crop_pct
            ch, cw = min(1.0, th / (h * s)), min(1.0, tw / (w * s))
            return (1 - ch) / 2, (1 - cw) / 2, ch, cw, False, False
        u = lambda: float(torch.rand((), generator=generator))  # noqa: E731
        for _ in range(10):  # torchvision's RandomResizedCrop rule, in fractions
            area = self.scale[0] + (self.scale[1] - self.scale[0]) * u()
            logr = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u()
            r = math.exp(logr) * (h / w)  # aspect of the window in pixels -> in fractions
            ch, cw = math.sqrt(area / r), math.sqrt(area * r)
            if ch <= 1 and cw <= 1:
                return u() * (1 - ch), u() * (1 - cw), ch, cw, u() < self.hflip, u() < self.vflip
        return 0.0, 0.0, 1.0, 1.0, u() < self.hflip, u() < self.vflip

    def _apply(self, name: str, x: torch.Tensor, win) -> torch.Tensor:
        top, left, ch, cw, hf, vf = win
        h, w = x.shape[-2:]
        y0, x0 = int(round(top * h)), int(round(left * w))
        y1, x1 = max(y0 + 1, int(round((top + ch) * h))), max(x0 + 1, int(round((left + cw) * w)))
        x = x[..., y0:y1, x0:x1]
        size = self.sizes[name]
        if tuple(x.shape[-2:]) != size:
            mode = 'nearest' if name in self.categorical else self.interpolation
            dtype = x.dtype
            x = F.interpolate(x.float(), size=size, mode=mode,
                              **({} if mode in ('nearest', 'area') else dict(align_corners=False, antialias=True)))
            x = x.to(dtype) if not dtype.is_floating_point else x
        if hf:
            x = x.flip(-1)
        if vf:
            x = x.flip(-2)
        return x

    def forward(self, x: Union[torch.Tensor, Mapping[str, torch.Tensor]],
                generator: Optional[torch.Generator] = None):
        single = not isinstance(x, Mapping)
        batch = {next(iter(self.sizes)): x} if single else {k: v for k, v in x.items() if v is not None}
        unknown = [k for k in batch if k not in self.sizes]
        if unknown:
            raise InvalidInputError(f'unknown modality keys {unknown}; expected {list(self.sizes)}')
        ref = next(iter(batch.values()))
        if ref.ndim != 4:
            raise InvalidInputError(f'expected (B, C, H, W) tensors, got shape {tuple(ref.shape)}')
        h, w = ref.shape[-2:]
        out: Dict[str, List[torch.Tensor]] = {k: [] for k in batch}
        for i in range(ref.shape[0]):
            win = self._window(h, w, self.sizes[next(iter(batch))], generator)
            for k, v in batch.items():
                out[k].append(self._apply(k, v[i:i + 1], win))
        res = {k: torch.cat(v) for k, v in out.items()}
        if single:
            return next(iter(res.values()))
        return {k: res.get(k) for k in x}


class Transform(nn.Module):
    """Band selection + normalisation (:class:`Preprocess`), then :class:`SpatialTransform`."""

    def __init__(self, preprocess: Preprocess, spatial: SpatialTransform):
        super().__init__()
        self.preprocess, self.spatial = preprocess, spatial

    def forward(self, x, generator: Optional[torch.Generator] = None):
        # normalise at the native resolution (the NaN rule counts real pixels), then resample
        return self.spatial(self.preprocess(x), generator=generator)


def create_transform(
        model_or_spec: Any,
        is_training: bool = False,
        image_size: Optional[Union[int, Sequence[int]]] = None,
        source_bands: Optional[Union[Sequence[str], Mapping[str, Sequence[str]]]] = None,
        crop_pct: float = 1.0,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.5,
        interpolation: str = 'bilinear',
        missing_bands: str = 'error',
        allow_unnormalised: bool = False,
        nan: str = 'error',
) -> Transform:
    """timm's ``create_transform`` for batched EO tensors, driven by the input spec.

    Bands are selected by name and normalised as the weights were trained (:func:`for_model`), then every
    modality is brought to its spec size (``image_size`` overrides it for all modalities; it must satisfy the
    model's size rules). Returns a module: ``transform(x)`` for a (B, C, H, W) tensor or a modality dict;
    ``transform(x, generator=g)`` makes the training augmentation reproducible.
    """
    spec = spec_of(model_or_spec)
    sizes = {}
    for m in spec.modalities:
        if image_size is None:
            size = tuple(m.image_size)
        else:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            mult = m.size_multiple or 1
            if m.fixed_size and size != tuple(m.image_size):
                raise InvalidInputError(f'{m.name}: this model takes exactly {tuple(m.image_size)} px, '
                                        f'image_size={size} was given')
            if any(v % mult for v in size):
                raise InvalidInputError(f'{m.name}: image_size must be a multiple of {mult}, got {size}')
        sizes[m.name] = size
    categorical = [m.name for m in spec.modalities if _kind(m.sensor) == 'categorical']
    return Transform(Preprocess(spec, source_bands, missing_bands, allow_unnormalised, nan),
                     SpatialTransform(sizes, categorical, is_training, crop_pct, scale, ratio, hflip, vflip,
                                      interpolation))


def _kind(sensor: str) -> Optional[str]:
    try:
        return get_sensor(sensor).kind
    except UnknownBandError:  # 'any' / 'unknown' sensors are not in the catalogue
        return None
