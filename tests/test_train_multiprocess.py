"""Two JAX processes on localhost (jax.distributed, gloo CPU collectives), each
feeding its half of the batch, take the same training steps as one process
with the whole batch (loss and updated parameters, relative 1e-5). ``train.py``
itself as two processes (each reading its shard through grain, checkpointing,
preempted, resuming, exporting) is tests/test_preemption.py's two-process test."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import sd_fixtures
from helpers import cpu_env

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{{port}}", num_processes=num_processes, process_id=process_id)
sys.path.insert(0, {tests!r})
from ipadapter_jax.ip_adapter import load_ip_adapter
from ipadapter_jax.models import UNet2DConditionModel
from ipadapter_jax.training import sharding
from ipadapter_jax.training.step import Trainer
from sd_fixtures import SD15_SCHEDULER
unet = UNet2DConditionModel.from_pretrained({unet!r})
load_ip_adapter({adapter!r}, unet)
trainer, trainable, frozen = Trainer.create(unet, scheduler_config=SD15_SCHEDULER)
rng = np.random.default_rng(0)
full = {{"latents": rng.standard_normal((4, 8, 8, 4), dtype=np.float32),
        "text_embeds": rng.standard_normal((4, 5, 64), dtype=np.float32),
        "image_embeds": rng.standard_normal((4, 24), dtype=np.float32)}}
n = 4 // num_processes
local = {{k: v[process_id * n:(process_id + 1) * n] for k, v in full.items()}}
local["empty_text"] = np.zeros((5, 64), np.float32)
mesh = sharding.make_mesh()
put = lambda tree: jax.device_put(tree, sharding.param_shardings(tree, mesh))
t, f = put(trainable), put(frozen)
o = put(trainer.init_optimizer(t))
step = jax.jit(trainer.train_step)
losses = []
for i in range(3):
    t, o, metrics = step(t, o, f, sharding.put_batch(local, mesh), jax.random.key(0), np.int32(i))
    losses.append(float(metrics["loss"]))
params = [np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True)).tolist()
          for x in jax.tree.leaves(t)] if num_processes > 1 else [np.asarray(x).tolist() for x in jax.tree.leaves(t)]
if process_id == 0:
    json.dump({{"losses": losses, "params": params, "devices": jax.device_count()}}, open({out!r} + str(num_processes), "w"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    paths = sd_fixtures.build_pipeline_folder(tmp_path)
    out = str(tmp_path / "result")
    script = SCRIPT.format(tests=str(ROOT / "tests"), unet=str(paths["sd"] / "unet"), adapter=str(paths["adapter"]),
                           out=out)
    (tmp_path / "run.py").write_text(script)
    env = cpu_env()
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(i), "2", port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    single = subprocess.run([sys.executable, str(tmp_path / "run.py"), "0", "1", "0"], env=env, capture_output=True,
                            text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-4000:]
    two, one = json.loads(Path(out + "2").read_text()), json.loads(Path(out + "1").read_text())
    assert two["devices"] == 2 and one["devices"] == 1
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    for a, b in zip(two["params"], one["params"]):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5
