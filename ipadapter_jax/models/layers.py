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
from flax import nnx

Dtype = Any


def linear(in_features: int, out_features: int, *, bias: bool = True, dtype: Dtype = jnp.float32,
           rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
         padding: int | tuple = 0, bias: bool = True, dtype: Dtype = jnp.float32,
         rngs: nnx.Rngs) -> nnx.Conv:
    """2-D convolution over NHWC with torch-style symmetric integer padding.

    ``padding`` may also be an explicit ((top, bottom), (left, right)) pair, used
    by the VAE's asymmetric downsampling pad.
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                    padding=padding, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    rngs=rngs)


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
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class Identity(nnx.Module):
    """Parameter-free placeholder that keeps list indices aligned with torch
    (e.g. the Dropout at ``ff.net.1`` so that ``ff.net.2`` is the output Linear)."""

    def __call__(self, x):
        return x
