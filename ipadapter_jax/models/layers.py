"""Layer constructors with PyTorch's semantics.

diffusers/transformers layers differ from Flax defaults in ways that break
parity silently: LayerNorm/GroupNorm epsilon (torch 1e-5, Flax 1e-6), GELU
(torch exact, Flax tanh approximation) and the single-pass variance formula.
Every model builds its layers through these helpers so those choices live in
one place. Parameters are float32; ``dtype`` is the compute dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.io.errors import BadArgument

Dtype = Any


def linear(in_features: int, out_features: int, *, bias: bool = True, dtype: Dtype = jnp.float32,
           rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
         padding: int | tuple = 0, bias: bool = True, dtype: Dtype = jnp.float32,
         rngs: nnx.Rngs) -> nnx.Conv:
    """2-D convolution over NHWC (``Conv``) with torch-style symmetric integer padding.

    ``padding`` may also be an explicit ((top, bottom), (left, right)) pair, used
    by the VAE's asymmetric downsampling pad.
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                padding=padding, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                rngs=rngs)


# Largest matmul row count (batch x output pixels) for which a CPU convolution runs as
# im2col + one matmul. XLA:CPU's convolution is slow at small spatial sizes (SD's
# 1280-channel 3x3 at 8x8), forward and even more so with the input gradient, so im2col
# wins there; on larger maps (2 x 32 x 32 x 640) the native convolution wins. Measured
# in BENCHMARKS.md ("Where the performance goals landed", the CPU convolution paragraph).
IM2COL_MAX_ROWS = 512


class Conv(nnx.Conv):
    """``nnx.Conv`` (same parameters) that, on CPU, computes small-spatial
    convolutions as im2col + one matmul: the same function, up to float rounding."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides or (1, 1))
        padding = self.padding
        dilated = any(d is not None and any(v != 1 for v in np.atleast_1d(d))
                      for d in (self.kernel_dilation, self.input_dilation))
        if (jax.default_backend() != "cpu" or inputs.ndim != 4 or (kh, kw) == (1, 1) or self.feature_group_count != 1
                or not isinstance(padding, (tuple, list)) or dilated):
            return super().__call__(inputs)
        (pt, pb), (pl, pr) = padding
        b, h, w, c = inputs.shape
        out_h = (h + pt + pb - kh) // strides[0] + 1
        out_w = (w + pl + pr - kw) // strides[1] + 1
        if b * out_h * out_w > IM2COL_MAX_ROWS:
            return super().__call__(inputs)
        dtype = self.dtype or inputs.dtype
        kernel = self.kernel[...].astype(dtype)
        x = jnp.pad(inputs.astype(dtype), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        cols = [x[:, i:i + strides[0] * (out_h - 1) + 1:strides[0], j:j + strides[1] * (out_w - 1) + 1:strides[1]]
                for i in range(kh) for j in range(kw)]
        y = jnp.concatenate(cols, axis=-1).reshape(-1, kh * kw * c) @ kernel.reshape(kh * kw * c, -1)
        y = y.reshape(b, out_h, out_w, -1)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def group_norm(num_groups: int, num_channels: int, *, eps: float, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance: torch computes E[(x - mean)^2], which matters at 1e-5.
    return nnx.GroupNorm(num_channels, num_groups=num_groups, epsilon=eps, dtype=dtype,
                         param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


def layer_norm(num_features: int, *, eps: float = 1e-5, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(num_features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU() default: the exact erf form."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    """Look up an activation by its diffusers/transformers config name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise BadArgument(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class Identity(nnx.Module):
    """Parameter-free placeholder that keeps list indices aligned with torch
    (e.g. the Dropout at ``ff.net.1`` so that ``ff.net.2`` is the output Linear)."""

    def __call__(self, x):
        return x
