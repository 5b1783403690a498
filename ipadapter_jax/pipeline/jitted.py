"""Frozen modules behind one jitted function, and the ``data`` mesh the
pipelines shard their batch over."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipadapter_jax.io.errors import BadArgument


class JittedModule:
    """A frozen module called through one jitted pure function (split once):
    eager NNX calls dispatch op by op, which is slow for a 32-layer encoder.
    ``method`` picks what to call (``"__call__"``, ``"encode"``, ``"decode"``);
    ``config`` is passed through for code that reads it."""

    def __init__(self, module, method: str = "__call__"):
        self.config = getattr(module, "config", None)
        graphdef, self.state = nnx.split(module)
        self.fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))

    def __call__(self, *args):
        return self.fn(self.state, *args)


def data_mesh() -> Mesh:
    """All local devices on one ``data`` axis (this process's: a pipeline runs per process)."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def shard_batch(mesh: Mesh, x):
    """Batch-split over the ``data`` axis when it divides, else replicate."""
    n = mesh.shape["data"]
    spec = P("data") if n > 1 and np.ndim(x) and np.shape(x)[0] % n == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))


def data_fsdp_mesh(fsdp: int) -> Mesh:
    """This process's devices as a ``(data, fsdp)`` mesh: the batch splits over
    ``data``, large weights over ``fsdp`` (``fsdp`` must divide the device count)."""
    devices = np.asarray(jax.local_devices())
    if fsdp < 1 or devices.size % fsdp:
        raise BadArgument(f"fsdp={fsdp} must divide the {devices.size} local devices")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), ("data", "fsdp"))


def fsdp_shardings(tree, mesh: Mesh, min_size: int = 1 << 14):
    """A NamedSharding per leaf of a parameter tree: weights of at least
    ``min_size`` elements split their largest dimension that the ``fsdp`` axis
    divides (each device holds a slice; XLA gathers it where a matmul needs
    it); everything else is replicated."""
    n = mesh.shape.get("fsdp", 1)

    def spec(leaf):
        shape = np.shape(leaf)
        if n > 1 and np.size(leaf) >= min_size:
            for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
                if shape[axis] % n == 0:
                    return NamedSharding(mesh, P(*([None] * axis), "fsdp"))
        return NamedSharding(mesh, P())

    return jax.tree.map(spec, tree)
