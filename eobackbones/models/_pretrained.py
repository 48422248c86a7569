"""Typed pretrained configs: where weights come from, what they expect, and how to read them."""
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from ..errors import ManifestError
from ..spec import InputSpec

__all__ = ['HubSource', 'ManualSource', 'PretrainedCfg']

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
class PretrainedCfg:
    """One ``arch.tag``: architecture, weights source and the input contract of the weights.

    ``model_args`` are constructor arguments the weights require (e.g. ``in_chans``, a patch-embed
    layout); they are applied before the user's kwargs. ``converter`` names the family function that
    maps an upstream checkpoint to our keys (``format: torch``).
    """
    architecture: str
    tag: str = ''
    source: Optional[Union[HubSource, ManualSource]] = None
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
        """True when the weights can be fetched automatically (a Hub source)."""
        return isinstance(self.source, HubSource)

    @property
    def has_source(self) -> bool:
        return self.source is not None

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d['source'] = dataclasses.asdict(self.source) if self.source is not None else None
        d['input_spec'] = self.input_spec.to_dict() if self.input_spec is not None else None
        return d
