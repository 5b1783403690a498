"""Winograd F(2x2, 3x3) / F(4x4, 3x3) (models/winograd.py) against lax.conv_general_dilated, and the
CPU convolution paths of layers.Conv: each computes XLA's convolution, forward and gradients; the
choice is made by layers.cpu_conv_path only, and only on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax import lax

from helpers import nchw, nhwc, rel_err
from ipadapter_jax.models import AutoencoderKL, UNet2DConditionModel, layers, winograd
from test_unet import CONFIGS as UNET_CONFIGS
from test_vae import CONFIG as VAE_CONFIG


def lax_conv(x, k, padding):
    return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("hw, padding", [
    ((7, 9), ((1, 1), (1, 1))),        # odd sizes: neither a multiple of 2 nor of 4
    ((6, 5), ((0, 1), (1, 0))),        # asymmetric padding
    ((3, 10), ((0, 0), (0, 0))),       # one output row, no padding
])
def test_winograd_matches_lax_in_float64(tile, hw, padding):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((3, *hw, 5)))
        k = jnp.asarray(rng.standard_normal((3, 3, 5, 6)))
        ref = lax_conv(x, k, padding)
        ct = jnp.asarray(rng.standard_normal(ref.shape))
        win = jax.jit(lambda x, k: winograd.conv(x, k, tile=tile, padding=padding))
        out = win(x, k)
        assert out.dtype == jnp.float64 and out.shape == ref.shape
        assert rel_err(out, ref) <= 1e-13

        def grads(f):
            return jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * ct), argnums=(0, 1)))(x, k)

        (gx, gk), (rx, rk) = grads(win), grads(lambda x, k: lax_conv(x, k, padding))
        assert rel_err(gx, rx) <= 1e-13
        assert rel_err(gk, rk) <= 1e-13


def test_float32_rounding_of_each_tile():
    """float32 error against a float64 reference at a UNet-like shape (64 channels, unit-variance
    activations, kernels at torch's default init scale), next to XLA's own convolution's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 22, 22, 64)).astype(np.float32)
    k = (rng.uniform(-1, 1, (3, 3, 64, 64)) / np.sqrt(9 * 64)).astype(np.float32)
    pad = ((1, 1), (1, 1))
    with jax.enable_x64(True):
        ref = lax_conv(jnp.asarray(x, jnp.float64), jnp.asarray(k, jnp.float64), pad)
    errors = {"xla": rel_err(lax_conv(x, k, pad), ref)}
    for tile in winograd.TILES:
        errors[tile] = rel_err(jax.jit(lambda x, k, tile=tile: winograd.conv(x, k, tile=tile))(x, k), ref)
    assert errors["xla"] <= 5e-7, errors                      # measured 3.7e-7
    assert errors[2] <= 1.25 * errors["xla"], errors          # 2.7e-7: as accurate as XLA's
    assert errors[4] <= 2e-6, errors                          # 1.1e-6


@pytest.mark.parametrize("path", sorted(layers.CONV_PATHS))
def test_every_cpu_path_of_the_layer_is_the_native_convolution(monkeypatch, path):
    assert jax.default_backend() == "cpu"
    m = layers.conv(8, 6, 3, padding=1, rngs=nnx.Rngs(0))
    m.bias[...] = jnp.asarray(np.random.default_rng(1).standard_normal(6), jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 9, 7, 8), dtype=np.float32))
    taken = []
    monkeypatch.setattr(layers, "cpu_conv_path", lambda *args: taken.append(args) or path)
    native = lambda m, x: nnx.Conv.__call__(m, x)   # noqa: E731
    assert rel_err(m(x), native(m, x)) <= 1e-6
    assert taken == [((3, 3, 8, 6), (1, 1), 3 * 9 * 7, jnp.float32)]
    loss = lambda f: lambda m, x: jnp.sum(f(m, x) ** 2)   # noqa: E731
    g_m, g_x = nnx.grad(loss(lambda m, x: m(x)), argnums=(0, 1))(m, x)
    r_m, r_x = nnx.grad(loss(native), argnums=(0, 1))(m, x)
    assert rel_err(g_x, r_x) <= 1e-5
    assert rel_err(g_m.kernel[...], r_m.kernel[...]) <= 1e-5
    assert rel_err(g_m.bias[...], r_m.bias[...]) <= 1e-5


def test_winograd_only_where_it_applies():
    """Winograd is chosen only for 3x3, stride 1, float32; other convolutions keep their paths."""
    big = 2 * 64 * 64
    assert any(p.startswith("winograd") for *_, p in layers.CPU_CONV_TABLE)
    assert {p for *_, p in layers.CPU_CONV_TABLE} <= set(layers.CONV_PATHS)
    choices = {layers.cpu_conv_path((3, 3, c, c), (1, 1), rows, jnp.float32)
               for c in (320, 640, 1280) for rows in (big, 4 * big)}
    assert any(p.startswith("winograd") for p in choices)
    for kernel, strides, dtype in [((3, 3, 320, 320), (2, 2), jnp.float32), ((1, 1, 320, 320), (1, 1), jnp.float32),
                                   ((3, 3, 320, 320), (1, 1), jnp.bfloat16), ((2, 2, 320, 320), (1, 1), jnp.float32)]:
        assert not layers.cpu_conv_path(kernel, strides, big, dtype).startswith("winograd")
    assert layers.cpu_conv_path((3, 3, 320, 320), (1, 1), layers.IM2COL_MAX_ROWS, jnp.float32) == "im2col"
    # 1x1 stride 1 is a plain matmul at every size (the im2col path with one "column").
    assert {layers.cpu_conv_path((1, 1, 320, 640), (1, 1), rows, dtype)
            for rows in (16, big) for dtype in (jnp.float32, jnp.bfloat16)} == {"im2col"}
    assert layers.cpu_conv_path((1, 1, 320, 640), (2, 2), big, jnp.float32) == "xla"


def test_other_backends_keep_the_native_convolution(monkeypatch):
    m = layers.conv(8, 8, 3, padding=1, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 40, 40, 8))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(layers, "cpu_conv_path", lambda *args: pytest.fail("CPU path chosen on a GPU"))
    calls = []
    monkeypatch.setattr(nnx.Conv, "__call__", lambda self, x: calls.append(x.shape) or x)
    m(x)
    assert calls == [(2, 40, 40, 8)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """A small SD1.5-like UNet and a small VAE (the parity tests' configs), saved, with
    diffusers' outputs: UNet at 2 x 16 x 16 latents, VAE decode of 1 x 12 x 12 latents."""
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    unet, vae = TorchUNet(**UNET_CONFIGS["sd15_like"]).eval(), TorchVAE(**VAE_CONFIG).eval()
    folder = tmp_path_factory.mktemp("winograd")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    x = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)
    context = rng.standard_normal((2, 7, 24), dtype=np.float32)
    t = np.array([3, 917])
    z = rng.standard_normal((1, 12, 12, 4), dtype=np.float32)
    with torch.no_grad():
        unet_out = nhwc(unet(nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)
        vae_out = nhwc(vae.decode(nchw(z)).sample)
    return folder, (x, t, context), unet_out, z, vae_out


@pytest.mark.parametrize("tile", winograd.TILES)
def test_models_keep_parity_with_every_3x3_convolution_on_winograd(monkeypatch, references, tile):
    """The UNet and VAE parity bound (1e-5 against diffusers) holds with every 3x3 stride-1
    convolution forced onto F(tile x tile), at any size, beyond what CPU_CONV_TABLE picks."""
    folder, unet_args, unet_out, z, vae_out = references
    path = f"winograd{tile}"
    monkeypatch.setattr(layers, "CPU_CONV_TABLE", ((0, 1, 1, path),))
    traced = []
    run = layers.CONV_PATHS[path]
    monkeypatch.setitem(layers.CONV_PATHS, path, lambda *a: traced.append(a[1].shape) or run(*a))

    def jitted(model, method):
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s, *a: method(nnx.merge(graphdef, s), *a)), state

    forward, state = jitted(UNet2DConditionModel.from_pretrained(folder / "unet"), lambda m, *a: m(*a))
    assert rel_err(forward(state, *unet_args), unet_out) <= 1e-5
    n_unet = len(traced)
    decode, state = jitted(AutoencoderKL.from_pretrained(folder / "vae"), lambda m, z: m.decode(z))
    assert rel_err(decode(state, z), vae_out) <= 1e-5
    assert n_unet >= 20 and len(traced) - n_unet >= 10          # the convolutions did take the path
