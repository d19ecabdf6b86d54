"""Exception types of lorashear.

Every error a user can cause (bad input file, bad option, unsupported model) is a
:class:`LorashearError` subclass carrying enough context (file, op, module path, hint) for the
command-line tools to print one clear line instead of a traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (its type name, or ``default``, when empty):
    what a one-line error report quotes of a library's multi-line message."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if default is None else default


class LorashearError(Exception):
    """Base class of all errors lorashear reports to a user."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class IRParseError(LorashearError):
    """A `.ir` text could not be parsed: carries the file name, line and column."""

    def __init__(self, message: str, *, source: str = "<string>", line: int = 0, column: int = 0,
                 hint: str | None = None) -> None:
        super().__init__(f"{source}:{line}:{column}: {message}", hint=hint)
        self.source, self.line, self.column = source, line, column


class IRFormatVersionError(LorashearError):
    """A `.ir` file was written by a newer (or unknown) format version."""


class VerificationError(LorashearError):
    """The IR breaks one of its invariants (a use without a def, a shape mismatch, ...)."""


class LoweringError(LorashearError):
    """A model could not be lowered into the IR: names the ATen op and the module path."""


class ModelLoadError(LorashearError):
    """A model or adapter directory is missing, malformed, or does not fit its base model."""


class PassError(LorashearError):
    """A pass failed, was misconfigured, or the pipeline text is malformed."""


class PluginError(LorashearError):
    """A pass plugin file does not exist, cannot be imported, or defines no pass."""


class DataError(LorashearError):
    """A data source or data spec is missing, empty or malformed."""


class EmissionError(LorashearError):
    """A module could not be emitted in the requested format."""


class ExecutionError(LorashearError):
    """An op failed while a module ran on real tensors (an index out of range that no shape
    check can see, a device out of memory): names the op and its module path."""


class KernelError(LorashearError):
    """A numeric kernel got inputs it cannot handle (shapes, dtypes, devices, group ids) or a
    backend that is not available (Triton missing, CPU tensors without the interpreter)."""


class UnsupportedModelError(LoweringError):
    """A model built from a construct lorashear does not prune (a state-space or recurrent
    layer, an encoder-decoder): names the model type, the construct and where it is."""
