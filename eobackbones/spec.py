"""The input contract: which modalities, bands, wavelengths, units and normalisation a model expects.

An :class:`InputSpec` is plain data (it round-trips through JSON / YAML). Normalisation is a list of
steps applied in order, each a dict with an ``op`` key:

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
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ManifestError

__all__ = ['ModalitySpec', 'InputSpec', 'NORM_OPS', 'validate_norm_step']

# op -> (required keys, optional keys)
NORM_OPS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    'clip': (('min', 'max'), ()),
    'add': (('value',), ()),
    'scale': (('factor',), ()),
    'per_sample_max': ((), ('eps',)),
    'meanstd': (('mean', 'std'), ()),
    'minmax': (('min', 'max'), ('out',)),
}


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
    for k in ('mean', 'std', 'min', 'max'):
        v = step.get(k)
        if isinstance(v, (list, tuple)) and len(v) != num_bands:
            raise ManifestError(f'{where}op {op!r} key {k!r} has {len(v)} values for {num_bands} bands')
    if op == 'meanstd' and any(s <= 0 for s in _as_list(step['std'])):
        raise ManifestError(f'{where}meanstd std must be positive, got {step["std"]}')


def _check_keys(cls: type, d: Dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ManifestError(f'{what} has unknown keys {sorted(unknown)}; allowed: {sorted(known)}')


def _as_list(v: Any) -> List[float]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality of the input looks like.

    Args:
        name: key of the modality in a dict input (``s1``, ``s2``) and in the specs.
        sensor: key in the sensor catalogue (``sentinel2``), or ``any`` for wavelength-conditioned models.
        bands: ordered band names; channel ``i`` of the tensor is ``bands[i]``.
        wavelengths_um: centre wavelengths in micrometres, aligned with ``bands`` (None when meaningless).
        unit: the value domain the first normalisation step expects.
        normalization: steps applied in order (see module docstring).
        processing_level: ``L1C`` / ``L2A`` / ``GRD`` ... when the weights were trained on one level.
        gsd_m: ground sampling distance of the training data in metres.
        notes: free text, e.g. where a unit mapping is unknown.
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

    def __post_init__(self):
        object.__setattr__(self, 'bands', tuple(self.bands))
        if self.wavelengths_um is not None:
            object.__setattr__(self, 'wavelengths_um', tuple(float(w) for w in self.wavelengths_um))
        object.__setattr__(self, 'normalization', tuple(dict(s) for s in self.normalization))
        where = f'modality {self.name!r}: '
        if not self.bands:
            raise ManifestError(f'{where}needs at least one band')
        if len(set(self.bands)) != len(self.bands):
            raise ManifestError(f'{where}duplicate band names in {list(self.bands)}')
        if self.wavelengths_um is not None and len(self.wavelengths_um) != len(self.bands):
            raise ManifestError(f'{where}{len(self.wavelengths_um)} wavelengths for {len(self.bands)} bands')
        for step in self.normalization:
            validate_norm_step(step, len(self.bands), where)

    @property
    def in_chans(self) -> int:
        return len(self.bands)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['bands'] = list(self.bands)
        d['wavelengths_um'] = list(self.wavelengths_um) if self.wavelengths_um is not None else None
        d['normalization'] = [dict(s) for s in self.normalization]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'ModalitySpec':
        _check_keys(cls, d, 'modality spec')
        return cls(**d)


@dataclass(frozen=True)
class InputSpec:
    """The full input contract of a model (or of one set of weights).

    Args:
        modalities: one entry per modality, in the order the model consumes them.
        image_size: native (H, W) of the training crops.
        input_format: ``tensor`` (single modality, ``(B, C, H, W)``) or ``dict`` (``{name: tensor}``).
        any_bands: the model takes any band set given its wavelengths (DOFA); ``bands`` are then the default.
        size_multiple: H and W must be multiples of this (the patch size of ViTs; 1 for CNNs).
        fixed_size: H and W must equal ``image_size`` (e.g. Swin with a fixed window grid).
        missing_modality: ``error`` or the name of the documented policy the model applies.
    """
    modalities: Tuple[ModalitySpec, ...]
    image_size: Tuple[int, int] = (224, 224)
    input_format: str = 'tensor'
    any_bands: bool = False
    size_multiple: int = 1
    fixed_size: bool = False
    missing_modality: str = 'error'

    def __post_init__(self):
        object.__setattr__(self, 'modalities', tuple(
            m if isinstance(m, ModalitySpec) else ModalitySpec.from_dict(m) for m in self.modalities))
        object.__setattr__(self, 'image_size', tuple(int(s) for s in self.image_size))
        if not self.modalities:
            raise ManifestError('input spec needs at least one modality')
        if self.input_format not in ('tensor', 'dict'):
            raise ManifestError(f'input_format must be "tensor" or "dict", got {self.input_format!r}')
        if self.input_format == 'tensor' and len(self.modalities) != 1:
            raise ManifestError(f'a tensor input has one modality, got {len(self.modalities)}')
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ManifestError(f'duplicate modality names {names}')
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ManifestError(f'image_size must be (H, W), got {self.image_size}')

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

    @property
    def sensors(self) -> Tuple[str, ...]:
        return tuple(m.sensor for m in self.modalities)

    def replace_modality(self, name: str, **changes: Any) -> 'InputSpec':
        mods = tuple(dataclasses.replace(m, **changes) if m.name == name else m for m in self.modalities)
        return dataclasses.replace(self, modalities=mods)

    def to_dict(self) -> Dict[str, Any]:
        return dict(
            modalities=[m.to_dict() for m in self.modalities], image_size=list(self.image_size),
            input_format=self.input_format, any_bands=self.any_bands, size_multiple=self.size_multiple,
            fixed_size=self.fixed_size, missing_modality=self.missing_modality)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'InputSpec':
        _check_keys(cls, d, 'input spec')
        d = dict(d)
        d['modalities'] = tuple(ModalitySpec.from_dict(m) for m in d.get('modalities', ()))
        return cls(**d)
