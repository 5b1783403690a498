"""Images from files and arrays: loading (EXIF orientation, clear errors),
conversion of any PIL mode to RGB, and CLIP's pixel preprocessing.

* ``load_image``: open a file with its EXIF orientation applied. Files
  declaring more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` are refused
  before decoding (decompression bombs); animated files give their first
  frame, with a warning.
* ``to_rgb`` / ``load_rgb``: any PIL mode -> RGB (alpha composited on white,
  palette, grey, 16-bit and float images scaled to 8 bits).
* ``preprocess``: the ``CLIPImageProcessor`` defaults (PIL path): shortest
  side to ``size`` (bicubic), center crop, x / 255, normalise with the OpenAI
  CLIP mean/std (``CLIP_MEAN`` / ``CLIP_STD``). NHWC float32 out.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from ipadapter_jax.io.errors import BadArgument, BadFile, MissingFile

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


# Resizes that would make more pixels than this are done on the cropped region only
# (see ``resize_crop``): an extreme aspect ratio (a 1 x 20000 strip) would otherwise
# be scaled to gigabytes before the center crop.
MAX_RESIZE_PIXELS = 1 << 24


def _too_big(path: Path, size: tuple[int, int], limit: int) -> BadFile:
    w, h = size
    return BadFile(f"{path}: refused: the image declares {w}x{h} = {w * h} pixels, more than Pillow's limit "
                   f"PIL.Image.MAX_IMAGE_PIXELS = {limit} (a decompression bomb?). For a trusted file, raise "
                   "that limit")


def load_image(path: str | os.PathLike):
    """Open an image file with its EXIF orientation applied; clear errors for
    missing, unreadable, oversized (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``,
    refused before decoding) files. An animated file gives its first frame and a
    warning saying so."""
    from PIL import Image, ImageOps

    path = Path(path)
    if path.is_dir():
        raise BadFile(f"{path} is a folder; expected an image file")
    if not path.is_file():
        raise MissingFile(f"image not found: {path}")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit, then decodes anyway: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if limit is not None and opened.size[0] * opened.size[1] > limit:
                    raise _too_big(path, opened.size, limit)
                animated, kind = getattr(opened, "is_animated", False), opened.format or "image"
                if animated:
                    opened.seek(0)
                opened.load()
                image = ImageOps.exif_transpose(opened)
                if image is opened:   # keep a copy: the file is closed here
                    image = opened.copy()
    except BadFile:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadFile(f"{path}: refused: {e} (PIL.Image.MAX_IMAGE_PIXELS = {limit}; for a trusted file, raise "
                      "that limit)") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, EOFError, ... on corrupt files
        raise BadFile(f"cannot read image {path}: {e or type(e).__name__}") from None
    if animated:
        warnings.warn(f"{path} is an animated {kind}; only its first frame is used",
                      stacklevel=2)
    return image


def to_rgb(image) -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3]. Transparency is composited on
    white (as transformers does); 16/32-bit integer images are scaled to 8 bits
    instead of saturating."""
    from PIL import Image

    if image.size[0] == 0 or image.size[1] == 0:
        raise BadArgument(f"the image is {image.size[0]}x{image.size[1]}: it has no pixels")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(values * 255.0 / top), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise BadArgument("the float image holds NaN or inf pixel values")
        scale = 255.0 if values.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    except ValueError as e:   # modes Pillow cannot convert (LAB, HSV, ...)
        raise BadArgument(f"cannot convert a {image.mode} image to RGB: {e}") from None


def check_array_image(image: np.ndarray) -> None:
    """An array image must be uint8 [H, W, 3 or 4] with at least one pixel."""
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8 or 0 in image.shape:
        raise BadArgument(f"array images must be uint8 [H, W, 3 or 4] with H, W >= 1, got {image.dtype} "
                          f"{image.shape}")


def load_rgb(image):
    """A path, PIL image or uint8 array -> an RGB PIL image (``to_rgb`` rules)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = image
        try:
            return Image.fromarray(to_rgb(load_image(path)))
        except BadArgument as e:   # the file's content: name it
            raise BadFile(f"{path}: {e}") from None
    if isinstance(image, np.ndarray):
        check_array_image(image)
        image = Image.fromarray(image)
    return Image.fromarray(to_rgb(image))


def resize_crop(image, size: tuple[int, int], box: tuple[int, int, int, int], resample):
    """``image.resize(size, resample).crop(box)``, without making the whole resized
    image when it would exceed ``MAX_RESIZE_PIXELS``: then Pillow's two passes
    (horizontal, then vertical, 8-bit in between) run on the rows and columns
    the crop needs only, which gives the same pixels up to rounding."""
    from PIL import Image

    new_w, new_h = size
    left, top, right, bottom = box
    inside = 0 <= left < right <= new_w and 0 <= top < bottom <= new_h
    if new_w * new_h <= MAX_RESIZE_PIXELS or not inside:
        return image.resize((new_w, new_h), resample=resample).crop(box)
    w, h = image.size
    sx, sy = w / new_w, h / new_h
    support = {Image.NEAREST: 0.5, Image.BOX: 0.5, Image.BILINEAR: 1.0, Image.HAMMING: 1.0,
               Image.BICUBIC: 2.0}.get(resample, 3.0)
    reach = support * max(sy, 1.0) + 2          # source rows the vertical kernels touch, and a margin
    r0, r1 = max(int(top * sy - reach), 0), min(math.ceil(bottom * sy + reach), h)
    rows = image.crop((0, r0, w, r1))
    x_box = (0, 0, w, r1 - r0) if (left, right) == (0, new_w) else (left * sx, 0, right * sx, r1 - r0)
    wide = rows.resize((right - left, r1 - r0), resample=resample, box=x_box)            # horizontal pass
    return wide.resize((right - left, bottom - top), resample=resample,                    # vertical pass
                       box=(0, top * sy - r0, right - left, bottom * sy - r0))


def preprocess(images, size: int = 224, crop_size: int = 224) -> np.ndarray:
    """Images (paths, PIL images or uint8 [H, W, 3] arrays) -> normalised
    [N, crop, crop, 3] float32 pixels, as ``CLIPImageProcessor`` computes them."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getbands"):
        images = [images]
    out = []
    for image in images:
        if isinstance(image, np.ndarray):
            check_array_image(image)
        rgb = load_rgb(image)
        w, h = rgb.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
        if top >= 0 and left >= 0:
            pixels = np.asarray(resize_crop(rgb, (new_w, new_h), (left, top, left + crop_size, top + crop_size),
                                            Image.BICUBIC))
        else:   # a crop larger than the resized image
            pixels = np.asarray(rgb.resize((new_w, new_h), resample=Image.BICUBIC))
            pixels = pixels[top:top + crop_size, left:left + crop_size]
        pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((pixels - CLIP_MEAN) / CLIP_STD)
    return np.stack(out)


def preprocess_siglip(images, size: int = 384) -> np.ndarray:
    """Images -> [N, size, size, 3] float32 pixels in [-1, 1], as ``SiglipImageProcessor``
    computes them: a bicubic resize to the square (no crop), then (x / 255 - 0.5) / 0.5."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getbands"):
        images = [images]
    out = []
    for image in images:
        if isinstance(image, np.ndarray):
            check_array_image(image)
        pixels = np.asarray(load_rgb(image).resize((size, size), resample=Image.BICUBIC))
        pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((pixels - np.float32(0.5)) / np.float32(0.5))
    return np.stack(out)
