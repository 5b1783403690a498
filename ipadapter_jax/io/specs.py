"""``FILE[:X]`` specs of the command lines (``--lora FILE[:SCALE]``,
``--embedding FILE[:TOKEN]``), parsed without JAX so that a bad one is
reported before anything loads.

A spec whose whole text names an existing file is that file, colons and all.
Otherwise the text after the last colon is the suffix when it reads as one
(a number for a scale; a word without ``.`` or ``/`` for a token), so a hub
id with a path (``org/name:file.safetensors``, ``io.hub``) keeps its colon.
"""

from __future__ import annotations

import math
from pathlib import Path

from ipadapter_jax.io.errors import BadArgument


def _split(spec: str) -> tuple[str, str | None]:
    if Path(spec).is_file() or ":" not in spec:
        return spec, None
    file, _, tail = spec.rpartition(":")
    return file, tail


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` (``--lora``) -> (file or hub id, scale; default 1.0)."""
    file, tail = _split(spec)
    if tail is None:
        return Path(file), 1.0
    try:
        value = float(tail)
    except ValueError:
        if "/" in file and "." in tail:       # org/name:path/file.safetensors, no scale
            return Path(spec), 1.0
        raise BadArgument(f"--lora {spec!r}: expected FILE or FILE:SCALE with a number SCALE, got {tail!r}") from None
    if not math.isfinite(value):
        raise BadArgument(f"--lora {spec!r}: the scale must be a finite number, got {tail}")
    return Path(file), value


def parse_embedding_spec(spec: str) -> tuple[Path, str | None]:
    """``FILE[:TOKEN]`` (``--embedding``) -> (file or hub id, token or None)."""
    file, tail = _split(spec)
    if tail is None:
        return Path(file), None
    if "/" in file and ("." in tail or "/" in tail):   # org/name:path/file.safetensors, no token
        return Path(spec), None
    if not tail or any(c.isspace() for c in tail):
        raise BadArgument(f"--embedding {spec!r}: expected FILE or FILE:TOKEN with a one-word TOKEN")
    return Path(file), tail
