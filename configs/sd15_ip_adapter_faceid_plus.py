"""IP-Adapter FaceID-PlusV2 on SD 1.5: the FaceID recipe (``sd15_ip_adapter_faceid``: ID embedding,
rank-128 LoRA) plus a perceiver over the CLIP ``hidden_states[-2]`` of each record's face crop, with the
ID tokens added back (``model.shortcut``; False trains the first FaceID-Plus). Needs the CLIP image
encoder (ViT-H/14, IP-Adapter's models/image_encoder).

Data: per record the image, its caption, its ID embedding (json ``id_embed_file`` / webdataset
``KEY.npy``) and its face crop (json ``face_image_file`` / webdataset ``KEY.face.jpg``).
"""

from configs import sd15_ip_adapter_faceid


def get_config(arg: str | None = None):
    c = sd15_ip_adapter_faceid.get_config(arg)
    c.workdir = "runs/sd15_ip_adapter_faceid_plus"
    c.model.variant = "faceid-plus"
    c.model.shortcut = True
    c.data.condition = "face"
    return c
