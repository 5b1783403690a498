"""The SDXL training step (cached text: context, pooled embedding, per-image
time ids) on a 4x2 mesh of 8 virtual CPU devices (data x fsdp, the frozen
UNet's kernels sharded by ``configs/sdxl_ip_adapter.py``'s rules) gives the
loss and updated adapter parameters of 1 device (relative 1e-5). (The pure
data-parallel 8x1 mesh is covered for SD 1.5 in test_train_sharding.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import ipadapter_fixtures as fx
from helpers import cpu_env

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from jax.sharding import PartitionSpec as P
from configs import sdxl_ip_adapter
from ipadapter_jax.ip_adapter import load_ip_adapter
from ipadapter_jax.models import UNet2DConditionModel
from ipadapter_jax.training import sharding
from ipadapter_jax.training.step import Trainer
from sd_fixtures import SD15_SCHEDULER
import ipadapter_fixtures as fx
assert jax.device_count() == 8
unet = UNet2DConditionModel.from_pretrained({unet!r})
load_ip_adapter({adapter!r}, unet)
trainer, trainable, frozen = Trainer.create(unet, scheduler_config=SD15_SCHEDULER)
rng = np.random.default_rng(0)
c, pooled = {c}, {pooled}
batch = {{"latents": rng.standard_normal((8, 8, 8, 4), dtype=np.float32),
         "text_embeds": rng.standard_normal((8, 7, c), dtype=np.float32),
         "pooled_text_embeds": rng.standard_normal((8, pooled), dtype=np.float32),
         "time_ids": fx.sdxl_time_ids(8),
         "image_embeds": rng.standard_normal((8, fx.CLIP_DIM), dtype=np.float32),
         "empty_text": np.zeros((7, c), np.float32), "empty_pooled": np.zeros((pooled,), np.float32)}}
rules = [(pattern, P(*spec)) for pattern, spec in sdxl_ip_adapter.get_config().sharding_rules]
results = {{}}
step = jax.jit(trainer.train_step)   # one jit for every mesh: traced once, compiled per sharding
for name, mesh in [("1", sharding.make_mesh(1, 1, devices=jax.devices()[:1])), ("4x2", sharding.make_mesh(4, 2))]:
    put = lambda tree: jax.device_put(tree, sharding.param_shardings(tree, mesh, rules))
    t, f = put(trainable), put(frozen)
    o = put(trainer.init_optimizer(t))
    for i in range(2):
        t, o, metrics = step(t, o, f, sharding.put_batch(batch, mesh), jax.random.key(0), np.int32(i))
    if name == "4x2":
        sharded = [x.ndim for x in jax.tree.leaves(f) if not x.sharding.is_fully_replicated]
        assert 2 in sharded and 4 in sharded, "linear and conv kernels should both be split over fsdp"
    results[name] = {{"loss": float(metrics["loss"]), "params": [np.asarray(x).tolist() for x in jax.tree.leaves(t)]}}
json.dump(results, open({out!r}, "w"))
"""


def test_sdxl_meshes_match_one_device(tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    torch_unet = TorchUNet(**fx.SDXL_UNET)
    torch_unet.save_pretrained(tmp_path / "unet")
    c = fx.SDXL_UNET["cross_attention_dim"]
    save_file(fx.flat(fx.image_proj("base", c), fx.ip_layers(torch_unet)), tmp_path / "adapter.safetensors")
    out = tmp_path / "results.json"
    script = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), unet=str(tmp_path / "unet"),
                           adapter=str(tmp_path / "adapter.safetensors"), c=c, pooled=fx.SDXL_POOLED, out=str(out))
    env = cpu_env(devices=8)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    res = json.loads(out.read_text())
    for name in ("4x2",):
        assert abs(res[name]["loss"] - res["1"]["loss"]) / abs(res["1"]["loss"]) <= 1e-5, name
        for a, b in zip(res[name]["params"], res["1"]["params"], strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5, name
