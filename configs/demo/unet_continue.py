"""Demo stage 3b: 2400 more UNet steps, starting from stage 3's UNet (<root>/sd/unet) with a
fresh warm-up + cosine schedule at half the learning rate and a new data order (seed 1).
Stage 3's loss was still falling at its end; this stage rewrites <root>/sd."""

from configs.demo import common, unet


def get_config(arg=None):
    c = unet.get_config(arg)
    c.workdir = "runs/demo/unet_continue"
    c.model.init_from = f"{common.ROOT}/sd/unet"
    c.seed = 1
    c.optimizer.lr = 2.5e-4
    c.optimizer.warmup_steps = 50
    c.train.steps = 2400
    return c
