"""ControlNet in the denoising loop: structure from a control map, beside the
IP-Adapter's appearance from a reference image.

A call gives one ``ControlNetSpec`` per ControlNet loaded on the pipeline
(same order). ``prepare_control`` turns them into a ``ControlInputs`` pytree
(the control images and a [K, steps] table of conditioning scale x start/end
keep), and ``controlled`` adds the ControlNets' residuals to a step's
``UNetConditioning`` inside the jitted loop. The ControlNets see the text
conditioning only (the image-prompt tokens never reach them), as diffusers'
ControlNet pipelines and the official ``CNAttnProcessor`` do.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, Unsupported
from ipadapter_jax.io.images import check_array_image, load_image
from ipadapter_jax.models import hoisting
from ipadapter_jax.models.conditioning import UNetConditioning

PREPROCESSORS = ("none", "canny")


@dataclasses.dataclass(frozen=True)
class ControlNetSpec:
    """One ControlNet's input for a call.

    image: the control map (path, PIL image or uint8 [H, W, 3] array; RGB in
      [0, 1] after loading), or a list with one per batch image. It is resized
      to the output size (Lanczos, as diffusers' control image processor).
    scale: ``controlnet_conditioning_scale``: its residuals are multiplied by it.
    start / end: the fraction of the denoising steps during which it acts
      (diffusers' ``control_guidance_start`` / ``control_guidance_end``).
    preprocess: ``"none"`` (the image is already a map: edges, depth, pose) or
      ``"canny"`` (OpenCV's Canny edges, thresholds ``canny_low`` / ``canny_high``;
      needs ``pip install ipadapter-jax[control]``).
    """

    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    canny_low: int = 100
    canny_high: int = 200


@struct.dataclass
class ControlInputs:
    """What the jitted loop takes for its ControlNets: their parameters, one
    control image batch each ([B, H, W, 3] in [0, 1]) and ``scales[k, i]``,
    ControlNet k's conditioning scale at step i (0 outside its start/end)."""

    params: tuple
    images: tuple
    scales: jax.Array


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """OpenCV's Canny edges of a uint8 RGB image, as a 3-channel uint8 map."""
    try:
        import cv2
    except ImportError:
        raise Unsupported("--control-preprocess canny needs OpenCV: pip install 'ipadapter-jax[control]' "
                          "(or opencv-python-headless)") from None
    edges = cv2.Canny(np.ascontiguousarray(image), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def control_pil(image):
    """A control map (path, PIL image or uint8 [H, W, 3 or 4] array) as a PIL image in its own mode."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        check_array_image(image)
        return Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise BadArgument(f"a control image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")
    return image


def _rgb(image, source):
    try:
        return image.convert("RGB")
    except ValueError as e:   # modes Pillow cannot convert
        raise (BadFile if source else BadArgument)(
            f"{source or 'control image'}: cannot convert a {image.mode} image to RGB: {e}") from None


def load_control_image(image, height: int, width: int, *, preprocess: str = "none", canny_low: int = 100,
                       canny_high: int = 200) -> np.ndarray:
    """A control map -> float32 [1, height, width, 3] in [0, 1], as diffusers'
    control image processor (``VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False)``): Lanczos resize to the output size in the image's
    own mode, then a plain ``convert("RGB")`` (so transparent pixels come out
    black and 16-bit maps saturate at 255, as there). ``preprocess="canny"``
    runs OpenCV's Canny on the RGB image first."""
    from PIL import Image

    if preprocess not in PREPROCESSORS:
        raise BadArgument(f"control preprocess must be one of {PREPROCESSORS}, got {preprocess!r}")
    source = image if isinstance(image, (str, os.PathLike)) else None
    pil = control_pil(image)
    if preprocess == "canny":
        pil = Image.fromarray(canny(np.asarray(_rgb(pil, source)), canny_low, canny_high))
    pil = pil.resize((width, height), Image.LANCZOS)
    return (np.asarray(_rgb(pil, source), np.float32) / 255.0)[None]


def check_spec(spec: ControlNetSpec, where: str) -> None:
    for name in ("scale", "start", "end"):
        value = getattr(spec, name)
        if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
            raise BadArgument(f"{where}: {name} must be a finite number, got {value!r}")
    if not 0.0 <= spec.start < spec.end <= 1.0:
        raise BadArgument(f"{where}: need 0 <= start < end <= 1, got start={spec.start}, end={spec.end}")


def keep_table(specs: Sequence[ControlNetSpec], steps: int, start: int) -> np.ndarray:
    """[K, steps] float32: scale x keep, where keep(i) = 0 when step i lies
    outside [start, end) of the steps run (diffusers' ``controlnet_keep``; with
    img2img the fractions count the steps actually run, from ``start``)."""
    n = steps - start
    table = np.zeros((len(specs), steps), np.float32)
    for k, spec in enumerate(specs):
        for i in range(start, steps):
            j = i - start
            off = j / n < spec.start or (j + 1) / n > spec.end
            table[k, i] = 0.0 if off else spec.scale
    return table


def control_images(spec: ControlNetSpec, batch: int, height: int, width: int, where: str) -> np.ndarray:
    """One ControlNet's control images as [batch, H, W, 3]."""
    images = spec.image if isinstance(spec.image, (list, tuple)) else [spec.image]
    if len(images) not in (1, batch):
        raise BadArgument(f"{where}: {len(images)} control images for a batch of {batch}: give one image, or one "
                          "per batch image")
    options = dict(preprocess=spec.preprocess, canny_low=spec.canny_low, canny_high=spec.canny_high)
    arrays = [load_control_image(image, height, width, **options) for image in images]
    out = np.concatenate(arrays)
    return np.repeat(out, batch, axis=0) if len(arrays) == 1 else out


def prepare_control(controlnets: Sequence, specs: Sequence[ControlNetSpec], *, batch: int, height: int,
                    width: int, steps: int, start: int, param_states: Sequence) -> ControlInputs | None:
    """Check a call's ControlNet specs against the loaded ControlNets and build
    the loop's ``ControlInputs`` (None without ControlNets)."""
    if len(specs) != len(controlnets):
        raise BadArgument(f"got {len(specs)} control inputs for {len(controlnets)} loaded ControlNets: give one "
                          "ControlNetSpec (control image) per ControlNet, in load order")
    if not specs:
        return None
    images = []
    for k, spec in enumerate(specs):
        where = f"controlnet {k}"
        if not isinstance(spec, ControlNetSpec):
            raise BadArgument(f"{where}: expected a ControlNetSpec, got {type(spec).__name__}")
        check_spec(spec, where)
        images.append(jnp.asarray(control_images(spec, batch, height, width, where)))
    return ControlInputs(params=tuple(param_states), images=tuple(images),
                         scales=jnp.asarray(keep_table(specs, steps, start)))


# What a ControlNet must share with the UNet for its residuals to fit the UNet's skips.
FITTING_FIELDS = ("addition_embed_type", "block_out_channels", "cross_attention_dim", "down_block_types",
                  "layers_per_block")


def check_controlnet_fits(controlnet, unet, name: str) -> None:
    """Refuse a ControlNet whose residuals cannot be added to ``unet`` (another
    family: SD 1.5 vs SDXL, or another layout), naming both and what differs."""
    def family(cfg):
        return "SDXL-style (text_time added conditioning)" if cfg.addition_embed_type == "text_time" else \
            "SD 1.x/2.x-style"

    def value(cfg, field):
        v = cfg.per_block(field) if field in ("layers_per_block", "cross_attention_dim") else getattr(cfg, field)
        return tuple(v) if isinstance(v, (list, tuple)) else v

    c, u = controlnet.config.unet, unet.config
    differ = [f for f in FITTING_FIELDS if value(c, f) != value(u, f)]
    if differ:
        details = "; ".join(f"{f}: ControlNet {value(c, f)} vs UNet {value(u, f)}" for f in differ)
        raise Incompatible(f"ControlNet {name} does not fit this UNet: the ControlNet is {family(c)}, the UNet is "
                           f"{family(u)} ({details}). Use a ControlNet trained for this base model (an SDXL "
                           "ControlNet for SDXL, an SD 1.5 one for SD 1.5)")


def _control_inputs(text, added, image, *, cfg: bool, half: bool):
    """A ControlNet's text, added conditioning and control images for the
    model batch: the conditional half only (``half``), else the control images
    doubled under CFG."""
    if half:
        text = jnp.split(text, 2)[1] if text.shape[0] > 1 else text
        added = None if added is None else {k: (jnp.split(v, 2)[1] if v.shape[0] > 1 else v)
                                            for k, v in added.items()}
    elif cfg:
        image = jnp.concatenate([image, image])
    return text, added, image


def controlled(controlnets: Sequence, control: ControlInputs, cond: UNetConditioning, model_in: jax.Array,
               timestep, i, *, cfg: bool, guess_mode: bool) -> UNetConditioning:
    """``cond`` with the summed residuals of every ControlNet at step ``i``.

    Under CFG the batch is [uncond; cond]: the ControlNets see both halves
    (their control images doubled), or in guess mode only the conditional
    half, the unconditional half getting zero residuals (diffusers)."""
    half = guess_mode and cfg
    if half:
        model_in = jnp.split(model_in, 2)[1]
    down, mid = None, None
    for k, net in enumerate(controlnets):
        # What a ControlNet sees of the conditioning is the same at every step (hoisted by the loop).
        text, added, image = hoisting.constant(net, "inputs", lambda *a: _control_inputs(*a, cfg=cfg, half=half),
                                               cond.encoder_hidden_states, cond.added_cond, control.images[k])
        d, m = net(model_in, timestep, text, image, conditioning_scale=control.scales[k, i], added_cond=added,
                   guess_mode=guess_mode)
        down = list(d) if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    if half:
        down = [jnp.concatenate([jnp.zeros_like(r), r]) for r in down]
        mid = jnp.concatenate([jnp.zeros_like(mid), mid])
    return cond.replace(down_block_residuals=tuple(down), mid_block_residual=mid)

