"""A FLUX IP-Adapter in XLabs' layout (diffusers' load_ip_adapter reads the export), rectified flow.

    python train.py --config configs/flux_ip_adapter.py \\
        --config.model.pretrained=black-forest-labs/FLUX.1-dev \\
        --config.model.image_encoder=openai/clip-vit-large-patch14 \\
        --config.data.json_file=data.json --config.data.image_root=images/ --config.mesh.fsdp=8
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "flux_ip_adapter"
    c.workdir = "runs/flux_ip_adapter"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""          # diffusers FLUX folder, or a BFL single file (then model.model_config)
    c.model.model_config = ""        # a diffusers FLUX folder for a single file's other components
    c.model.image_encoder = ""       # CLIP ViT-L/14 (transformers CLIPVisionModelWithProjection folder)
    c.model.layout = "xlabs"         # xlabs (CLIP ViT-L image_embeds) | instantx (SigLIP pooler_output)
    c.model.num_tokens = 4           # image tokens: XLabs v1 4, v2 16; InstantX 128
    c.model.adapter_init = ""        # optional XLabs-layout file to continue from

    c.data = ml_collections.ConfigDict()
    c.data.kind = "json"             # json | webdataset | tfds (as configs/sd15_ip_adapter.py)
    c.data.json_file = ""
    c.data.image_root = ""
    c.data.shards = ""
    c.data.index_dir = ""
    c.data.tfds_name = ""
    c.data.tfds_dir = ""
    c.data.split = "train"
    c.data.image_key = "image"
    c.data.text_key = "text"
    c.data.cache_dir = ""            # not supported for FLUX yet
    c.data.condition = "image"
    c.data.resolution = 512          # a multiple of 16
    c.data.batch_size = 8
    c.data.workers = 4

    # Rectified flow: sigma = shift(sigmoid(N(logit_mean, logit_std))) (SD3 paper; diffusers' FLUX scripts).
    c.flow = ml_collections.ConfigDict()
    c.flow.logit_mean = 0.0
    c.flow.logit_std = 1.0
    c.flow.shift = "resolution"      # "resolution": FLUX's sampling shift for the image size; or a number (1: none)
    c.flow.guidance = 1.0            # embedded guidance during training (guidance-distilled dev)
    c.flow.max_sequence_length = 512  # T5 tokens per caption

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0
    c.optimizer.accumulate = 1
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.ema_decay = 0.0

    c.step = ml_collections.ConfigDict()
    c.step.compute_dtype = "bfloat16"    # the frozen models' compute dtype; the adapter stays float32
    c.step.image_drop_rate = 0.05
    c.step.text_drop_rate = 0.05
    c.step.both_drop_rate = 0.05

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100_000
    c.train.log_every = 50
    c.train.save_every = 2000
    c.train.keep = 3
    c.train.export = ""                  # default: <workdir>/ip_adapter.safetensors
    c.train.remat = True                 # gradient checkpointing per transformer block (memory for compute)
    c.train.tensorboard = True
    c.train.eval_every = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    # FSDP over the frozen transformer and T5: their large kernels split over the fsdp axis.
    c.sharding_rules = [(r"^models/transformer/.*kernel$", (None, "fsdp")), (r"^t5/.*kernel$", (None, "fsdp"))]
    return c
