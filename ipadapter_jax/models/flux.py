"""FLUX.1's ``FluxTransformer2DModel`` (diffusers) in Flax NNX.

A diffusion transformer over packed latent tokens (2x2 latent patches, see
``pipeline.flux_latents``): ``num_layers`` double-stream blocks, where text and
image tokens keep their own weights and meet in one joint attention, then
``num_single_layers`` single-stream blocks over the concatenated sequence
(attention and MLP side by side), every block modulated (AdaLN-Zero) by the
timestep + pooled-text (+ embedded guidance, dev) embedding. Positions enter
only through rotary embeddings over 3 id axes (``rope_tables``), computed on
the host in float64 as diffusers does.

Image prompts: each block may carry adapter layers (``ip_adapter.flux``); a
block hands its queries after their QK norm and before RoPE to
``adapter.attend``, whose output is added where the adapter's ``site`` says:
"output", to the image stream after the block's feed-forward (XLabs,
diffusers' ``FluxIPAdapterAttnProcessor``), or "attention", to the attention
output before its projection (InstantX: the image stream's in double-stream
blocks, every token's in single-stream ones).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.io.errors import BadFile
from ipadapter_jax.io.pretrained import PretrainedMixin, check_fields
from ipadapter_jax.models import layers
from ipadapter_jax.models.attention import dot_product_attention
from ipadapter_jax.models.unet import TimestepEmbedding, timestep_embedding

ROPE_THETA = 10000


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Fields of a diffusers ``transformer/config.json`` (defaults are diffusers')."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)

    _KINDS = {"patch_size": "int", "in_channels": "int", "out_channels": "int?", "num_layers": "int0",
              "num_single_layers": "int0", "attention_head_dim": "int", "num_attention_heads": "int",
              "joint_attention_dim": "int", "pooled_projection_dim": "int", "guidance_embeds": "bool",
              "axes_dims_rope": "list[int]"}

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "transformer config") -> "FluxConfig":
        check_fields(cfg, cls._KINDS, source)
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names})
        if sum(config.axes_dims_rope) != config.attention_head_dim or any(d % 2 for d in config.axes_dims_rope):
            raise BadFile(f"{source}: axes_dims_rope {list(config.axes_dims_rope)} must be even and sum to "
                          f"attention_head_dim ({config.attention_head_dim})")
        if config.patch_size != 1:
            raise BadFile(f"{source}: patch_size {config.patch_size}: FLUX packs 2x2 latent patches outside "
                          "the transformer and takes patch_size 1")
        return config

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def outputs(self) -> int:
        return self.out_channels or self.in_channels


# --------------------------------------------------------------------------- positions

def rope_tables(ids: np.ndarray, axes_dim, theta: float = ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [S, head_dim] float32 of position ids [S, len(axes_dim)]: per axis
    d frequencies theta^(-2j/d), each repeated twice (real/imaginary pairs
    interleaved), as diffusers' ``FluxPosEmbed`` (float64, then float32)."""
    pos = np.asarray(ids, np.float32).astype(np.float64)
    cos, sin = [], []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.outer(pos[:, axis], freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return np.concatenate(cos, 1).astype(np.float32), np.concatenate(sin, 1).astype(np.float32)


def apply_rope(x: jax.Array, rope) -> jax.Array:
    """Rotate [B, S, H, D] by (cos, sin) [S, D]: pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
    cos, sin = rope
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


# --------------------------------------------------------------------------- embeddings

class TextProjection(nnx.Module):
    """diffusers' ``PixArtAlphaTextProjection`` (``linear_1`` -> SiLU -> ``linear_2``)."""

    def __init__(self, in_features: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = layers.linear(in_features, hidden, dtype=dtype, rngs=rngs)
        self.linear_2 = layers.linear(hidden, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbedding(nnx.Module):
    """``time_text_embed``: sinusoidal(t) -> MLP, (+ sinusoidal(guidance) -> MLP),
    + pooled text -> MLP (diffusers' ``CombinedTimestep[Guidance]TextProjEmbeddings``)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool, *, dtype, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs) if guidance else None
        self.text_embedder = TextProjection(pooled_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, guidance, pooled):
        def embed(values, mlp):
            return mlp(timestep_embedding(values, 256, flip_sin_to_cos=True, downscale_freq_shift=0))

        emb = embed(timestep, self.timestep_embedder)
        if self.guidance_embedder is not None:
            emb = emb + embed(guidance, self.guidance_embedder)
        return emb + self.text_embedder(pooled)


def _plain_norm(dim: int, *, dtype, rngs) -> nnx.LayerNorm:
    """LayerNorm without affine parameters, eps 1e-6 (every AdaLN in FLUX)."""
    return nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype,
                         param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


class AdaLayerNorm(nnx.Module):
    """``linear(silu(temb))`` split in ``chunks`` modulation vectors; ``norm`` unscaled.
    6 chunks: AdaLayerNormZero (shift, scale, gate for attention, then MLP); 3:
    AdaLayerNormZeroSingle; 2: AdaLayerNormContinuous (scale first, then shift)."""

    def __init__(self, dim: int, chunks: int, *, dtype, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = layers.linear(dim, chunks * dim, dtype=dtype, rngs=rngs)
        self.norm = _plain_norm(dim, dtype=dtype, rngs=rngs)

    def modulation(self, temb) -> list[jax.Array]:
        return [m[:, None] for m in jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)]


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class GELUProj(nnx.Module):
    """diffusers' ``GELU(approximate="tanh")`` layer: ``proj`` then tanh-GELU."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.proj = layers.linear(dim, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """``net.0`` GELU-tanh projection, ``net.1`` dropout, ``net.2`` output (4x wide)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.net = nnx.List([GELUProj(dim, 4 * dim, dtype=dtype, rngs=rngs), layers.Identity(),
                             layers.linear(4 * dim, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


# --------------------------------------------------------------------------- attention

def _rms(dim: int, *, dtype, rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class FluxAttention(nnx.Module):
    """Multi-head attention with RMS-normed queries and keys. ``joint``: the
    double-stream form, whose text tokens have their own projections
    (``add_{q,k,v}_proj``, ``norm_added_{q,k}``, ``to_add_out``) and join the
    image tokens (text first) in one attention. ``pre_only``: no output
    projection (single-stream blocks project after the MLP)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, joint: bool, pre_only: bool, dtype,
                 backend: str, rngs: nnx.Rngs):
        inner = heads * head_dim
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        self.to_q = layers.linear(dim, inner, dtype=dtype, rngs=rngs)
        self.to_k = layers.linear(dim, inner, dtype=dtype, rngs=rngs)
        self.to_v = layers.linear(dim, inner, dtype=dtype, rngs=rngs)
        self.norm_q = _rms(head_dim, dtype=dtype, rngs=rngs)
        self.norm_k = _rms(head_dim, dtype=dtype, rngs=rngs)
        self.to_out = None if pre_only else nnx.List([layers.linear(inner, dim, dtype=dtype, rngs=rngs),
                                                      layers.Identity()])
        if joint:
            self.add_q_proj = layers.linear(dim, inner, dtype=dtype, rngs=rngs)
            self.add_k_proj = layers.linear(dim, inner, dtype=dtype, rngs=rngs)
            self.add_v_proj = layers.linear(dim, inner, dtype=dtype, rngs=rngs)
            self.norm_added_q = _rms(head_dim, dtype=dtype, rngs=rngs)
            self.norm_added_k = _rms(head_dim, dtype=dtype, rngs=rngs)
            self.to_add_out = layers.linear(inner, dim, dtype=dtype, rngs=rngs)

    def split(self, x):
        return x.reshape(*x.shape[:-1], -1, self.head_dim)

    def qkv(self, x, q_proj, k_proj, v_proj, q_norm, k_norm):
        return q_norm(self.split(q_proj(x))), k_norm(self.split(k_proj(x))), self.split(v_proj(x))

    def attend(self, q, k, v):
        out = dot_product_attention(q, k, v.astype(q.dtype), scale=self.head_dim ** -0.5, backend=self.backend)
        return out.reshape(*out.shape[:2], -1)

    def __call__(self, x, rope, context=None, ip_attn=None):
        """-> (image-stream output, text-stream output or None, image queries before RoPE).

        ``ip_attn(queries)``: image-prompt attention added to this attention's
        output before its projection (InstantX's adapters), from the queries of
        ``x`` after their QK norm and before RoPE."""
        q, k, v = self.qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        image_q = q
        if context is not None:
            cq, ck, cv = self.qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                  self.norm_added_q, self.norm_added_k)
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
        h = self.attend(apply_rope(q, rope), apply_rope(k, rope), v)
        if context is None:
            if ip_attn is not None:
                h = h + ip_attn(image_q).astype(h.dtype)
            return h, None, image_q
        text = context.shape[1]
        image_h = h[:, text:]
        if ip_attn is not None:
            image_h = image_h + ip_attn(image_q).astype(h.dtype)
        return self.to_out[0](image_h), self.to_add_out(h[:, :text]), image_q


# --------------------------------------------------------------------------- blocks

class FluxTransformerBlock(nnx.Module):
    """Double stream: AdaLN-Zero per stream, joint attention, a feed-forward per stream."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, backend: str, rngs: nnx.Rngs):
        self.norm1 = AdaLayerNorm(dim, 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLayerNorm(dim, 6, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True, pre_only=False, dtype=dtype,
                                  backend=backend, rngs=rngs)
        self.norm2 = _plain_norm(dim, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.norm2_context = _plain_norm(dim, dtype=dtype, rngs=rngs)
        self.ff_context = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, context, temb, rope, ip_out=None, ip_attn=None):
        """``ip_out(image queries) -> [B, S_img, C]``: image prompts added to the image stream last
        (XLabs); ``ip_attn``: added to the attention output before its projection (InstantX)."""
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1.modulation(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.modulation(temb)
        attn, context_attn, image_q = self.attn(modulate(self.norm1.norm(x), shift, scale), rope,
                                                context=modulate(self.norm1_context.norm(context), c_shift, c_scale),
                                                ip_attn=ip_attn)
        x = x + gate * attn
        x = x + gate_mlp * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if ip_out is not None:
            x = x + ip_out(image_q).astype(x.dtype)
        context = context + c_gate * context_attn
        context = context + c_gate_mlp * self.ff_context(modulate(self.norm2_context(context), c_shift_mlp,
                                                                  c_scale_mlp))
        return context, x


class FluxSingleTransformerBlock(nnx.Module):
    """Single stream over [text; image]: attention and a tanh-GELU MLP side by
    side from one AdaLN-Zero, concatenated into ``proj_out``, gated."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, backend: str, rngs: nnx.Rngs):
        self.norm = AdaLayerNorm(dim, 3, dtype=dtype, rngs=rngs)
        self.proj_mlp = layers.linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.proj_out = layers.linear(dim + 4 * dim, dim, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False, pre_only=True, dtype=dtype,
                                  backend=backend, rngs=rngs)

    def __call__(self, x, temb, rope, ip_attn=None):
        """x: [B, S_text + S_img, C]; ``ip_attn`` as in the double block, over every token's query."""
        shift, scale, gate = self.norm.modulation(temb)
        h = modulate(self.norm.norm(x), shift, scale)
        attn, _, _ = self.attn(h, rope, ip_attn=ip_attn)
        mlp = jax.nn.gelu(self.proj_mlp(h), approximate=True)
        return x + gate * self.proj_out(jnp.concatenate([attn, mlp], axis=-1))


# --------------------------------------------------------------------------- the model

class FluxTransformer2DModel(PretrainedMixin, nnx.Module):
    """``model(latents, context, pooled, timestep, rope, guidance=None, ip=()) -> velocity``.

    latents: packed [B, S_img, in_channels]; context: T5 tokens [B, S_text,
    joint_attention_dim]; pooled: CLIP pooled text [B, pooled_projection_dim];
    timestep: [B] in [0, 1] (sigma; scaled by 1000 inside, as diffusers);
    rope: ``rope_tables`` of [text ids; image ids]; guidance: [B] embedded
    guidance (models with ``guidance_embeds``); ``ip``: ``((adapter, prompt), ...)``
    from ``ip_adapter.flux``.
    """

    weights_name = "diffusion_pytorch_model"

    def __init__(self, config: FluxConfig | dict, *, dtype=jnp.float32, attention_backend: str = "auto",
                 remat: bool = False, rngs: nnx.Rngs):
        cfg = config if isinstance(config, FluxConfig) else FluxConfig.from_dict(config)
        self.config = cfg
        self.config_json = json.dumps(dataclasses.asdict(cfg))
        self.dtype = dtype
        # Gradient checkpointing per block: a backward pass recomputes each block's activations
        # instead of keeping them (training a FLUX adapter at 1024 px).
        self.remat = remat
        dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        kw = dict(dtype=dtype, backend=attention_backend, rngs=rngs)
        self.time_text_embed = TimeTextEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds,
                                                 dtype=dtype, rngs=rngs)
        self.context_embedder = layers.linear(cfg.joint_attention_dim, dim, dtype=dtype, rngs=rngs)
        self.x_embedder = layers.linear(cfg.in_channels, dim, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([FluxTransformerBlock(dim, heads, head_dim, **kw)
                                            for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nnx.List([FluxSingleTransformerBlock(dim, heads, head_dim, **kw)
                                                   for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaLayerNorm(dim, 2, dtype=dtype, rngs=rngs)
        self.proj_out = layers.linear(dim, cfg.outputs, dtype=dtype, rngs=rngs)

    @classmethod
    def parse_config(cls, config: dict) -> FluxConfig:
        return FluxConfig.from_dict(config)

    def _call(self, block, terms: dict, *args):
        return _remat_call(block, terms, *args) if self.remat else block(*args, **terms)

    def rope(self, txt_ids: np.ndarray, img_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rotary tables of [text; image] positions (host-side, numpy)."""
        return rope_tables(np.concatenate([txt_ids, img_ids], axis=0), self.config.axes_dims_rope)

    def embed_time(self, timestep, pooled, guidance=None):
        """The modulation input ``temb`` [B, C]: timestep (x 1000), guidance (x 1000), pooled text."""
        t = jnp.asarray(timestep, jnp.float32) * 1000
        g = None if guidance is None else jnp.asarray(guidance, jnp.float32) * 1000
        if self.config.guidance_embeds and g is None:
            raise ValueError("this FLUX transformer embeds guidance (guidance_embeds): pass guidance")
        return self.time_text_embed(t, g, pooled.astype(self.dtype))

    def __call__(self, latents, context, pooled, timestep, rope, guidance=None, ip: tuple = ()):
        dtype = self.dtype
        temb = self.embed_time(timestep, pooled, guidance)
        x = self.x_embedder(latents.astype(dtype))
        context = self.context_embedder(context.astype(dtype))
        rope = tuple(jnp.asarray(r, jnp.float32) for r in rope)
        for index, block in enumerate(self.transformer_blocks):
            terms = dict(ip_out=_ip_terms(ip, "double", index, "output"),
                         ip_attn=_ip_terms(ip, "double", index, "attention"))
            context, x = self._call(block, terms, x, context, temb, rope)
        text = context.shape[1]
        h = jnp.concatenate([context, x], axis=1)
        for index, block in enumerate(self.single_transformer_blocks):
            h = self._call(block, dict(ip_attn=_ip_terms(ip, "single", index, "attention")), h, temb, rope)
        x = h[:, text:]
        scale, shift = self.norm_out.modulation(temb)
        return self.proj_out(modulate(self.norm_out.norm(x), shift, scale)).astype(jnp.float32)


def _remat_call(block, terms: dict, *args):
    """``block(*args, **terms)`` under ``jax.checkpoint``: the block's weights and inputs
    are the rematerialised function's arguments (the image-prompt terms close over
    their adapters' arrays, which JAX differentiates through the closure)."""
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a, **terms))(state, *args)


def _ip_terms(ip: tuple, kind: str, index: int, site: str):
    """The summed image-prompt terms of one block at one ``site`` ("output": after
    the block's feed-forward, XLabs; "attention": into the attention output,
    InstantX) as a function of the queries; None when no adapter has one there."""
    active = [(adapter, prompt) for adapter, prompt in ip if adapter.site == site and adapter.has_layer(kind, index)]
    if not active:
        return None
    return lambda queries: sum(adapter.attend(kind, index, queries, prompt) for adapter, prompt in active)
