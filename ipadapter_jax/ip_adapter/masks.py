"""Attention masks per reference image: one mask at output resolution ->
the mask at every attention resolution of the UNet (diffusers'
``ip_adapter_masks`` semantics, with torch's bicubic resampling)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.io.errors import BadArgument


def _cubic_weights(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of torch's bicubic interpolation (align_corners=False,
    A=-0.75, border-clamped taps), so resizing is two matrix products."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    base = np.floor(src)
    frac = src - base
    m = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        idx = np.clip(base + k, 0, n_in - 1).astype(int)
        np.add.at(m, (np.arange(n_out), idx), _cubic_weights(frac - k))
    return m


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of [..., H, W] masks like ``F.interpolate(mode="bicubic")``."""
    mask = np.asarray(mask, np.float64)
    rows = _bicubic_matrix(mask.shape[-2], height)
    cols = _bicubic_matrix(mask.shape[-1], width)
    return np.einsum("oh,...hw,pw->...op", rows, mask, cols)


def _mask_grid(num_queries: int, mask_h: int, mask_w: int) -> tuple[int, int]:
    # diffusers' IPAdapterMaskProcessor.downsample: the grid follows the mask's
    # aspect ratio, and rounds the height up when it does not divide.
    ratio = mask_w / mask_h
    h = int(math.sqrt(num_queries / ratio))
    h = h + int(num_queries % h != 0)
    return h, num_queries // h


def mask_pyramid(masks: np.ndarray, unet, latent_height: int, latent_width: int) -> dict[int, jax.Array]:
    """Masks of N reference images ([N, H, W] or [B, N, H, W], values in [0, 1],
    already at output resolution) -> ``{num_queries: [B, N, num_queries]}`` for
    every attention resolution of ``unet`` at this latent size.

    Same grid and bicubic resampling as diffusers, padded with 0 / cut when the
    mask's aspect ratio does not match the image (diffusers warns then too).
    """
    masks = np.asarray(masks, np.float64)
    if masks.ndim == 3:
        masks = masks[None]
    if masks.ndim != 4:
        raise BadArgument(f"masks must be [N, H, W] or [B, N, H, W], got shape {masks.shape}")
    out = {}
    for q in _query_lengths(unet, latent_height, latent_width):
        h, w = _mask_grid(q, masks.shape[-2], masks.shape[-1])
        flat = resize_mask(masks, h, w).reshape(*masks.shape[:2], h * w)
        if flat.shape[-1] < q:
            flat = np.pad(flat, ((0, 0), (0, 0), (0, q - flat.shape[-1])))
        out[q] = jnp.asarray(flat[..., :q], jnp.float32)
    return out


def _query_lengths(unet, latent_height: int, latent_width: int) -> list[int]:
    """Token counts of the attention layers: the latent grid after each
    downsampling (conv stride 2, padding 1: ceil halving)."""
    h, w = latent_height, latent_width
    sizes = []
    for i, block in enumerate(unet.down_blocks):
        if block.attentions is not None:
            sizes.append(h * w)
        if block.downsamplers is not None:
            h, w = (h + 1) // 2, (w + 1) // 2
    if unet.mid_block is not None:
        sizes.append(h * w)
    return sorted(set(sizes))
