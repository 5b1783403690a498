"""IP-Adapter (base) on SDXL, the official ``tutorial_train_sdxl.py`` recipe:
the SD 1.5 config (``sd15_ip_adapter``) with SDXL's differences.

    python train.py --config configs/sdxl_ip_adapter.py \\
        --config.model.pretrained=stable-diffusion-xl-base-1.0 \\
        --config.model.image_encoder=IP-Adapter/sdxl_models/image_encoder \\
        --config.data.json_file=data.json --config.data.image_root=images/

The trainer sees SDXL from the UNet (``addition_embed_type="text_time"``) and
adds ``text_encoder_2`` / ``tokenizer_2`` from the same folder; each image's
time ids are its original size, the crop it got and the target size.
"""

from configs import sd15_ip_adapter


def get_config(arg: str | None = None):
    c = sd15_ip_adapter.get_config(arg)
    c.workdir = "runs/sdxl_ip_adapter"
    c.model.pretrained = ""          # diffusers SDXL base folder (+ text_encoder_2, tokenizer_2)
    c.model.image_encoder = ""       # OpenCLIP ViT-bigG/14 (IP-Adapter's sdxl_models/image_encoder)
    c.data.resolution = 1024
    c.data.batch_size = 8            # global; the official runs used 8 GPUs x batch 8 (lower it to fit memory)
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.01
    c.step.compute_dtype = "float32"   # "bfloat16" for the frozen UNet / encoders (the official mixed precision)
    c.step.noise_offset = 0.0          # the official --noise_offset (0: off)
    c.train.remat = "none"             # "full" trades compute for memory at 1024 px
    # FSDP of the frozen 2.6B-parameter UNet (set --config.mesh.fsdp=N to split it over N devices): conv
    # kernels (HWIO) over their output channels, linear kernels ([in, out]) over theirs; a rule whose spec
    # has more axes than the parameter is skipped, so the first rule only meets 4-D kernels. Checked on 8
    # devices against 1 in tests/test_train_sharding_sdxl.py.
    c.sharding_rules = [(r"^unet/.*kernel$", (None, None, None, "fsdp")), (r"^unet/.*kernel$", (None, "fsdp"))]
    return c
