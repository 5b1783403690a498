"""Block inputs and outputs of a PyTorch module, captured with forward hooks
while it runs once: what the per-block comparison feeds our blocks (the
reference's own inputs, so errors do not accumulate) and compares their
outputs with. Only numpy copies are kept, never the modules' tensors or
autograd state; torch is imported by the caller."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np


@dataclasses.dataclass
class Captured:
    """One block's last call: its class name (``kind``), positional and
    keyword inputs (torch layout: NCHW stays NCHW, tensors as float32 numpy)
    and its output (feature maps turned NHWC, several outputs flattened into
    a list)."""

    kind: str
    args: tuple
    kwargs: dict
    output: list


def to_numpy(x):
    """Tensors -> float32 numpy (torch layout); tuples, lists and dicts of
    them recursively; anything else as it is."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    if isinstance(x, (tuple, list)):
        return type(x)(to_numpy(v) for v in x) if not hasattr(x, "_fields") else tuple(to_numpy(v) for v in x)
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    return x


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC for 4-D arrays; others unchanged."""
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1))) if np.ndim(x) == 4 else np.asarray(x)


def flat_outputs(output) -> list[np.ndarray]:
    """A module's output as a flat list of arrays, feature maps NHWC:
    ``(hidden, (res, ...))`` -> [hidden, res, ...]; model outputs by their
    first field (``.sample``, ``.last_hidden_state``)."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if hasattr(output, "detach"):
        return [nhwc(to_numpy(output))]
    if isinstance(output, (tuple, list)):
        return [a for item in output for a in flat_outputs(item)]
    if output is None:
        return []
    return [nhwc(np.asarray(output))]


@contextlib.contextmanager
def capture(module, names, *, inputs: bool = True):
    """Forward hooks on ``module.get_submodule(name)`` for each name. Yields a
    dict that forward passes inside the block fill with ``{name: Captured}``
    (the last call of each block; without ``inputs`` only the outputs). The
    hooks are removed on exit."""
    captured: dict[str, Captured] = {}

    def hook(name):
        def record(module_, args, kwargs, output):
            captured[name] = Captured(type(module_).__name__, to_numpy(args) if inputs else (), to_numpy(kwargs) if inputs else {},
                                      flat_outputs(output))
        return record

    handles = [module.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
