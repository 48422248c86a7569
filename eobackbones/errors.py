"""Typed errors of eobackbones.

Every error derives from a builtin so callers can catch broadly (``except ValueError``) or precisely.
Messages are one line: what was expected, what was given, and the next step where there is one.

Which error when:

* ``InvalidInputError`` (a ``ValueError``): the *data* a user feeds a model, a transform or a probe does not fit
  the input spec (channels, sizes, dtype, non-finite values, wavelengths, a conditioning vector).
* ``MissingModalityError``: a multimodal model was called without a modality (or conditioning input) it needs.
* ``UnknownBandError``: a band name the sensor catalogue or the model's spec does not know.
* ``UnknownModelError``: a model name, tag or source URI the registry does not know.
* ``WeightsNotFoundError`` / ``ChecksumMismatchError`` / ``CheckpointFormatError``: weight files that are absent,
  damaged or do not fit the model.
* ``ManifestError``: a manifest entry, input spec or config.json that does not follow the schema.
* ``NormalisationError``: the weights' own normalisation cannot be applied to this data (unit mismatch).
* plain ``ValueError`` / ``TypeError``: a bad *argument* of a function or constructor (an option out of range,
  an unknown keyword), i.e. a programming error rather than bad data.
"""

__all__ = [
    'EOBackbonesError', 'UnknownModelError', 'UnknownBandError', 'InvalidInputError', 'MissingModalityError',
    'NormalisationError', 'WeightsNotFoundError', 'ChecksumMismatchError', 'CheckpointFormatError', 'ManifestError',
    'first_line',
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


class NormalisationError(InvalidInputError):
    """The weights' own normalisation cannot be applied (unit mismatch without a published mapping)."""


class WeightsNotFoundError(EOBackbonesError, FileNotFoundError):
    """Weights are neither in the cache nor reachable (offline, manual source, missing file)."""


class ChecksumMismatchError(EOBackbonesError, OSError):
    """A downloaded or cached weight file does not match the size / sha256 recorded for it."""


class CheckpointFormatError(EOBackbonesError, ValueError):
    """A checkpoint holds unexpected keys, misses keys, has wrong shapes or non-tensor objects."""


class ManifestError(EOBackbonesError, ValueError):
    """An entry of weights_manifest.yaml (or a config.json) that does not follow the schema."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type name (for one-line reports)."""
    s = str(e).strip()
    return (s.splitlines()[0] if s else '') or type(e).__name__
