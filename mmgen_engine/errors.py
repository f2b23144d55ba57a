"""Exception types of the public API.

Every user-facing failure raises a subclass of :class:`MMGenError` with a message that fits on one
line and names the offending file, option or shape. The CLI prints that line and exits non-zero.
"""


class MMGenError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(MMGenError):
    """An engine checkpoint is missing, corrupt, of an unknown format or version, or has wrong shapes."""


class ConversionError(MMGenError):
    """A source checkpoint cannot be converted (unsupported architecture, missing or unused keys, ...)."""


class InputError(MMGenError, ValueError):
    """A request is invalid: unreadable image or audio, out-of-range option, too-long input."""


class BackendError(MMGenError, RuntimeError):
    """No implementation of an op exists for the requested (backend, device, dtype)."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """``str(e)`` collapsed to one line of at most ``limit`` characters, for error messages."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EngineOverloaded(MMGenError):
    """``Engine.submit`` refused a request: ``max_queued`` requests already wait for a slot."""


class EngineClosed(MMGenError, RuntimeError):
    """The engine was shut down (or failed): it takes no more requests."""


class EngineFailed(MMGenError, RuntimeError):
    """An internal error stopped an engine's scheduler; every request it held fails with this."""


class DeadlineExceeded(MMGenError, TimeoutError):
    """A request was not finished within its ``timeout``."""
