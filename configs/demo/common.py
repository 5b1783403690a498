"""Settings shared by the demo stages."""

import ml_collections

from configs import sd15_ip_adapter

ROOT = "ipadapter_jax/demo/model"      # where the shipped demo lives
DATA_DIR = "runs/demo/tfds"


def base(task: str, workdir: str) -> ml_collections.ConfigDict:
    c = sd15_ip_adapter.get_config()
    c.task = task
    c.workdir = workdir
    c.demo = ml_collections.ConfigDict({"root": ROOT, "data_dir": DATA_DIR})
    c.data.resolution = 64
    c.data.workers = 0
    c.train.log_every = 25
    c.train.save_every = 250
    c.train.keep = 2
    c.optimizer.schedule = "cosine"
    return c
