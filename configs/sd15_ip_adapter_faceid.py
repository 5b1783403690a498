"""IP-Adapter FaceID on SD 1.5, the official ``tutorial_train_faceid.py`` recipe: a face ID embedding
(InsightFace ``normed_embedding``, 512-d, precomputed per record) -> 4 tokens (Linear, GELU, Linear,
LayerNorm), trained with to_k_ip / to_v_ip and a rank-128 LoRA on every attention layer of the frozen
UNet. No CLIP image encoder (leave model.image_encoder empty).

    python train.py --config configs/sd15_ip_adapter_faceid.py --config.model.pretrained=SD_DIR \\
        --config.data.json_file=faces.json --config.data.image_root=images/

Data: json records with ``id_embed_file`` (a .npy, or the official scripts' torch-saved tensor;
relative to the image root) beside ``image_file``, or webdataset records with ``KEY.npy``. The export
holds the LoRA in the official layout, which diffusers' ``load_ip_adapter`` applies (with peft).
"""

from configs import sd15_ip_adapter


def get_config(arg: str | None = None):
    c = sd15_ip_adapter.get_config(arg)
    c.workdir = "runs/sd15_ip_adapter_faceid"
    c.model.variant = "faceid"
    c.model.num_tokens = 4
    c.model.lora_rank = 128
    return c
