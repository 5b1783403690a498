"""layers.Conv: the CPU im2col path computes nnx.Conv's function (forward and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import rel_err
from ipadapter_jax.models import layers


@pytest.mark.parametrize("cin, cout, kernel, stride, padding, size", [
    (8, 6, 3, 1, 1, 5),                      # ResNet 3x3
    (8, 6, 3, 2, ((0, 1), (0, 1)), 8),       # the VAE's asymmetric-pad downsampler
    (4, 5, 3, 2, 1, 7),                      # the UNet's downsampler, odd size
    (3, 4, 2, 2, 0, 6),                      # even kernel, no padding
    (8, 6, 1, 1, 0, 5),                      # 1x1 (resnet shortcut, transformer proj_in / proj_out): a matmul
    (8, 6, 1, 1, 1, 5),                      # 1x1 with padding (the output grows by the border)
])
def test_im2col_matches_native_convolution(cin, cout, kernel, stride, padding, size):
    assert jax.default_backend() == "cpu"
    m = layers.conv(cin, cout, kernel, stride=stride, padding=padding, rngs=nnx.Rngs(0))
    m.bias[...] = jnp.asarray(np.random.default_rng(1).standard_normal(cout), jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size, cin), dtype=np.float32))
    assert 2 * size * size <= layers.IM2COL_MAX_ROWS           # the im2col path runs
    native = lambda m, x: nnx.Conv.__call__(m, x)
    assert rel_err(m(x), native(m, x)) <= 1e-6
    loss = lambda f: lambda m, x: jnp.sum(f(m, x) ** 2)
    g_m, g_x = nnx.grad(loss(lambda m, x: m(x)), argnums=(0, 1))(m, x)
    r_m, r_x = nnx.grad(loss(native), argnums=(0, 1))(m, x)
    assert rel_err(g_x, r_x) <= 1e-5
    assert rel_err(g_m.kernel[...], r_m.kernel[...]) <= 1e-5
    assert rel_err(g_m.bias[...], r_m.bias[...]) <= 1e-5


def test_large_inputs_take_the_native_convolution(monkeypatch):
    m = layers.conv(4, 4, 3, padding=1, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, 8, 4))
    monkeypatch.setattr(layers, "IM2COL_MAX_ROWS", 63)
    calls = []
    monkeypatch.setattr(nnx.Conv, "__call__", lambda self, x: calls.append(x.shape) or x)
    m(x)
    assert calls == [(1, 8, 8, 4)]
