"""IP-Adapter (base) on SD 1.5, the paper's recipe (section 4.1.2).

    python train.py --config configs/sd15_ip_adapter.py \\
        --config.model.pretrained=stable-diffusion-v1-5 \\
        --config.model.image_encoder=IP-Adapter/models/image_encoder \\
        --config.data.json_file=data.json --config.data.image_root=images/
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "ip_adapter"            # ip_adapter (this file); the demo stages use clip | vae | unet
    c.workdir = "runs/sd15_ip_adapter"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""          # diffusers SD folder (unet, vae, text_encoder, tokenizer, scheduler)
    c.model.image_encoder = ""       # CLIP vision folder (OpenCLIP ViT-H/14 for the official SD1.5 adapters)
    c.model.variant = "base"         # base | plus | full-face | faceid | faceid-plus (a new adapter); not with
                                     # adapter_init (its file says)
    c.model.num_tokens = 4           # image tokens (base: 4; plus: 16)
    c.model.adapter_init = ""        # optional official adapter file to continue from
    c.model.lora_rank = 128          # FaceID variants: the rank of the LoRA on every attention layer
    c.model.shortcut = False         # faceid-plus: PlusV2 (ID tokens added back to the perceiver's output)
    # Which cross-attention layers get an image branch: all | down | mid | up | comma-separated diffusers
    # layer names (up_blocks.1.attentions.0.transformer_blocks.0.attn2, ...); the others export as zeros.
    c.model.image_layers = "all"

    c.data = ml_collections.ConfigDict()
    c.data.kind = "json"             # json | tfds | webdataset | cached
    c.data.json_file = ""
    c.data.image_root = ""
    # kind=webdataset: img2dataset tar shards, a glob or a brace range ("shards/{00000..00099}.tar"); each
    # shard is indexed once (kept in index_dir, default <workdir>/shard_index) and read by random access.
    c.data.shards = ""
    c.data.index_dir = ""
    c.data.tfds_name = ""
    c.data.tfds_dir = ""
    c.data.split = "train"
    c.data.image_key = "image"
    c.data.text_key = "text"
    c.data.cache_dir = ""            # kind=cached: read it; json/tfds: encode once into it, then train from it
    # The image prompt: "image" (the image itself) or "face" (its face crop: json face_image_file, webdataset
    # KEY.face.jpg; the Plus-face / full-face recipe: the crop conditions, the whole image is the target).
    c.data.condition = "image"
    c.data.resolution = 512
    c.data.batch_size = 8            # global, over all processes
    c.data.workers = 4

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 0.0      # 0: no clipping (paper)
    c.optimizer.accumulate = 1       # gradient accumulation steps
    c.optimizer.schedule = "constant"  # constant | cosine
    c.optimizer.warmup_steps = 0
    c.optimizer.ema_decay = 0.0      # > 0: keep an EMA of the trained weights and export it

    c.step = ml_collections.ConfigDict()
    c.step.prediction_type = "epsilon"   # epsilon | v_prediction
    c.step.compute_dtype = "float32"     # float32 | bfloat16 (float32 master weights either way)
    # decoupled: the paper's separate image K/V; concat: the "simple adapter" ablation (image tokens
    # appended to the text tokens of the frozen cross-attention; train only model.image_proj then).
    c.step.image_conditioning = "decoupled"
    # The paper's condition dropout (section 4.1.2), one uniform draw per sample: the image alone, the
    # caption alone, or both (what classifier-free guidance needs); the three sum to at most 1.
    c.step.image_drop_rate = 0.05
    c.step.text_drop_rate = 0.05
    c.step.both_drop_rate = 0.05
    c.step.noise_offset = 0.0            # the official --noise_offset (0: off)
    c.step.snr_gamma = 0.0               # min-SNR-gamma loss weighting, e.g. 5.0 (0: plain MSE, the paper)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1_000_000
    c.train.log_every = 50
    c.train.save_every = 2000
    c.train.keep = 3
    c.train.trainable = r"^ip_adapters/"   # regex over state paths: what the optimizer sees
    c.train.export = ""                    # default: <workdir>/ip_adapter.safetensors
    c.train.remat = "none"                 # UNet block rematerialisation: none | full | dots (memory for compute)
    c.train.tensorboard = True             # event files in <workdir>/tensorboard (scalars, eval samples)
    c.train.eval_every = 0                 # > 0: live evaluation every N steps and at the end (needs eval.cases)

    # Live evaluation (train.eval_every): a sample grid of held-out references and CLIP-I / CLIP-T.
    c.eval = ml_collections.ConfigDict()
    c.eval.cases = ""                # JSON [{"image": "ref.png", "caption": "..."}] (ipadapter-eval's format);
                                     # "demo": the demo's held-out shapes
    c.eval.clip_model = ""           # transformers CLIPModel folder for CLIP-I / CLIP-T ("": the grid only)
    c.eval.grid = 4                  # cases in the grid (reference | image prompt | image prompt + caption)
    c.eval.num_cases = 0             # cases scored (0: all), shared out over the processes
    c.eval.steps = 25                # DDIM steps of each sample
    c.eval.guidance = 5.0
    c.eval.scale = 1.0               # the adapter's scale
    c.eval.size = 0                  # pixels (0: data.resolution)
    c.eval.seed = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                 # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    # (path regex, PartitionSpec axes) rules; unmatched parameters are replicated. Example for FSDP of the
    # frozen UNet's large kernels: [(r"^unet/.*kernel$", (None, "fsdp"))]
    c.sharding_rules = []
    return c
