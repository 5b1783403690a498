"""ResnetBlock2D, Downsample2D and Upsample2D (diffusers ``models/resnet.py``
and ``models/{down,up}sampling.py``), shared by the UNet and the VAE. NHWC."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.io.errors import BadArgument
from ipadapter_jax.models import layers


class ResnetBlock2D(nnx.Module):
    """GroupNorm -> act -> conv, plus the time embedding, twice, with a skip.

    ``time_embedding_norm``: ``"default"`` adds the projected embedding before
    ``norm2``; ``"scale_shift"`` projects to 2x channels and modulates after it.
    ``temb_channels=None`` (the VAE) has no ``time_emb_proj``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None,
                 groups: int = 32, eps: float = 1e-5, act_fn: str = "silu",
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if time_embedding_norm not in ("default", "scale_shift"):
            raise BadArgument(f"resnet_time_scale_shift={time_embedding_norm!r} is not supported; "
                             "expected 'default' or 'scale_shift'")
        self.act = layers.activation(act_fn)
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = layers.group_norm(groups, in_channels, eps=eps, dtype=dtype, rngs=rngs)
        self.conv1 = layers.conv(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        if temb_channels is not None:
            proj_out = out_channels * (2 if time_embedding_norm == "scale_shift" else 1)
            self.time_emb_proj = layers.linear(temb_channels, proj_out, dtype=dtype, rngs=rngs)
        else:
            self.time_emb_proj = None
        self.norm2 = layers.group_norm(groups, out_channels, eps=eps, dtype=dtype, rngs=rngs)
        self.conv2 = layers.conv(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (layers.conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(self.act(temb))[:, None, None, :]
            if self.time_embedding_norm == "default":
                h = self.norm2(h + t)
            else:
                scale, shift = jnp.split(t, 2, axis=-1)
                h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h)
        h = self.conv2(self.act(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=0`` (the VAE) pads right/bottom by one
    first, as diffusers does, so odd sizes round the same way."""

    def __init__(self, channels: int, *, out_channels: int | None = None, padding: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = layers.conv(channels, out_channels or channels, 3, stride=2, padding=pad,
                                dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch ``F.interpolate(mode="nearest")`` on NHWC: source index
    floor(dst * in / out). For exact 2x this is a repeat."""
    h_in, w_in = x.shape[1:3]
    h_out, w_out = size
    if (h_out, w_out) == (2 * h_in, 2 * w_in):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, _nearest_index(h_in, h_out)][:, :, _nearest_index(w_in, w_out)]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # Static indices, computed in float32 like torch's CPU kernel so rounding matches.
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)


class Upsample2D(nnx.Module):
    """Nearest 2x (or to an explicit size) followed by a 3x3 conv."""

    def __init__(self, channels: int, *, out_channels: int | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = layers.conv(channels, out_channels or channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(nearest_resize(x, size))
