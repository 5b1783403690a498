"""Attention: the one attention function every model uses, and the
diffusers-named ``Attention`` module (``to_q``/``to_k``/``to_v``/``to_out.0``).

Layout convention: ``q`` is [batch, q_len, heads, head_dim], ``k``/``v`` are
[batch, kv_len, heads, head_dim] (the layout of ``jax.nn.dot_product_attention``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.io.errors import BadArgument
from ipadapter_jax.models import hoisting, layers

BACKENDS = ("auto", "xla", "blocked", "jax", "cudnn", "pallas")

# Query rows per block in the "blocked" path: a 1024 x 4096 float32 score block
# (16 MB) per head keeps the exp/sum passes close to cache on a CPU.
QUERY_BLOCK = 1024
# Below this many scores per head, blocking buys nothing.
BLOCKED_MIN_SCORES = 1024 * 1024


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"blocked"`` on CPU, ``"cudnn"`` on GPU (cuDNN's fused
    attention for bf16/fp16; float32 falls back to XLA), ``"pallas"`` on TPU
    (the Pallas flash-attention kernel where the lengths fit its blocks),
    ``"jax"`` elsewhere.
    cuDNN is the GPU default because its fused kernel beat XLA's attention in
    the SD1.5 sampling loop (measured in BENCHMARKS.md, "Sampling loop")."""
    if backend not in BACKENDS:
        raise BadArgument(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        platform = jax.default_backend()
        return {"cpu": "blocked", "gpu": "cudnn", "cuda": "cudnn", "tpu": "pallas"}.get(platform, "jax")
    return backend


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, mask=None) -> jax.Array:
    """Heads-major core: q [..., Lq, D], k/v [..., Lk, D]; float32 softmax."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...qk,...kd->...qd", probs, v)


def _blocked(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Exact attention computed one (batch*head, query block) at a time.

    XLA on CPU materialises the whole [B, H, Lq, Lk] score tensor in the plain
    path; for 4096 tokens that is 1 GB written and read several times, and the
    memory traffic, not the FLOPs, sets the time. Sequential blocks keep each
    score block small, which wins on CPU at SD1.5's 64x64 layer (measured in
    BENCHMARKS.md, "UNet forward"). On accelerators use "jax": a sequential
    map would serialise the device.

    Its gradient is flash attention's (``_blocked_backward``), not autodiff of
    the loop: autodiff would store every block's probabilities and read them
    back one head at a time. Being a ``jax.custom_vjp``, it has no forward-mode
    derivative (``jax.jvp``); the "xla" backend has.
    """
    b, lq, h, _ = q.shape
    heads_major = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], x.shape[-1])
    out = _blocked_heads(heads_major(q), heads_major(k), heads_major(v), scale)
    return out.reshape(b, h, lq, -1).transpose(0, 2, 1, 3)


def _blocked_forward(qh: jax.Array, kh: jax.Array, vh: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """Heads-major [BH, L, D] inputs -> (output [BH, Lq, Dv], logsumexp of the scaled scores [BH, Lq])."""
    lq, d = qh.shape[1:]
    block = min(QUERY_BLOCK, lq)
    pad = (-lq) % block
    if pad:
        qh = jnp.pad(qh, ((0, 0), (0, pad), (0, 0)))

    def one_block(x, kk, vv):
        logits = jnp.einsum("qd,kd->qk", x, kk).astype(jnp.float32) * scale
        peak = logits.max(-1, keepdims=True)
        unnormalized = jnp.exp(logits - peak)    # jax.nn.softmax's steps, so both paths round alike
        total = unnormalized.sum(-1, keepdims=True)
        out = jnp.einsum("qk,kd->qd", (unnormalized / total).astype(vv.dtype), vv)
        return out, (peak + jnp.log(total))[:, 0]

    def one_head(args):
        qq, kk, vv = args
        out, lse = jax.lax.map(lambda x: one_block(x, kk, vv), qq.reshape(-1, block, d))
        return out.reshape(-1, vv.shape[-1]), lse.reshape(-1)

    out, lse = jax.lax.map(one_head, (qh, kh, vh))
    return out[:, :lq], lse[:, :lq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_heads(qh: jax.Array, kh: jax.Array, vh: jax.Array, scale: float) -> jax.Array:
    return _blocked_forward(qh, kh, vh, scale)[0]


def _blocked_with_residuals(qh, kh, vh, scale):
    out, lse = _blocked_forward(qh, kh, vh, scale)
    return out, (qh, kh, vh, out, lse)


# The blocked path's backward pass works on (heads x query rows) blocks of at most this many
# float32 scores (fewer heads, not fewer rows, once BACKWARD_MIN_ROWS is reached): measured
# against autodiff of the forward loop and other block sizes in BENCHMARKS.md ("Attention
# backward on CPU").
BACKWARD_BLOCK_BYTES = 4 << 20
BACKWARD_MIN_ROWS = 128


def backward_blocks(heads: int, lq: int, lk: int) -> tuple[int, int]:
    """(heads, query rows) per block of the blocked path's backward pass; ``heads``
    divides the batch*head count."""
    rows = min(lq, max(BACKWARD_MIN_ROWS, BACKWARD_BLOCK_BYTES // (4 * lk * heads)))
    group = heads
    while group > 1 and group * rows * lk * 4 > BACKWARD_BLOCK_BYTES:
        group = max(n for n in range(1, group) if heads % n == 0)
    return group, rows


def _blocked_backward(scale: float, residuals, g: jax.Array):
    """Flash attention's backward pass (Dao et al. 2022, algorithm 2) from the saved
    logsumexp: each block's probabilities are recomputed from q and k, never stored;
    dK and dV accumulate over the query blocks. In float32, whatever the input dtype,
    except the recomputed scores: q k^T by the forward pass's expression (input dtype,
    then float32), so that the probabilities are those the saved logsumexp belongs to."""
    qh, kh, vh, out, lse = residuals
    dtypes = (qh.dtype, kh.dtype, vh.dtype)
    qh, kh, vh, out, g = (x.astype(jnp.float32) for x in (qh, kh, vh, out, g))
    bh, lq, d = qh.shape
    lk = kh.shape[1]
    heads, rows = backward_blocks(bh, lq, lk)
    pad = (-lq) % rows
    delta = jnp.sum(g * out, axis=-1)       # rowsum(dO * O) = rowsum(P * dP)

    def blocks(x):   # [BH, Lq, ...] -> [BH / heads, Lq / rows, heads, rows, ...]; padded rows have g = 0
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(bh // heads, heads, -1, rows, *x.shape[2:]).swapaxes(1, 2)

    def group(args):
        qg, gg, lse_g, delta_g, kk, vv = args

        # dK and dV accumulate transposed, [heads, D, Lk]: XLA:CPU computes (P^T dO)^T as
        # [D, rows] x [rows, Lk] several times faster than P^T dO as [Lk, rows] x [rows, D]
        # with a small D (BENCHMARKS.md, "Attention backward on CPU"). The transpose back stays
        # after the scan: inside the loop XLA folds it into the dot and the slow form returns.
        def step(carry, xs):
            dk_t, dv_t = carry
            qb, gb, lse_b, delta_b = xs
            scores = jnp.einsum("hqd,hkd->hqk", qb.astype(dtypes[0]), kk.astype(dtypes[1])).astype(jnp.float32)
            probs = jnp.exp(scores * scale - lse_b[..., None])
            dv_t = dv_t + jnp.einsum("hqd,hqk->hdk", gb, probs)
            dscores = probs * (jnp.einsum("hqd,hkd->hqk", gb, vv) - delta_b[..., None]) * scale
            dk_t = dk_t + jnp.einsum("hqd,hqk->hdk", qb, dscores)
            return (dk_t, dv_t), jnp.einsum("hqk,hkd->hqd", dscores, kk)

        zeros = (jnp.zeros_like(kk.swapaxes(1, 2)), jnp.zeros_like(vv.swapaxes(1, 2)))
        (dk_t, dv_t), dq = jax.lax.scan(step, zeros, (qg, gg, lse_g, delta_g))
        return dq, dk_t.swapaxes(1, 2), dv_t.swapaxes(1, 2)

    grouped = lambda x: x.reshape(bh // heads, heads, *x.shape[1:])
    dq, dk, dv = jax.lax.map(group, (blocks(qh), blocks(g), blocks(lse), blocks(delta), grouped(kh), grouped(vh)))
    dq = dq.swapaxes(1, 2).reshape(bh, lq + pad, d)[:, :lq]
    return dq.astype(dtypes[0]), dk.reshape(kh.shape).astype(dtypes[1]), dv.reshape(vh.shape).astype(dtypes[2])


_blocked_heads.defvjp(_blocked_with_residuals, _blocked_backward)


def cudnn_supports(q: jax.Array, v: jax.Array) -> bool:
    """Whether cuDNN's fused attention takes these inputs: half precision on an
    NVIDIA GPU, head dims <= 256 and multiples of 8 (the VAE's one 512-wide head
    is not; it takes XLA's path)."""
    dims = (q.shape[-1], v.shape[-1])
    return (q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() in ("gpu", "cuda")
            and all(d <= 256 and d % 8 == 0 for d in dims))


# The Pallas TPU kernel runs on TPUs; tests set this (inside
# ``pltpu.force_tpu_interpret_mode()``) to run it in Pallas' TPU interpret mode on the CPU.
PALLAS_INTERPRET = False


def _pallas_block(length: int) -> int | None:
    """Largest flash-attention block (512, 256 or 128) dividing ``length``."""
    return next((b for b in (512, 256, 128) if length % b == 0), None)


def pallas_supports(q: jax.Array, k: jax.Array) -> bool:
    """Whether the Pallas TPU flash kernel takes these inputs: on a TPU (or in
    interpret mode) and query/key lengths that are multiples of 128 (SD's
    64x64/32x32/16x16 self-attention; not the 77 text tokens or 8x8 maps)."""
    on_tpu = jax.default_backend() == "tpu" or PALLAS_INTERPRET
    return on_tpu and _pallas_block(q.shape[1]) is not None and _pallas_block(k.shape[1]) is not None


def _pallas_flash(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    bq, bk = _pallas_block(q.shape[1]), _pallas_block(k.shape[1])
    blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                           block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                           block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    return heads_major(fa.flash_attention(heads_major(q), heads_major(k), heads_major(v), sm_scale=scale,
                                          block_sizes=blocks))


def _reference(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, mask=None) -> jax.Array:
    """The plain XLA path on [B, L, H, D] inputs."""
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    return heads_major(_attend(heads_major(q), heads_major(k), heads_major(v), scale, mask))


def fused_forward_reference_backward(forward):
    """``forward(q, k, v, scale)`` with the reference path's gradient: for fused
    kernels whose backward pass rejects some shapes. The backward recomputes
    the reference attention (short key lengths only, so the scores are small)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def attention(q, k, v, scale):
        return forward(q, k, v, scale)

    def fwd(q, k, v, scale):
        return forward(q, k, v, scale), (q, k, v)

    def bwd(scale, residuals, g):
        _, vjp = jax.vjp(lambda *qkv: _reference(*qkv, scale), *residuals)
        return vjp(g)

    attention.defvjp(fwd, bwd)
    return attention


_cudnn_forward = fused_forward_reference_backward(
    lambda q, k, v, scale: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn"))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          mask: jax.Array | None = None, backend: str = "xla") -> jax.Array:
    """softmax(q k^T * scale + mask) v, softmax in float32.

    Args:
      q, k, v: [B, L, H, D] arrays (k and v share their length).
      scale: multiplier of the logits (usually ``head_dim ** -0.5``).
      mask: optional boolean array broadcastable to [B, H, Lq, Lk]; True keeps.
      backend: ``"xla"`` (plain einsum reference path, works everywhere),
        ``"blocked"`` (the same math one head and query block at a time: fast on
        CPU for long sequences), ``"jax"`` (``jax.nn.dot_product_attention``
        with XLA's choice of implementation), ``"cudnn"`` (its cuDNN fused
        kernel, bf16/fp16 on NVIDIA GPUs; elsewhere the same as ``"jax"``),
        ``"pallas"`` (the Pallas flash-attention kernel on TPUs for lengths that
        are multiples of 128; ``"jax"`` otherwise) or ``"auto"`` (see ``resolve_backend``).
    """
    backend = resolve_backend(backend)
    if backend == "cudnn" and cudnn_supports(q, v):
        if k.shape[1] % 64 == 0:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
        if mask is None:
            # cuDNN's fused backward rejects key lengths such as 77 text tokens, its forward
            # takes them: fused forward, and the reference path's gradient when one is taken.
            return _cudnn_forward(q, k, v, scale)
    if backend == "pallas" and mask is None and pallas_supports(q, k):
        return _pallas_flash(q, k, v, scale)
    if backend in ("jax", "cudnn", "pallas"):  # cuDNN's fused kernels take half precision only
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    if backend == "blocked" and mask is None and q.shape[1] * k.shape[1] >= BLOCKED_MIN_SCORES:
        return _blocked(q, k, v, scale)
    return _reference(q, k, v, scale, mask)


class Attention(nnx.Module):
    """Multi-head attention with diffusers' parameter names.

    Covers the UNet's self/cross attention (bias-free q/k/v, biased ``to_out.0``)
    and the VAE mid-block attention (biased q/k/v, a ``group_norm`` before it
    and a residual connection around it, on NHWC feature maps).
    """

    def __init__(self, query_dim: int, *, heads: int, dim_head: int,
                 cross_attention_dim: int | None = None, bias: bool = False,
                 out_bias: bool = True, norm_num_groups: int | None = None,
                 norm_eps: float = 1e-5, residual_connection: bool = False,
                 dtype=jnp.float32, backend: str = "auto", rngs: nnx.Rngs):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.residual_connection = residual_connection
        self.backend = resolve_backend(backend)
        self.group_norm = (layers.group_norm(norm_num_groups, query_dim, eps=norm_eps, dtype=dtype, rngs=rngs)
                           if norm_num_groups else None)
        self.to_q = layers.linear(query_dim, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.to_k = layers.linear(kv_dim, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.to_v = layers.linear(kv_dim, inner, bias=bias, dtype=dtype, rngs=rngs)
        # A list so that torch's ``to_out.0`` maps by name; ``to_out.1`` is Dropout.
        self.to_out = nnx.List([layers.linear(inner, query_dim, bias=out_bias, dtype=dtype, rngs=rngs)])
        # Position among the UNet's attention processors (diffusers' ``attn_processors``
        # order) and among its cross-attention layers; set by the UNet, None elsewhere.
        self.processor_index: int | None = None
        self.cross_index: int | None = None

    def heads_split(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.dim_head)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask=None) -> jax.Array:
        """[B, Lq, inner] x [B, Lk, inner] -> [B, Lq, inner]. Adapter branches may
        hold float32 weights under a bfloat16 UNet: k/v follow q's dtype."""
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        h = dot_product_attention(self.heads_split(q), self.heads_split(k), self.heads_split(v),
                                  scale=self.scale, mask=mask, backend=self.backend)
        return h.reshape(*h.shape[:2], -1)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None,
                 ip: tuple = ()) -> jax.Array:
        """x: [B, L, C] tokens, or [B, H, W, C] feature maps (VAE); context:
        [B, S, C_ctx] for cross-attention (None: self-attention).

        ``ip``: ``((adapter, ImagePrompt), ...)`` from the UNet: image
        branches on cross-attention layers (decoupled cross-attention) and,
        for adapters that carry them (FaceID), LoRA deltas on every layer.
        """
        residual = x
        spatial_shape = x.shape if x.ndim == 4 else None
        if self.group_norm is not None:
            x = self.group_norm(x)
        if spatial_shape is not None:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        loras = [(adapter.lora[self.processor_index], prompt.lora_scale) for adapter, prompt in ip
                 if adapter.lora is not None and self.processor_index is not None]
        q = self.to_q(x)
        for lora, s in loras:
            q = q + (s * lora.to_q_lora(x)).astype(q.dtype)

        def project(c, lora_scales):
            k, v = self.to_k(c), self.to_v(c)
            for (lora, _), s in zip(loras, lora_scales):
                k = k + (s * lora.to_k_lora(c)).astype(k.dtype)
                v = v + (s * lora.to_v_lora(c)).astype(v.dtype)
            return k, v

        scales = tuple(s for _, s in loras)
        # A cross-attention context (text) is the same at every denoising step: its K/V once per loop.
        k, v = project(x, scales) if context is None else hoisting.constant(self, "kv", project, context, scales)
        h = self.attend(q, k, v, mask)
        if self.cross_index is not None:
            for adapter, prompt in ip:
                h = h + self.image_attention(q, adapter.layers[self.cross_index], prompt)
        out = self.to_out[0](h)
        for lora, s in loras:
            out = out + (s * lora.to_out_lora(h)).astype(out.dtype)
        if spatial_shape is not None:
            out = out.reshape(spatial_shape)
        if self.residual_connection:
            out = out + residual
        return out

    def image_attention(self, q: jax.Array, layer, prompt) -> jax.Array:
        """scale * Attn(q, to_k_ip(image tokens), to_v_ip(image tokens)).

        Without masks the images' tokens are one sequence; with masks each
        image is attended separately and its output multiplied by its mask at
        this layer's resolution (diffusers' ``ip_adapter_masks``).
        """
        b, n, t, c = prompt.tokens.shape                       # [B, N, T, C]
        scale = prompt.scale[self.cross_index].astype(q.dtype)  # traced: new scales never recompile

        def project(tokens, i=None):    # the tokens are the same at every denoising step: once per loop
            tokens = tokens.astype(q.dtype)
            tokens = tokens.reshape(b, n * t, c) if i is None else tokens[:, i]
            return layer.to_k_ip(tokens), layer.to_v_ip(tokens)

        if prompt.masks is None:
            return scale * self.attend(q, *hoisting.constant(layer, "kv", project, prompt.tokens))
        masks = prompt.masks[q.shape[1]].astype(q.dtype)       # [B, N, Lq]
        out = 0
        for i in range(n):
            kv = hoisting.constant(layer, f"kv{i}", lambda tokens, i=i: project(tokens, i), prompt.tokens)
            out = out + self.attend(q, *kv) * masks[:, i, :, None]
        return scale * out
