"""IP-Adapter full-face on SD 1.5 (as ``ip-adapter-full-face_sd15``): a per-token MLP
(Linear, GELU, Linear, LayerNorm) over all CLIP ``hidden_states[-2]`` tokens (257 for ViT-H/14, so
``model.num_tokens`` does not apply), conditioned on each record's face crop (see
``sd15_ip_adapter_plus_face`` for the data).
"""

from configs import sd15_ip_adapter


def get_config(arg: str | None = None):
    c = sd15_ip_adapter.get_config(arg)
    c.workdir = "runs/sd15_ip_adapter_full_face"
    c.model.variant = "full-face"
    c.data.condition = "face"
    return c
