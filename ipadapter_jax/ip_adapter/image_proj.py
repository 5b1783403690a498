"""IP-Adapter image projection models: image (or face ID) embeddings -> tokens
for the UNet's image cross-attention.

Module names mirror the official IP-Adapter checkpoints (``image_proj.*`` keys
of the h94/IP-Adapter files), so loading them is a prefix strip:

================  ===============================  ==============================
class             official files                   input
================  ===============================  ==============================
ImageProjModel    ip-adapter_sd15, _light, vit-G   CLIP ``image_embeds`` [B, D]
MLPProjModel      ip-adapter-full-face_sd15        CLIP ``hidden_states[-2]`` [B, 257, D]
Resampler         ip-adapter-plus(-face)_sd15      CLIP ``hidden_states[-2]`` [B, 257, D]
FaceIDProjModel   ip-adapter-faceid(-portrait)     InsightFace ID embedding [B, 512]
FaceIDPlusModel   ip-adapter-faceid-plus(v2)       ID embedding + CLIP hidden_states[-2]
================  ===============================  ==============================

LayerNorm epsilon is torch's 1e-5 and GELU is exact, as in the reference.
Every projection tells what it takes and makes: ``input_dim`` (embedding
width), ``token_dim`` (token width, the UNet's cross-attention width) and
``num_tokens`` (tokens per image; None for one per CLIP token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models import layers
from ipadapter_jax.models.attention import dot_product_attention


class ImageProjModel(nnx.Module):
    """``proj``: Linear(D, T*C) -> reshape [T, C] -> ``norm`` LayerNorm(C)."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, *, rngs: nnx.Rngs):
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.proj = layers.linear(embed_dim, num_tokens * cross_attention_dim, rngs=rngs)
        self.norm = layers.layer_norm(cross_attention_dim, rngs=rngs)

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        x = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(x)

    @property
    def input_dim(self) -> int:
        return self.proj.in_features

    @property
    def token_dim(self) -> int:
        return self.cross_attention_dim


class MLPProjModel(nnx.Module):
    """Full-face: per token Linear(D, D) -> GELU -> Linear(D, C) -> LayerNorm(C)
    (``proj.0``, ``proj.2``, ``proj.3``; index 1 is the GELU)."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, *, rngs: nnx.Rngs):
        self.proj = nnx.List([layers.linear(embed_dim, embed_dim, rngs=rngs), layers.Identity(),
                              layers.linear(embed_dim, cross_attention_dim, rngs=rngs),
                              layers.layer_norm(cross_attention_dim, rngs=rngs)])

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        x = layers.gelu(self.proj[0](hidden_states))
        return self.proj[3](self.proj[2](x))

    @property
    def input_dim(self) -> int:
        return self.proj[0].in_features

    @property
    def token_dim(self) -> int:
        return self.proj[2].out_features

    @property
    def num_tokens(self) -> None:
        """None: one token per CLIP token (257 at 224 px)."""
        return None


class PerceiverAttention(nnx.Module):
    """Latents attend to [features; latents]. Bias-free ``to_q``/``to_kv``/``to_out``;
    q and k each scaled by dim_head**-0.25 (one dim_head**-0.5 on the logits)."""

    def __init__(self, dim: int, dim_head: int, heads: int, *, rngs: nnx.Rngs):
        inner = dim_head * heads
        self.heads, self.dim_head = heads, dim_head
        self.norm1 = layers.layer_norm(dim, rngs=rngs)
        self.norm2 = layers.layer_norm(dim, rngs=rngs)
        self.to_q = layers.linear(dim, inner, bias=False, rngs=rngs)
        self.to_kv = layers.linear(dim, inner * 2, bias=False, rngs=rngs)
        self.to_out = layers.linear(inner, dim, bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, self.dim_head)
        q = split(self.to_q(latents))
        k, v = jnp.split(self.to_kv(jnp.concatenate([x, latents], axis=1)), 2, axis=-1)
        out = dot_product_attention(q, split(k), split(v), scale=self.dim_head ** -0.5, backend="xla")
        return self.to_out(out.reshape(b, n, -1))


def feed_forward(dim: int, mult: int = 4, *, rngs: nnx.Rngs) -> nnx.List:
    """LayerNorm -> Linear(d, mult*d) -> GELU -> Linear(mult*d, d), bias-free, as a
    list so the keys read ``0``, ``1``, ``3`` (index 2 is the GELU)."""
    return nnx.List([layers.layer_norm(dim, rngs=rngs), layers.linear(dim, dim * mult, bias=False, rngs=rngs),
                     layers.Identity(), layers.linear(dim * mult, dim, bias=False, rngs=rngs)])


def perceiver_layers(dim: int, depth: int, dim_head: int, heads: int, ff_mult: int, *, rngs: nnx.Rngs) -> nnx.List:
    """``layers[i] = [PerceiverAttention, feed-forward]``: keys ``layers.i.0.to_q``, ``layers.i.1.1``."""
    return nnx.List([nnx.List([PerceiverAttention(dim, dim_head, heads, rngs=rngs),
                               feed_forward(dim, ff_mult, rngs=rngs)]) for _ in range(depth)])


def _perceiver(proj_in, layers_, proj_out, norm_out, x, latents):
    x = proj_in(x)
    for attn, ff in layers_:
        latents = attn(x, latents) + latents
        latents = ff[3](layers.gelu(ff[1](ff[0](latents)))) + latents
    return norm_out(proj_out(latents))


class Resampler(nnx.Module):
    """IP-Adapter Plus: ``num_queries`` learned latents read the CLIP patch
    features through ``depth`` perceiver layers."""

    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4, rngs: nnx.Rngs):
        self.latents = nnx.Param(jax.random.normal(rngs.params(), (1, num_queries, dim)) / dim ** 0.5)
        self.proj_in = layers.linear(embedding_dim, dim, rngs=rngs)
        self.proj_out = layers.linear(dim, output_dim, rngs=rngs)
        self.norm_out = layers.layer_norm(output_dim, rngs=rngs)
        self.layers = perceiver_layers(dim, depth, dim_head, heads, ff_mult, rngs=rngs)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        latents = jnp.broadcast_to(self.latents[...], (hidden_states.shape[0], *self.latents.shape[1:]))
        return _perceiver(self.proj_in, self.layers, self.proj_out, self.norm_out, hidden_states, latents)

    @property
    def input_dim(self) -> int:
        return self.proj_in.in_features

    @property
    def token_dim(self) -> int:
        return self.proj_out.out_features

    @property
    def num_tokens(self) -> int:
        return self.latents.shape[1]


class _IDTokens:
    """What the FaceID projections share: the ID MLP ``proj`` -> [T, C] tokens."""

    @property
    def input_dim(self) -> int:
        """The ID embedding's width (512 for InsightFace)."""
        return self.proj[0].in_features

    @property
    def token_dim(self) -> int:
        return self.cross_attention_dim

    def id_tokens(self, id_embeds: jax.Array) -> jax.Array:
        """Linear(id, mult*id) -> GELU -> Linear(mult*id, T*C) -> reshape [T, C] -> LayerNorm."""
        x = self.proj[2](layers.gelu(self.proj[0](id_embeds)))
        return self.norm(x.reshape(-1, self.num_tokens, self.cross_attention_dim))


class FaceIDProjModel(_IDTokens, nnx.Module):
    """FaceID: ID embedding -> Linear(id, 2*id) -> GELU -> Linear(2*id, T*C) ->
    reshape [T, C] -> LayerNorm (``proj.0``, ``proj.2``, ``norm``)."""

    def __init__(self, id_embed_dim: int, cross_attention_dim: int, num_tokens: int, mult: int = 2, *,
                 rngs: nnx.Rngs):
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.proj = nnx.List([layers.linear(id_embed_dim, id_embed_dim * mult, rngs=rngs), layers.Identity(),
                              layers.linear(id_embed_dim * mult, cross_attention_dim * num_tokens, rngs=rngs)])
        self.norm = layers.layer_norm(cross_attention_dim, rngs=rngs)

    def __call__(self, id_embeds: jax.Array) -> jax.Array:
        return self.id_tokens(id_embeds)


class FacePerceiverResampler(nnx.Module):
    """The perceiver of FaceID-Plus: ID tokens (as latents) read CLIP features."""

    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int,
                 ff_mult: int = 4, rngs: nnx.Rngs):
        self.proj_in = layers.linear(embedding_dim, dim, rngs=rngs)
        self.proj_out = layers.linear(dim, output_dim, rngs=rngs)
        self.norm_out = layers.layer_norm(output_dim, rngs=rngs)
        self.layers = perceiver_layers(dim, depth, dim_head, heads, ff_mult, rngs=rngs)

    def __call__(self, latents: jax.Array, x: jax.Array) -> jax.Array:
        return _perceiver(self.proj_in, self.layers, self.proj_out, self.norm_out, x, latents)


class FaceIDPlusModel(_IDTokens, nnx.Module):
    """FaceID-Plus / PlusV2 (official ``ProjPlusModel``): ID tokens refined by a
    perceiver over CLIP ``hidden_states[-2]`` of the face crop. PlusV2 adds the
    ID tokens back: ``out = id_tokens + s_scale * out`` (``shortcut=True``)."""

    def __init__(self, *, id_embed_dim: int, cross_attention_dim: int, clip_embed_dim: int, num_tokens: int,
                 depth: int = 4, dim_head: int = 64, heads: int | None = None, mult: int = 2,
                 rngs: nnx.Rngs):
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        c = cross_attention_dim
        self.proj = nnx.List([layers.linear(id_embed_dim, id_embed_dim * mult, rngs=rngs), layers.Identity(),
                              layers.linear(id_embed_dim * mult, c * num_tokens, rngs=rngs)])
        self.norm = layers.layer_norm(c, rngs=rngs)
        self.perceiver_resampler = FacePerceiverResampler(dim=c, depth=depth, dim_head=dim_head,
                                                          heads=heads or c // dim_head,
                                                          embedding_dim=clip_embed_dim, output_dim=c, rngs=rngs)

    def __call__(self, id_embeds: jax.Array, clip_hidden_states: jax.Array, *, shortcut: bool = False,
                 s_scale: float | jax.Array = 1.0) -> jax.Array:
        x = self.id_tokens(id_embeds)
        out = self.perceiver_resampler(x, clip_hidden_states)
        return x + s_scale * out if shortcut else out
