"""IP-Adapter Plus-face on SDXL (as ``ip-adapter-plus-face_sdxl_vit-h``): the SDXL Plus recipe
(``sdxl_ip_adapter_plus``: Resampler dim 1280 over ViT-H/14 hidden states, 16 tokens) conditioned on
each record's face crop, the whole image the target (see ``sd15_ip_adapter_plus_face`` for the data).
"""

from configs import sdxl_ip_adapter_plus


def get_config(arg: str | None = None):
    c = sdxl_ip_adapter_plus.get_config(arg)
    c.workdir = "runs/sdxl_ip_adapter_plus_face"
    c.data.condition = "face"
    return c
