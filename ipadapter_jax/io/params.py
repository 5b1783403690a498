"""Torch state dict <-> Flax NNX module, by name.

Module trees mirror diffusers/transformers, so a torch key is the Flax path
joined with dots, with three generic layout rules:

* ``kernel`` of a Linear (2-D): torch ``weight`` [out, in], transposed.
* ``kernel`` of a Conv (4-D): torch ``weight`` [O, I, kh, kw] -> HWIO, axes (2, 3, 1, 0).
* norm ``scale`` and Embed ``embedding``: torch ``weight``, as is.

Anything else keeps its name (``class_embedding``, ``latents``). Per-model
oddities (legacy names, buffers to ignore) are passed in as ``rename``.
Loading is strict: every checkpoint key must land in a parameter of the same
shape and every parameter must be filled; otherwise a ``CheckpointError``
names the keys and shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.io.files import CheckpointError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}

# Optional per-model hook: (torch key, array) -> (canonical key, array), or None to drop the entry.
Rename = Callable[[str, np.ndarray], "tuple[str, np.ndarray] | None"]


def torch_key(path: tuple) -> str:
    """Flax state path -> torch state-dict key."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_flax_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return value.T
    return value


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (3, 2, 0, 1))
        if value.ndim == 2:
            return value.T
    return value


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    return tuple(to_torch_layout(path, np.empty(shape, dtype=np.uint8)).shape) if shape else ()


@dataclasses.dataclass
class LoadReport:
    """What a non-strict load skipped (strict loads raise instead)."""

    missing: list[str] = dataclasses.field(default_factory=list)      # parameters left at their init
    unexpected: list[str] = dataclasses.field(default_factory=list)   # checkpoint keys not used

    def __bool__(self):
        return bool(self.missing or self.unexpected)


# ml_dtypes floating point types numpy does not know as kind "f".
_EXTRA_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _as_float32(key: str, value: np.ndarray, source: str) -> np.ndarray:
    if value.dtype.kind != "f" and str(value.dtype) not in _EXTRA_FLOATS:
        raise CheckpointError(f"{source}: tensor {key!r} has dtype {value.dtype}; expected a floating "
                              "point tensor (float16/bfloat16/float32/float64, or float8)")
    return np.asarray(value, dtype=np.float32)


def _list_some(keys: list[str], n: int = 8) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _refuse(source: str, mismatched: list[str], missing: list[str], unexpected: list[str], *,
            few_filled: bool) -> None:
    """The strict loader's errors: shape mismatches always, missing / unexpected keys when given."""
    if mismatched:
        raise CheckpointError(f"{source}: shape mismatch (torch layout) for {len(mismatched)} tensors: "
                              f"{_list_some(mismatched, 5)}")
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint keys match no parameter: {_list_some(sorted(unexpected))}")
        if missing:
            parts.append(f"{len(missing)} parameters are not in the checkpoint: {_list_some(missing)}")
        hint = " Is this the weights file of another model or config?" if few_filled else ""
        raise CheckpointError(f"{source}: " + "; ".join(parts) + "." + hint +
                              " (strict=False loads what matches and reports the rest)")


class AbstractRngs:
    """Stands in for ``nnx.Rngs`` when a module is only traced abstractly
    (``nnx.eval_shape``), where no random value is ever computed: every draw
    (``rngs.params()``, ``rngs()``, any stream) returns the same key. Inside a
    trace each real ``nnx.Rngs`` draw costs time proportional to the graph
    traced so far, which makes the abstract build of a large model (SDXL's
    UNet: 1,680 draws) take about a minute instead of seconds."""

    def __call__(self):
        return jax.random.key(0)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self


def load_state_dict_into(make_module: Callable[[], nnx.Module], state_dict: dict[str, np.ndarray], *,
                         source: str = "checkpoint", strict: bool = True, rename: Rename | None = None,
                         make_abstract: Callable[[], nnx.Module] | None = None,
                         ) -> tuple[nnx.Module, LoadReport]:
    """Build ``make_module()`` with its parameters taken from ``state_dict``.

    With ``strict=True`` (default) the module is only traced abstractly
    (``nnx.eval_shape``, no random init) and every mismatch raises. With
    ``strict=False`` the module is initialised for real, whatever the checkpoint
    does not cover keeps its init, and the returned report lists what was
    skipped. ``make_abstract``, when given, builds the same module for the
    abstract trace (typically with ``AbstractRngs()``: much faster for large
    models); ``make_module`` is then only called for a non-strict real init.
    """
    abstract = nnx.eval_shape(make_abstract or make_module)
    graphdef, state = nnx.split(abstract)
    targets = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        targets[torch_key(path)] = (path, value.shape)

    filled: dict[tuple, np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in state_dict.items():
        original = key   # errors name the key as the file has it
        if rename is not None:
            renamed = rename(key, value)
            if renamed is None:
                continue
            key, value = renamed
        if key not in targets:
            unexpected.append(key)
            continue
        path, shape = targets[key]
        value = to_flax_layout(path, _as_float32(original, value, source))
        if value.shape != tuple(shape):
            mismatched.append(f"{key}: checkpoint {tuple(to_torch_layout(path, value).shape)} vs model "
                              f"{_torch_shape(path, tuple(shape))}")
            continue
        # Strict: converted now, so a lazily read checkpoint never sits in memory twice. Non-strict keeps numpy:
        # the real init below would otherwise sit on the device beside every converted tensor.
        filled[path] = jnp.asarray(value) if strict else value
    missing = sorted(k for k, (path, _) in targets.items() if path not in filled)

    _refuse(source, mismatched, missing if strict else [], unexpected if strict else [],
            few_filled=len(filled) < len(targets) // 2)

    if missing:  # non-strict: start from a real init for what the checkpoint lacks
        module = make_module()
        graphdef, state = nnx.split(module)
    flat = dict(nnx.to_flat_state(state))
    for path, value in filled.items():
        var = flat[path]
        if hasattr(var, "set_value"):
            var.set_value(jnp.asarray(value))
        else:
            var.value = jnp.asarray(value)
    module = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return module, LoadReport(missing=missing, unexpected=sorted(unexpected))


def module_state_dict(module: nnx.Module, *, filter: Any = nnx.Param) -> dict[str, np.ndarray]:
    """Flax module -> torch-layout {key: float32 numpy array}; the inverse of loading."""
    state = nnx.state(module, filter)
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path, np.asarray(jax.device_get(value))))
    return out
