"""Demo stage 2: a tiny AutoencoderKL (64 px -> 16x16x4 latents), L1 + L2 + KL.
Writes <root>/vae with the measured latent scaling_factor."""

from configs.demo import common


def get_config(arg=None):
    c = common.base("vae", "runs/demo/vae")
    m = c.model
    m.block_out_channels = (16, 32, 64)
    m.layers_per_block = 1
    m.norm_num_groups = 8
    m.kl_weight = 1e-4
    c.data.batch_size = 16
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    c.train.steps = 1200
    return c
