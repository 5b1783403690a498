"""The Stable Diffusion families a single file can hold, as data: where each
part lives in the file, and each family's standard diffusers configuration.

The configurations mirror the official ``config.json`` files of
``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (architecture fields only: the
provenance fields ``_diffusers_version``, ``_name_or_path``,
``transformers_version`` and ``torch_dtype`` are left out, the last because
transformers 5 would load the weights in that dtype). A single file carries no
configuration, so these are what it is read with unless a diffusers folder
gives others (``model_config``). Nor does it carry tokenizers: each text
encoder names the Hugging Face repos whose tokenizer it takes, looked up in the
local cache (never downloaded) when no configuration folder gives one.
"""

from __future__ import annotations

import copy
import dataclasses

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."

# Buffers of the original training code (``LatentDiffusion`` / ``DDPM``), not
# weights: the noise schedule (the scheduler config carries it), the loss
# weights, the latent scale. Full checkpoints of the single-file models and of
# original-layout ControlNets (``convert.controlnet``) hold them.
DDPM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "scale_factor",
})
# What a single file may hold beside its parts: those buffers and the EMA's counters.
IGNORED_KEYS = DDPM_BUFFERS | {"model_ema.decay", "model_ema.num_updates"}


@dataclasses.dataclass(frozen=True)
class HubTokenizer:
    """Where a tokenizer is found in the local Hugging Face cache: a repo, the
    folder in it (None: the repo's top level), and a padding token to use
    instead of the repo's (SDXL pads its second encoder's text with ``!``)."""

    repo: str
    subfolder: str | None = None
    pad_token: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}/{self.subfolder}" if self.subfolder else self.repo


@dataclasses.dataclass(frozen=True)
class TextSlot:
    """One text encoder of a family: its diffusers component, where the single
    file keeps it, in which naming (``clip``: transformers', ``openclip``), and
    where its tokenizer may be cached (first found is used; a single file has none)."""

    component: str
    prefix: str
    layout: str
    hub_tokenizers: tuple[HubTokenizer, ...] = ()

    @property
    def tokenizer(self) -> str:
        return self.component.replace("text_encoder", "tokenizer")


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its text encoders, the file keys it ignores on purpose
    (named, not matched by pattern, so anything else unused is an error), and
    its standard configuration per component."""

    name: str
    title: str
    text: tuple[TextSlot, ...]
    ignored: tuple[str, ...]
    configs: dict

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(slot.tokenizer for slot in self.text)

    def config(self, component: str) -> dict:
        """A copy of the standard configuration of ``component`` (``unet``,
        ``vae``, ``text_encoder``, ``text_encoder_2``, ``scheduler``, ``model_index``)."""
        return copy.deepcopy(self.configs[component])


# Tokenizers shared by families: OpenAI's CLIP ViT-L/14 (SD 1.x, SDXL's first encoder).
_CLIP_L = "openai/clip-vit-large-patch14"
_SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"

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

SD1 = Family(
    name="sd1", title="SD 1.x",
    text=(TextSlot("text_encoder", "cond_stage_model.transformer.", "clip", (
        HubTokenizer("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
        HubTokenizer("runwayml/stable-diffusion-v1-5", "tokenizer"), HubTokenizer(_CLIP_L))),),
    ignored=("cond_stage_model.transformer.text_model.embeddings.position_ids",
             "cond_stage_model.transformer.embeddings.position_ids"),   # older files lack text_model.
    configs={
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
    })

SD2 = Family(
    name="sd2", title="SD 2.x",
    text=(TextSlot("text_encoder", "cond_stage_model.model.", "openclip", (
        HubTokenizer("stabilityai/stable-diffusion-2-1", "tokenizer"),
        HubTokenizer("stabilityai/stable-diffusion-2-1-base", "tokenizer"))),),
    # OpenCLIP's projection and logit scale: diffusers' SD 2.x text encoder uses
    # neither (its output is the penultimate block's, through ln_final). The
    # last resblock, which diffusers drops too, is ignored by the reader.
    ignored=("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"),
    configs={
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
    })

SDXL = Family(
    name="sdxl", title="SDXL",
    text=(TextSlot("text_encoder", "conditioner.embedders.0.transformer.", "clip", (
              HubTokenizer(_SDXL_REPO, "tokenizer"), HubTokenizer(_CLIP_L))),
          TextSlot("text_encoder_2", "conditioner.embedders.1.model.", "openclip", (
              HubTokenizer(_SDXL_REPO, "tokenizer_2"),
              HubTokenizer("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", pad_token="!")))),
    ignored=("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
             "conditioner.embedders.1.model.logit_scale"),
    configs={
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
    })

FAMILIES = {family.name: family for family in (SD1, SD2, SDXL)}
