"""The one error hierarchy of mmn: every expected failure raises an :class:`MMNError`.

A stage (:func:`mmn.runner.stage`) prints an ``MMNError`` as one ``error: ...`` line and
exits 1; anything else is a bug and keeps its traceback. Each category also derives
from the builtin its old classes derived from, so ``except ValueError`` callers keep working.

====================  ===================================================================
class                 raised for (examples)
====================  ===================================================================
``ParamsError``       params.yaml problems (:mod:`mmn.params`), undeclared params reads
``DataError``         missing or malformed inputs: COCO layout (``LayoutError``, ``SplitError``)
``ModelError``        models that cannot be built or loaded: ``ModelLoadError``,
                      ``ProjectionError``, ``ClipUnavailable``, ``BertScoreUnavailable``,
                      unsupported LM family, device ``cuda`` without a GPU, spaCy model missing
``QualityError``      a data-quality gate failed (:class:`mmn.quality.core.QualityError`)
``NetworkError``      downloads that fail (``DownloadError``, ``CocoDownloadError``)
``StageError``        any other failure a stage reports as one line
====================  ===================================================================
"""

from __future__ import annotations


class MMNError(Exception):
    """An expected failure; the message names the file, key or row and how to fix it."""


class ParamsError(MMNError, ValueError):
    """A params.yaml problem; the message names the file and the key."""


class DataError(MMNError, ValueError):
    """Missing or malformed input data; the message names the file/row."""


class ModelError(MMNError, RuntimeError):
    """A model (LM, encoder, projection, scorer) that cannot be built, loaded or run as asked."""


class QualityError(MMNError, RuntimeError):
    """A data-quality gate failed (see :class:`mmn.quality.core.QualityError`)."""


class NetworkError(MMNError, RuntimeError):
    """A download that failed after its retries; the message names the URL or file."""


class StageError(MMNError, RuntimeError):
    """Any other failure a stage reports as one clear line (no traceback)."""
