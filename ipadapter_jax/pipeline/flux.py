"""Text + image prompts -> images for FLUX.1 (dev, schnell): prepare -> denoise -> decode.

``FluxPipeline.from_pretrained(folder)`` reads a diffusers ``FluxPipeline``
folder (transformer, vae, CLIP-L text encoder + tokenizer, T5 encoder +
tokenizer, scheduler); ``load_ip_adapter`` adds an XLabs FLUX IP-Adapter
(``ip_adapter.flux``). A call encodes the prompt (T5 tokens, CLIP pooled
text), packs 2x2 latent patches into tokens, runs one jitted ``fori_loop`` of
flow-matching Euler steps (real classifier-free guidance, ``true_cfg_scale``,
as one [negative; positive] batch) and decodes through the VAE's shift and
scale. ``guidance_scale`` is the *embedded* guidance of guidance-distilled
models (dev), as diffusers' ``guidance_scale``; schnell has none.

Latents in and out of the API are NHWC and unpacked, ``[B, H/8, W/8, 16]``,
in the transformer's space (before the VAE's shift and scaling).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax import families
from ipadapter_jax.convert.build import build_module
from ipadapter_jax.convert.flux_lora import apply_flux_lora
from ipadapter_jax.convert.flux_single_file import load_bfl_transformer
from ipadapter_jax.convert.single_file import read_vae
from ipadapter_jax.io.errors import BadArgument, Incompatible, Unsupported, require_finite
from ipadapter_jax.io.files import read_json
from ipadapter_jax.io.hub import PIPELINE_FOLDER_PATTERNS, resolve, resolve_model_folder
from ipadapter_jax.io.images import preprocess, preprocess_siglip
from ipadapter_jax.ip_adapter import flux as flux_adapter
from ipadapter_jax.ip_adapter.gates import schedule_gates
from ipadapter_jax.ip_adapter.masks import resize_mask
from ipadapter_jax.models import AutoencoderKL, CLIPTextModel, CLIPVisionModelWithProjection
from ipadapter_jax.models.flux import FluxTransformer2DModel
from ipadapter_jax.models.siglip import SiglipVisionModel
from ipadapter_jax.models.t5 import T5EncoderModel
from ipadapter_jax.pipeline.inputs import load_init_image, load_mask
from ipadapter_jax.pipeline.jitted import JittedModule, data_fsdp_mesh, fsdp_shardings, shard_batch
from ipadapter_jax.pipeline.prompts import ImagePromptSpec, check_spec
from ipadapter_jax.pipeline.stable_diffusion import SampleOutput, refuse_nonfinite
from ipadapter_jax.schedulers.core import SchedulerState, load_scheduler_config
from ipadapter_jax.schedulers.flow_match import FlowMatchEuler

log = logging.getLogger(__name__)

PIPELINE_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline")
# T5's SentencePiece model (tokenizer_2/spiece.model) beside the usual folder files.
FLUX_FOLDER_PATTERNS = (*PIPELINE_FOLDER_PATTERNS, "*/*.model")


def _embeds(value, adapter, what: str) -> np.ndarray:
    """Given embeddings as [N, D] (or [D]), their width checked against the adapter's input."""
    x = np.asarray(value, np.float32)
    if x.ndim not in (1, 2) or x.shape[-1] != adapter.input_dim:
        raise Incompatible(f"{what} have shape {x.shape}; this adapter takes [N, {adapter.input_dim}] (CLIP ViT-L/14 "
                           "image_embeds for XLabs' adapters, SigLIP so400m pooler_output for InstantX's)")
    return x.reshape(-1, adapter.input_dim)


def _flux_folder(model_dir) -> Path:
    """A diffusers FLUX folder (local path or hub id), refused by name when it is another pipeline's."""
    folder = resolve(model_dir, kind="folder", what="FLUX model folder", allow_patterns=FLUX_FOLDER_PATTERNS)
    index_path = folder / "model_index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise Unsupported(f"{folder} is {'a ' + name if name else 'not a'} FLUX folder (model_index.json); "
                          f"FluxPipeline runs {', '.join(PIPELINE_CLASSES)} folders")
    return folder


# --------------------------------------------------------------------------- latent tokens

def pack_latents(latents) -> jax.Array:
    """[B, h, w, C] -> [B, h/2 x w/2, 4C]: each 2x2 patch one token, channels
    ordered (C, dy, dx) as diffusers' ``_pack_latents`` orders them from NCHW."""
    b, h, w, c = latents.shape
    x = jnp.asarray(latents).reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens, height: int, width: int) -> jax.Array:
    """The inverse of ``pack_latents`` for latents ``height`` x ``width``."""
    b, _, ch = tokens.shape
    x = jnp.asarray(tokens).reshape(b, height // 2, width // 2, ch // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, ch // 4)


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """[h/2 x w/2, 3] position ids of the packed tokens: (0, row, column)."""
    ids = np.zeros((height // 2, width // 2, 3), np.float32)
    ids[..., 1] = np.arange(height // 2)[:, None]
    ids[..., 2] = np.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


# --------------------------------------------------------------------------- the loop

class FluxModels(nnx.Module):
    """The transformer and the attached adapters: one graph, split once per loop."""

    def __init__(self, transformer: FluxTransformer2DModel, adapters: list):
        self.transformer = transformer
        self.adapters = nnx.List(adapters)


def make_flux_loop(graphdef, scheduler: FlowMatchEuler, *, true_cfg: bool):
    """The jitted loop ``denoise(params, state, latents, context, pooled, rope,
    guidance, prompts, gates, true_cfg_scale, start, stop) -> latents`` over
    packed latents, steps [start, stop) (traced: one executable runs the whole
    loop or one step at a time, for a progress bar); under ``true_cfg`` the
    conditioning batch is [negative; positive]."""

    def denoise(params, state, latents, context, pooled, rope, guidance, prompts, gates, cfg_scale, start, stop):
        models = nnx.merge(graphdef, params)

        def body(i, x):
            model_in = jnp.concatenate([x, x]) if true_cfg else x
            # diffusers passes t / 1000 and the model multiplies by 1000 again: the same float32 rounding here.
            t = jnp.broadcast_to(state.timesteps[i] / 1000, (model_in.shape[0],))
            ip = tuple((adapter, prompt.replace(scale=prompt.scale * g[i]))
                       for adapter, prompt, g in zip(models.adapters, prompts, gates))
            v = models.transformer(model_in, context, pooled, t, rope, guidance, ip=ip)
            if true_cfg:
                negative, positive = jnp.split(v, 2)
                v = negative + cfg_scale * (positive - negative)
            x, _ = scheduler.step(state, v, i, x)
            return x

        return jax.lax.fori_loop(start, stop, body, latents)

    return jax.jit(denoise)


@dataclasses.dataclass
class FluxPrepared:
    """A call after ``prepare``: everything the jitted loop takes."""

    state: SchedulerState
    latents: jax.Array            # packed [B, S, 4C], noised
    context: jax.Array            # T5 tokens [B or 2B, L, C]
    pooled: jax.Array             # CLIP pooled [B or 2B, P]
    rope: tuple
    guidance: jax.Array | None
    prompts: tuple
    gates: np.ndarray
    start: int
    steps: int
    true_cfg_scale: float
    latent_size: tuple[int, int]

    @property
    def true_cfg(self) -> bool:
        return self.context.shape[0] == 2 * self.latents.shape[0]


class FluxPipeline:
    """FLUX.1 text-to-image and img2img with XLabs IP-Adapters, in JAX.

    ``dtype`` is the transformer's and text encoders' compute dtype; the VAE
    and the scheduler arithmetic stay in float32. ``fsdp`` > 1 spreads the
    transformer's and the adapters' weights over that many of this process's
    devices (a ``(data, fsdp)`` mesh; the batch splits over ``data``), so a
    transformer larger than one device's memory runs; 1: every device holds
    all weights and takes a share of the batch."""

    def __init__(self, transformer: FluxTransformer2DModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer, text_encoder_2: T5EncoderModel, tokenizer_2, scheduler_config: dict,
                 image_encoder: CLIPVisionModelWithProjection | None = None, *, fsdp: int = 1):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler_config = scheduler_config
        self.scheduler = FlowMatchEuler(scheduler_config)
        self.image_encoder = image_encoder
        self.ip_adapters: list[flux_adapter.FluxIPAdapter] = []
        self._clip = JittedModule(text_encoder)
        self._t5 = JittedModule(text_encoder_2)
        self._image = JittedModule(image_encoder) if image_encoder is not None else None
        self._vae_encode = JittedModule(vae, "encode")
        self._vae_decode = JittedModule(vae, "decode")
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.mesh = data_fsdp_mesh(fsdp)
        self._shardings: dict = {}
        self._loops: dict = {}
        self.family = families.of_pipeline_class(type(self).__name__)[0]

    @property
    def default_size(self) -> int:
        """1024 px for the standard VAE (diffusers' ``default_sample_size`` 128 x the VAE factor)."""
        return 128 * self.vae_scale

    @property
    def num_compiled(self) -> int:
        return len(self._loops)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, image_encoder=None, dtype=jnp.float32,
                        attention_backend: str = "auto", variant: str | None = None, fsdp: int = 1
                        ) -> "FluxPipeline":
        """Load a diffusers FLUX folder (a local path or a hub id) and optionally a
        CLIP image encoder folder (XLabs' adapters take CLIP ViT-L/14, e.g.
        ``openai/clip-vit-large-patch14``). ``variant`` ("fp16", "bf16") reads
        ``*.{variant}.safetensors`` weights, into float32 parameters."""
        folder = _flux_folder(model_dir)
        options = dict(dtype=dtype, attention_backend=attention_backend)
        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", variant=variant, **options)
        return cls._with(transformer, folder, image_encoder=image_encoder, variant=variant, fsdp=fsdp, **options)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, model_config: str | os.PathLike,
                         vae: str | os.PathLike | None = None, image_encoder=None, dtype=jnp.float32,
                         attention_backend: str = "auto", fsdp: int = 1) -> "FluxPipeline":
        """The transformer from a BFL single file (``flux1-dev.safetensors``; fp8,
        bf16, fp16 or float32 storage; ComfyUI's ``model.diffusion_model.`` prefix
        too), everything else from ``model_config``: a diffusers FLUX folder (its
        transformer weights are not read). ``vae``: a VAE folder or file instead
        of the folder's (``convert.single_file.read_vae``: diffusers or LDM names)."""
        folder = _flux_folder(model_config)
        config_path = folder / "transformer" / "config.json"
        base = read_json(config_path) if config_path.is_file() else families.of_pipeline_class(
            cls.__name__)[0].config("transformer")
        options = dict(dtype=dtype, attention_backend=attention_backend)
        transformer = load_bfl_transformer(path, base, **options)
        vae_module = None
        if vae is not None:
            vae_module = build_module("vae", read_vae(vae, read_json(folder / "vae" / "config.json")),
                                      attention_backend=attention_backend)
        return cls._with(transformer, folder, image_encoder=image_encoder, vae=vae_module, fsdp=fsdp, **options)

    @classmethod
    def _with(cls, transformer, folder, *, image_encoder, dtype, attention_backend, variant=None, vae=None,
              fsdp: int = 1) -> "FluxPipeline":
        """The pipeline of ``transformer`` and the other components of a FLUX folder."""
        from transformers import AutoTokenizer, CLIPTokenizer

        options = dict(dtype=dtype, attention_backend=attention_backend)
        if vae is None:
            vae = AutoencoderKL.from_pretrained(folder / "vae", variant=variant, attention_backend=attention_backend)
        clip = CLIPTextModel.from_pretrained(folder / "text_encoder", variant=variant, **options)
        t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", variant=variant, **options)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        tokenizer_2 = AutoTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True)
        encoder = None
        if isinstance(image_encoder, (CLIPVisionModelWithProjection, SiglipVisionModel)):
            encoder = image_encoder
        elif image_encoder is not None:
            enc_folder = resolve_model_folder(image_encoder, weights_name="model", what="image encoder folder")
            config = read_json(enc_folder / "config.json") if (enc_folder / "config.json").is_file() else {}
            siglip = "siglip" in str(config.get("model_type", "")) or "vision_config" in config and \
                "siglip" in str(config["vision_config"].get("model_type", ""))
            encoder = (SiglipVisionModel if siglip else CLIPVisionModelWithProjection).from_pretrained(
                enc_folder, **options)
        return cls(transformer, vae, clip, tokenizer, t5, tokenizer_2, load_scheduler_config(folder), encoder,
                   fsdp=fsdp)

    # ------------------------------------------------------------------ adapters

    def load_ip_adapter(self, path: str | os.PathLike) -> flux_adapter.FluxIPAdapter:
        """Read and attach an XLabs FLUX IP-Adapter file; calls then take one
        ``ImagePromptSpec`` per attached adapter, in order."""
        source = resolve(path, kind="file", what="FLUX IP-Adapter file")
        adapter = flux_adapter.load_flux_ip_adapter(source, self.transformer)
        return self.attach(adapter)

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0):
        """Merge a FLUX LoRA file (kohya, diffusers / PEFT or BFL names; ``convert.flux_lora``)
        into the transformer's weights; returns what was merged."""
        return apply_flux_lora(self.transformer, resolve(path, kind="file", what="LoRA file"), scale)

    def attach(self, adapter: flux_adapter.FluxIPAdapter) -> flux_adapter.FluxIPAdapter:
        self.ip_adapters.append(adapter)
        return adapter

    def detach_ip_adapters(self) -> None:
        self.ip_adapters = []

    # ------------------------------------------------------------------ text

    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (T5 tokens [B, L, C], CLIP pooled [B, P]) as diffusers'
        ``encode_prompt``: CLIP padded to its 77 tokens, T5 to ``max_sequence_length``
        (no attention mask: padding is attended, as in training)."""
        if not 1 <= max_sequence_length <= 512:
            raise BadArgument(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        prompts = list(prompts)
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="np").input_ids
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                  return_tensors="np").input_ids
        full = self.tokenizer_2(prompts, padding="longest", return_tensors="np").input_ids
        if full.shape[-1] > t5_ids.shape[-1]:
            log.warning("The prompt was truncated to max_sequence_length=%d T5 tokens", max_sequence_length)
        pooled = self._clip(jnp.asarray(clip_ids, jnp.int32)).pooler_output
        context = self._t5(jnp.asarray(t5_ids, jnp.int32))
        return np.asarray(context, np.float32), np.asarray(pooled, np.float32)

    # ------------------------------------------------------------------ image prompts

    def encode_images(self, images) -> np.ndarray:
        """Reference images -> CLIP ``image_embeds`` [N, D] (XLabs' adapters) or SigLIP
        ``pooler_output`` [N, D] (InstantX's), at the encoder's own resolution."""
        if self._image is None:
            raise BadArgument("this pipeline has no image encoder: pass image_encoder= to from_pretrained "
                              "(CLIP ViT-L/14 for XLabs' adapters, SigLIP so400m for InstantX's), or give embeds")
        size = self.image_encoder.config.image_size
        if isinstance(self.image_encoder, SiglipVisionModel):
            return np.asarray(self._image(jnp.asarray(preprocess_siglip(list(images), size))).pooler_output,
                              np.float32)
        return np.asarray(self._image(jnp.asarray(preprocess(list(images), size, size))).image_embeds, np.float32)

    def _image_prompts(self, specs: Sequence[ImagePromptSpec], *, batch: int, true_cfg: bool, latent_size,
                       height: int, width: int, steps: int) -> tuple[tuple, np.ndarray]:
        if len(specs) != len(self.ip_adapters):
            raise BadArgument(f"{len(specs)} image prompts for {len(self.ip_adapters)} attached IP-Adapters")
        prompts, gates = [], []
        for k, (spec, adapter) in enumerate(zip(specs, self.ip_adapters)):
            if spec.face_embeds is not None or spec.weight_type is not None or spec.combine != "concat":
                raise Unsupported(f"image prompt {k}: face_embeds, weight_type and combine modes are for SD "
                                  "adapters; a FLUX (XLabs) adapter takes images or embeds, scale, masks, start/end")
            embeds = (_embeds(spec.embeds, adapter, f"image prompt {k}: embeds") if spec.embeds is not None
                      else self.encode_images(spec.images if spec.images is not None else []))
            if embeds.shape[0] == 0:
                raise BadArgument(f"image prompt {k}: no reference images or embeds")
            if embeds.shape[-1] != adapter.input_dim:
                raise Incompatible(f"image prompt {k}: embeddings are {embeds.shape[-1]} wide but the adapter takes "
                                   f"{adapter.input_dim} (CLIP ViT-L/14 image_embeds for XLabs' adapters, SigLIP "
                                   "so400m pooler_output for InstantX's): give its image encoder")
            tokens = np.asarray(adapter.project(embeds))[None]           # [1, N, T, C]
            tokens = np.repeat(tokens, batch, axis=0)
            if true_cfg:
                if spec.negative_embeds is not None:
                    neg = _embeds(spec.negative_embeds, adapter, f"image prompt {k}: negative_embeds")
                else:    # diffusers' default negative image prompt: a black image
                    neg = self.encode_images(spec.negative_images or [np.zeros((height, width, 3), np.uint8)])
                neg_tokens = np.asarray(adapter.project(neg))[None]
                if neg_tokens.shape[1] == 1 and tokens.shape[1] > 1:
                    neg_tokens = np.repeat(neg_tokens, tokens.shape[1], axis=1)
                if neg_tokens.shape[1:] != tokens.shape[1:]:
                    raise BadArgument(f"image prompt {k}: {neg_tokens.shape[1]} negative images for "
                                      f"{tokens.shape[1]} reference images")
                tokens = np.concatenate([np.repeat(neg_tokens, batch, axis=0), tokens])
            masks = None
            if spec.masks is not None and adapter.layout == flux_adapter.INSTANTX:
                raise Unsupported(f"image prompt {k}: masks with InstantX's adapter (its single-stream blocks "
                                  "give every text token an image prompt too): use an XLabs adapter for masks")
            if spec.masks is not None:
                if len(spec.masks) != tokens.shape[1]:
                    raise BadArgument(f"image prompt {k}: {len(spec.masks)} masks for {tokens.shape[1]} images")
                h2, w2 = latent_size[0] // 2, latent_size[1] // 2
                grid = np.stack([resize_mask(load_mask(m, height, width), h2, w2).reshape(-1) for m in spec.masks])
                masks = {h2 * w2: jnp.asarray(grid[None], jnp.float32)}
            prompts.append(flux_adapter.flux_image_prompt(adapter, tokens, spec.scale, masks=masks))
            gates.append(schedule_gates(steps, spec.start, spec.end))
        return tuple(prompts), np.asarray(gates, np.float32).reshape(len(prompts), steps)

    # ------------------------------------------------------------------ the stages

    def prepare(self, prompt: str | Sequence[str] = "", *, negative_prompt: str | Sequence[str] | None = None,
                ip_adapter_prompts: Sequence[ImagePromptSpec] = (), num_inference_steps: int = 28,
                guidance_scale: float = 3.5, true_cfg_scale: float = 1.0, height: int | None = None,
                width: int | None = None, num_images: int = 1, seed: int = 0, latents=None, init_image=None,
                strength: float = 0.6, max_sequence_length: int = 512) -> FluxPrepared:
        """Validate and encode a call (see ``__call__``)."""
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        step = 2 * self.vae_scale
        if height % step or width % step:
            raise BadArgument(f"height and width must be multiples of {step} (the VAE's factor x 2x2 packing), "
                              f"got {height}x{width}")
        if num_inference_steps < 1:
            raise BadArgument(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        for name, value in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale),
                            ("strength", strength), ("latents", latents)):
            require_finite(name, value)
        for i, spec in enumerate(ip_adapter_prompts):
            check_spec(spec, f"ip_adapter_prompts[{i}]")
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        true_cfg = true_cfg_scale > 1 and negative_prompt is not None
        lh, lw = height // self.vae_scale, width // self.vae_scale
        channels = self.transformer.config.in_channels // 4
        context, pooled = self.encode_prompt(prompts, max_sequence_length)
        if true_cfg:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch:
                raise BadArgument(f"{len(negatives)} negative prompts for {batch} prompts")
            neg_context, neg_pooled = self.encode_prompt(negatives, max_sequence_length)
            context, pooled = np.concatenate([neg_context, context]), np.concatenate([neg_pooled, pooled])
        seq_len = (lh // 2) * (lw // 2)
        state = self.scheduler.set_timesteps(num_inference_steps, seq_len)
        steps = self.scheduler.num_steps(state)
        latent_key, vae_key = jax.random.split(jax.random.key(seed))
        shape = (batch, lh, lw, channels)
        if latents is not None:
            noise = np.asarray(latents, np.float32)
            if noise.shape != shape:
                raise BadArgument(f"latents must have shape {shape} (NHWC, unpacked), got {noise.shape}")
        else:
            noise = np.asarray(jax.random.normal(latent_key, shape))
        x, start = pack_latents(noise), 0
        if init_image is not None:
            if not 0.0 < strength <= 1.0:
                raise BadArgument(f"strength must be in (0, 1], got {strength}")
            start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
            if start >= steps:
                raise BadArgument(f"strength {strength} leaves no denoising step of {num_inference_steps}: raise it")
            pixels = np.repeat(load_init_image(init_image, height, width), batch, axis=0)
            init = self._vae_encode(jnp.asarray(pixels)).sample(vae_key)
            shift = self.vae.config.shift_factor or 0.0
            init = (init - shift) * self.vae.scaling_factor
            x = self.scheduler.add_noise(state, pack_latents(init), x, start)
        ip_prompts, gates = self._image_prompts(list(ip_adapter_prompts), batch=batch, true_cfg=true_cfg,
                                                latent_size=(lh, lw), height=height, width=width, steps=steps)
        txt_ids = np.zeros((context.shape[1], 3), np.float32)
        rope = self.transformer.rope(txt_ids, latent_image_ids(lh, lw))
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = jnp.full((context.shape[0],), guidance_scale, jnp.float32)
        return FluxPrepared(state=state, latents=x, context=jnp.asarray(context), pooled=jnp.asarray(pooled),
                            rope=tuple(jnp.asarray(r) for r in rope), guidance=guidance, prompts=ip_prompts,
                            gates=gates, start=start, steps=steps, true_cfg_scale=true_cfg_scale,
                            latent_size=(lh, lw))

    def denoise(self, request: FluxPrepared, *, progress: bool = False,
                on_step: Callable[[jax.Array], None] | None = None) -> tuple[jax.Array, dict]:
        """Run the jitted loop -> (final packed latents, timings); compiled once per
        signature. ``progress``: one call per step, with a progress bar;
        ``on_step(packed latents)``: called after every step (the parity toolkit's trajectory)."""
        models = FluxModels(self.transformer, list(self.ip_adapters))
        graphdef, params = nnx.split(models)
        if graphdef not in self._shardings:
            self._shardings = {graphdef: fsdp_shardings(params, self.mesh)}
        params = jax.device_put(params, self._shardings[graphdef])
        nnx.update(models, params)   # the modules keep the placed weights: the next call moves nothing
        shard = lambda x: None if x is None else shard_batch(self.mesh, x)
        prompts = tuple(p.replace(tokens=shard(p.tokens)) for p in request.prompts)
        args = (params, request.state, shard(request.latents), shard(request.context), shard(request.pooled),
                request.rope, shard(request.guidance), prompts, jnp.asarray(request.gates),
                jnp.float32(request.true_cfg_scale), jnp.int32(request.start), jnp.int32(request.steps))
        leaves = jax.tree.leaves(args)
        key = (graphdef, self.scheduler.cache_key, request.true_cfg, jax.tree.structure(args),
               tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves))
        t0 = time.perf_counter()
        if key not in self._loops:
            self._loops[key] = make_flux_loop(graphdef, self.scheduler, true_cfg=request.true_cfg).lower(
                *args).compile()
        timings = {"compile_s": time.perf_counter() - t0}
        t1 = time.perf_counter()
        loop = self._loops[key]
        if progress or on_step is not None:
            from tqdm.auto import tqdm

            final = args[2]
            for i in tqdm(range(request.start, request.steps), desc="denoising", unit="step", disable=not progress):
                final = loop(*args[:2], jax.device_put(final, args[2].sharding), *args[3:10], jnp.int32(i),
                             jnp.int32(i + 1))
                final.block_until_ready()
                if on_step is not None:
                    on_step(final)
        else:
            final = loop(*args)
        final.block_until_ready()
        run = request.steps - request.start
        timings.update(denoise_s=time.perf_counter() - t1, steps=run)
        timings["steps_per_s"] = run / max(timings["denoise_s"], 1e-9)
        return final, timings

    def decode(self, latents) -> np.ndarray:
        """Unpacked latents [B, h, w, C] (transformer space) -> images [B, H, W, 3] in [0, 1]."""
        shift = self.vae.config.shift_factor or 0.0
        images = self._vae_decode(jnp.asarray(latents) / self.vae.scaling_factor + shift)
        return np.asarray(jnp.clip(images / 2 + 0.5, 0.0, 1.0))

    def __call__(self, prompt: str | Sequence[str] = "", *, negative_prompt: str | Sequence[str] | None = None,
                 ip_adapter_prompts: Sequence[ImagePromptSpec] = (), num_inference_steps: int = 28,
                 guidance_scale: float = 3.5, true_cfg_scale: float = 1.0, height: int | None = None,
                 width: int | None = None, num_images: int = 1, seed: int = 0, latents=None, init_image=None,
                 strength: float = 0.6, max_sequence_length: int = 512, progress: bool = False,
                 allow_nonfinite: bool = False, on_step: Callable[[jax.Array], None] | None = None
                 ) -> SampleOutput:
        """Sample images.

        guidance_scale: embedded guidance (dev; ignored by models without a guidance embedding).
        true_cfg_scale / negative_prompt: real classifier-free guidance when > 1 and a
          negative prompt is given (two transformer passes per step, as one batch);
          each adapter's negative image prompt is then its ``negative_images`` /
          ``negative_embeds``, else a black image, as diffusers.
        latents: unit-variance initial noise [B, H/8, W/8, C] (NHWC, unpacked); overrides ``seed``.
        init_image / strength: img2img (the VAE-encoded image, noised to the step ``strength`` implies).
        Returns ``SampleOutput``: images in [0, 1], final latents [B, H/8, W/8, C]
        before the VAE's shift and scaling, timings.
        """
        t0 = time.perf_counter()
        request = self.prepare(prompt, negative_prompt=negative_prompt, ip_adapter_prompts=ip_adapter_prompts,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               true_cfg_scale=true_cfg_scale, height=height, width=width, num_images=num_images,
                               seed=seed, latents=latents, init_image=init_image, strength=strength,
                               max_sequence_length=max_sequence_length)
        timings = {"encode_s": time.perf_counter() - t0}
        packed, loop_timings = self.denoise(request, progress=progress, on_step=on_step)
        timings.update(loop_timings)
        final = unpack_latents(packed, *request.latent_size)
        t1 = time.perf_counter()
        images = self.decode(final)
        timings["decode_s"] = time.perf_counter() - t1
        if not allow_nonfinite:
            refuse_nonfinite(np.asarray(final), images)
        return SampleOutput(images=images, latents=np.asarray(final), timings=timings)
