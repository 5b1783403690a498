"""Text + image prompts -> images for SDXL: the SD pipeline with SDXL's text stage.

``StableDiffusionXLPipeline`` is ``StableDiffusionPipeline`` (same prepare ->
denoise -> decode stages, the same jitted loop and adapters) with two text
encoders and SDXL's added conditioning, as diffusers builds them:

* context: ``text_encoder``'s and ``text_encoder_2``'s ``hidden_states[-2]``
  (``-(clip_skip + 2)`` for the prompt) side by side on the last axis;
* pooled: ``text_encoder_2``'s projected ``text_embeds``;
* ``prompt_2`` / ``negative_prompt_2`` go to encoder 2 (default: ``prompt`` /
  ``negative_prompt``);
* without a negative prompt (``negative_prompt=None``, the default) and with
  ``force_zeros_for_empty_prompt`` (``model_index.json``, default True) the
  negative context and pooled embedding are zeros;
* time ids: ``original_size + crops_coords_top_left + target_size`` (defaults
  (height, width), (0, 0), (height, width)); the negative ones default to the
  positive ones;
* ``added_cond = {"text_embeds", "time_ids"}``, [negative; positive] under CFG.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ipadapter_jax.convert.components import Components
from ipadapter_jax.families.text import added_conditioning, time_ids
from ipadapter_jax.io.errors import BadArgument, require_finite
from ipadapter_jax.models import (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection,
                                  CLIPVisionModelWithProjection, UNet2DConditionModel)
from ipadapter_jax.pipeline.jitted import JittedModule
from ipadapter_jax.pipeline.prompts import ImagePromptSpec
from ipadapter_jax.pipeline.stable_diffusion import Prepared, SampleOutput, StableDiffusionPipeline


def _pair(name: str, value, default) -> tuple[int, int]:
    if value is None:
        return tuple(int(v) for v in default)
    if len(value) != 2:
        raise BadArgument(f"{name} must be two numbers, got {value!r}")
    require_finite(name, value)
    return int(value[0]), int(value[1])


def _prompt_list(value, n: int, name: str) -> list[str]:
    items = [value] * n if isinstance(value, str) else list(value)
    if len(items) != n:
        raise BadArgument(f"{len(items)} {name} for {n} prompts")
    return items


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL (base) text-to-image and img2img with IP-Adapters, in JAX.

    ``from_pretrained`` reads a diffusers SDXL folder (unet, vae, text_encoder,
    text_encoder_2, tokenizer, tokenizer_2, scheduler, model_index.json).
    Calls take ``StableDiffusionPipeline``'s arguments plus ``prompt_2``,
    ``negative_prompt_2``, SDXL's size / crop micro-conditioning and
    ``clip_skip``; ``height`` / ``width`` default to the model's size (1024).
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer,
                 scheduler_config: dict, image_encoder: CLIPVisionModelWithProjection | None = None, *,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer_2,
                 force_zeros_for_empty_prompt: bool = True, family=None):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler_config, image_encoder, family=family)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self._text_2 = JittedModule(text_encoder_2)
        pooled = self.pooled_dim = text_encoder_2.config.projection_dim   # kept: free_encoders drops the encoder
        added = unet.config.addition_time_embed_dim * 6 + pooled
        expected = unet.config.projection_class_embeddings_input_dim
        if unet.config.addition_embed_type != "text_time" or added != expected:
            raise BadArgument(
                f"this UNet does not take SDXL base conditioning: addition_embed_type "
                f"{unet.config.addition_embed_type!r}, projection_class_embeddings_input_dim {expected}, but "
                f"text_encoder_2's projection ({pooled}) + 6 time ids x {unet.config.addition_time_embed_dim} "
                f"= {added}")

    ENCODER_ATTRIBUTES = StableDiffusionPipeline.ENCODER_ATTRIBUTES + ("text_encoder_2", "_text_2")

    @classmethod
    def _extra_components(cls, components: Components) -> dict:
        return dict(text_encoder_2=components.text_encoders[1], tokenizer_2=components.tokenizers[1],
                    force_zeros_for_empty_prompt=components.model_index.get("force_zeros_for_empty_prompt", True))

    def _more_text_encoders(self) -> list:
        return [self._text_2]

    def _more_tokenizers(self) -> list:
        return [self.tokenizer_2]

    # ------------------------------------------------------------------ text

    def encode_prompt_xl(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None,
                         clip_skip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (context [B, 77, C1 + C2], pooled [B, P]). ``prompts_2``
        go to encoder 2 (default ``prompts``); ``clip_skip`` skips that many more
        layers than SDXL's penultimate one."""
        if clip_skip is not None and clip_skip < 0:
            raise BadArgument(f"clip_skip must be >= 0, got {clip_skip}")
        layer = None if clip_skip is None else -(clip_skip + 2)
        out = self._encode_text([prompts, prompts_2 or prompts], layer)
        return out.context, out.pooled

    def _text_conditioning(self, text: dict, *, num_images: int, cfg: bool, height: int,
                           width: int) -> tuple[np.ndarray, dict]:
        """SDXL's text stage: (context [negative; prompt], {"text_embeds", "time_ids"})."""
        prompt, prompt_2 = text["prompt"], text.get("prompt_2")
        negative, negative_2 = text["negative_prompt"], text.get("negative_prompt_2")
        embeds, pooled = text["prompt_embeds"], text.get("pooled_prompt_embeds")
        neg_embeds, neg_pooled = text["negative_prompt_embeds"], text.get("negative_pooled_prompt_embeds")
        if (embeds is None) != (pooled is None):
            raise BadArgument("give pooled_prompt_embeds with prompt_embeds (SDXL needs both)")
        if (neg_embeds is None) != (neg_pooled is None):
            raise BadArgument("give negative_pooled_prompt_embeds with negative_prompt_embeds (SDXL needs both)")
        if embeds is not None:
            context, pooled = np.asarray(embeds, np.float32), np.asarray(pooled, np.float32)
            if context.ndim != 3 or pooled.shape != (context.shape[0], self.pooled_dim):
                raise BadArgument(f"prompt_embeds [B, L, C] and pooled_prompt_embeds [B, "
                                  f"{self.pooled_dim}] expected, got {context.shape} "
                                  f"and {pooled.shape}")
        else:
            prompts = _prompt_list(prompt, num_images, "prompts")
            prompts_2 = _prompt_list(prompt_2 or prompt, len(prompts), "prompt_2 entries")
            context, pooled = self.encode_prompt_xl(prompts, prompts_2, text.get("clip_skip"))
        n = context.shape[0]
        if cfg:
            if neg_embeds is not None:
                neg_context, neg_pooled = np.asarray(neg_embeds, np.float32), np.asarray(neg_pooled, np.float32)
                if neg_context.shape != context.shape or neg_pooled.shape != pooled.shape:
                    raise BadArgument(f"negative embeddings {neg_context.shape}, {neg_pooled.shape} do not match "
                                      f"the prompt's {context.shape}, {pooled.shape}")
            elif negative is None and self.force_zeros_for_empty_prompt:
                neg_context, neg_pooled = np.zeros_like(context), np.zeros_like(pooled)
            else:
                negatives = _prompt_list(negative or "", n, "negative prompts")
                negatives_2 = _prompt_list(negative_2 or negative or "", n, "negative_prompt_2 entries")
                # diffusers encodes negatives at SDXL's penultimate layer whatever clip_skip says.
                neg_context, neg_pooled = self.encode_prompt_xl(negatives, negatives_2)
            context = np.concatenate([neg_context, context])
            pooled = np.concatenate([neg_pooled, pooled])
        original = _pair("original_size", text.get("original_size"), (height, width))
        crop = _pair("crops_coords_top_left", text.get("crops_coords_top_left"), (0, 0))
        target = _pair("target_size", text.get("target_size"), (height, width))
        ids = np.tile(time_ids(original, crop, target), (n, 1))
        if cfg:
            negative_ids = time_ids(_pair("negative_original_size", text.get("negative_original_size"), original),
                                    _pair("negative_crops_coords_top_left",
                                          text.get("negative_crops_coords_top_left"), crop),
                                    _pair("negative_target_size", text.get("negative_target_size"), target))
            ids = np.concatenate([np.tile(negative_ids, (n, 1)), ids])
        return context, added_conditioning(self.family, pooled, ids)

    # ------------------------------------------------------------------ calls

    def prepare(self, prompt="", *, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                ip_adapter_prompts: Sequence[ImagePromptSpec] = (), num_inference_steps: int = 30,
                guidance_scale: float = 5.0, scheduler: str = "euler", scheduler_options: dict | None = None,
                height: int | None = None, width: int | None = None, num_images: int = 1, seed: int = 0,
                latents=None, init_image=None, strength: float = 0.3, prompt_embeds=None,
                negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                guidance_rescale: float = 0.0, original_size=None, crops_coords_top_left=None, target_size=None,
                negative_original_size=None, negative_crops_coords_top_left=None, negative_target_size=None,
                clip_skip: int | None = None, controlnet_inputs: Sequence = (), guess_mode: bool = False) -> Prepared:
        """Validate and encode a call (see ``__call__`` for the arguments)."""
        for name, value in (("pooled_prompt_embeds", pooled_prompt_embeds),
                            ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
            require_finite(name, value)
        options = dict(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                       pooled_prompt_embeds=pooled_prompt_embeds,
                       negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, original_size=original_size,
                       crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                       negative_original_size=negative_original_size,
                       negative_crops_coords_top_left=negative_crops_coords_top_left,
                       negative_target_size=negative_target_size, clip_skip=clip_skip)
        return super().prepare(prompt, negative_prompt=negative_prompt, ip_adapter_prompts=ip_adapter_prompts,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               scheduler=scheduler, scheduler_options=scheduler_options,
                               height=self.default_size if height is None else height,
                               width=self.default_size if width is None else width,
                               num_images=num_images, seed=seed, latents=latents, init_image=init_image,
                               strength=strength, prompt_embeds=prompt_embeds,
                               negative_prompt_embeds=negative_prompt_embeds, guidance_rescale=guidance_rescale,
                               controlnet_inputs=controlnet_inputs, guess_mode=guess_mode, text_options=options)

    def __call__(self, prompt: str | Sequence[str] = "", *, output_type: str = "np", progress: bool = False,
                 allow_nonfinite: bool = False, **kwargs) -> SampleOutput:
        """Sample images.

        Takes ``StableDiffusionPipeline.__call__``'s arguments, with SDXL's defaults
        (``negative_prompt=None``: zero negative conditioning when the model says
        ``force_zeros_for_empty_prompt``; scheduler "euler", guidance 5, strength
        0.3, height / width the model's size), plus:
        prompt_2 / negative_prompt_2: text for encoder 2 (default: prompt / negative_prompt).
        pooled_prompt_embeds / negative_pooled_prompt_embeds: [B, P] with the
          precomputed ``prompt_embeds`` / ``negative_prompt_embeds``.
        original_size, crops_coords_top_left, target_size: (h, w), (top, left), (h, w)
          micro-conditioning (defaults (height, width), (0, 0), (height, width));
          negative_original_size, negative_crops_coords_top_left, negative_target_size:
          the unconditional half's (default: the positive ones).
        clip_skip: layers to skip below SDXL's penultimate one (prompt only, as diffusers).
        """
        if output_type != "np":
            raise BadArgument(f"output_type must be 'np' (float32 arrays in [0, 1]), got {output_type!r}")
        t0 = time.perf_counter()
        request = self.prepare(prompt, **kwargs)
        return self._run(request, t0, progress=progress, allow_nonfinite=allow_nonfinite)
