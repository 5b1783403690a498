"""Demo stage 1: a tiny CLIP (text + vision towers) trained contrastively on the shapes.
Writes <root>/tokenizer, <root>/clip (transformers CLIPModel) and <root>/image_encoder."""

from configs.demo import common


def get_config(arg=None):
    c = common.base("clip", "runs/demo/clip")
    m = c.model
    m.text_hidden, m.text_layers = 64, 3
    m.vision_hidden, m.vision_layers = 96, 4
    m.heads, m.projection_dim = 4, 64
    m.image_size, m.patch_size = 64, 8
    c.data.batch_size = 128
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.1
    c.optimizer.warmup_steps = 100
    c.train.steps = 1500
    return c
