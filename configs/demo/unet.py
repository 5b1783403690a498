"""Demo stage 3: a tiny text-to-image UNet2DConditionModel on the frozen VAE latents (encoded
once, a fresh posterior sample each step) and CLIP text tokens: half the captions partial
("a striped star", the dataset's short_text), 10% empty for classifier-free guidance. Writes
<root>/sd, a diffusers StableDiffusionPipeline folder."""

from configs.demo import common


def get_config(arg=None):
    c = common.base("unet", "runs/demo/unet")
    m = c.model
    m.block_out_channels = (32, 64, 128)
    m.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    m.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    m.layers_per_block = 1
    m.attention_head_dim = 4
    m.norm_num_groups = 8
    c.step.text_drop_rate = 0.1
    c.data.partial_caption_rate = 0.5    # text-to-image from full and from partial descriptions
    c.data.batch_size = 64
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 200
    c.optimizer.ema_decay = 0.999
    c.train.steps = 3200                 # 2400 (40.6 min) when the VAE encoder ran in every step; now 44 min
    return c
