"""The paper's ablation arm: the "simple adapter". The same image projection and budget as
ip_adapter.py, but its tokens are appended to the text tokens of the frozen cross-attention
(no separate K/V), so only the projection trains."""

from configs.demo import ip_adapter


def get_config(arg=None):
    c = ip_adapter.get_config(arg)
    c.workdir = "runs/demo/ip_adapter_simple"
    c.step.image_conditioning = "concat"
    c.train.trainable = r"^ip_adapters/0/image_proj/"
    c.train.export = "runs/demo/ip_adapter_simple/ip-adapter_simple.safetensors"
    return c
