"""IP-Adapter FaceID-PlusV2 on SDXL (as ``ip-adapter-faceid-plusv2_sdxl``): ID embedding + the face
crop's ViT-H/14 hidden states, ID tokens added back, rank-128 LoRA, on the SDXL base recipe (see
``sd15_ip_adapter_faceid_plus`` for the data).
"""

from configs import sdxl_ip_adapter_faceid


def get_config(arg: str | None = None):
    c = sdxl_ip_adapter_faceid.get_config(arg)
    c.workdir = "runs/sdxl_ip_adapter_faceid_plus"
    c.model.image_encoder = ""       # OpenCLIP ViT-H/14 (IP-Adapter's models/image_encoder)
    c.model.variant = "faceid-plus"
    c.model.shortcut = True
    c.data.condition = "face"
    return c
