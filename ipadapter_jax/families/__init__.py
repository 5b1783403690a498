"""Base-model families as data: one ``Family`` record per base model.

Everything that differs between SD 1.x, SD 2.x and SDXL lives in its record:
how to recognise it (a folder's ``model_index.json`` class and configs, a
single file's keys), its components (text encoders and their tokenizers, in
order, with where a single file keeps each), its text conditioning (the name
of a function in ``families.text``, shared by the pipelines and the training
step), its added conditioning (SDXL's pooled text + time ids), the token
width of its cross-attention, ComfyUI's transformer layout, its standard
configurations (``families.configs``: default size, prediction type, ...),
its pipeline class and the hub repos whose tokenizers a single file uses.
Code elsewhere asks the record; it does not test for a family by name.

Adding a family: its models (``models/``), a ``Family`` entry here, its
standard configs (``configs.py``), its text conditioning (``text.py``) if it is
new, its single-file key maps (``convert/``), and its tests (README: "Adding a
base-model family").

This module imports no JAX: the command lines read families before JAX loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Mapping

from ipadapter_jax.families.configs import FLUX_CONFIGS, SD1_CONFIGS, SD2_CONFIGS, SDXL_CONFIGS
from ipadapter_jax.io.errors import BadFile, MissingFile, Unsupported

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
    """Where a tokenizer is found in the Hugging Face hub cache: a repo, the
    folder in it (None: the repo's top level), and a padding token to use
    instead of the repo's (SDXL pads its second encoder's text with ``!``)."""

    repo: str
    subfolder: str | None = None
    pad_token: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}/{self.subfolder}" if self.subfolder else self.repo


@dataclasses.dataclass(frozen=True)
class TextSlot:
    """One text encoder of a family: its diffusers component and model class,
    where a single file keeps it and in which naming (``clip``: transformers',
    ``openclip``), what it is (for messages), and where its tokenizer may be
    cached (first found is used; a single file has none)."""

    component: str
    model_class: str
    prefix: str
    layout: str
    what: str
    hub_tokenizers: tuple[HubTokenizer, ...] = ()
    # A single file holds one more block than diffusers' encoder (SD 2.x: OpenCLIP's
    # last block, unused as SD 2.x conditions on the penultimate one).
    skips_last_block: bool = False

    @property
    def tokenizer(self) -> str:
        return self.component.replace("text_encoder", "tokenizer")


@dataclasses.dataclass(frozen=True)
class ComfyLayout:
    """The transformers ComfyUI's special weight types pick in one UNet layout
    (``IPAdapterPlus.py``'s ``is_sdxl`` tables), by transformer index.

    counts: transformers in the (input, middle, output) blocks, which identify the
    layout. style: style transfer. strong_style: strong style transfer (and the
    style part of strong style and composition). composition: {index: factor}
    of the composition weight for "composition" and "style and composition";
    strong_composition: the same for "strong style and composition".
    """

    name: str
    counts: tuple[int, int, int]
    style: tuple[int, ...]
    strong_style: tuple[int, ...]
    composition: dict
    strong_composition: dict


@dataclasses.dataclass(frozen=True)
class Family:
    """A base-model family (see the module docstring for what each field is for)."""

    name: str
    title: str
    pipeline: str                      # this package's pipeline class (``ipadapter_jax.pipeline``)
    pipeline_classes: tuple[str, ...]  # diffusers ``model_index.json`` classes of its folders
    text: tuple[TextSlot, ...]
    text_conditioning: str             # a key of ``families.text.TEXT_CONDITIONING``
    added_conditioning: str | None     # the UNet's ``addition_embed_type``
    token_dim: int                     # the standard denoiser's text-token width
    comfy: ComfyLayout | None          # None: no UNet blocks for ComfyUI's weight types (FLUX)
    adapters: str                      # where its official IP-Adapter files are
    file_markers: tuple[str, ...]      # single-file key prefixes only this family has
    ignored: tuple[str, ...]           # single-file keys it ignores on purpose (named, not by pattern)
    configs: dict
    # UNet / VAE sample size of a single file of this family that says epsilon
    # prediction, when that marks a smaller base model (SD 2.x-base: 512 px).
    epsilon_sample_size: int | None = None
    # The denoiser's diffusers component: ``unet`` (SD) or ``transformer`` (FLUX, a DiT).
    denoiser: str = "unet"

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(slot.tokenizer for slot in self.text)

    @property
    def components(self) -> tuple[str, ...]:
        """The component folders of its diffusers folder (scheduler/ is optional)."""
        return (self.denoiser, "vae", *(slot.component for slot in self.text), *self.tokenizers)

    @property
    def default_size(self) -> int:
        """Default image size in pixels: its standard UNet's sample size x the VAE's factor 8
        (FLUX: its VAE's sample size, 1024, as diffusers' 128 latent rows x 8)."""
        if self.denoiser == "unet":
            return self.configs["unet"]["sample_size"] * 8
        return self.configs["vae"]["sample_size"]

    @property
    def prediction_type(self) -> str:
        """``epsilon`` / ``v_prediction`` (SD), ``flow`` (FLUX: velocity noise - x0)."""
        if self.denoiser == "transformer":
            return "flow"
        return self.configs["scheduler"].get("prediction_type", "epsilon")

    def config(self, component: str) -> dict:
        """A copy of the standard configuration of ``component`` (``unet``,
        ``vae``, ``text_encoder``, ``text_encoder_2``, ``scheduler``, ``model_index``)."""
        return copy.deepcopy(self.configs[component])


# Tokenizers shared by families: OpenAI's CLIP ViT-L/14 (SD 1.x, SDXL's first encoder).
_CLIP_L = "openai/clip-vit-large-patch14"
_SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")

# SD 1.x / 2.x: input blocks 1, 2, 4, 5, 7, 8 -> 0-5, middle -> 6, output blocks 3-11 -> 7-15.
_COMFY_SD = ComfyLayout("SD 1.x/2.x", (6, 1, 9), style=(0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15),
                        strong_style=(0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                        composition={4: 0.25, 5: 1.0}, strong_composition={4: 1.0, 5: 1.0})

SD1 = Family(
    name="sd1", title="SD 1.x", pipeline="StableDiffusionPipeline", pipeline_classes=_SD_PIPELINES,
    text=(TextSlot("text_encoder", "CLIPTextModel", "cond_stage_model.transformer.", "clip", "the text encoder",
                   (HubTokenizer("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                    HubTokenizer("runwayml/stable-diffusion-v1-5", "tokenizer"), HubTokenizer(_CLIP_L))),),
    text_conditioning="last_hidden_state", added_conditioning=None, token_dim=768, comfy=_COMFY_SD,
    adapters="the *_sd15* files in h94/IP-Adapter's models/",
    file_markers=("cond_stage_model.transformer.",),
    ignored=("cond_stage_model.transformer.text_model.embeddings.position_ids",
             "cond_stage_model.transformer.embeddings.position_ids"),   # older files lack text_model.
    configs=SD1_CONFIGS)

SD2 = Family(
    name="sd2", title="SD 2.x", pipeline="StableDiffusionPipeline", pipeline_classes=_SD_PIPELINES,
    text=(TextSlot("text_encoder", "CLIPTextModel", "cond_stage_model.model.", "openclip",
                   "the text encoder, OpenCLIP ViT-H/14",
                   (HubTokenizer("stabilityai/stable-diffusion-2-1", "tokenizer"),
                    HubTokenizer("stabilityai/stable-diffusion-2-1-base", "tokenizer")), skips_last_block=True),),
    text_conditioning="last_hidden_state", added_conditioning=None, token_dim=1024, comfy=_COMFY_SD,
    adapters="h94/IP-Adapter has none: train one",
    file_markers=("cond_stage_model.model.",),
    # OpenCLIP's projection and logit scale: diffusers' SD 2.x text encoder uses
    # neither (its output is the penultimate block's, through ln_final). The
    # last resblock, which diffusers drops too, is ignored by the reader.
    ignored=("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"),
    configs=SD2_CONFIGS, epsilon_sample_size=64)

SDXL = Family(
    name="sdxl", title="SDXL", pipeline="StableDiffusionXLPipeline",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    text=(TextSlot("text_encoder", "CLIPTextModel", "conditioner.embedders.0.transformer.", "clip",
                   "the first text encoder, CLIP ViT-L",
                   (HubTokenizer(_SDXL_REPO, "tokenizer"), HubTokenizer(_CLIP_L))),
          TextSlot("text_encoder_2", "CLIPTextModelWithProjection", "conditioner.embedders.1.model.", "openclip",
                   "the second text encoder, OpenCLIP ViT-bigG/14 (CLIPTextModelWithProjection)",
                   (HubTokenizer(_SDXL_REPO, "tokenizer_2"),
                    HubTokenizer("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", pad_token="!")))),
    text_conditioning="penultimate_pair_pooled", added_conditioning="text_time", token_dim=2048,
    # input blocks 4, 5, 7, 8 -> 0-3, middle -> 4, output blocks 0-5 -> 5-10; style is
    # up_blocks.0.attentions.1 (6), composition down_blocks.2.attentions.1 (3).
    comfy=ComfyLayout("SDXL", (4, 1, 6), style=(6,), strong_style=(0, 1, 2, 4, 5, 6, 7, 8, 9, 10),
                      composition={3: 1.0}, strong_composition={3: 1.0}),
    adapters="the *_sdxl* files in h94/IP-Adapter's sdxl_models/",
    file_markers=("conditioner.", f"{UNET_PREFIX}label_emb."),
    ignored=("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
             "conditioner.embedders.1.model.logit_scale"),
    configs=SDXL_CONFIGS)

FLUX = Family(
    name="flux", title="FLUX.1", pipeline="FluxPipeline", pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    text=(TextSlot("text_encoder", "CLIPTextModel", "text_encoders.clip_l.transformer.", "clip",
                   "the first text encoder, CLIP ViT-L (pooled)",
                   (HubTokenizer("black-forest-labs/FLUX.1-dev", "tokenizer"), HubTokenizer(_CLIP_L))),
          TextSlot("text_encoder_2", "T5EncoderModel", "text_encoders.t5xxl.transformer.", "t5",
                   "the second text encoder, T5 v1.1 XXL",
                   (HubTokenizer("black-forest-labs/FLUX.1-dev", "tokenizer_2"),))),
    text_conditioning="t5_tokens_clip_pooled", added_conditioning=None, token_dim=4096, comfy=None,
    adapters="XLabs-AI/flux-ip-adapter (ip_adapter.safetensors, v1) and XLabs-AI/flux-ip-adapter-v2",
    # BFL's single-file transformer (flux1-dev.safetensors): its blocks, by their names.
    file_markers=("double_blocks.", "single_blocks."), ignored=(), configs=FLUX_CONFIGS, denoiser="transformer")

FAMILIES: dict[str, Family] = {family.name: family for family in (SD1, SD2, SDXL, FLUX)}
UNET_FAMILIES: tuple[Family, ...] = tuple(f for f in FAMILIES.values() if f.denoiser == "unet")


# --------------------------------------------------------------------------- lookups

def of_token_dim(dim: int) -> Family | None:
    """The first family whose standard UNet takes tokens of this width (None: none does)."""
    return next((f for f in UNET_FAMILIES if f.token_dim == dim), None)


def adapter_denoiser(keys) -> str | None:
    """The denoiser an IP-Adapter file's keys are made for: ``"transformer"``
    (FLUX: XLabs' ``ip_adapter_proj_model.*`` / ``double_blocks.*``, or diffusers'
    naming of them, whose image keys have biases), ``"unet"`` (SD: h94's
    ``image_proj.*`` / ``ip_adapter.*``), None (neither: the loader says what it is)."""
    keys = list(keys)
    if any(k.startswith(("ip_adapter_proj_model.", "double_blocks.")) for k in keys):
        return "transformer"
    # InstantX's FLUX adapter: an MLP projection with a norm (h94's FaceID ones too) and image keys in
    # processor 0 (h94's sit at odd indices).
    if {"image_proj.proj.0.weight", "image_proj.norm.weight", "ip_adapter.0.to_k_ip.weight"} <= set(keys):
        return "transformer"
    if any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys):
        biased = any(k.startswith("ip_adapter.") and k.endswith("to_k_ip.bias") for k in keys)
        return "transformer" if biased else "unet"
    return None


def of_pipeline_class(class_name: str) -> list[Family]:
    """The families whose diffusers folders name ``class_name`` in ``model_index.json``."""
    return [f for f in FAMILIES.values() if class_name in f.pipeline_classes]


def of_unet_config(unet: Mapping) -> Family:
    """The family of a UNet config (a dict or a config object): its added
    conditioning, else its cross-attention width (SD 1.x for widths no family has)."""
    get = unet.get if isinstance(unet, Mapping) else lambda k, d=None: getattr(unet, k, d)
    added = get("addition_embed_type")
    if added is not None:
        found = [f for f in UNET_FAMILIES if f.added_conditioning == added]
        if not found:
            raise Unsupported(f"a UNet with addition_embed_type={added!r} belongs to no supported family "
                              f"({', '.join(f.title for f in UNET_FAMILIES)})")
        return found[0]
    width = get("cross_attention_dim")
    return next((f for f in UNET_FAMILIES if f.added_conditioning is None and f.token_dim == width), SD1)


def of_configs(configs: Mapping[str, dict]) -> Family:
    """The family a diffusers folder's configs describe: added conditioning or a
    second text encoder (SDXL); else the text encoder's activation (SD 2.x's
    OpenCLIP uses gelu, SD 1.x's OpenAI CLIP quick_gelu); else the UNet's width."""
    unet = configs.get("unet", {})
    if unet.get("addition_embed_type") is not None:
        return of_unet_config(unet)
    if "transformer" in configs:
        return next(f for f in FAMILIES.values() if f.denoiser == "transformer")
    two = [f for f in UNET_FAMILIES if len(f.text) > 1]
    if "text_encoder_2" in configs and two:
        return two[0]
    text = configs.get("text_encoder")
    if text is not None:
        act = text.get("hidden_act")
        return next((f for f in UNET_FAMILIES if len(f.text) == 1
                     and f.configs["text_encoder"].get("hidden_act") == act), SD1)
    return of_unet_config(unet)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadFile(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise BadFile(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def folder_configs(model_dir: Path) -> dict[str, dict]:
    """The component configs of a diffusers folder that has them (``model_index``
    and each ``<component>/config.json``), read as plain JSON."""
    found = {}
    if (model_dir / "model_index.json").is_file():
        found["model_index"] = _read_json(model_dir / "model_index.json")
    for sub in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        if (model_dir / sub / "config.json").is_file():
            found[sub] = _read_json(model_dir / sub / "config.json")
    return found


def of_folder(model_dir: str | Path) -> Family:
    """The family of a diffusers folder: its ``model_index.json`` class (refused
    by name when no family runs it), then its configs."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingFile(f"model folder not found: {model_dir}")
    configs = folder_configs(model_dir)
    name = configs.get("model_index", {}).get("_class_name")
    if name is not None and not of_pipeline_class(name):
        runs = ", ".join(sorted({c for f in FAMILIES.values() for c in f.pipeline_classes}))
        raise Unsupported(f"{model_dir} is a {name} folder (model_index.json); this package runs {runs} folders")
    candidates = of_pipeline_class(name) if name is not None else list(FAMILIES.values())
    if len(candidates) == 1:      # the class alone says (SDXL); SD 1.x and 2.x share theirs
        return candidates[0]
    family = of_configs(configs)
    return family if family in candidates else candidates[0]
