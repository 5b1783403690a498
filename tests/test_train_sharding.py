"""The training step on meshes of 8 (virtual CPU) devices, 8x1 (data) and 4x2
(data x fsdp, frozen UNet kernels sharded over fsdp), gives the loss and
updated parameters of 1 device (relative 1e-5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sd_fixtures
from helpers import cpu_env

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, {tests!r})
from jax.sharding import PartitionSpec as P
from ipadapter_jax.ip_adapter import load_ip_adapter
from ipadapter_jax.models import UNet2DConditionModel
from ipadapter_jax.training import sharding
from ipadapter_jax.training.step import Trainer
from sd_fixtures import SD15_SCHEDULER
assert jax.device_count() == 8
unet = UNet2DConditionModel.from_pretrained({unet!r})
load_ip_adapter({adapter!r}, unet)
trainer, trainable, frozen = Trainer.create(unet, scheduler_config=SD15_SCHEDULER)
rng = np.random.default_rng(0)
batch = {{"latents": rng.standard_normal((8, 8, 8, 4), dtype=np.float32),
         "text_embeds": rng.standard_normal((8, 5, 64), dtype=np.float32),
         "image_embeds": rng.standard_normal((8, 24), dtype=np.float32),
         "empty_text": np.zeros((5, 64), np.float32)}}
rules = [(r"^unet/.*kernel$", P(None, "fsdp"))]
results = {{}}
step = jax.jit(trainer.train_step)   # one jit for every mesh: traced once, compiled per sharding
for name, mesh in [("1", sharding.make_mesh(1, 1, devices=jax.devices()[:1])),
                   ("8x1", sharding.make_mesh(8, 1)), ("4x2", sharding.make_mesh(4, 2))]:
    put = lambda tree: jax.device_put(tree, sharding.param_shardings(tree, mesh, rules))
    t, f = put(trainable), put(frozen)
    o = put(trainer.init_optimizer(t))
    for i in range(2):
        t, o, metrics = step(t, o, f, sharding.put_batch(batch, mesh), jax.random.key(0), np.int32(i))
    leaves = [np.asarray(x) for x in jax.tree.leaves(t)]
    if name == "4x2":
        n_sharded = sum(1 for x in jax.tree.leaves(f) if not x.sharding.is_fully_replicated)
        assert n_sharded > 0, "no frozen kernel was sharded over fsdp"
    results[name] = {{"loss": float(metrics["loss"]), "params": [x.tolist() for x in leaves]}}
json.dump(results, open({out!r}, "w"))
"""


@pytest.mark.parametrize("unused", [0])
def test_meshes_match_one_device(tmp_path, unused):
    paths = sd_fixtures.build_pipeline_folder(tmp_path)
    out = tmp_path / "results.json"
    script = SCRIPT.format(tests=str(ROOT / "tests"), unet=str(paths["sd"] / "unet"), adapter=str(paths["adapter"]),
                           out=str(out))
    env = cpu_env(devices=8)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    res = json.loads(out.read_text())
    for name in ("8x1", "4x2"):
        assert abs(res[name]["loss"] - res["1"]["loss"]) / abs(res["1"]["loss"]) <= 1e-5, name
        for a, b in zip(res[name]["params"], res["1"]["params"]):
            a, b = np.asarray(a), np.asarray(b)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5, name
