"""The pipeline's exceptions, and the note a second problem leaves on the first.

The classes live here, below every part of the pipeline that raises them; they are documented
and imported as ``mlkv.frameworks.torch.pipeline.PipelineError`` and ``...PipelineTimeout``,
so that is the module they name.
"""

from __future__ import annotations

from mlkv.errors import MlkvError

_PUBLIC_MODULE = "mlkv.frameworks.torch.pipeline"


class PipelineError(MlkvError):
    """A :class:`Pipeline` cannot go on (hooks already installed, its update worker failed)."""

    __module__ = _PUBLIC_MODULE


class PipelineTimeout(PipelineError, TimeoutError):
    """A pipeline waited longer than its ``timeout`` for updates to be applied."""

    __module__ = _PUBLIC_MODULE


def note(exc: BaseException, text: str) -> None:
    """Add ``text`` to the message of ``exc`` where Python can (3.11+).

    Used when an exception is already on its way out and a second one must not replace it.
    """
    if hasattr(exc, "add_note"):
        exc.add_note(text)
