"""A tiny run for tests and smoke checks: small resolution and batch, a few steps.

    python train.py --config configs/tiny.py --config.model.pretrained=DIR --config.model.image_encoder=DIR \\
        --config.data.json_file=data.json --config.data.image_root=images/ --config.workdir=runs/tiny
"""

from configs import sd15_ip_adapter


def get_config(arg: str | None = None):
    c = sd15_ip_adapter.get_config(arg)
    c.workdir = "runs/tiny"
    c.data.resolution = 16
    c.data.batch_size = 4
    c.data.workers = 0
    c.optimizer.lr = 1e-3
    c.train.steps = 20
    c.train.log_every = 1
    c.train.save_every = 5
    c.train.keep = 2
    return c
