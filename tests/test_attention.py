"""The attention backends against a float64 NumPy softmax(q k^T) v."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import rel_err
from ipadapter_jax.models import attention


def reference(q, k, v, scale, mask=None):
    q, k, v = (x.astype(np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = q @ k.transpose(0, 1, 3, 2) * scale
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("backend", ["xla", "blocked", "jax", "cudnn", "auto"])
@pytest.mark.parametrize("lq, lk", [(1500, 1100), (2048, 77), (64, 64)])
def test_backends_match_reference(backend, lq, lk, monkeypatch):
    # Small blocks so that the blocked path (with query padding) runs at test sizes.
    monkeypatch.setattr(attention, "QUERY_BLOCK", 512)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, lq, 3, 16), dtype=np.float32)
    k = rng.standard_normal((2, lk, 3, 16), dtype=np.float32)
    v = rng.standard_normal((2, lk, 3, 16), dtype=np.float32)
    out = attention.dot_product_attention(q, k, v, scale=0.25, backend=backend)
    assert rel_err(out, reference(q, k, v, 0.25)) <= 1e-5


@pytest.mark.parametrize("backend", ["xla", "blocked", "jax"])
def test_mask(backend):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 9, 2, 8), dtype=np.float32) for _ in range(3))
    mask = np.tril(np.ones((9, 9), bool))[None, None]
    out = attention.dot_product_attention(q, k, v, scale=8 ** -0.5, mask=mask, backend=backend)
    assert rel_err(out, reference(q, k, v, 8 ** -0.5, mask)) <= 1e-5


def test_unknown_backend():
    with pytest.raises(ValueError, match="flash3"):
        attention.resolve_backend("flash3")


@pytest.mark.parametrize("backend", ["xla", "blocked", "jax", "cudnn"])
def test_bfloat16_backends(backend, monkeypatch):
    import jax.numpy as jnp

    monkeypatch.setattr(attention, "QUERY_BLOCK", 512)
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, n, 4, 32), dtype=np.float32) for n in (1100, 77, 77))
    out = attention.dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), scale=32 ** -0.5,
                                          backend=backend)
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out, np.float32), reference(q, k, v, 32 ** -0.5)) <= 1e-2


def test_fused_forward_reference_backward_gradients():
    """The cuDNN-forward wrapper's custom gradient (the reference path's VJP) equals
    autodiff through the reference, checked with an XLA forward standing in for cuDNN."""
    import jax
    import jax.numpy as jnp

    fused = attention.fused_forward_reference_backward(
        lambda q, k, v, scale: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla"))
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 16), dtype=np.float32)) for n in (96, 77, 77))
    w = jnp.asarray(rng.standard_normal((2, 96, 3, 16), dtype=np.float32))
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))
    got = jax.grad(loss(lambda q, k, v: fused(q, k, v, 0.25)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: attention.dot_product_attention(q, k, v, scale=0.25, backend="xla")),
                    argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-5
    assert rel_err(fused(q, k, v, 0.25), reference(*(np.asarray(x) for x in (q, k, v)), 0.25)) <= 1e-5


@pytest.mark.parametrize("block_bytes", [4 << 20, 2 << 20])
def test_blocked_gradients_are_the_reference_gradients(block_bytes, monkeypatch):
    """The blocked path's flash-style backward (recomputed probabilities from the
    saved logsumexp; query rows padded to its 158- or 128-row blocks; at 2 MB the 6 batch-heads
    split into groups of 3) against autodiff through the plain path."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(attention, "QUERY_BLOCK", 512)
    monkeypatch.setattr(attention, "BACKWARD_BLOCK_BYTES", block_bytes)
    assert attention.backward_blocks(6, 1500, 1100) == ((6, 158) if block_bytes == 4 << 20 else (3, 128))
    rng = np.random.default_rng(5)
    q, k = (jnp.asarray(rng.standard_normal((2, n, 3, 16), dtype=np.float32)) for n in (1500, 1100))
    v = jnp.asarray(rng.standard_normal((2, 1100, 3, 24), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((2, 1500, 3, 24), dtype=np.float32))
    loss = lambda backend: lambda q, k, v: jnp.sum(w * attention.dot_product_attention(q, k, v, scale=0.25,
                                                                                       backend=backend))
    assert "custom_vjp_call" in str(jax.make_jaxpr(loss("blocked"))(q, k, v))   # the blocked path runs
    grads = lambda backend: jax.jit(jax.grad(loss(backend), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads("blocked"), grads("xla")):
        assert rel_err(g, r) <= 1e-5


def test_blocked_gradients_in_bfloat16(monkeypatch):
    """bfloat16 inputs: the blocked path's gradients are no further from float32
    autodiff than twice the plain bfloat16 path's (measured: 0.9% against 1.6%)."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(attention, "QUERY_BLOCK", 512)
    rng = np.random.default_rng(6)
    q, k, v, w = (rng.standard_normal((1, n, 2, 32), dtype=np.float32) for n in (1100, 1000, 1000, 1100))
    q = 4 * q      # larger scores, sharper softmax: bfloat16 errors show more
    loss = lambda backend, dtype: lambda q, k, v: jnp.sum(w * attention.dot_product_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), scale=32 ** -0.5, backend=backend).astype(jnp.float32))
    want = jax.grad(loss("xla", jnp.float32), argnums=(0, 1, 2))(q, k, v)
    plain = jax.grad(loss("xla", jnp.bfloat16), argnums=(0, 1, 2))(q, k, v)
    blocked = jax.grad(loss("blocked", jnp.bfloat16), argnums=(0, 1, 2))(q, k, v)
    for b, p, r in zip(blocked, plain, want):
        assert rel_err(b, r) <= max(2 * rel_err(p, r), 1e-2), (rel_err(b, r), rel_err(p, r))


def test_cudnn_supports(monkeypatch):
    """cuDNN's fused kernel is used only where it runs: half precision on a GPU and
    head dims <= 256, multiples of 8 (the SD VAE's single 512-wide head is not)."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = lambda d, dtype=jnp.bfloat16: jnp.zeros((1, 4, 1, d), dtype)
    assert attention.cudnn_supports(x(64), x(64))
    assert not attention.cudnn_supports(x(512), x(512))
    assert not attention.cudnn_supports(x(60), x(60))
    assert not attention.cudnn_supports(x(64, jnp.float32), x(64, jnp.float32))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not attention.cudnn_supports(x(64), x(64))


def test_pallas_flash_kernel_in_interpret_mode(monkeypatch):
    """The TPU backend: Pallas' flash-attention kernel (run here in Pallas' TPU
    interpret mode) against the float64 reference, gradients against XLA's; lengths
    that are not multiples of 128 (77 text tokens) take the XLA path."""
    from jax.experimental.pallas import tpu as pltpu

    monkeypatch.setattr(attention, "PALLAS_INTERPRET", True)
    with pltpu.force_tpu_interpret_mode():
        _check_pallas()


def _check_pallas():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, 2, 64), dtype=np.float32)) for n in (256, 128, 128))
    assert attention.pallas_supports(q, k) and not attention.pallas_supports(q, k[:, :77])
    out = attention.dot_product_attention(q, k, v, scale=0.125, backend="pallas")
    assert rel_err(out, reference(*(np.asarray(x) for x in (q, k, v)), 0.125)) <= 1e-5
    w = jnp.asarray(rng.standard_normal(out.shape, dtype=np.float32))
    grads = lambda backend: jax.grad(lambda q, k, v: jnp.sum(w * attention.dot_product_attention(
        q, k, v, scale=0.125, backend=backend)), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads("pallas"), grads("xla")):
        assert rel_err(g, r) <= 1e-5
    short = attention.dot_product_attention(q, k[:, :77], v[:, :77], scale=0.125, backend="pallas")
    assert rel_err(short, reference(*(np.asarray(x) for x in (q, k[:, :77], v[:, :77])), 0.125)) <= 1e-5
