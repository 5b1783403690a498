"""Images from files and arrays: loading (EXIF orientation, clear errors),
conversion of any PIL mode to RGB, and CLIP's pixel preprocessing.

* ``load_image``: open a file with its EXIF orientation applied.
* ``to_rgb`` / ``load_rgb``: any PIL mode -> RGB (alpha composited on white,
  palette, grey, 16-bit and float images scaled to 8 bits).
* ``preprocess``: the ``CLIPImageProcessor`` defaults (PIL path): shortest
  side to ``size`` (bicubic), center crop, x / 255, normalise with the OpenAI
  CLIP mean/std (``CLIP_MEAN`` / ``CLIP_STD``). NHWC float32 out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ipadapter_jax.io.errors import BadArgument, BadFile, MissingFile

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def load_image(path: str | os.PathLike):
    """Open an image file with its EXIF orientation applied; clear errors for
    missing or unreadable files."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"image not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise BadFile(f"cannot read image {path}: {e}") from None
    return ImageOps.exif_transpose(image)


def to_rgb(image) -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3]. Transparency is composited on
    white (as transformers does); 16/32-bit integer images are scaled to 8 bits
    instead of saturating."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(values * 255.0 / top), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def load_rgb(image):
    """A path, PIL image or uint8 array -> an RGB PIL image (``to_rgb`` rules)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return Image.fromarray(to_rgb(image))


def preprocess(images, size: int = 224, crop_size: int = 224) -> np.ndarray:
    """Images (paths, PIL images or uint8 [H, W, 3] arrays) -> normalised
    [N, crop, crop, 3] float32 pixels, as ``CLIPImageProcessor`` computes them."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getbands"):
        images = [images]
    out = []
    for image in images:
        if isinstance(image, np.ndarray) and (image.ndim != 3 or image.shape[-1] not in (3, 4)
                                              or image.dtype != np.uint8):
            raise BadArgument(f"array images must be uint8 [H, W, 3 or 4], got {image.dtype} {image.shape}")
        rgb = load_rgb(image)
        w, h = rgb.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        pixels = np.asarray(rgb.resize((new_w, new_h), resample=Image.BICUBIC))
        top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
        pixels = pixels[top:top + crop_size, left:left + crop_size]
        pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((pixels - CLIP_MEAN) / CLIP_STD)
    return np.stack(out)
