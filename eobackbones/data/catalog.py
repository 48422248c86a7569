"""The probe's datasets as a table: one adapter function per dataset, and the options each one takes.

``load_dataset(name, DataRequest(...))`` is what the probe calls; it knows no dataset. An option a dataset does not
use (``--bands`` for the embedded data, ``--root`` for it, ``--download`` for a folder) is refused with one line
instead of being silently ignored. Register more with :func:`register_dataset`.
"""
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .datasets import ProbeData, load_bigearthnet_mini, load_folder
from .segmentation import load_pastis_mini
from .torchgeo import load_torchgeo

__all__ = ['DataRequest', 'DatasetAdapter', 'DATASETS', 'register_dataset', 'load_dataset', 'list_datasets',
           'check_request']

# request field -> the command-line option that sets it (for messages)
_OPTION = {'root': '--root', 'bands': '--bands', 'unit': '--unit', 'folder_modality': '--folder-modality',
           'download': '--download', 'max_per_split': '--max-per-split', 'strict': '--strict'}


@dataclass(frozen=True)
class DataRequest:
    """What the probe asks a dataset for. ``modalities``: the data modality keys the model(s) need."""
    modalities: Tuple[str, ...] = ('s2',)
    root: Optional[str] = None
    bands: Optional[Tuple[str, ...]] = None
    unit: Optional[str] = None
    folder_modality: Optional[str] = None
    download: bool = False
    max_per_split: Optional[int] = None
    strict: bool = False


@dataclass(frozen=True)
class DatasetAdapter:
    """One dataset: ``load(request) -> ProbeData``, the modality keys it can provide and the request fields it uses."""
    name: str
    load: Callable[[DataRequest], ProbeData]
    modalities: Tuple[str, ...]
    options: Tuple[str, ...] = ()
    needs_root: bool = False
    task: str = 'classification'
    description: str = ''


DATASETS: Dict[str, DatasetAdapter] = {}


def register_dataset(adapter: DatasetAdapter) -> DatasetAdapter:
    DATASETS[adapter.name] = adapter
    return adapter


def list_datasets(task: Optional[str] = None) -> List[str]:
    return [n for n, a in DATASETS.items() if task is None or a.task == task]


def check_request(name: str, request: DataRequest) -> DatasetAdapter:
    """The adapter for ``name``; refuses options it does not use and a missing ``--root`` (one line each)."""
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; known: {", ".join(DATASETS)}')
    a = DATASETS[name]
    unused = [f for f in _OPTION if f not in a.options and f != 'strict'
              and getattr(request, f) not in (None, False, DataRequest.__dataclass_fields__[f].default)]
    if unused:
        opts = ', '.join(_OPTION[f] for f in unused)
        raise ValueError(f'{opts} {"does" if len(unused) == 1 else "do"} not apply to --dataset {name} '
                         f'(it takes {", ".join(_OPTION[f] for f in a.options) or "no data options"})')
    if a.needs_root and not request.root:
        raise ValueError(f'--dataset {name} needs --root DIR')
    if name == 'folder' and not request.bands:
        raise ValueError("--dataset folder needs --bands NAME ... (band names in the files' channel order)")
    return a


def load_dataset(name: str, request: DataRequest) -> ProbeData:
    """Load ``name`` for ``request`` (the modalities it lacks are simply not there: the probe decides)."""
    a = check_request(name, request)
    mods = tuple(m for m in request.modalities if m in a.modalities) or a.modalities[:1]
    return a.load(dataclasses.replace(request, modalities=mods))


register_dataset(DatasetAdapter(
    'bigearthnet-mini', lambda r: load_bigearthnet_mini(r.modalities), ('s2', 's1'),
    description='embedded real BigEarthNet v2 sample: 101 patches, S2 L2A + S1 dB, 48 px, 19-class multi-label'))
register_dataset(DatasetAdapter(
    'folder', lambda r: load_folder(r.root, bands=list(r.bands), modality=r.folder_modality or 's2',
                                    unit=r.unit or 'reflectance_1e4', strict=r.strict),
    ('s2', 's1', 'landsat', 'naip', 'dem'), options=('root', 'bands', 'unit', 'folder_modality', 'strict'),
    needs_root=True, description='root/<class>/<sample>.npy|.tif, single-label; --bands names the channels'))
for _name in ('eurosat', 'bigearthnet', 'bigearthnet-v2', 'so2sat'):
    register_dataset(DatasetAdapter(
        _name, lambda r, n=_name: load_torchgeo(n, r.root, modalities=r.modalities, download=r.download,
                                               strict=r.strict, max_per_split=r.max_per_split),
        ('s2',) if _name == 'eurosat' else ('s2', 's1'),
        options=('root', 'download', 'max_per_split', 'strict'), needs_root=True,
        description=f'torchgeo {_name} (install eobackbones[datasets])'))
register_dataset(DatasetAdapter(
    'pastis-mini', lambda r: load_pastis_mini(r.modalities), ('s2', 's1'), task='segmentation',
    description='embedded real PASTIS-R sample: 9 patches, S2 + S1, 32 px at ~40 m, 3-group crop map (a smoke test)'))
