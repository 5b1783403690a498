"""Text + image prompts -> images for SD 1.x / 2.x: prepare -> denoise -> decode.

``StableDiffusionPipeline.from_pretrained(model_dir)`` reads a diffusers SD
folder (unet, vae, text_encoder, tokenizer, scheduler); ``load_ip_adapter``
attaches official adapter files; calling the pipeline samples. A call runs in
three stages: ``prepare`` (validate, encode text and reference images, draw
the noise, img2img) gives a ``Prepared`` request; ``denoise`` runs it through
one jitted ``lax.fori_loop`` (CFG over text and image together, scheduler
steps, per-step adapter gates), compiled once per UNet structure, scheduler
and shape, with the batch sharded over every local device on a ``data`` mesh
axis; ``decode`` runs the VAE. Prompts, seeds, scales, masks and images are
array inputs: changing them never recompiles.
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

from ipadapter_jax import families, ip_adapter, schedulers
from ipadapter_jax.convert.components import Components, load_components
from ipadapter_jax.convert.controlnet import load_controlnet
from ipadapter_jax.families.text import TEXT_CONDITIONING, EncodedText, token_ids
from ipadapter_jax.io.errors import BadArgument, Incompatible, NonFiniteError, Unsupported, require_finite
from ipadapter_jax.io.hub import pipeline_patterns, resolve, resolve_model_folder
from ipadapter_jax.models import AutoencoderKL, CLIPTextModel, CLIPVisionModelWithProjection, UNet2DConditionModel
from ipadapter_jax.models.conditioning import ImagePrompt, UNetConditioning
from ipadapter_jax.models.controlnet import ControlNetModel
from ipadapter_jax.pipeline.control import ControlInputs, ControlNetSpec, check_controlnet_fits, prepare_control
from ipadapter_jax.pipeline.denoise import CompiledLoops, run_stepwise
from ipadapter_jax.pipeline.inputs import load_init_image
from ipadapter_jax.pipeline.jitted import JittedModule, data_mesh, shard_batch
from ipadapter_jax.pipeline.prompts import ImagePromptSpec, build_image_prompts, check_spec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SampleOutput:
    images: np.ndarray        # [B, H, W, 3] float32 in [0, 1]
    latents: np.ndarray       # [B, h, w, 4] final latents before the VAE (NHWC)
    timings: dict


@dataclasses.dataclass
class Prepared:
    """A call after ``prepare``: everything the jitted loop takes."""

    scheduler: schedulers.Scheduler
    state: schedulers.SchedulerState
    latents: jax.Array               # initial latents, already noised / scaled
    cond: UNetConditioning           # [uncond; cond] batch under CFG
    gates: np.ndarray                # [n_adapters, steps]
    noise_key: jax.Array
    start: int                       # first step (img2img starts part-way)
    steps: int
    guidance_scale: float            # classifier-free guidance runs when > 1
    guidance_rescale: float = 0.0
    control: ControlInputs | None = None   # ControlNet images and per-step scales (params added at denoise)
    guess_mode: bool = False

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0


def refuse_nonfinite(latents: np.ndarray, images: np.ndarray) -> None:
    """A result with NaN / inf is an error, never a silently black image."""
    where = [name for name, x in (("latents", latents), ("pixels", images)) if not np.isfinite(x).all()]
    if where:
        raise NonFiniteError(
            f"the sampled {' and '.join(where)} contain NaN or inf. Likely causes: a float16/bfloat16 overflow "
            "(try --dtype float32, or a VAE that is safe in half precision), a corrupt adapter or LoRA file, or a "
            "non-finite input (scales, embeddings, initial latents). allow_nonfinite=True (sample.py "
            "--allow-nonfinite) returns the result anyway")


class StableDiffusionPipeline:
    """SD 1.x/2.x text-to-image and img2img with IP-Adapters, in JAX.

    Build with ``from_pretrained``; attach adapters with ``load_ip_adapter``;
    call with prompts and ``ImagePromptSpec``s. ``dtype`` is the UNet/text
    encoder compute dtype (``jnp.bfloat16`` on accelerators); the VAE and the
    scheduler arithmetic stay in float32. ``family`` (``ipadapter_jax.families``)
    is the base model's; its record says how prompts become the UNet's conditioning.
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer,
                 scheduler_config: dict, image_encoder: CLIPVisionModelWithProjection | None = None, *,
                 family: families.Family | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = scheduler_config
        self.image_encoder = image_encoder
        # The loader's family (from the folder or file); built by hand, the UNet's config says.
        self.family = family or families.of_unet_config(unet.config)
        # The frozen encoders and the VAE run through jitted functions, compiled once per shape.
        self._text = JittedModule(text_encoder)
        self._image = JittedModule(image_encoder) if image_encoder is not None else None
        self._vae_encode = JittedModule(vae, "encode")
        self._vae_decode = JittedModule(vae, "decode")
        self.mesh = data_mesh()
        self.controlnets: list[ControlNetModel] = []
        self._loops = CompiledLoops()
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """Default height and width in pixels: the UNet's sample size x the VAE
        factor, as diffusers (SD 1.5: 64 x 8 = 512, SD 2.1: 96 x 8 = 768, SDXL: 128 x 8 = 1024)."""
        size = self.unet.config.sample_size
        if not isinstance(size, int):
            raise BadArgument(f"the UNet's config gives no single sample_size ({size!r}) to take the default image "
                              "size from: pass height and width")
        return size * self.vae_scale

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, image_encoder: str | os.PathLike | None = None,
                        dtype=jnp.float32, variant: str | None = None,
                        attention_backend: str = "auto") -> "StableDiffusionPipeline":
        """Load a diffusers folder of this pipeline's family, a local path or a
        hub id (``org/name``, ``org/name:subfolder``), and optionally a CLIP
        image encoder folder in transformers layout (e.g. IP-Adapter's
        ``models/image_encoder``, or ``h94/IP-Adapter:models/image_encoder``).
        Hub ids are read from the Hugging Face cache, downloaded only where
        the hub is reachable and not ``HF_HUB_OFFLINE``."""
        model_dir = resolve(model_dir, kind="folder", what="model folder", allow_patterns=pipeline_patterns(variant))
        family = families.of_folder(model_dir)
        if family.pipeline != cls.__name__:
            raise Unsupported(f"{model_dir} is an {family.title} folder (model_index.json / configs); {cls.__name__} runs "
                              f"{', '.join(f.title for f in families.FAMILIES.values() if f.pipeline == cls.__name__)} "
                              f"folders; use {family.pipeline} (or ipadapter_jax.pipeline.load_pipeline, which "
                              "picks the class)")
        components = load_components(model_dir, dtype=dtype, variant=variant, attention_backend=attention_backend)
        return cls.from_components(components, image_encoder=image_encoder, dtype=dtype,
                                   attention_backend=attention_backend)

    @classmethod
    def from_components(cls, components: Components, *,
                        image_encoder: str | os.PathLike | CLIPVisionModelWithProjection | None = None,
                        dtype=jnp.float32, attention_backend: str = "auto") -> "StableDiffusionPipeline":
        """The pipeline of loaded components (``convert.components.load_components``)
        and an optional CLIP image encoder: a folder (local path or hub id), or a
        loaded ``CLIPVisionModelWithProjection`` (used as it is)."""
        encoder = None
        if isinstance(image_encoder, CLIPVisionModelWithProjection):
            encoder = image_encoder
        elif image_encoder is not None:
            folder = resolve_model_folder(image_encoder, weights_name="model", what="CLIP image encoder folder")
            encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype,
                                                                    attention_backend=attention_backend)
        c = components
        return cls(c.unet, c.vae, c.text_encoders[0], c.tokenizers[0], c.scheduler_config, encoder, family=c.family,
                   **cls._extra_components(c))

    @classmethod
    def _extra_components(cls, components: Components) -> dict:
        """Constructor arguments beyond the first text encoder (subclasses: SDXL's second)."""
        return {}

    # ------------------------------------------------------------------ adapters

    def load_ip_adapter(self, path: str | os.PathLike, **kwargs) -> ip_adapter.IPAdapter:
        """Load and attach an official IP-Adapter file; returns the adapter."""
        return ip_adapter.load_ip_adapter(path, self.unet, **kwargs)

    def load_controlnet(self, controlnet: str | os.PathLike | ControlNetModel, *, config=None,
                        variant: str | None = None) -> ControlNetModel:
        """Add a ControlNet (a diffusers folder, a single file in the original
        ``control_v11p_sd15_*`` layout or with diffusers names, or a loaded
        ``ControlNetModel``; ``config``: a diffusers config folder / file / dict
        for a single file that is not SD 1.5's default ControlNet). Calls then
        take one ``ControlNetSpec`` per added ControlNet, in this order; their
        residuals are summed. Returns the ControlNet."""
        if not isinstance(controlnet, ControlNetModel):
            name = str(controlnet)
            controlnet = load_controlnet(controlnet, config, variant=variant, dtype=self.unet.dtype)
        else:
            name = f"#{len(self.controlnets)}"
        check_controlnet_fits(controlnet, self.unet, name)
        if controlnet.config.downscale != self.vae_scale:
            # Control images are resized to the output size, so no control image size would fit.
            raise Incompatible(f"ControlNet {name} maps control images to latents {controlnet.config.downscale}x "
                               f"smaller (its conditioning_embedding_out_channels) but this model's VAE "
                               f"downsamples {self.vae_scale}x; use a ControlNet made for this base model")
        self.controlnets.append(controlnet)
        return controlnet

    def detach_controlnets(self) -> None:
        """Remove every ControlNet: calls take no control inputs again."""
        self.controlnets = []

    def detach_ip_adapters(self) -> None:
        """Detach every adapter: the UNet computes its plain output again."""
        ip_adapter.detach_all(self.unet)

    # The encoders' attributes (subclasses add theirs): what ``free_encoders`` drops.
    ENCODER_ATTRIBUTES = ("text_encoder", "_text", "image_encoder", "_image")

    def free_encoders(self) -> None:
        """Drop the text and image encoders. ``denoise`` and ``decode`` of a
        request already ``prepare``d need only the UNet, the ControlNets and the
        VAE: a memory-bound run of a big model (SDXL in float32 beside its
        bfloat16 compute copy) prepares, frees the encoders, then denoises.
        Encoding a prompt or an image afterwards is an error."""
        for name in self.ENCODER_ATTRIBUTES:
            setattr(self, name, None)

    def _require_encoders(self) -> None:
        if self._text is None:
            raise BadArgument("this pipeline's encoders were freed (free_encoders): load it again to encode prompts")

    def prompt_tokens(self, adapter: ip_adapter.IPAdapter, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """``ip_adapter.prompt_tokens`` with this pipeline's image encoder:
        (cond, uncond) tokens of reference images for ``adapter``."""
        return ip_adapter.prompt_tokens(adapter, image_encoder=self._image, **kwargs)

    @property
    def num_compiled(self) -> int:
        """Denoising loops compiled so far (one per UNet structure, scheduler and shape)."""
        return len(self._loops)

    # ------------------------------------------------------------------ text

    def _encode_text(self, prompt_lists: Sequence[Sequence[str]], layer: int | None = None) -> EncodedText:
        """Each text encoder's prompts -> the family's conditioning (float32 numpy)."""
        self._require_encoders()
        encoders = [self._text, *self._more_text_encoders()]
        tokenizers = [self.tokenizer, *self._more_tokenizers()]
        ids = [jnp.asarray(token_ids(tok, prompts)) for tok, prompts in zip(tokenizers, prompt_lists)]
        out = TEXT_CONDITIONING[self.family.text_conditioning](encoders, ids, layer=layer)
        return EncodedText(np.asarray(out.context, np.float32),
                                None if out.pooled is None else np.asarray(out.pooled, np.float32))

    def _more_text_encoders(self) -> list:
        return []

    def _more_tokenizers(self) -> list:
        return []

    def encode_prompt(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> [B, 77, C] text embeddings (last hidden state). Prompts longer
        than the encoder's 77 tokens are truncated with a warning, as diffusers does."""
        return self._encode_text([prompts]).context

    def _text_context(self, prompt, negative_prompt, num_images: int, cfg: bool, prompt_embeds,
                      negative_prompt_embeds) -> np.ndarray:
        """The text half of the conditioning: [B, L, C], or [negative; prompt] under CFG."""
        if (prompt_embeds is None) != (negative_prompt_embeds is None):
            raise BadArgument("give both prompt_embeds and negative_prompt_embeds, or neither")
        if prompt_embeds is not None:
            text = np.asarray(prompt_embeds, np.float32)
            negative = np.asarray(negative_prompt_embeds, np.float32)
            if text.ndim != 3 or text.shape != negative.shape:
                raise BadArgument(f"prompt_embeds {text.shape} and negative_prompt_embeds "
                                 f"{negative.shape} must have the same [B, L, C] shape")
            return np.concatenate([negative, text]) if cfg else text
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise BadArgument(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        text = self.encode_prompt(prompts)
        return np.concatenate([self.encode_prompt(negatives), text]) if cfg else text

    def _text_conditioning(self, text: dict, *, num_images: int, cfg: bool, height: int,
                           width: int) -> tuple[np.ndarray, dict | None]:
        """The text stage: (encoder_hidden_states [B or 2B, L, C], added_cond or None).
        ``text`` holds the call's text arguments; subclasses (SDXL) override this."""
        return self._text_context(text.pop("prompt"), text.pop("negative_prompt"), num_images, cfg,
                                  text.pop("prompt_embeds"), text.pop("negative_prompt_embeds"), **text), None

    # ------------------------------------------------------------------ the stages

    def _initial_latents(self, sched, state, latent_shape, keys, latents, init_image, strength,
                         num_inference_steps: int, size: tuple[int, int]) -> tuple[jax.Array, int]:
        """The loop's starting latents and first step: scaled noise, or the
        VAE-encoded ``init_image`` (resized to ``size``) noised to the step
        ``strength`` implies. ``keys``: (latent noise key, VAE sampling key)."""
        latent_key, vae_key = keys
        if latents is not None:
            noise = np.asarray(latents, np.float32)
            if noise.shape != latent_shape:
                raise BadArgument(f"latents must have shape {latent_shape} (NHWC), got {noise.shape}")
        else:
            noise = np.asarray(jax.random.normal(latent_key, latent_shape))
        if init_image is None:
            return jnp.asarray(noise) * sched.init_noise_sigma(state), 0
        if not 0.0 < strength <= 1.0:
            raise BadArgument(f"strength must be in (0, 1], got {strength}")
        pixels = np.repeat(load_init_image(init_image, *size), latent_shape[0], axis=0)
        init = self._vae_encode(jnp.asarray(pixels)).sample(vae_key) * self.vae.scaling_factor
        start = schedulers.begin_index(sched, state, strength, num_inference_steps)  # refuses 0 steps left
        return sched.add_noise(state, init, jnp.asarray(noise), start), start

    def prepare(self, prompt="", *, negative_prompt="", ip_adapter_prompts: Sequence[ImagePromptSpec] = (),
                num_inference_steps: int = 30, guidance_scale: float = 7.5, scheduler: str = "ddim",
                scheduler_options: dict | None = None, height: int | None = None, width: int | None = None,
                num_images: int = 1, seed: int = 0, latents=None, init_image=None, strength: float = 0.8,
                prompt_embeds=None, negative_prompt_embeds=None, guidance_rescale: float = 0.0,
                controlnet_inputs: Sequence[ControlNetSpec] = (), guess_mode: bool = False,
                text_options: dict | None = None) -> Prepared:
        """Validate and encode a call (see ``__call__`` for the arguments).
        ``text_options``: extra keyword arguments of a subclass's text stage
        (``_text_conditioning``), e.g. SDXL's ``prompt_2``; none here."""
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        if height % 8 or width % 8:
            raise BadArgument(f"height and width must be multiples of 8, got {height}x{width}")
        if num_inference_steps < 1:
            raise BadArgument(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale),
                            ("strength", strength),
                            ("scheduler_options", scheduler_options), ("latents", latents),
                            ("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            require_finite(name, value)
        for i, spec in enumerate(ip_adapter_prompts):
            check_spec(spec, f"ip_adapter_prompts[{i}]")
        cfg = guidance_scale > 1.0
        if prompt_embeds is not None:
            num_images = np.shape(prompt_embeds)[0]
        elif not isinstance(prompt, str):
            num_images = len(prompt)
        lh, lw = height // self.vae_scale, width // self.vae_scale
        latent_shape = (num_images, lh, lw, self.unet.config.in_channels)
        sched = schedulers.make_scheduler(scheduler, self.scheduler_config, **(scheduler_options or {}))
        # The state holds the multistep history (PNDM, DPM++), so it needs the latents' shape.
        state = sched.set_timesteps(num_inference_steps, sample_shape=latent_shape)
        steps = sched.num_steps(state)
        context, added_cond = self._text_conditioning(
            dict(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                 negative_prompt_embeds=negative_prompt_embeds, **(text_options or {})),
            num_images=num_images, cfg=cfg, height=height, width=width)
        prompts, gates = build_image_prompts(list(ip_adapter_prompts), self.unet, self._image, batch=num_images,
                                             height=height, width=width, vae_scale=self.vae_scale, steps=steps,
                                             cfg=cfg)
        noise_key, latent_key, vae_key = jax.random.split(jax.random.key(seed), 3)
        x, start = self._initial_latents(sched, state, latent_shape, (latent_key, vae_key), latents, init_image,
                                         strength, num_inference_steps, (height, width))
        control = prepare_control(self.controlnets, list(controlnet_inputs), batch=num_images, height=height,
                                  width=width, steps=steps, start=start, param_states=())
        # diffusers: guess mode is forced when the (first) ControlNet has global_pool_conditions.
        guess_mode = bool(guess_mode) or bool(self.controlnets and self.controlnets[0].config.global_pool_conditions)
        return Prepared(scheduler=sched, state=state, latents=x,
                        cond=UNetConditioning(context, prompts, added_cond=added_cond),
                        gates=gates, noise_key=noise_key, start=start, steps=steps, guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale, control=control,
                        guess_mode=guess_mode and control is not None)

    def _shard_prompt(self, prompt: ImagePrompt) -> ImagePrompt:
        shard = lambda x: shard_batch(self.mesh, x)
        return prompt.replace(tokens=shard(prompt.tokens),
                              masks=None if prompt.masks is None else {
                                  q: (shard(m) if m.shape[0] > 1 else m) for q, m in prompt.masks.items()})

    def denoise(self, request: Prepared, *, progress: bool = False,
                on_step: Callable[[jax.Array], None] | None = None) -> tuple[jax.Array, dict]:
        """Run the jitted loop on a prepared request: (final latents, timings).
        Compiles ahead of time (timed apart) once per argument signature.
        ``on_step(latents)``: called with the latents after every step (the loop
        then runs one step per call, as with ``progress``)."""
        stepwise = progress or on_step is not None
        cond = request.cond.replace(
            encoder_hidden_states=shard_batch(self.mesh, request.cond.encoder_hidden_states),
            image_prompts=tuple(self._shard_prompt(p) for p in request.cond.image_prompts),
            added_cond=(None if request.cond.added_cond is None else
                        {k: shard_batch(self.mesh, v) for k, v in request.cond.added_cond.items()}))
        graphdef, params = nnx.split(self.unet)
        args = (params, request.state, shard_batch(self.mesh, request.latents), cond, jnp.asarray(request.gates),
                jnp.float32(request.guidance_scale), jnp.float32(request.guidance_rescale), request.noise_key,
                jnp.int32(request.start))
        control_graphdefs = ()
        given = 0 if request.control is None else len(request.control.images)
        if given != len(self.controlnets):
            raise BadArgument(f"this request was prepared for {given} ControlNets but the pipeline now has "
                              f"{len(self.controlnets)}: prepare it again after load_controlnet / detach_controlnets")
        control = None
        if request.control is not None:
            control_graphdefs, states = zip(*(nnx.split(net) for net in self.controlnets))
            control = request.control.replace(params=tuple(states), images=tuple(
                shard_batch(self.mesh, image) for image in request.control.images))
            args += (control,)
        if stepwise:   # step by step, driven from Python (see make_denoise_loop's ``partial``)
            args = args[:9] + (control, jnp.int32(request.start + 1))
        t0 = time.perf_counter()
        compiled, compiled_now = self._loops.get(graphdef, request.scheduler, cfg=request.cfg, partial=stepwise,
                                                 args=args, control_graphdefs=tuple(control_graphdefs),
                                                 guess_mode=request.guess_mode)
        timings = {"compile_s": time.perf_counter() - t0}
        if progress and compiled_now:
            log.info("compiled the denoising loop (%d steps) in %.1f s", request.steps, timings["compile_s"])
        t1 = time.perf_counter()
        if on_step is not None:
            final = run_stepwise(compiled, args, request.start, request.steps, on_step)
        else:
            final = self._run_steps(compiled, args, request) if progress else compiled(*args)
        final.block_until_ready()
        run = request.steps - request.start
        timings.update(denoise_s=time.perf_counter() - t1, steps=run)
        timings["steps_per_s"] = run / max(timings["denoise_s"], 1e-9)
        return final, timings

    @staticmethod
    def _run_steps(compiled, args: tuple, request: Prepared) -> jax.Array:
        """The loop one step per call, with a progress bar (``args`` as the partial loop takes them)."""
        from tqdm.auto import tqdm

        with tqdm(total=request.steps - request.start, desc="denoising", unit="step") as bar:
            return run_stepwise(compiled, args, request.start, request.steps, lambda _: bar.update(1))

    def decode(self, latents) -> np.ndarray:
        """Latents -> images [B, H, W, 3] in [0, 1] (float32)."""
        images = self._vae_decode(jnp.asarray(latents) / self.vae.scaling_factor)
        return np.asarray(jnp.clip(images / 2 + 0.5, 0.0, 1.0))

    def __call__(self, prompt: str | Sequence[str] = "", *, negative_prompt: str | Sequence[str] = "",
                 ip_adapter_prompts: Sequence[ImagePromptSpec] = (), num_inference_steps: int = 30,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, scheduler: str = "ddim",
                 scheduler_options: dict | None = None, height: int | None = None, width: int | None = None,
                 num_images: int = 1, seed: int = 0, latents: np.ndarray | None = None,
                 init_image=None, strength: float = 0.8, output_type: str = "np", progress: bool = False,
                 prompt_embeds: np.ndarray | None = None, negative_prompt_embeds: np.ndarray | None = None,
                 controlnet_inputs: Sequence[ControlNetSpec] = (), guess_mode: bool = False,
                 allow_nonfinite: bool = False) -> SampleOutput:
        """Sample images.

        prompt / negative_prompt: one string (repeated ``num_images`` times) or one per image.
        ip_adapter_prompts: one ``ImagePromptSpec`` per attached adapter, in attach order.
        latents: unit-variance initial noise [B, h, w, 4] (NHWC); overrides ``seed``
          and is scaled by the scheduler's initial sigma, as diffusers does.
        height / width: pixels, multiples of 8 (default: the model's size, ``default_size``).
        init_image / strength: img2img (VAE-encode the image, start part-way).
        prompt_embeds / negative_prompt_embeds: precomputed text conditioning [B, L, C]
          instead of ``prompt`` / ``negative_prompt`` (any length L, e.g. text tokens
          with appended image tokens for the "simple adapter" ablation); both or neither.
        controlnet_inputs: one ``ControlNetSpec`` (control image, scale, start/end,
          preprocessing) per ControlNet added with ``load_controlnet``, in that order.
        guess_mode: ControlNets act on the conditional half only, their residuals
          scaled from 0.1 (shallowest) to 1.0 (mid block), as diffusers' guess mode.
        allow_nonfinite: return a result holding NaN / inf instead of raising
          ``NonFiniteError`` (for debugging).
        Returns ``SampleOutput`` (images in [0, 1], final latents, timings).
        """
        if output_type != "np":
            raise BadArgument(f"output_type must be 'np' (float32 arrays in [0, 1]), got {output_type!r}")
        t0 = time.perf_counter()
        request = self.prepare(prompt, negative_prompt=negative_prompt, ip_adapter_prompts=ip_adapter_prompts,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               scheduler=scheduler, scheduler_options=scheduler_options, height=height,
                               width=width, num_images=num_images, seed=seed, latents=latents,
                               init_image=init_image, strength=strength, prompt_embeds=prompt_embeds,
                               negative_prompt_embeds=negative_prompt_embeds, guidance_rescale=guidance_rescale,
                               controlnet_inputs=controlnet_inputs, guess_mode=guess_mode)
        return self._run(request, t0, progress=progress, allow_nonfinite=allow_nonfinite)

    def _run(self, request: Prepared, t0: float, *, progress: bool, allow_nonfinite: bool) -> SampleOutput:
        """denoise + decode a prepared call (``t0``: when preparing began)."""
        timings = {"encode_s": time.perf_counter() - t0}
        final, loop_timings = self.denoise(request, progress=progress)
        timings.update(loop_timings)
        t1 = time.perf_counter()
        images = self.decode(final)
        timings["decode_s"] = time.perf_counter() - t1
        if not allow_nonfinite:
            refuse_nonfinite(np.asarray(final), images)
        return SampleOutput(images=images, latents=np.asarray(final), timings=timings)
