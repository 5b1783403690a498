"""Package names imported on first use (PEP 562), so that importing a package
(``ipadapter_jax``, ``ipadapter_jax.io``, ``ipadapter_jax.convert``) loads no JAX.

A package lists ``_LAZY = {name: module}`` and sets
``__getattr__, __dir__ = lazy_names(__name__, _LAZY)``; tests/test_layering.py
checks that each table names existing modules of the package's part or below.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_names(package: str, table: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for ``table``'s names."""
    module = sys.modules[package]

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(module, name, value)    # later lookups are plain attribute reads
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(table))

    return __getattr__, __dir__
