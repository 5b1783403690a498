"""IP-Adapter FaceID on SDXL (as ``ip-adapter-faceid_sdxl``): the SD 1.5 FaceID recipe
(``sd15_ip_adapter_faceid``) on the SDXL base recipe (``sdxl_ip_adapter``: both text encoders, per-image
time ids, FSDP rules for the frozen UNet). No CLIP image encoder.
"""

from configs import sdxl_ip_adapter


def get_config(arg: str | None = None):
    c = sdxl_ip_adapter.get_config(arg)
    c.workdir = "runs/sdxl_ip_adapter_faceid"
    c.model.variant = "faceid"
    c.model.num_tokens = 4
    c.model.lora_rank = 128
    return c
