"""Errors a user can act on. Each message names the field, key, file or size that was wrong."""


def first_line(exc: BaseException) -> str:
    """The first line of another library's error message (some span a page), or its type when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class TierstoreError(Exception):
    """Base class of every error tierstore raises for bad input or bad data."""


class BudgetError(TierstoreError, ValueError):
    """A budget is malformed, or too small for what it must hold."""


class ConfigError(TierstoreError, ValueError):
    """A config key is unknown or its value is not allowed."""


class CheckpointError(TierstoreError):
    """A checkpoint or layer store is missing, malformed or corrupt."""


class ModelError(TierstoreError, ValueError):
    """The model cannot be run layer by layer (architecture, remote code, alias)."""


class InputError(TierstoreError, ValueError):
    """A generation request is invalid (empty prompt, token counts, context length)."""


class InvariantError(RuntimeError):
    """tierstore's own bookkeeping broke a rule it keeps (a bug, not bad input): checked whatever `python -O`
    says, so that a broken invariant stops the run instead of corrupting it."""
