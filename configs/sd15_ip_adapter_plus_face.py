"""IP-Adapter Plus-face on SD 1.5 (as ``ip-adapter-plus-face_sd15``): the Plus recipe
(``sd15_ip_adapter_plus``: a Resampler over CLIP ``hidden_states[-2]``, 16 tokens) conditioned on each
record's face crop while the whole image is the denoising target.

    python train.py --config configs/sd15_ip_adapter_plus_face.py --config.model.pretrained=SD_DIR \\
        --config.model.image_encoder=IP-Adapter/models/image_encoder \\
        --config.data.json_file=faces.json --config.data.image_root=images/

Data: json records with ``face_image_file`` beside ``image_file`` (relative to the image root), or
webdataset shards whose records hold ``KEY.face.jpg`` (or png / webp) beside ``KEY.jpg``.
"""

from configs import sd15_ip_adapter_plus


def get_config(arg: str | None = None):
    c = sd15_ip_adapter_plus.get_config(arg)
    c.workdir = "runs/sd15_ip_adapter_plus_face"
    c.data.condition = "face"
    return c
