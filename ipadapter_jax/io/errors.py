"""The package's user-facing errors: what the caller gave is wrong, not the code.

Every CLI prints a ``UserError`` as one line (``PROG: error: MESSAGE``, exit
status 2) and keeps tracebacks for everything else, which is a bug. Each class
also derives from the built-in exception Python code would expect
(``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps
working for API users.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input: arguments, files, models or their combination."""


class BadArgument(UserError, ValueError):
    """An argument's value is invalid (out of range, not finite, wrong shape, unknown name)."""


class BadFile(UserError, ValueError):
    """A file exists but its contents are not what was expected (corrupt, wrong format, wrong keys)."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder that was named does not exist."""


class Unsupported(UserError, NotImplementedError, ValueError):
    """A model, configuration or option this package does not support (also a
    ``ValueError``: an unsupported value in a config was one before this class)."""


class Incompatible(UserError, ValueError):
    """Inputs that are each valid but do not go together (an adapter made for another base model)."""


class NonFiniteError(UserError, FloatingPointError):
    """A computation produced NaN or infinity (the result is refused rather than returned)."""


def _numbers(value):
    """The numeric leaves of a number, array, or nested dict / list / tuple of them."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif value is not None and not isinstance(value, (str, bytes, bool)):
        yield value


def require_finite(name: str, value) -> None:
    """Refuse NaN or infinity anywhere in ``value`` (a number, an array, or a
    nested dict / list of them), naming the argument. Non-numeric leaves
    (strings, paths, images) are left to their own checks."""
    import numpy as np

    for leaf in _numbers(value):
        try:
            arr = np.asarray(leaf, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if not np.isfinite(arr).all():
            shown = leaf if arr.ndim == 0 else f"an array holding {int((~np.isfinite(arr)).sum())} NaN/inf values"
            raise BadArgument(f"{name} must be finite, got {shown}")
