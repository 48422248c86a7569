"""Typed configs: where weights come from, what they expect, and which weights a model actually holds.

Plain data, below everything that loads or builds (``hub`` reads and writes them, ``models`` builds from them).

Weight sources (``PretrainedCfg.source``):

* :class:`HubSource`: a file in a Hugging Face Hub repository at a pinned commit, verified by sha256;
* :class:`ManualSource`: published only outside the Hub (installed with ``eobackbones convert``);
* :class:`DirSource`: a ``save_pretrained`` directory, local (``local-dir:``) or a Hub repository (``hf-hub:``);
* :class:`FileSource`: a local checkpoint file, read through the family's converter.
"""
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

from .errors import ManifestError
from .spec import InputSpec

__all__ = ['HubSource', 'ManualSource', 'DirSource', 'FileSource', 'WeightSource', 'PretrainedCfg', 'Provenance']

_HEX40 = re.compile(r'^[0-9a-f]{40}$')
_HEX = re.compile(r'^[0-9a-f]+$')


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face Hub repository at a pinned commit."""
    hf_repo: str
    revision: str
    filename: str
    sha256: Optional[str] = None
    sha256_prefix: Optional[str] = None
    size: Optional[int] = None

    def __post_init__(self):
        where = f'source {self.hf_repo}/{self.filename}: '
        if not self.hf_repo or self.hf_repo.count('/') != 1:
            raise ManifestError(f'{where}hf_repo must be "org/name", got {self.hf_repo!r}')
        if not _HEX40.match(str(self.revision)):
            raise ManifestError(f'{where}revision must be a pinned 40-hex commit, got {self.revision!r}')
        if not self.sha256 and not self.sha256_prefix:
            raise ManifestError(f'{where}needs sha256 or sha256_prefix')
        if self.sha256 and not (len(self.sha256) == 64 and _HEX.match(self.sha256)):
            raise ManifestError(f'{where}sha256 must be 64 lowercase hex digits, got {self.sha256!r}')
        if self.sha256_prefix and not (8 <= len(self.sha256_prefix) <= 64 and _HEX.match(self.sha256_prefix)):
            raise ManifestError(f'{where}sha256_prefix must be >= 8 lowercase hex digits, got {self.sha256_prefix!r}')
        if self.size is not None and (not isinstance(self.size, int) or self.size <= 0):
            raise ManifestError(f'{where}size must be a positive integer, got {self.size!r}')

    @property
    def digest(self) -> str:
        """The full sha256, or the published prefix."""
        return self.sha256 or self.sha256_prefix

    def describe(self) -> str:
        return f'{self.hf_repo}@{self.revision[:12]}/{self.filename}'


@dataclass(frozen=True)
class ManualSource:
    """Weights published only outside the Hub (e.g. Google Drive): the user fetches and converts them."""
    manual: str
    filename: Optional[str] = None
    sha256: Optional[str] = None

    def describe(self) -> str:
        return f'manual download: {self.manual}'


@dataclass(frozen=True)
class DirSource:
    """A directory written by ``save_pretrained``: ``local-dir:/path`` or ``hf-hub:org/repo[@revision]``.

    ``sha256`` is the checksum of its ``model.safetensors`` recorded in its ``config.json`` (checked on load).
    """
    uri: str
    sha256: Optional[str] = None

    def describe(self) -> str:
        return self.uri


@dataclass(frozen=True)
class FileSource:
    """A local checkpoint file (an upstream file read through the family's converter, or our own keys):
    ``create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` or ``checkpoint_path=``."""
    path: str

    def describe(self) -> str:
        return f'file {self.path}'


WeightSource = Union[HubSource, ManualSource, DirSource, FileSource]


@dataclass(frozen=True)
class PretrainedCfg:
    """One ``arch.tag`` (or an architecture's defaults): weights source and the input contract of the weights.

    Args:
        architecture: registered architecture name.
        tag: weights tag (``''`` for the architecture's defaults without weights).
        source: where the weights come from (None: no weights).
        format: ``safetensors`` or ``torch`` (an upstream checkpoint read by ``converter``).
        converter: name of the registered converter that maps an upstream checkpoint to our keys.
        license, paper, provenance, notes: facts about the weights.
        input_spec: what the weights expect (bands, units, normalisation, sizes, extra inputs).
        model_args: constructor arguments the weights require, applied before the user's kwargs.
        fingerprint: optional golden statistics of the outputs.
        num_classes: classifier outputs stored with the weights (0: none). A model built with another
            ``num_classes`` gets a fresh head: the one rule for every source.
        feature_kwargs: keyword arguments the probe and the benchmark pass with every forward (e.g. a
            diffusion encoder's ``timestep``); recorded with the results.
        seg_feature_index: index into ``feature_info`` of the map the segmentation probe uses (None: the last map
            at reduction 16, else the finest).
    """
    architecture: str
    tag: str = ''
    source: Optional[WeightSource] = None
    format: str = 'safetensors'
    converter: Optional[str] = None
    license: Optional[str] = None
    paper: Optional[str] = None
    provenance: Optional[str] = None
    input_spec: Optional[InputSpec] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    fingerprint: Optional[Dict[str, Any]] = None
    num_classes: int = 0
    notes: str = ''
    feature_kwargs: Dict[str, Any] = field(default_factory=dict)
    seg_feature_index: Optional[int] = None

    def __post_init__(self):
        if self.format not in ('safetensors', 'torch'):
            raise ManifestError(f'{self.name}: format must be "safetensors" or "torch", got {self.format!r}')
        if self.format == 'torch' and not self.converter:
            raise ManifestError(f'{self.name}: format "torch" needs a converter')

    @property
    def name(self) -> str:
        return f'{self.architecture}.{self.tag}' if self.tag else self.architecture

    @property
    def has_weights(self) -> bool:
        """True when the weights can be fetched automatically (a Hub file, a saved directory or a local file)."""
        return isinstance(self.source, (HubSource, DirSource, FileSource))

    @property
    def has_source(self) -> bool:
        return self.source is not None

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d['source'] = dataclasses.asdict(self.source) if self.source is not None else None
        d['input_spec'] = self.input_spec.to_dict() if self.input_spec is not None else None
        return d

    # ------------------------------------------------------------------ timm's view
    # timm's data helpers (resolve_data_config, resolve_model_data_config) read a model's pretrained_cfg as a mapping
    # of timm keys; this typed cfg answers them from its input spec. mean / std are given only where the spec's
    # normalisation is a plain per-band mean/std; otherwise they are identity (0 / 1) and the EO normalisation comes
    # from eobackbones.transforms.create_transform (never ImageNet statistics by default).

    def timm_dict(self) -> Dict[str, Any]:
        """This cfg in timm's ``pretrained_cfg`` keys."""
        spec = self.input_spec
        out: Dict[str, Any] = dict(architecture=self.architecture, tag=self.tag or None, num_classes=self.num_classes,
                                   interpolation='bilinear', crop_pct=1.0, crop_mode='center', license=self.license,
                                   paper_ids=self.paper, notes=self.notes or None)
        if spec is not None:
            m = spec.modalities[0]
            chans = sum(x.in_chans for x in spec.modalities)
            out.update(input_size=(chans, *m.image_size), fixed_input_size=bool(m.fixed_size))
            steps = m.normalization
            if len(spec.modalities) == 1 and len(steps) == 1 and steps[0]['op'] == 'meanstd':
                out.update(mean=tuple(steps[0]['mean']), std=tuple(steps[0]['std']))
            else:
                out.update(mean=(0.0,) * chans, std=(1.0,) * chans)
        return out

    def __getitem__(self, key: str) -> Any:
        d = self.timm_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]

    def get(self, key: str, default: Any = None) -> Any:
        v = self.timm_dict().get(key)
        return default if v is None else v

    def __contains__(self, key: str) -> bool:
        return self.timm_dict().get(key) is not None

    def keys(self):
        return [k for k, v in self.timm_dict().items() if v is not None]


@dataclass(frozen=True)
class Provenance:
    """Which weights a model instance actually holds (never implied by the architecture's default cfg).

    ``kind``:

    * ``none``: random initialisation;
    * ``manifest``: published weights ``name`` (``arch.tag``) from ``source`` with checksum ``sha256``;
    * ``directory``: a ``save_pretrained`` directory ``source`` (``local-dir:`` / ``hf-hub:repo@rev``) whose weights
      file has checksum ``sha256``; ``origin`` is what that directory recorded about itself;
    * ``file``: weights converted from a user-supplied checkpoint ``source`` (not a published manifest file);
    * ``trained``: weights changed after construction (fine-tuning, pretraining): ``origin`` is what the model
      started from, ``note`` says what was done (e.g. "pretrained by the user on X for N steps").
    """
    kind: str = 'none'
    name: Optional[str] = None
    source: Optional[str] = None
    sha256: Optional[str] = None
    origin: Optional['Provenance'] = None
    note: Optional[str] = None

    def __post_init__(self):
        if self.kind not in ('none', 'manifest', 'file', 'directory', 'trained'):
            raise ManifestError(f'provenance kind must be none, manifest, file, directory or trained, got {self.kind!r}')
        if isinstance(self.origin, Mapping):
            object.__setattr__(self, 'origin', Provenance.from_dict(self.origin))

    def describe(self) -> str:
        """One line: what the weights are."""
        if self.kind == 'none':
            return 'random initialisation (no trained weights)'
        if self.kind == 'manifest':
            return f'published weights {self.name} ({self.source}, sha256 {(self.sha256 or "?")[:16]})'
        if self.kind == 'file':
            return f'weights from the file {self.source} (sha256 {(self.sha256 or "?")[:16]}; {self.note or "converted"})'
        if self.kind == 'directory':
            inner = self.origin.describe() if self.origin is not None else 'unknown origin'
            return f'{inner}; loaded from {self.source}'
        base = self.origin.describe() if self.origin is not None else 'random initialisation'
        return f'{self.note or "trained"} (started from: {base})'

    @property
    def root(self) -> 'Provenance':
        """Follow ``directory`` links down to what the weights are (none / manifest / trained)."""
        p = self
        while p.kind == 'directory' and p.origin is not None:
            p = p.origin
        return p

    @property
    def base(self) -> 'Provenance':
        """Follow ``directory`` and ``trained`` links down to the first weights (none or published)."""
        p = self
        while p.kind in ('directory', 'trained') and p.origin is not None:
            p = p.origin
        return p

    def to_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.origin is not None:
            d['origin'] = self.origin.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'Provenance':
        if not isinstance(d, Mapping):
            raise ManifestError(f'provenance must be a mapping, got {type(d).__name__}')
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ManifestError(f'provenance has unknown keys {sorted(unknown)}')
        return cls(**d)
