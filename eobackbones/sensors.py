"""Sensor catalogue: canonical band names with centre wavelengths (micrometres) per sensor.

The numbers live in ``sensors.yaml`` beside this file; this module only reads and looks them up.
Unqualified band names are Sentinel-2 / Sentinel-1 names first (``B04``, ``B8A``, ``B11``, ``VV``: the
convention of most EO datasets); any other sensor's band is unqualified only when no other sensor has
that name, and otherwise is written ``sensor:band`` (``landsat8:B10``, ``enmap:B48``).
"""
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from .errors import UnknownBandError

__all__ = ['Band', 'Sensor', 'get_sensor', 'list_sensors', 'resolve_band', 'resolve_bands', 'band_wavelengths']


_PRIMARY = ('sentinel2', 'sentinel1')


@dataclass(frozen=True)
class Band:
    sensor: str
    name: str
    wavelength_um: float
    bandwidth_um: Optional[float] = None
    gsd_m: Optional[float] = None
    frequency_ghz: Optional[float] = None
    description: str = ''

    @property
    def qualified_name(self) -> str:
        return f'{self.sensor}:{self.name}'


@dataclass(frozen=True)
class Sensor:
    key: str
    title: str
    modality: str
    kind: str
    source: str
    bands: Dict[str, Band]
    default_subset: Tuple[str, ...] = ()

    @property
    def band_names(self) -> Tuple[str, ...]:
        return tuple(self.bands)


def _parse_sensor(key: str, raw: dict) -> Sensor:
    bands = {}
    if 'wavelength_table' in raw:
        # hyperspectral: bands B1..Bn from a plain table of centre wavelengths
        for i, wl in enumerate(raw['wavelength_table'], start=1):
            bands[f'B{i}'] = Band(key, f'B{i}', float(wl), None, raw.get('gsd_m'))
    for name, b in (raw.get('bands') or {}).items():
        bands[name] = Band(
            key, name, float(b['wavelength_um']), b.get('bandwidth_um'), b.get('gsd_m'),
            b.get('frequency_ghz'), b.get('description', ''))
    subset = ()
    if raw.get('default_subset'):
        subset = tuple(f'B{i}' for lo, hi in raw['default_subset'] for i in range(lo, hi + 1))
    return Sensor(key, raw['title'], raw['modality'], raw['kind'], raw.get('source', ''), bands, subset)


@lru_cache(maxsize=None)
def _catalogue() -> Dict[str, Sensor]:
    text = resources.files('eobackbones').joinpath('sensors.yaml').read_text(encoding='utf-8')
    return {k: _parse_sensor(k, v) for k, v in yaml.safe_load(text).items()}


def list_sensors() -> List[str]:
    return list(_catalogue())


def get_sensor(name: str) -> Sensor:
    cat = _catalogue()
    if name not in cat:
        raise UnknownBandError(f'unknown sensor {name!r}; known sensors: {", ".join(cat)}')
    return cat[name]


def resolve_band(name: str, sensor: Optional[str] = None) -> Band:
    """Look up one band by name (``B04``), qualified name (``sentinel2:B04``) or within ``sensor``."""
    if ':' in name:
        sensor, name = name.split(':', 1)
    cat = _catalogue()
    if sensor is not None:
        s = get_sensor(sensor)
        if name not in s.bands:
            raise UnknownBandError(f'sensor {sensor!r} has no band {name!r}; its bands: {", ".join(s.band_names[:20])}')
        return s.bands[name]
    for primary in _PRIMARY:
        if name in cat[primary].bands:
            return cat[primary].bands[name]
    hits = [s.bands[name] for s in cat.values() if name in s.bands]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        import difflib
        names = sorted({b for s in cat.values() for b in s.bands})
        close = difflib.get_close_matches(name, names, n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        raise UnknownBandError(f'unknown band name {name!r}{hint} (Sentinel-2 bands are B01..B12 and B8A, Sentinel-1 VV/VH)')
    raise UnknownBandError(
        f'band name {name!r} is ambiguous between {", ".join(b.qualified_name for b in hits)}; qualify it as sensor:band')


def resolve_bands(names: Sequence[str], sensor: Optional[str] = None) -> List[Band]:
    if isinstance(names, str):
        raise UnknownBandError(f'bands must be a sequence of band names, got the string {names!r}')
    return [resolve_band(n, sensor) for n in names]


def band_wavelengths(names: Sequence[str], sensor: Optional[str] = None) -> List[float]:
    """Centre wavelengths (um) of the named bands, from the catalogue."""
    return [b.wavelength_um for b in resolve_bands(names, sensor)]
