"""Sensor catalogue: canonical band names with centre wavelengths (micrometres) per sensor.

The numbers live in ``sensors.yaml`` beside this file; this module only reads and looks them up.
Unqualified band names are Sentinel-2 / Sentinel-1 names first (``B04``, ``B8A``, ``B11``, ``VV``: the
convention of most EO datasets); any other sensor's band is unqualified only when no other sensor has
that name, and otherwise is written ``sensor:band`` (``landsat8:B10``, ``enmap:B48``).
"""
import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from .errors import UnknownBandError

__all__ = ['Band', 'Sensor', 'get_sensor', 'list_sensors', 'resolve_band', 'resolve_bands', 'band_wavelengths',
           'suggest_band']


_PRIMARY = ('sentinel2', 'sentinel1')


@dataclass(frozen=True)
class Band:
    sensor: str
    name: str
    wavelength_um: Optional[float]  # None for non-spectral layers (elevation, class maps)
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
        wl = b.get('wavelength_um')
        bands[name] = Band(
            key, name, float(wl) if wl is not None else None, b.get('bandwidth_um'), b.get('gsd_m'),
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


def _variants(name: str) -> List[str]:
    """Spellings users write for a band: lower case, ``B8`` / Earth Engine ``B2`` for ``B08`` / ``B02``."""
    u = name.strip().upper()
    out = [u]
    m = re.fullmatch(r'B0*(\d{1,2})(A?)', u)
    if m:
        n, a = int(m.group(1)), m.group(2)
        out += [f'B{n}{a}', f'B{n:02d}{a}']
    return list(dict.fromkeys(out))


def suggest_band(name: str, sensor: Optional[str] = None) -> List[str]:
    """Likely intended band names for a name the catalogue does not know (``b04`` -> ``B04``, ``B8`` -> ``B08``)."""
    cat = _catalogue()
    sensors = [get_sensor(sensor)] if sensor else [cat[p] for p in _PRIMARY] + [v for k, v in cat.items() if k not in _PRIMARY]
    hits = []
    for s in sensors:
        for v in _variants(name):
            if v in s.bands and v != name:
                hits.append(v if sensor or s.key in _PRIMARY else f'{s.key}:{v}')
    primary = [h for h in hits if ':' not in h]
    hits = primary or hits  # unqualified names are Sentinel names first
    if not hits:
        names = sorted({b for s in sensors for b in s.bands})
        hits = difflib.get_close_matches(name, names, n=3)
    return list(dict.fromkeys(hits))[:3]


def _hint(name: str, sensor: Optional[str] = None) -> str:
    close = suggest_band(name, sensor)
    return f'; did you mean {", ".join(close)}?' if close else ''


def resolve_band(name: str, sensor: Optional[str] = None) -> Band:
    """Look up one band by name (``B04``), qualified name (``sentinel2:B04``) or within ``sensor``.

    Raises:
        UnknownBandError: unknown (with "did you mean": case, zero padding, close names) or ambiguous names.
    """
    if not isinstance(name, str):
        raise UnknownBandError(f'band names are strings, got {name!r}')
    if ':' in name:
        sensor, name = name.split(':', 1)
    cat = _catalogue()
    if sensor is not None:
        s = get_sensor(sensor)
        if name not in s.bands:
            raise UnknownBandError(f'sensor {sensor!r} has no band {name!r}{_hint(name, sensor)} '
                                   f'(its bands: {", ".join(s.band_names[:16])}{" ..." if len(s.bands) > 16 else ""})')
        return s.bands[name]
    for primary in _PRIMARY:
        if name in cat[primary].bands:
            return cat[primary].bands[name]
    hits = [s.bands[name] for s in cat.values() if name in s.bands]
    primary_hint = [v for v in _variants(name) if any(v in cat[p].bands for p in _PRIMARY)]
    if len(hits) == 1 and not primary_hint:
        return hits[0]
    if not hits:
        raise UnknownBandError(f'unknown band name {name!r}{_hint(name)} (Sentinel-2 bands are B01..B12 and B8A, '
                               f'Sentinel-1 VV/VH)')
    also = f'; or did you mean Sentinel-2 {primary_hint[-1]}?' if primary_hint else ''
    raise UnknownBandError(
        f'band name {name!r} is ambiguous between {", ".join(b.qualified_name for b in hits)}; qualify it as '
        f'sensor:band{also}')


def resolve_bands(names: Sequence[str], sensor: Optional[str] = None) -> List[Band]:
    if isinstance(names, str):
        raise UnknownBandError(f'bands must be a sequence of band names, got the string {names!r}')
    return [resolve_band(n, sensor) for n in names]


def band_wavelengths(names: Sequence[str], sensor: Optional[str] = None) -> List[float]:
    """Centre wavelengths (um) of the named bands, from the catalogue."""
    return [b.wavelength_um for b in resolve_bands(names, sensor)]
