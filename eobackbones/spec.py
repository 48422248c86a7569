"""The input contract: which modalities, bands, wavelengths, units, sizes and extra inputs a model expects.

An :class:`InputSpec` is plain data (it round-trips through JSON / YAML) and it is also the one place where inputs
are checked: :meth:`InputSpec.check` / :meth:`InputSpec.split` validate a tensor or a modality dict (keys, channels,
sizes, dtype, finite values) with one-line errors, and apply the model's missing-modality policy.

Normalisation is a list of steps applied in order, each a dict with an ``op`` key:

=========================  =========================================================================
``{op: clip, min, max}``   clamp values
``{op: add, value}``       add a constant (e.g. shift clipped dB to be non-negative)
``{op: scale, factor}``    multiply by a constant
``{op: per_sample_max,     divide every channel of every sample by its own maximum (+ eps)
eps}``
``{op: meanstd, mean,      per-band standardisation; ``mean`` / ``std`` are aligned with ``bands``
std}``
``{op: minmax, min, max,   map [min, max] linearly to [lo, hi] (scalars or per-band lists)
out: [lo, hi]}``
=========================  =========================================================================

``unit`` names the value domain the first step expects (``reflectance_1e4``, ``dB``, ``uint8`` ...).
When no published mapping from a sensor's physical values to the unit the weights saw exists, the
spec says so in ``notes`` and ``unit`` names that domain; nothing converts between units silently.

Besides images a spec declares non-image inputs: conditioning vectors (:class:`ConditionSpec`, passed as keyword
arguments, e.g. ``context=`` of a conditional diffusion model, with their own normalisation) and call arguments
with defaults (:class:`CallArg`, e.g. ``timestep=1``), so generic code (``example_call``, transforms, the probe, the
benchmark) can build and pass them without knowing the family.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import InvalidInputError, ManifestError, MissingModalityError

__all__ = [
    'ModalitySpec', 'ConditionSpec', 'CallArg', 'InputSpec', 'NORM_OPS', 'MISSING_POLICIES', 'validate_norm_step',
    'check_image',
]

# op -> (required keys, optional keys)
NORM_OPS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    'clip': (('min', 'max'), ()),
    'add': (('value',), ()),
    'scale': (('factor',), ()),
    'per_sample_max': ((), ('eps',)),
    'meanstd': (('mean', 'std'), ()),
    'minmax': (('min', 'max'), ('out',)),
}
_PER_BAND_KEYS = ('mean', 'std', 'min', 'max', 'value', 'factor')
MISSING_POLICIES = ('error', 'zeros', 'subset')
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_norm_step(step: Dict[str, Any], num_bands: int, where: str = '') -> None:
    if not isinstance(step, dict) or 'op' not in step:
        raise ManifestError(f'{where}normalisation step must be a mapping with an "op" key, got {step!r}')
    op = step['op']
    if op not in NORM_OPS:
        raise ManifestError(f'{where}unknown normalisation op {op!r}; known: {", ".join(NORM_OPS)}')
    req, opt = NORM_OPS[op]
    missing = [k for k in req if k not in step]
    extra = [k for k in step if k not in req + opt + ('op',)]
    if missing or extra:
        raise ManifestError(f'{where}op {op!r} needs keys {list(req)} (optional {list(opt)}); missing {missing}, unknown {extra}')
    for k in _PER_BAND_KEYS:
        v = step.get(k)
        if isinstance(v, (list, tuple)) and len(v) != num_bands:
            raise ManifestError(f'{where}op {op!r} key {k!r} has {len(v)} values for {num_bands} bands')
    if op == 'meanstd' and any(s <= 0 for s in _as_list(step['std'])):
        raise ManifestError(f'{where}meanstd std must be positive, got {step["std"]}')


def _check_keys(cls: type, d: Mapping[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ManifestError(f'{what} has unknown keys {sorted(unknown)}; allowed: {sorted(known)}')


def _as_list(v: Any) -> List[float]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _size2(v: Any) -> Optional[Tuple[int, int]]:
    if v is None:
        return None
    t = (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(s) for s in v)
    if len(t) != 2 or min(t) < 1:
        raise ManifestError(f'image_size must be (H, W) of positive integers, got {v!r}')
    return t


def check_image(
        x: Any,
        what: str,
        in_chans: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        size: Optional[Tuple[int, int]] = None,
        size_multiple: int = 1,
        require_finite: bool = True,
        bands: Optional[Sequence[str]] = None,
) -> None:
    """Validate one image batch ``(B, C, H, W)``; raises :class:`InvalidInputError` with one line.

    Args:
        x: the tensor.
        what: how to name it in messages (``modality 's2'``).
        in_chans: required channel count (None: any).
        dtype: the model's compute dtype: a different float dtype is refused unless autocast is on.
        size: required (H, W) (fixed-size models).
        size_multiple: H and W must be multiples of it.
        require_finite: refuse NaN / inf values.
        bands: band names, only to make the channel message helpful.
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f'{what}: expected a (B, C, H, W) tensor, got {type(x).__name__}')
    if x.ndim != 4:
        raise InvalidInputError(f'{what}: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}')
    if not x.is_floating_point():
        raise InvalidInputError(
            f'{what}: expected a floating-point tensor, got {x.dtype} (raw digital numbers?); normalise it first with '
            f'eobackbones.transforms.for_model(model)')
    if dtype is not None and x.dtype != dtype and not (
            torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64):
        raise InvalidInputError(
            f'{what}: input dtype {x.dtype} does not match the model\'s {dtype}; cast the input (x.to({dtype})) or run '
            f'under torch.autocast / eobackbones.optimize_for_inference')
    b, c, h, w = x.shape
    if b == 0:
        raise InvalidInputError(f'{what}: empty batch (shape {tuple(x.shape)}); pass at least one sample')
    if h == 0 or w == 0:
        raise InvalidInputError(f'{what}: empty image (shape {tuple(x.shape)})')
    if in_chans is not None and c != in_chans:
        names = f' {list(bands)}' if bands is not None and len(bands) <= 16 else ''
        raise InvalidInputError(f'{what}: expected {in_chans} channels{names}, got {c} (shape {tuple(x.shape)})')
    if size is not None and (h, w) != tuple(size):
        raise InvalidInputError(f'{what}: expected {size[0]}x{size[1]} inputs (the model is built for this size), '
                                f'got {h}x{w}')
    if size is None and size_multiple > 1 and (h % size_multiple or w % size_multiple):
        raise InvalidInputError(f'{what}: height and width must be multiples of {size_multiple}, got {h}x{w}')
    if require_finite and not x.is_meta and not _compiling() and not _all_finite(x):
        n = int((~torch.isfinite(x)).sum())
        raise InvalidInputError(f'{what}: {n} non-finite values (NaN / inf) in the input; mask or fill them before the '
                                f'model (see transforms.for_model(..., nan="fill"))')


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN / inf in ``x``. One float32 sum (NaN / inf anywhere make it non-finite) instead of an elementwise
    ``isfinite`` pass: ~18x cheaper, 5 % of DOFA-base's bf16 forward on CPU otherwise; only a sum that overflows on
    finite values takes the exact check."""
    if not x.is_floating_point():
        return True
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality of the input looks like.

    Args:
        name: key of the modality in a dict input (``s1``, ``s2``) and in the specs.
        sensor: key in the sensor catalogue (``sentinel2``), or ``any`` for wavelength-conditioned models.
        bands: ordered band names; channel ``i`` of the tensor is ``bands[i]`` (the default bands when ``any_bands``).
        wavelengths_um: centre wavelengths in micrometres, aligned with ``bands`` (None when meaningless).
        unit: the value domain the first normalisation step expects.
        normalization: steps applied in order (see module docstring).
        processing_level: ``L1C`` / ``L2A`` / ``GRD`` ... when the weights were trained on one level.
        gsd_m: ground sampling distance of the training data in metres.
        notes: free text, e.g. where a unit mapping is unknown.
        image_size: native (H, W) of this modality (None: the spec's ``image_size``).
        size_multiple: H and W must be multiples of this (the patch size of ViTs; 1 for CNNs). None: the spec's.
        fixed_size: H and W must equal ``image_size`` (e.g. Swin with a fixed window grid). None: the spec's.
        any_bands: the bands are free (wavelength-conditioned models): any band set given its wavelengths.
        band_stats: per-band normalisation statistics of the weights for bands beyond ``bands``
            (``{qualified band: {mean, std, unit}}``), used when a wavelength-conditioned model is bound to other bands.
    """
    name: str
    sensor: str
    bands: Tuple[str, ...]
    wavelengths_um: Optional[Tuple[float, ...]] = None
    unit: str = 'unknown'
    normalization: Tuple[Dict[str, Any], ...] = ()
    processing_level: Optional[str] = None
    gsd_m: Optional[float] = None
    notes: str = ''
    image_size: Optional[Tuple[int, int]] = None
    size_multiple: Optional[int] = None
    fixed_size: Optional[bool] = None
    any_bands: Optional[bool] = None
    band_stats: Optional[Dict[str, Dict[str, Any]]] = None

    def __post_init__(self):
        object.__setattr__(self, 'bands', tuple(self.bands))
        if self.wavelengths_um is not None:
            object.__setattr__(self, 'wavelengths_um', tuple(float(w) for w in self.wavelengths_um))
        object.__setattr__(self, 'normalization', tuple(dict(s) for s in self.normalization))
        object.__setattr__(self, 'image_size', _size2(self.image_size))
        if self.band_stats is not None:
            object.__setattr__(self, 'band_stats', {str(k): dict(v) for k, v in self.band_stats.items()})
        where = f'modality {self.name!r}: '
        if not self.bands:
            raise ManifestError(f'{where}needs at least one band')
        if len(set(self.bands)) != len(self.bands):
            raise ManifestError(f'{where}duplicate band names in {list(self.bands)}')
        if self.wavelengths_um is not None and len(self.wavelengths_um) != len(self.bands):
            raise ManifestError(f'{where}{len(self.wavelengths_um)} wavelengths for {len(self.bands)} bands')
        if self.size_multiple is not None and int(self.size_multiple) < 1:
            raise ManifestError(f'{where}size_multiple must be >= 1, got {self.size_multiple}')
        for step in self.normalization:
            validate_norm_step(step, len(self.bands), where)
        for b, s in (self.band_stats or {}).items():
            if not {'mean', 'std'} <= set(s) or set(s) - {'mean', 'std', 'unit'}:
                raise ManifestError(f'{where}band_stats[{b!r}] needs mean and std (optional unit), got {sorted(s)}')
        if not self.normalization and self.band_stats and all(self.qualified(b) in self.band_stats for b in self.bands):
            # a spec stated by its statistics table: the default bands' meanstd step comes from it
            derived = self.with_bands(self.bands)
            object.__setattr__(self, 'normalization', derived.normalization)
            object.__setattr__(self, 'unit', derived.unit)

    @property
    def in_chans(self) -> int:
        return len(self.bands)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['bands'] = list(self.bands)
        d['wavelengths_um'] = list(self.wavelengths_um) if self.wavelengths_um is not None else None
        d['normalization'] = [dict(s) for s in self.normalization]
        d['image_size'] = list(self.image_size) if self.image_size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'ModalitySpec':
        _check_keys(cls, d, 'modality spec')
        return cls(**d)

    def qualified(self, band: str) -> str:
        """``sensor:band`` (band names are unique only within their sensor)."""
        return band if ':' in band or self.sensor in ('any', 'unknown', '') else f'{self.sensor}:{band}'

    def with_bands(
            self,
            bands: Sequence[str],
            wavelengths_um: Optional[Sequence[float]] = None,
            qualified: Optional[Sequence[str]] = None,
    ) -> 'ModalitySpec':
        """This modality with another band list (selected, reordered or new bands).

        Bands are matched by qualified name (``sentinel2:B04``; ``qualified`` gives them for ``bands``, default:
        within this modality's sensor), never by position or plain name. Per-band normalisation values follow
        their band; a band this spec does not list takes its statistics from ``band_stats``. When any band has no
        known value for a per-band step, the normalisation cannot be stated: the result has no normalisation,
        unit ``unknown`` and a note naming the bands (nothing is invented).
        """
        bands = tuple(bands)
        qualified = tuple(qualified) if qualified is not None else tuple(self.qualified(b) for b in bands)
        old = {self.qualified(b): i for i, b in enumerate(self.bands)}
        stats = self.band_stats or {}
        norm: List[Dict[str, Any]] = []
        unknown: List[str] = []
        units = set()
        steps = self.normalization or ((({'op': 'meanstd', 'mean': [None] * self.in_chans,
                                          'std': [None] * self.in_chans},) if stats else ()))
        for step in steps:
            new = dict(step)
            for k in _PER_BAND_KEYS:
                v = step.get(k)
                if not isinstance(v, (list, tuple)):
                    continue
                vals = []
                for q in qualified:
                    if q in old and v[old[q]] is not None:
                        vals.append(v[old[q]])
                        if self.unit != 'unknown':
                            units.add(self.unit)
                    elif step['op'] == 'meanstd' and k in ('mean', 'std') and q in stats:
                        vals.append(float(stats[q][k]))
                        units.add(stats[q].get('unit', self.unit))
                    else:
                        vals.append(None)
                        if q not in unknown:
                            unknown.append(q)
                new[k] = vals
            norm.append(new)
        unit, notes = '+'.join(sorted(units)) or self.unit, self.notes
        if unknown:
            norm, unit = [], 'unknown'
            notes = (f'no normalisation statistics of these weights for {", ".join(unknown)}, so no normalisation '
                     f'step; normalise the data yourself (e.g. dataset z-score)')
        return dataclasses.replace(
            self, bands=bands, normalization=tuple(norm), unit=unit, notes=notes,
            wavelengths_um=tuple(wavelengths_um) if wavelengths_um is not None else (
                tuple(self.wavelengths_um[old[q]] for q in qualified)
                if self.wavelengths_um is not None and all(q in old for q in qualified) else None))


@dataclass(frozen=True)
class ConditionSpec:
    """A non-image input passed as a keyword argument: a vector of ``len(features)`` values per sample.

    Args:
        name: keyword argument of ``forward`` (``context``).
        features: one name per value, in order (``climate_zone``, ``era5_t2m`` ...).
        unit: the raw values' unit(s), in words.
        normalization: steps applied in order to the raw values (ops as for images; per-feature lists).
        required: calling without it is an error (else the model has a documented default).
        notes: free text (sources, value ranges).
    """
    name: str
    features: Tuple[str, ...]
    unit: str = 'unknown'
    normalization: Tuple[Dict[str, Any], ...] = ()
    required: bool = True
    notes: str = ''

    def __post_init__(self):
        object.__setattr__(self, 'features', tuple(self.features))
        object.__setattr__(self, 'normalization', tuple(dict(s) for s in self.normalization))
        where = f'condition {self.name!r}: '
        if not self.features:
            raise ManifestError(f'{where}needs at least one feature')
        for step in self.normalization:
            validate_norm_step(step, len(self.features), where)
            if step['op'] == 'per_sample_max':
                raise ManifestError(f'{where}per_sample_max is for images only')

    @property
    def size(self) -> int:
        return len(self.features)

    def to_dict(self) -> Dict[str, Any]:
        return dict(name=self.name, features=list(self.features), unit=self.unit,
                    normalization=[dict(s) for s in self.normalization], required=self.required, notes=self.notes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'ConditionSpec':
        _check_keys(cls, d, 'condition spec')
        return cls(**d)

    def check(self, v: Any, batch: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Validate ``(B, len(features))`` values; returns them unchanged."""
        want = f'(B, {self.size}) values [{", ".join(self.features)}]'
        if not isinstance(v, torch.Tensor):
            raise InvalidInputError(f'{self.name}: expected a tensor of {want}, got {type(v).__name__}')
        if v.ndim != 2 or v.shape[1] != self.size:
            raise InvalidInputError(f'{self.name}: expected {want}, got shape {tuple(v.shape)}')
        if not v.is_floating_point():
            raise InvalidInputError(f'{self.name}: expected floating-point values, got {v.dtype}; normalise them with '
                                    f'eobackbones.transforms.for_model(model).conditions(...)')
        if batch is not None and v.shape[0] != batch:
            raise InvalidInputError(f'{self.name}: {v.shape[0]} rows for a batch of {batch} images')
        if not v.is_meta and not _compiling() and not _all_finite(v):
            raise InvalidInputError(f'{self.name}: non-finite values (NaN / inf)')
        return v


@dataclass(frozen=True)
class CallArg:
    """A keyword argument of ``forward`` with a default (e.g. a diffusion ``timestep``)."""
    name: str
    default: Any = None
    description: str = ''

    def to_dict(self) -> Dict[str, Any]:
        return dict(name=self.name, default=self.default, description=self.description)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'CallArg':
        _check_keys(cls, d, 'call argument')
        return cls(**d)


@dataclass(frozen=True)
class InputSpec:
    """The full input contract of a model (or of one set of weights).

    Args:
        modalities: one entry per modality, in the order the model consumes them.
        image_size: default native (H, W) of every modality that does not state its own.
        input_format: ``tensor`` (single modality, ``(B, C, H, W)``) or ``dict`` (``{name: tensor}``).
        any_bands: default of the modalities' ``any_bands``.
        size_multiple: default of the modalities' ``size_multiple``.
        fixed_size: default of the modalities' ``fixed_size``.
        missing_modality: what the model does when a modality of a dict input is absent: ``error`` (names it),
            ``zeros`` (late fusion: the absent encoder is skipped, its features are zeros at fixed width) or
            ``subset`` (the architecture takes any non-empty subset).
        same_size: every modality of a dict input must have the same H, W.
        conditions: non-image inputs passed as keyword arguments.
        call_args: keyword arguments of ``forward`` with defaults.
    """
    modalities: Tuple[ModalitySpec, ...]
    image_size: Tuple[int, int] = (224, 224)
    input_format: str = 'tensor'
    any_bands: bool = False
    size_multiple: int = 1
    fixed_size: bool = False
    missing_modality: str = 'error'
    same_size: bool = True
    conditions: Tuple[ConditionSpec, ...] = ()
    call_args: Tuple[CallArg, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, 'image_size', _size2(self.image_size))
        mods = []
        for m in self.modalities:
            m = m if isinstance(m, ModalitySpec) else ModalitySpec.from_dict(m)
            # per-modality values default to the spec-wide ones
            mods.append(dataclasses.replace(
                m, image_size=m.image_size or self.image_size,
                size_multiple=int(m.size_multiple if m.size_multiple is not None else self.size_multiple),
                fixed_size=bool(m.fixed_size if m.fixed_size is not None else self.fixed_size),
                any_bands=bool(m.any_bands if m.any_bands is not None else self.any_bands)))
        object.__setattr__(self, 'modalities', tuple(mods))
        object.__setattr__(self, 'conditions', tuple(
            c if isinstance(c, ConditionSpec) else ConditionSpec.from_dict(c) for c in self.conditions))
        object.__setattr__(self, 'call_args', tuple(
            a if isinstance(a, CallArg) else CallArg.from_dict(a) for a in self.call_args))
        if not self.modalities:
            raise ManifestError('input spec needs at least one modality')
        if self.input_format not in ('tensor', 'dict'):
            raise ManifestError(f'input_format must be "tensor" or "dict", got {self.input_format!r}')
        if self.input_format == 'tensor' and len(self.modalities) != 1:
            raise ManifestError(f'a tensor input has one modality, got {len(self.modalities)}')
        if self.missing_modality not in MISSING_POLICIES:
            raise ManifestError(f'missing_modality must be one of {MISSING_POLICIES}, got {self.missing_modality!r}')
        names = [m.name for m in self.modalities] + [c.name for c in self.conditions] + [a.name for a in self.call_args]
        if len(set(names)) != len(names):
            raise ManifestError(f'duplicate modality / condition / argument names {names}')

    # ------------------------------------------------------------------ lookups
    @property
    def modality_names(self) -> Tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def modality(self, name: Optional[str] = None) -> ModalitySpec:
        if name is None:
            return self.modalities[0]
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f'no modality {name!r} in this spec; modalities: {list(self.modality_names)}')

    def condition(self, name: str) -> ConditionSpec:
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(f'no condition {name!r} in this spec; conditions: {[c.name for c in self.conditions]}')

    @property
    def sensors(self) -> Tuple[str, ...]:
        return tuple(m.sensor for m in self.modalities)

    @property
    def call_defaults(self) -> Dict[str, Any]:
        return {a.name: a.default for a in self.call_args}

    def replace_modality(self, name: str, **changes: Any) -> 'InputSpec':
        mods = tuple(dataclasses.replace(m, **changes) if m.name == name else m for m in self.modalities)
        return dataclasses.replace(self, modalities=mods)

    # ------------------------------------------------------------------ checks
    def split(
            self,
            x: Any,
            missing: Optional[str] = None,
            dtype: Optional[torch.dtype] = None,
            check: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Validate an input and return ``{modality: tensor}`` for the modalities present.

        Args:
            x: a tensor (single-modality specs) or a dict keyed by modality name (``None`` values count as absent).
            missing: the missing-modality policy to apply (default: the spec's ``missing_modality``). ``error``
                refuses an absent modality; ``zeros`` / ``subset`` accept any non-empty subset (the model decides
                what absent means).
            dtype: the model's compute dtype (see :func:`check_image`).
            check: validate channels, sizes, dtype and finiteness of every present modality.

        Raises:
            InvalidInputError / MissingModalityError: one line naming what was expected and what was given.
        """
        missing = missing or self.missing_modality
        if self.input_format == 'tensor':
            m = self.modalities[0]
            if isinstance(x, Mapping):
                if set(x) != {m.name}:
                    raise InvalidInputError(f'expected a (B, C, H, W) tensor (or {{{m.name!r}: tensor}}), got a dict '
                                            f'with keys {list(x)}')
                x = x[m.name]
            present = {m.name: x}
        else:
            if not isinstance(x, Mapping):
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise InvalidInputError(f'expected a dict keyed by {list(self.modality_names)}, got {shape}')
            unknown = [k for k in x if k not in self.modality_names]
            if unknown:
                raise InvalidInputError(f'unknown modality keys {unknown}; expected {list(self.modality_names)}')
            present = {m.name: x[m.name] for m in self.modalities if x.get(m.name) is not None}
            absent = [m for m in self.modality_names if m not in present]
            if not present:
                raise MissingModalityError(f'no modality given: expected a non-empty subset of {list(self.modality_names)}')
            if absent and missing == 'error':
                hint = ('; build the model with missing="zeros" where it supports it' if self.missing_modality == 'error'
                        else f' (this model takes missing={self.missing_modality!r})')
                raise MissingModalityError(
                    f'missing modality {", ".join(repr(m) for m in absent)}: expected {list(self.modality_names)}, '
                    f'got {list(present)}{hint}')
        if check:
            sizes = {}
            for name, t in present.items():
                m = self.modality(name)
                check_image(t, f'modality {name!r}' if self.input_format == 'dict' else 'input',
                            in_chans=None if m.any_bands else m.in_chans, dtype=dtype,
                            size=m.image_size if m.fixed_size else None, size_multiple=m.size_multiple,
                            bands=m.bands)
                sizes[name] = tuple(t.shape[-2:])
            batches = {n: t.shape[0] for n, t in present.items()}
            if len(set(batches.values())) > 1:
                raise InvalidInputError(f'modalities have different batch sizes: {batches}')
            if self.same_size and len(set(sizes.values())) > 1:
                raise InvalidInputError(f'modalities must have the same height and width, got {sizes}')
        return present

    def check(self, x: Any, dtype: Optional[torch.dtype] = None, **kwargs: Any) -> Dict[str, Any]:
        """Validate a whole call ``model(x, **kwargs)``: images (see :meth:`split`) and conditioning inputs.

        Returns the keyword arguments with every declared call argument filled with its default.
        Unknown keyword arguments are refused (one line listing the known ones).
        """
        present = self.split(x, dtype=dtype)
        batch = next(iter(present.values())).shape[0]
        known = {c.name for c in self.conditions} | {a.name for a in self.call_args}
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            raise InvalidInputError(f'unknown keyword arguments {unknown}; this model takes {sorted(known) or "none"}')
        out = dict(self.call_defaults)
        out.update({k: v for k, v in kwargs.items() if v is not None})
        for c in self.conditions:
            v = kwargs.get(c.name)
            if v is None:
                if c.required:
                    raise MissingModalityError(
                        f'missing conditioning input {c.name!r}: expected (B, {c.size}) values '
                        f'[{", ".join(c.features)}]')
                continue
            out[c.name] = c.check(v, batch=batch)
        return out

    # ------------------------------------------------------------------ examples
    def example_call(
            self,
            batch_size: int = 1,
            image_size: Optional[Union[int, Sequence[int]]] = None,
            seed: int = 0,
            device: Optional[Union[str, torch.device]] = None,
    ) -> Tuple[Union[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """A valid, already-normalised random call ``(x, kwargs)``: right modalities, channels, sizes, conditions."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for m in self.modalities:
            if image_size is None:
                h, w = m.image_size
            elif isinstance(image_size, int):
                h = w = image_size
            else:
                h, w = image_size
            out[m.name] = torch.randn(batch_size, m.in_chans, h, w, generator=g).to(device or 'cpu')
        kwargs = {c.name: (torch.rand(batch_size, c.size, generator=g) * 2 - 1).to(device or 'cpu')
                  for c in self.conditions}
        x = out if self.input_format == 'dict' else out[self.modalities[0].name]
        return x, kwargs

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        d = dict(
            modalities=[m.to_dict() for m in self.modalities], image_size=list(self.image_size),
            input_format=self.input_format, any_bands=self.any_bands, size_multiple=self.size_multiple,
            fixed_size=self.fixed_size, missing_modality=self.missing_modality)
        if not self.same_size:
            d['same_size'] = False
        if self.conditions:
            d['conditions'] = [c.to_dict() for c in self.conditions]
        if self.call_args:
            d['call_args'] = [a.to_dict() for a in self.call_args]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'InputSpec':
        _check_keys(cls, d, 'input spec')
        d = dict(d)
        d['modalities'] = tuple(ModalitySpec.from_dict(m) for m in d.get('modalities', ()))
        d['conditions'] = tuple(ConditionSpec.from_dict(c) for c in d.get('conditions', ()))
        d['call_args'] = tuple(CallArg.from_dict(a) for a in d.get('call_args', ()))
        return cls(**d)

