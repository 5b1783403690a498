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
from jax import lax

from ipadapter_jax.io.errors import BadArgument
from ipadapter_jax.models import hoisting, winograd

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


def conv_xla(x: jax.Array, kernel: jax.Array, strides: tuple, padding) -> jax.Array:
    """XLA's own convolution (what ``nnx.Conv`` calls): NHWC input, HWIO kernel."""
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x: jax.Array, kernel: jax.Array, strides: tuple, padding) -> jax.Array:
    """The same convolution as one matmul over the kh x kw shifted copies of the input."""
    kh, kw, c, _ = kernel.shape
    (pt, pb), (pl, pr) = padding
    b, h, w, _ = x.shape
    out_h = (h + pt + pb - kh) // strides[0] + 1
    out_w = (w + pl + pr - kw) // strides[1] + 1
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = [x[:, i:i + strides[0] * (out_h - 1) + 1:strides[0], j:j + strides[1] * (out_w - 1) + 1:strides[1]]
            for i in range(kh) for j in range(kw)]
    y = jnp.concatenate(cols, axis=-1).reshape(-1, kh * kw * c) @ kernel.reshape(kh * kw * c, -1)
    return y.reshape(b, out_h, out_w, -1)


def _winograd(tile: int):
    def conv_winograd(x: jax.Array, kernel: jax.Array, strides: tuple, padding) -> jax.Array:
        if tuple(strides) != (1, 1) or kernel.shape[:2] != (3, 3):
            raise ValueError(f"Winograd computes 3x3 stride-1 convolutions only, not {kernel.shape[:2]} kernels "
                             f"with strides {tuple(strides)}")
        return winograd.conv(x, kernel, tile=tile, padding=padding)
    return conv_winograd


# The CPU convolution paths by name; each computes conv_xla's function up to float rounding.
# Winograd is 3x3 stride 1 only.
CONV_PATHS = {"xla": conv_xla, "im2col": conv_im2col, "winograd2": _winograd(2), "winograd4": _winograd(4)}

# Largest matmul row count (batch x output pixels) for which a CPU convolution runs as
# im2col + one matmul. XLA:CPU's convolution is slow at small spatial sizes (SD's
# 1280-channel 3x3 at 8x8), forward and even more so with the input gradient, so im2col
# wins there; on larger maps (2 x 32 x 32 x 640) the native convolution wins. Measured
# in BENCHMARKS.md ("Where the performance goals landed", the CPU convolution paragraph).
IM2COL_MAX_ROWS = 512

# Winograd for 3x3 stride-1 float32 convolutions on CPU, first matching row wins:
# (fewest rows = batch x output pixels, fewest C_in, fewest C_out, path). Measured per shape
# with bench/conv.py (BENCHMARKS.md, "3x3 convolutions on CPU"): F(4x4) from 2 x 32 x 32 up
# (0.35-0.66x XLA's time at >= 256 channels); F(2x2) between 513 and 2047 rows, where the two
# tile sizes were within noise and F(2x2) rounds as XLA does, and at SD's 16 x 16 batch-2
# level with >= 1280 channels (0.75-0.94x im2col). At <= 256 rows the per-call kernel
# transform costs more than Winograd saves, and the few-channel convolutions (4 -> 320,
# 128 -> 3) are faster on XLA. A shape no row matches takes im2col up to IM2COL_MAX_ROWS,
# XLA's convolution above; 1x1 stride-1 kernels are a matmul at any size and dtype.
CPU_CONV_TABLE: tuple[tuple[int, int, int, str], ...] = (
    (2048, 32, 32, "winograd4"),
    (513, 128, 128, "winograd2"),
    (512, 1280, 1280, "winograd2"),
)


def cpu_conv_path(kernel_shape: tuple, strides: tuple, rows: int, dtype) -> str:
    """Which of CONV_PATHS computes a CPU convolution with this HWIO ``kernel_shape``,
    ``strides``, ``rows`` = batch x output pixels and compute ``dtype``.
    The one place the choice is made (float32 only for Winograd: its rounding was
    measured there)."""
    kh, kw, cin, cout = kernel_shape
    if (kh, kw) == (1, 1):
        # A matmul (im2col of a 1x1 kernel is the input itself): XLA:CPU's convolution copies
        # the kernel into its own layout on every call. The SD1.5 forward gained 1.5% from this,
        # the training step nothing measurable (BENCHMARKS.md, "The training step, profiled").
        return "im2col" if tuple(strides) == (1, 1) else "xla"
    if (kh, kw) == (3, 3) and tuple(strides) == (1, 1) and jnp.dtype(dtype) == jnp.float32:
        for min_rows, min_in, min_out, path in CPU_CONV_TABLE:
            if rows >= min_rows and cin >= min_in and cout >= min_out:
                return path
    return "im2col" if rows <= IM2COL_MAX_ROWS else "xla"


class Conv(nnx.Conv):
    """``nnx.Conv`` (same parameters) that, on CPU, computes the convolution by the path
    ``cpu_conv_path`` picks (im2col, Winograd or XLA's): the same function, up to float
    rounding. Other backends keep their native convolution (cuDNN, XLA:TPU)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides or (1, 1))
        padding = self.padding
        dilated = any(d is not None and any(v != 1 for v in np.atleast_1d(d))
                      for d in (self.kernel_dilation, self.input_dilation))
        if (jax.default_backend() != "cpu" or inputs.ndim != 4 or self.feature_group_count != 1
                or not isinstance(padding, (tuple, list)) or dilated):
            return super().__call__(inputs)
        kh, kw = self.kernel_size
        (pt, pb), (pl, pr) = padding
        b, h, w, _ = inputs.shape
        rows = b * ((h + pt + pb - kh) // strides[0] + 1) * ((w + pl + pr - kw) // strides[1] + 1)
        dtype = self.dtype or inputs.dtype
        path = cpu_conv_path(self.kernel.shape, strides, rows, dtype)
        if path == "xla":
            return super().__call__(inputs)
        if path.startswith("winograd") and hoisting.active():
            # Inside a denoising loop the transformed kernel is computed once per call (within
            # hoisting's BUDGETS and MIN_STEPS; otherwise here, tied to the input as winograd.conv does).
            tile = int(path[len("winograd"):])
            x = inputs.astype(dtype)
            u = hoisting.constant(self, path, lambda k: winograd.transform_kernel(k.astype(dtype), tile),
                                  self.kernel[...], budget="winograd",
                                  fallback=lambda k: winograd.transform_kernel(k.astype(dtype), tile,
                                                                               winograd.tied_zero(x, dtype)))
            y = winograd.conv3x3(x, u, tile=tile, padding=padding)
        else:
            y = CONV_PATHS[path](inputs.astype(dtype), self.kernel[...].astype(dtype), strides, padding)
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
