"""IP-Adapter Plus on SDXL (as ``ip-adapter-plus_sdxl_vit-h``): a Resampler
(dim 1280, 20 heads, 16 queries, output 2048) over ViT-H/14 ``hidden_states[-2]``;
otherwise the SDXL base recipe (``sdxl_ip_adapter``)."""

from configs import sdxl_ip_adapter


def get_config(arg: str | None = None):
    c = sdxl_ip_adapter.get_config(arg)
    c.workdir = "runs/sdxl_ip_adapter_plus"
    c.model.image_encoder = ""       # OpenCLIP ViT-H/14 (IP-Adapter's models/image_encoder)
    c.model.variant = "plus"
    c.model.num_tokens = 16
    c.model.resampler_dim = 1280     # the official SDXL Plus width (0: the UNet's token width)
    return c
