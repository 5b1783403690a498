"""Frozen modules behind one jitted function, and the ``data`` mesh the
pipelines shard their batch over."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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
    n = mesh.devices.size
    spec = P("data") if n > 1 and np.ndim(x) and np.shape(x)[0] % n == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
