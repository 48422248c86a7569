"""Typed errors of eobackbones.

Every error derives from a builtin so callers can catch broadly (``except ValueError``) or precisely.
Messages are one line: what was expected, what was given, and the next step where there is one.
"""

__all__ = [
    'EOBackbonesError', 'UnknownModelError', 'UnknownBandError', 'InvalidInputError', 'MissingModalityError',
    'WeightsNotFoundError', 'ChecksumMismatchError', 'CheckpointFormatError', 'ManifestError',
]


class EOBackbonesError(Exception):
    """Base class of every error raised by eobackbones."""


class UnknownModelError(EOBackbonesError, ValueError):
    """A model name, tag or source URI that the registry does not know."""


class UnknownBandError(EOBackbonesError, ValueError):
    """A band name that is not in the sensor catalogue or not in the model's input spec."""


class InvalidInputError(EOBackbonesError, ValueError):
    """An input tensor, wavelength list or image size that does not fit the model's input spec."""


class MissingModalityError(EOBackbonesError, ValueError):
    """A multimodal model was called without a modality it needs."""


class WeightsNotFoundError(EOBackbonesError, FileNotFoundError):
    """Weights are neither in the cache nor reachable (offline, manual source, missing file)."""


class ChecksumMismatchError(EOBackbonesError, OSError):
    """A downloaded or cached weight file does not match the size / sha256 in the manifest."""


class CheckpointFormatError(EOBackbonesError, ValueError):
    """A checkpoint holds unexpected keys, misses keys, has wrong shapes or non-tensor objects."""


class ManifestError(EOBackbonesError, ValueError):
    """An entry of weights_manifest.yaml (or a config.json) that does not follow the schema."""
