"""Each family's standard diffusers configuration, as data.

The configurations mirror the official ``config.json`` files of
``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1``,
``stabilityai/stable-diffusion-xl-base-1.0`` and ``black-forest-labs/FLUX.1-dev`` (architecture fields only: the
provenance fields ``_diffusers_version``, ``_name_or_path``,
``transformers_version`` and ``torch_dtype`` are left out, the last because
transformers 5 would load the weights in that dtype). A single file carries no
configuration, so these are what it is read with unless a diffusers folder
gives others (``model_config``).
"""

from __future__ import annotations

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def _vae(sample_size: int, **extra) -> dict:
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": sample_size,
            "up_block_types": ["UpDecoderBlock2D"] * 4, **extra}


def _clip_text(**fields) -> dict:
    base = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
            "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408}
    return {**base, **fields}


def _model_index(class_name: str, scheduler: str, **components) -> dict:
    index = {"_class_name": class_name, "scheduler": ["diffusers", scheduler],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], **components}
    if class_name == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    return index


_SD_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                 "trained_betas": None}

SD1_CONFIGS = {
    "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768, "down_block_types": _DOWN, "downsample_padding": 1,
             "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
             "sample_size": 64, "up_block_types": _UP},
    "vae": _vae(512),
    "text_encoder": _clip_text(),
    "scheduler": {"_class_name": "PNDMScheduler", **_SD_SCHEDULER},
    "model_index": _model_index("StableDiffusionPipeline", "PNDMScheduler"),
}

SD2_CONFIGS = {
    "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
             "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 1024, "down_block_types": _DOWN, "downsample_padding": 1,
             "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
             "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
             "up_block_types": _UP, "upcast_attention": True, "use_linear_projection": True},
    "vae": _vae(768),
    "text_encoder": _clip_text(hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                               num_attention_heads=16, num_hidden_layers=23, projection_dim=512),
    "scheduler": {"_class_name": "DDIMScheduler", **_SD_SCHEDULER, "prediction_type": "v_prediction"},
    "model_index": _model_index("StableDiffusionPipeline", "DDIMScheduler"),
}

SDXL_CONFIGS = {
    "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
             "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
             "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
             "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
             "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
             "cross_attention_norm": None,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
             "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
             "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
             "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
             "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
             "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
             "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
             "time_embedding_type": "positional", "timestep_post_act": None,
             "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "upcast_attention": None, "use_linear_projection": True},
    "vae": _vae(1024, force_upcast=True, scaling_factor=0.13025),
    "text_encoder": _clip_text(),
    "text_encoder_2": _clip_text(architectures=["CLIPTextModelWithProjection"], hidden_act="gelu",
                                 hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                 num_hidden_layers=32, projection_dim=1280),
    "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
    "model_index": _model_index("StableDiffusionXLPipeline", "EulerDiscreteScheduler",
                                text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                                tokenizer_2=["transformers", "CLIPTokenizer"],
                                force_zeros_for_empty_prompt=True),
}

FLUX_CONFIGS = {
    "transformer": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
                    "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
                    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                    "num_single_layers": 38, "out_channels": None, "patch_size": 1, "pooled_projection_dim": 768},
    "vae": _vae(1024, force_upcast=True, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True),
    "text_encoder": _clip_text(),
    "text_encoder_2": {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_ff": 10240, "d_kv": 64,
                       "d_model": 4096, "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu",
                       "is_gated_act": True, "layer_norm_epsilon": 1e-06, "num_heads": 64, "num_layers": 24,
                       "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
                       "vocab_size": 32128},
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                  "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True},
    "model_index": {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                    "text_encoder_2": ["transformers", "T5EncoderModel"],
                    "tokenizer_2": ["transformers", "T5TokenizerFast"],
                    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                    "image_encoder": [None, None], "feature_extractor": [None, None]},
}
