"""Device mesh and shardings for training: named axes ``data`` and ``fsdp``,
parameter shardings from (path regex -> PartitionSpec) rules, as big_vision
does; the model code carries no sharding annotations."""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipadapter_jax.io.errors import Incompatible

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all, every host).
    ``data=-1`` takes whatever ``fsdp`` leaves."""
    devices = list(devices if devices is not None else jax.devices())
    if data == -1:
        if len(devices) % fsdp:
            raise Incompatible(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise Incompatible(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def _path_str(path) -> str:
    """"/"-joined pytree path, without the ``value`` attribute of NNX Variables
    (so rules read like state paths: ``unet/down_blocks/0/.../kernel``)."""
    parts = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
    if parts and parts[-1] == "value" and type(path[-1]).__name__ == "GetAttrKey":
        parts.pop()
    return "/".join(parts)


def param_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, P]] = ()):
    """A NamedSharding per leaf: the first rule whose regex matches the leaf's
    "/"-joined path gives its PartitionSpec (replicated when none matches, or
    when the sharded dimension does not divide the axis size)."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec_for(path, leaf):
        name = _path_str(path)
        for regex, spec in compiled:
            if regex.search(name):
                shape = np.shape(leaf)
                if len(spec) > len(shape):
                    continue
                ok = all(axis is None or shape[i] % np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]) == 0
                         for i, axis in enumerate(spec))
                return NamedSharding(mesh, spec if ok else P())
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch dimension split over both axes (fsdp also splits data)."""
    return NamedSharding(mesh, P(BATCH_AXES))


REPLICATED_KEYS = ("empty_text", "empty_pooled", "uncond_image")


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global arrays: per-sample entries split over
    the mesh (multi-host: each process passes its own slice), the constants of
    ``REPLICATED_KEYS`` replicated."""
    sharding = batch_sharding(mesh)

    def put(key, x):
        x = np.asarray(x)
        if key in REPLICATED_KEYS:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return {k: put(k, v) for k, v in batch.items()}
