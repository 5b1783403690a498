"""What a sampling run writes and reads beside its models: image files (one per
image, plus a grid) and latents (``.npy``), every file written atomically so an
interrupted run leaves no half-written output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ipadapter_jax.io.errors import BadFile
from ipadapter_jax.io.files import atomic_write, read_npy

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}   # suffix -> PIL format


def save_images(images, out: str | os.PathLike) -> list[Path]:
    """Images [B, H, W, 3] in [0, 1] -> ``out`` (one image), or NAME-0.png, ...
    and NAME-grid.png (several), in the format ``out``'s suffix names."""
    out = Path(out)
    as_uint8 = (np.clip(images, 0, 1) * 255).round().astype("uint8")
    if len(as_uint8) == 1:
        return [save_image(as_uint8[0], out)]
    paths = [save_image(img, out.with_name(f"{out.stem}-{i}{out.suffix}")) for i, img in enumerate(as_uint8)]
    cols = int(np.ceil(np.sqrt(len(as_uint8))))
    rows = int(np.ceil(len(as_uint8) / cols))
    h, w = as_uint8.shape[1:3]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, img in enumerate(as_uint8):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    return paths + [save_image(grid, out.with_name(f"{out.stem}-grid{out.suffix}"))]


def save_image(pixels: np.ndarray, path: str | os.PathLike) -> Path:
    """One uint8 [H, W, 3] image, written atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(pixels).save(tmp, format=IMAGE_FORMATS[path.suffix.lower()])
    return path


def npy_path(path: str | os.PathLike) -> Path:
    """``path`` with ``.npy`` added when it lacks it (as ``np.save`` names its files)."""
    path = Path(path)
    return path if path.suffix == ".npy" else path.with_name(path.name + ".npy")


def save_latents(latents, path: str | os.PathLike) -> Path:
    """Latents to ``path`` (``.npy`` added as ``np.save`` adds it), written atomically."""
    path = npy_path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(latents))
    return path


def load_latents(path: str | os.PathLike, flag: str = "--init-latents") -> np.ndarray:
    """An ``.npy`` of float latents [N, h, w, C]; a clear error naming ``flag`` for anything else."""
    try:
        latents = read_npy(path)
    except BadFile as e:
        raise BadFile(f"{flag}: {e}") from None
    if latents.ndim != 4 or latents.dtype.kind != "f":
        raise BadFile(f"{flag} {path}: expected float latents [N, h, w, C], got {latents.dtype} {latents.shape}")
    return latents
