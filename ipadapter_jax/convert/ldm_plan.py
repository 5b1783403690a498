"""A key map between a diffusers model and the original (LDM) single-file layout, as data.

A *plan* is a list of ``Link``s, each joining one tensor of the single file to
one or more tensors of the diffusers model, with the operation between them:

* ``copy``      same tensor, new name;
* ``conv1x1``   diffusers' Linear ``[O, I]`` is LDM's 1x1 convolution ``[O, I, 1, 1]``
  (the VAE's mid-block attention);
* ``transpose`` ``[P, D]`` in diffusers is ``[D, P]`` in LDM (OpenCLIP's ``text_projection``,
  used as ``x @ P`` there);
* ``fuse``      OpenCLIP's ``in_proj_weight`` / ``in_proj_bias`` hold q, k and v stacked
  on the first axis; diffusers has three tensors.

Plans are built from diffusers names by a per-model *rule* (``ldm_unet``,
``ldm_vae``, ``ldm_text``): ``rule(key) -> (ldm key, op, slot)`` or None when
the name has no place in the layout. Values keep their dtype both ways, so
conversions are bit-exact. The same plan maps shapes alone (``ldm_shapes``),
so the layout of a full-size model can be computed without its weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

from ipadapter_jax.io.files import CheckpointError

_ARITY = {"copy": 1, "conv1x1": 1, "transpose": 1, "fuse": 3}

# rule(diffusers key) -> (LDM key, op, slot in a fused group) or None
Rule = Callable[[str], "tuple[str, str, int] | None"]


@dataclasses.dataclass(frozen=True)
class Link:
    """One LDM tensor and the diffusers tensor(s) it holds (``fuse``: q, k, v in that order)."""

    ldm: str
    diffusers: tuple[str, ...]
    op: str = "copy"


def list_some(keys: Iterable[str], n: int = 6) -> str:
    """The first ``n`` keys, comma-separated, with how many more there are."""
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def build_plan(keys: Iterable[str], rule: Rule, source: str) -> list[Link]:
    """The plan for the diffusers tensors ``keys``; a name the rule does not
    know, or a fused group missing a member, is an error naming it."""
    groups: dict[str, tuple[str, dict[int, str]]] = {}
    unknown = []
    for key in sorted(keys):
        hit = rule(key)
        if hit is None:
            unknown.append(key)
            continue
        ldm, op, slot = hit
        op_seen, slots = groups.setdefault(ldm, (op, {}))
        if op_seen != op or slot in slots:
            raise CheckpointError(f"{source}: {key} and {slots.get(slot, '?')} both map to {ldm}")
        slots[slot] = key
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors have no place in the single-file (LDM) layout: "
                              f"{list_some(unknown)}")
    plan = []
    for ldm, (op, slots) in sorted(groups.items()):
        if sorted(slots) != list(range(_ARITY[op])):
            raise CheckpointError(f"{source}: {ldm} stacks q, k and v, but only {sorted(slots.values())} exist")
        plan.append(Link(ldm, tuple(slots[i] for i in range(_ARITY[op])), op))
    return plan


def ldm_value(link: Link, values: list[np.ndarray]) -> np.ndarray:
    """The LDM tensor of ``link`` from its diffusers tensor(s)."""
    if link.op == "copy":
        return values[0]
    if link.op == "conv1x1":
        return values[0][:, :, None, None]
    if link.op == "transpose":
        return np.ascontiguousarray(values[0].T)
    return np.concatenate(values, axis=0)


def diffusers_values(link: Link, value: np.ndarray, source: str) -> list[np.ndarray]:
    """The diffusers tensor(s) of ``link`` from its LDM tensor (the inverse of ``ldm_value``)."""
    if link.op == "copy":
        return [value]
    if link.op == "conv1x1":
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            return [value[:, :, 0, 0]]
        if value.ndim == 2:   # some files store these as linear weights already
            return [value]
        raise CheckpointError(f"{source}: {link.ldm} has shape {tuple(value.shape)}; expected a 1x1 convolution "
                              "[C, C, 1, 1]")
    if link.op == "transpose":
        return [np.ascontiguousarray(value.T)]
    if value.ndim < 1 or value.shape[0] % 3:
        raise CheckpointError(f"{source}: {link.ldm} has shape {tuple(value.shape)}; expected q, k and v stacked "
                              "on the first axis (a multiple of 3)")
    return list(np.split(value, 3, axis=0))


def ldm_shape(link: Link, shapes: list[tuple]) -> tuple:
    """``ldm_value`` on shapes alone."""
    if link.op == "conv1x1":
        return (*shapes[0], 1, 1)
    if link.op == "transpose":
        return tuple(reversed(shapes[0]))
    if link.op == "fuse":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return tuple(shapes[0])


def diffusers_shapes(link: Link, shape: tuple) -> list[tuple]:
    """``diffusers_values`` on shapes alone (what a file's header promises)."""
    shape = tuple(shape)
    if link.op == "conv1x1":   # 1x1 convolution, or already a linear weight
        return [shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape]
    if link.op == "transpose":
        return [tuple(reversed(shape))]
    if link.op == "fuse":
        return [(shape[0] // 3, *shape[1:])] * 3 if shape else [shape] * 3
    return [shape]


def to_ldm(plan: list[Link], state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers tensors -> LDM tensors (names as the plan gives them)."""
    return {link.ldm: ldm_value(link, [state[k] for k in link.diffusers]) for link in plan}


def from_ldm(plan: list[Link], state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """LDM tensors -> diffusers tensors; every link's LDM key must be in ``state``."""
    out = {}
    for link in plan:
        out.update(zip(link.diffusers, diffusers_values(link, state[link.ldm], source)))
    return out


def ldm_shapes(plan: list[Link], shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """diffusers shapes -> LDM shapes: the layout of a model without its weights."""
    return {link.ldm: ldm_shape(link, [tuple(shapes[k]) for k in link.diffusers]) for link in plan}
