"""Work that is the same at every step of a denoising loop, done once before it.

Inside one sampling call the weights, the text context, the image-prompt
tokens and the control images do not change, yet a UNet step recomputes what
depends on them alone: the Winograd transform of every 3x3 kernel, the text
and image-token K/V projections of every cross-attention layer, a
ControlNet's embedding of its control image, SDXL's added embedding. XLA
does not move these out of the loop (the transforms are tied to the step's
input on purpose, see ``winograd.conv``).

A layer marks such work with ``constant(owner, tag, fn, *args)``: ``fn(*args)``
where ``args`` are loop invariants (parameters, conditioning). Outside a
hoisting scope that is all it does. The loop (``pipeline.denoise``) first
traces one step abstractly under ``collect``, which records every marked call
(keyed by the owner module's path and the tag), then ``Plan.compute``
evaluates the records once, outside the loop, and the loop's step is traced
under ``use``, where each marked call returns its value from there. The values
are a flat ``{key: array}`` dict, so a step-by-step loop (the progress bar)
computes them in one call and passes them to every step.

Why this is safe: in the abstract step every value computed from the step's
own inputs (latents, step index) is a tracer of that trace. A record whose
arguments include one cannot be evaluated outside it: JAX refuses the leaked
tracer (``UnexpectedTracerError``) when the loop is traced, so a wrong mark
fails loudly instead of freezing a value that changes. A record may take
another record's result as an argument (a cast context, doubled control
images): ``compute`` substitutes the computed value. A key met twice in one
step with different arguments is not hoisted (computed in place).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax
from flax import nnx

_SCOPE: contextvars.ContextVar = contextvars.ContextVar("hoisting", default=None)

# Per kind of hoisted value, a memory cap (bytes) and the fewest loop steps: when the values
# of a kind exceed their cap together, or the loop has fewer steps, none of that kind is
# hoisted (each is computed in the step, as without hoisting). Winograd-transformed kernels are
# 16/9 (F(2x2)) to 4x (F(4x4)) the size of their 3x3 kernels: SD 1.5's at 512 px fit under the
# cap, SDXL's at 1024 px do not; writing them costs more than a step saves, so short loops
# keep them in the step (sizes, gains and costs in BENCHMARKS.md, "The denoising loop: what
# is hoisted").
BUDGETS = {"winograd": 3 << 30}
MIN_STEPS = {"winograd": 8}
# Loops over fewer parameter bytes than this (all their models together) hoist nothing: what
# they could hoist is tiny, and finding it traces the step once more, which cost the embedded
# demo model's warm second run more compile time than it saved (BENCHMARKS.md, same section).
MIN_MODEL_BYTES = 64 << 20


def worth_hoisting(*states) -> bool:
    """Whether a loop over models with these parameter states is large enough to hoist."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(states)
               if hasattr(leaf, "dtype")) >= MIN_MODEL_BYTES


def module_paths(models: dict[str, Any]) -> dict[int, str]:
    """``{id(module): "name/path/in/graph"}`` over every module under ``models``
    (a name per root): keys that are the same in every trace of those models."""
    paths = {}
    for name, root in models.items():
        for path, node in nnx.iter_graph(root):
            if isinstance(node, nnx.Module):
                paths.setdefault(id(node), "/".join([name, *map(str, path)]))
    return paths


class Plan:
    """The marked calls of one traced step (``collect``), then their values."""

    def __init__(self, models: dict[str, Any], steps: int | None = None):
        self._paths = module_paths(models)
        self.steps = steps
        self.records: dict[str, tuple[Callable, tuple, Any]] = {}
        self.ambiguous: set[str] = set()
        self._inside = False
        self.budgets: dict[str, str] = {}

    def key(self, owner, tag: str) -> str:
        try:
            return f"{self._paths[id(owner)]}:{tag}"
        except KeyError:
            raise ValueError(f"hoisting: {type(owner).__name__} is not a module of the models being hoisted") from None

    def record(self, key: str, fn: Callable, args: tuple, budget: str | None = None):
        if self._inside:      # marked work inside marked work: hoisted with its caller
            return fn(*args)
        self._inside = True
        try:
            result = fn(*args)
        finally:
            self._inside = False
        if key in self.records:
            _, seen, _ = self.records[key]
            same = all(a is b for a, b in zip(jax.tree.leaves(seen), jax.tree.leaves(args)))
            if not same or jax.tree.structure(seen) != jax.tree.structure(args):
                self.ambiguous.add(key)
            return result
        self.records[key] = (fn, args, result)
        if budget is not None:
            self.budgets[key] = budget
        return result

    def over_budget(self) -> set[str]:
        """Keys of the kinds whose values together exceed their ``BUDGETS`` cap, or
        that need more loop steps (``MIN_STEPS``) than ``steps``."""
        totals: dict[str, int] = {}
        for key, kind in self.budgets.items():
            totals[kind] = totals.get(kind, 0) + sum(leaf.size * leaf.dtype.itemsize
                                                     for leaf in jax.tree.leaves(self.records[key][2]))
        over = {kind for kind, total in totals.items() if total > BUDGETS.get(kind, 0)
                or (self.steps is not None and self.steps < MIN_STEPS.get(kind, 0))}
        return {key for key, kind in self.budgets.items() if kind in over}

    def compute(self) -> dict[str, Any]:
        """Evaluate the records in the current trace (outside the loop), in the
        order they were met; a record reading another's result gets its value."""
        values, produced = {}, {}     # produced: id(abstract result leaf) -> (key, leaf index)
        for key, (fn, args, result) in self.records.items():
            passed = {id(leaf) for leaf in jax.tree.leaves(args)}   # returned as given (a no-op cast)
            for i, leaf in enumerate(jax.tree.leaves(result)):
                if id(leaf) not in passed:
                    produced.setdefault(id(leaf), (key, i))
        skipped = self.ambiguous | self.over_budget()
        for key, (fn, args, _) in self.records.items():
            if key in skipped:
                continue
            leaves, tree = jax.tree.flatten(args)
            sources = [produced.get(id(leaf)) for leaf in leaves]
            if any(s is not None and s[0] not in values for s in sources):
                skipped.add(key)      # reads a record that is not hoisted: computed in place too
                continue
            leaves = [leaf if s is None else jax.tree.leaves(values[s[0]])[s[1]] for leaf, s in zip(leaves, sources)]
            values[key] = fn(*jax.tree.unflatten(tree, leaves))
        return values


class _Use:
    def __init__(self, models: dict[str, Any], values: dict[str, Any]):
        self._paths = module_paths(models)
        self.values = values

    def get(self, owner, tag: str, fn: Callable, args: tuple, fallback: Callable | None):
        path = self._paths.get(id(owner))
        value = None if path is None else self.values.get(f"{path}:{tag}")
        return (fallback or fn)(*args) if value is None else value


def constant(owner, tag: str, fn: Callable, *args, budget: str | None = None, fallback: Callable | None = None):
    """``fn(*args)``, computed once per loop when a hoisting scope is active.

    ``owner``: the module doing the work (its path names the value); ``tag``:
    which of its values; ``args``: loop invariants only (see the module doc);
    ``budget``: the kind (``BUDGETS``, ``MIN_STEPS``) the value counts against;
    ``fallback``: how the step computes it when it is not hoisted (default ``fn``)."""
    scope = _SCOPE.get()
    if scope is None:
        return (fallback or fn)(*args)
    if isinstance(scope, Plan):
        return scope.record(scope.key(owner, tag), fn, args, budget)
    return scope.get(owner, tag, fn, args, fallback)


def active() -> bool:
    """Whether layers are being traced inside a hoisting scope."""
    return _SCOPE.get() is not None


@contextlib.contextmanager
def _scope(scope) -> Iterator:
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def collect(models: dict[str, Any], step: Callable, *args, steps: int | None = None) -> dict[str, Any]:
    """Trace ``step(*args)`` abstractly over ``models`` (``{name: module}``) and
    return the values of its marked calls, computed in the current trace;
    ``steps``: how many times the loop runs the step (for ``MIN_STEPS``)."""
    plan = Plan(models, steps)
    with _scope(plan):
        jax.eval_shape(step, *args)
    return plan.compute()


def use(models: dict[str, Any], values: dict[str, Any]):
    """Context in which marked calls of ``models`` return ``values`` (from ``collect``)."""
    return _scope(_Use(models, values))
