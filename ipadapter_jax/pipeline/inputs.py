"""Image inputs of a pipeline call other than reference images: IP-Adapter
masks and the img2img start image, prepared as diffusers' processors do."""

from __future__ import annotations

import os

import numpy as np

from ipadapter_jax.io.errors import BadArgument
from ipadapter_jax.io.images import load_image, load_rgb


def load_mask(mask, height: int, width: int) -> np.ndarray:
    """diffusers' IPAdapterMaskProcessor: greyscale, resize (Lanczos), binarise at 0.5."""
    from PIL import Image

    if isinstance(mask, (str, os.PathLike)):
        mask = load_image(mask)
    if isinstance(mask, np.ndarray):
        mask = np.asarray(mask, np.float32)
        if mask.ndim != 2:
            raise BadArgument(f"array masks must be [H, W], got shape {mask.shape}")
        mask = Image.fromarray(np.clip(np.round(mask * 255.0), 0, 255).astype(np.uint8), "L")
    grey = np.asarray(mask.convert("L").resize((width, height), Image.LANCZOS), np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)


def load_init_image(image, height: int, width: int) -> np.ndarray:
    """diffusers' VaeImageProcessor for img2img: RGB, resize (Lanczos), [-1, 1], [1, H, W, 3]."""
    from PIL import Image

    rgb = load_rgb(image).resize((width, height), Image.LANCZOS)
    return (np.asarray(rgb, np.float32) / 255.0 * 2.0 - 1.0)[None]
