"""A call's image prompts: one ``ImagePromptSpec`` per attached adapter ->
the ``ImagePrompt`` arrays the UNet takes, and each adapter's per-step gates."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ipadapter_jax import ip_adapter
from ipadapter_jax.io.errors import BadArgument, require_finite
from ipadapter_jax.models.conditioning import ImagePrompt
from ipadapter_jax.pipeline.inputs import load_mask


@dataclasses.dataclass
class ImagePromptSpec:
    """One adapter's image prompt for a pipeline call.

    Give ``images`` (paths, PIL images or uint8 arrays; encoded with the
    pipeline's image encoder) or precomputed ``embeds``; FaceID adapters take
    ``face_embeds`` (and FaceID-Plus the face crops as ``images``).
    scale: float, per-layer array, or diffusers' per-block dict; ``weight_type``
      applies a ComfyUI weight type to a float scale.
    masks: one mask per reference image (paths / arrays [H, W] in [0, 1]).
    start, end: fraction of the schedule during which the adapter is active.
    """

    images: Sequence[Any] | None = None
    embeds: Any = None
    face_embeds: Any = None
    negative_images: Sequence[Any] | None = None
    negative_embeds: Any = None
    scale: Any = 1.0
    weight_type: str | None = None
    composition_weight: float = 1.0
    combine: str = "concat"
    masks: Sequence[Any] | None = None
    start: float = 0.0
    end: float = 1.0
    lora_scale: float = 1.0
    s_scale: float = 1.0


def check_spec(spec: ImagePromptSpec, name: str = "image prompt") -> None:
    """Refuse non-finite numbers in a spec before anything is encoded or compiled."""
    for field in ("scale", "composition_weight", "lora_scale", "s_scale", "start", "end", "embeds",
                  "face_embeds", "negative_embeds"):
        require_finite(f"{name}.{field}", getattr(spec, field))
    for k, mask in enumerate(spec.masks or ()):
        if not isinstance(mask, (str, bytes)) and hasattr(mask, "__array__"):
            require_finite(f"{name}.masks[{k}]", mask)


def _masks(spec: ImagePromptSpec, n_images: int, unet, height: int, width: int, vae_scale: int):
    if spec.masks is None:
        return None
    if len(spec.masks) != n_images:
        raise BadArgument(f"{len(spec.masks)} masks for {n_images} reference images: give one mask per image")
    stack = np.stack([load_mask(m, height, width) for m in spec.masks])
    return ip_adapter.mask_pyramid(stack, unet, height // vae_scale, width // vae_scale)


def build_image_prompts(specs: Sequence[ImagePromptSpec], unet, image_encoder, *, batch: int, height: int,
                        width: int, vae_scale: int, steps: int, cfg: bool) -> tuple[tuple, np.ndarray]:
    """Specs -> (one ``ImagePrompt`` per attached adapter for the [uncond; cond]
    batch when ``cfg``, gates [n_adapters, steps])."""
    attached = list(unet.ip_adapters)
    if len(specs) != len(attached):
        raise BadArgument(f"{len(specs)} image prompts for {len(attached)} attached IP-Adapters")
    prompts: list[ImagePrompt] = []
    gates = []
    for spec, adapter in zip(specs, attached):
        cond, uncond = ip_adapter.prompt_tokens(
            adapter, image_encoder=image_encoder, images=spec.images, embeds=spec.embeds,
            face_embeds=spec.face_embeds, negative_images=spec.negative_images,
            negative_embeds=spec.negative_embeds, combine=spec.combine, s_scale=spec.s_scale)
        tokens = np.repeat(cond, batch, axis=0)
        if cfg:
            tokens = np.concatenate([np.repeat(uncond, batch, axis=0), tokens])
        masks = _masks(spec, cond.shape[1], unet, height, width, vae_scale)
        scale = ip_adapter.layer_scales(unet, spec.scale, weight_type=spec.weight_type,
                                        composition_weight=spec.composition_weight)
        prompts.append(ip_adapter.image_prompt(adapter, tokens, scale, masks=masks, lora_scale=spec.lora_scale))
        gates.append(ip_adapter.schedule_gates(steps, spec.start, spec.end))
    return tuple(prompts), np.asarray(gates, np.float32).reshape(len(prompts), steps)
