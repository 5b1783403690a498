"""The figures of a parity report: relative error ``||jax - ref|| / ||ref||``
and max absolute error, one ``Figure`` per component, block or step, and the
default bounds (the test suite's). numpy only: the tests, the report and the
command share these definitions."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

# The bounds the test suite holds our float32 models to against diffusers / transformers: full-size models
# component and block 1e-4 (tests/test_unet_sd15_full.py, test_unet_sdxl_full.py; the small models of the other
# tests are held to 1e-5, which full-size float32 rounding alone can pass: the random full-size SD 1.5 VAE
# decoder measures 1.1e-5 with every block at most 3.5e-6, README "Checking parity on your own files");
# the sampling loop: final latents 1e-4 relative, images 2e-3 max abs (test_pipeline.py, test_sdxl_pipeline.py);
# bfloat16 compute against float32: 5e-2 relative (test_pipeline.py).
BOUNDS = {"component": 1e-4, "block": 1e-4, "step": 1e-4, "image_max_abs": 2e-3}
# bfloat16's image bound is this toolkit's own (no test decodes in bfloat16): 8 mantissa bits carried through
# the loop move pixels by a few 1e-2.
BF16_BOUNDS = {"component": 5e-2, "block": 5e-2, "step": 5e-2, "image_max_abs": 1e-1}


def bounds_for(dtype: str, bound: float | None = None) -> dict[str, float]:
    """The bounds of a ``dtype`` run; ``bound`` (``--bound``) replaces every
    relative bound of it."""
    table = dict(BF16_BOUNDS if dtype == "bfloat16" else BOUNDS)
    if bound is not None:
        table.update(component=bound, block=bound, step=bound)
    return table


def _pair(actual, expected) -> tuple[np.ndarray, np.ndarray]:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape} vs reference {expected.shape}")
    return actual, expected


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (shapes must agree)."""
    actual, expected = _pair(actual, expected)
    norm = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / norm)


def max_abs(actual, expected) -> float:
    """max |actual - expected| (shapes must agree)."""
    actual, expected = _pair(actual, expected)
    return float(np.max(np.abs(actual - expected))) if actual.size else 0.0


@dataclasses.dataclass
class Figure:
    """One compared output: ``rel`` and ``max_abs`` (inf where the shapes or
    the number of outputs differ; nan where the output is not finite), with
    ``note`` saying why when they are not numbers."""

    name: str
    rel: float
    max_abs: float
    note: str = ""

    def over(self, bound: float) -> bool:
        """Not within ``bound`` (nan and inf are never within)."""
        return not self.rel <= bound

    def to_json(self) -> dict:
        out = {"name": self.name, "rel": _json_float(self.rel), "max_abs": _json_float(self.max_abs)}
        if self.note:
            out["note"] = self.note
        return out


def _json_float(x: float):
    return x if math.isfinite(x) else str(x)


def figure(name: str, actual, expected) -> Figure:
    """Compare one output or a sequence of outputs (a block returning several:
    the worst part counts)."""
    parts_a, parts_e = list(_parts(actual)), list(_parts(expected))
    if len(parts_a) != len(parts_e):
        return Figure(name, math.inf, math.inf, f"{len(parts_a)} outputs vs reference {len(parts_e)}")
    rels, maxes = [], []
    for a, e in zip(parts_a, parts_e):
        try:
            rels.append(rel_err(a, e))
            maxes.append(max_abs(a, e))
        except ValueError as err:
            return Figure(name, math.inf, math.inf, str(err))
    if not rels:
        return Figure(name, 0.0, 0.0)
    if any(math.isnan(r) for r in rels):
        return Figure(name, math.nan, math.nan, "not finite")
    return Figure(name, max(rels), max(maxes))


def _parts(x) -> Iterable[np.ndarray]:
    if isinstance(x, (list, tuple)):
        for item in x:
            yield from _parts(item)
    elif x is not None:
        yield np.asarray(x)


def first_over(figures: Sequence[Figure], bound: float) -> str | None:
    """The first figure (in forward order) not within ``bound``, by name."""
    return next((f.name for f in figures if f.over(bound)), None)


def describe(figures: Sequence[Figure], bound: float) -> str:
    """A failure message: the first block (in forward order) past ``bound``
    with its figure, then every block's relative error."""
    first = first_over(figures, bound)
    if first is None:
        head = f"no block past {bound:g}: the error builds up over blocks that are each within it"
    else:
        fig = next(f for f in figures if f.name == first)
        head = f"first block past {bound:g}: {first} (rel {fig.rel:.3e}{', ' + fig.note if fig.note else ''})"
    return head + "\nper-block rel err: " + ", ".join(f"{f.name}={f.rel:.2e}" for f in figures)
