"""The IP-Adapter module and how it attaches to a UNet.

An ``IPAdapter`` holds what an official adapter file holds: the image
projection (``image_proj``), one bias-free ``to_k_ip``/``to_v_ip`` pair per
UNet cross-attention layer (``layers[n]``, official key ``ip_adapter.{2n+1}``)
and, for FaceID files, LoRA on every attention layer (``lora[p]``, official
``ip_adapter.{p}``). It is attached to the UNet (``attach``), so one ``nnx``
split of the UNet carries it and path rules can pick it out for training.
Each UNet call then takes one ``ImagePrompt`` per attached adapter
(``image_prompt`` builds it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.io.errors import BadArgument, Incompatible
from ipadapter_jax.ip_adapter import scales, variants
from ipadapter_jax.models import layers
from ipadapter_jax.models.conditioning import ImagePrompt


class IPAdapterLayer(nnx.Module):
    """The image branch of one cross-attention layer: bias-free K/V projections."""

    def __init__(self, token_dim: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.to_k_ip = layers.linear(token_dim, hidden_size, bias=False, rngs=rngs)
        self.to_v_ip = layers.linear(token_dim, hidden_size, bias=False, rngs=rngs)


class LoRALinear(nnx.Module):
    """``up(down(x))``, bias-free (official ``LoRALinearLayer`` with no alpha)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, rngs: nnx.Rngs):
        self.down = layers.linear(in_features, rank, bias=False, rngs=rngs)
        self.up = nnx.Linear(rank, out_features, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x):
        return self.up(self.down(x))


class AttentionLoRA(nnx.Module):
    """LoRA deltas of one attention layer's q/k/v/out projections (FaceID)."""

    def __init__(self, hidden_size: int, kv_dim: int, rank: int, *, rngs: nnx.Rngs):
        self.to_q_lora = LoRALinear(hidden_size, hidden_size, rank, rngs=rngs)
        self.to_k_lora = LoRALinear(kv_dim, hidden_size, rank, rngs=rngs)
        self.to_v_lora = LoRALinear(kv_dim, hidden_size, rank, rngs=rngs)
        self.to_out_lora = LoRALinear(hidden_size, hidden_size, rank, rngs=rngs)


class IPAdapter(nnx.Module):
    """Image projection + per-layer image K/V (+ LoRA) for one UNet.

    Build with ``IPAdapter.for_unet`` (random init, for training) or load an
    official file with ``ipadapter_jax.ip_adapter.load_ip_adapter``.
    """

    def __init__(self, image_proj: nnx.Module, *, variant: str, hidden_sizes: Sequence[int], token_dim: int,
                 lora_dims: Sequence[tuple[int, int]] | None = None, lora_rank: int = 128,
                 shortcut: bool = False, rngs: nnx.Rngs):
        variants.get(variant)  # a clear error for unknown names
        self.variant = variant
        self.shortcut = shortcut
        self.token_dim = token_dim
        self.image_proj = image_proj
        self.layers = nnx.List([IPAdapterLayer(token_dim, h, rngs=rngs) for h in hidden_sizes])
        self.lora = (nnx.List([AttentionLoRA(h, kv, lora_rank, rngs=rngs) for h, kv in lora_dims])
                     if lora_dims else None)

    @classmethod
    def for_unet(cls, unet, image_proj: nnx.Module, *, variant: str, lora_rank: int | None = None,
                 shortcut: bool = False, rngs: nnx.Rngs) -> "IPAdapter":
        """An adapter shaped for ``unet`` (K/V widths of each cross-attention layer;
        LoRA on every attention layer when ``lora_rank`` is given)."""
        cross = unet.cross_attention_layers()
        lora_dims = None
        if lora_rank:
            lora_dims = [(a.heads * a.dim_head, a.to_k.in_features) for _, a in unet.attention_processors()]
        return cls(image_proj, variant=variant, hidden_sizes=[layer.hidden_size for layer in cross],
                   token_dim=cross[0].token_dim, lora_dims=lora_dims, lora_rank=lora_rank or 128,
                   shortcut=shortcut, rngs=rngs)

    @property
    def spec(self) -> variants.Variant:
        """This adapter's entry in the variant registry."""
        return variants.get(self.variant)

    @property
    def input_kind(self) -> str:
        return self.spec.input_kind

    def project(self, embeds: jax.Array, clip_hidden_states: jax.Array | None = None, *,
                s_scale: float | jax.Array = 1.0) -> jax.Array:
        """Embeddings of one image per row -> [B, T, C] image tokens.

        ``embeds`` is what the variant takes (``input_kind``): CLIP ``image_embeds``
        [B, D] (base), CLIP ``hidden_states[-2]`` [B, 257, D] (plus, full-face) or an
        InsightFace ID embedding [B, 512] (faceid, faceid-plus, which also need the
        face crop's ``clip_hidden_states``; ``s_scale`` weighs PlusV2's shortcut).
        """
        embeds = jnp.asarray(embeds)
        spec = self.spec
        if embeds.ndim != spec.embed_rank:
            what = {2: "CLIP image_embeds / ID embeddings [B, D]", 3: "CLIP hidden_states[-2] [B, tokens, D]"}
            raise BadArgument(f"this is a {self.variant!r} IP-Adapter: it takes {what[spec.embed_rank]}, got an "
                              f"array of shape {tuple(embeds.shape)} (see ipadapter_jax.ip_adapter.encode_image)")
        if embeds.shape[-1] != self.embed_dim:
            if spec.needs_face_id:
                raise Incompatible(f"this {self.variant!r} IP-Adapter takes ID embeddings of width {self.embed_dim} "
                                   f"(InsightFace's normed_embedding), got {embeds.shape[-1]}")
            raise Incompatible(variants.encoder_mismatch(self.variant, spec.encoder_output, self.embed_dim,
                                                         embeds.shape[-1]))
        if not spec.takes_face_crop:
            return self.image_proj(embeds)
        if clip_hidden_states is None or jnp.ndim(clip_hidden_states) != 3:
            raise BadArgument(f"a {self.variant!r} IP-Adapter needs clip_hidden_states [B, 257, D] of the face "
                              "crop as well as the ID embedding")
        if jnp.shape(clip_hidden_states)[-1] != self.clip_dim:
            raise Incompatible(variants.encoder_mismatch(self.variant, "hidden_states", self.clip_dim,
                                                         jnp.shape(clip_hidden_states)[-1]))
        return self.image_proj(embeds, jnp.asarray(clip_hidden_states), shortcut=self.shortcut, s_scale=s_scale)

    @property
    def embed_dim(self) -> int:
        """Width of the embeddings ``project`` takes (the ID width for FaceID)."""
        return self.image_proj.input_dim

    @property
    def clip_dim(self) -> int | None:
        """Width of the CLIP features the adapter takes: ``embed_dim``, or for
        FaceID-Plus the face crop's hidden states (None for FaceID: no CLIP input)."""
        if self.spec.takes_face_crop:
            return self.image_proj.perceiver_resampler.proj_in.in_features
        return None if self.spec.needs_face_id else self.embed_dim

    @property
    def num_tokens(self) -> int | None:
        """Tokens per reference image (None for full-face: one per CLIP token)."""
        return self.image_proj.num_tokens

    def init_from_unet(self, unet) -> None:
        """Start ``to_k_ip``/``to_v_ip`` from the UNet's ``to_k``/``to_v`` (the
        paper's initialisation for training)."""
        for layer, info in zip(self.layers, unet.cross_attention_layers()):
            # Copies: sharing buffers with the frozen UNet would break buffer donation.
            layer.to_k_ip.kernel.set_value(jnp.array(info.attention.to_k.kernel[...], copy=True))
            layer.to_v_ip.kernel.set_value(jnp.array(info.attention.to_v.kernel[...], copy=True))


def attach(unet, adapter: IPAdapter) -> int:
    """Attach ``adapter`` to ``unet``; returns its index (its position in the
    UNet's ``image_prompts``). Refuses an adapter shaped for another UNet."""
    cross = unet.cross_attention_layers()
    if len(adapter.layers) != len(cross) or adapter.token_dim != cross[0].token_dim:
        raise Incompatible(variants.base_model_mismatch("the IP-Adapter", len(adapter.layers), adapter.token_dim,
                                                        len(cross), cross[0].token_dim))
    for layer, info in zip(adapter.layers, cross):
        if (layer.to_k_ip.in_features, layer.to_k_ip.out_features) != (info.token_dim, info.hidden_size):
            raise Incompatible(f"IP-Adapter layer {info.index} ({info.name}) maps {layer.to_k_ip.in_features} -> "
                             f"{layer.to_k_ip.out_features}, the UNet needs {info.token_dim} -> {info.hidden_size}")
    if adapter.lora is not None and len(adapter.lora) != len(unet.attention_processors()):
        raise Incompatible(f"the IP-Adapter carries LoRA for {len(adapter.lora)} attention layers, the UNet has "
                         f"{len(unet.attention_processors())}")
    unet.ip_adapters.append(adapter)
    return len(unet.ip_adapters) - 1


def detach_all(unet) -> None:
    """Remove every attached adapter (the UNet computes its plain output again)."""
    unet.ip_adapters = nnx.List([])


def image_prompt(adapter, tokens: jax.Array, scale: Any = 1.0, *, masks: dict | None = None,
                 lora_scale: float = 1.0, unet=None) -> ImagePrompt:
    """Assemble an ``ImagePrompt`` for ``adapter``.

    tokens: [B, T, C] (one image per row) or [B, N, T, C] (N images), of the
      adapter's token width.
    scale: a float, a per-layer array, or anything ``layer_scales`` accepts
      (needs ``unet=`` then for the layer layout).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim == 3:
        tokens = tokens[:, None]
    if tokens.ndim != 4:
        raise BadArgument(f"image tokens must be [B, T, C] or [B, N, T, C], got shape {tuple(tokens.shape)}")
    if tokens.shape[-1] != adapter.token_dim:
        raise Incompatible(f"image tokens of width {tokens.shape[-1]} for an adapter whose layers take "
                         f"{adapter.token_dim}")
    try:
        finite = bool(np.isfinite(np.asarray(tokens)).all())
    except jax.errors.TracerArrayConversionError:  # inside jit: values unknown, checked by the caller
        finite = True
    if not finite:
        raise BadArgument("image tokens contain NaN or inf; refusing to condition on them")
    if masks is not None:
        for q, m in masks.items():
            if m.shape[1] != tokens.shape[1]:
                raise BadArgument(f"{m.shape[1]} masks for {tokens.shape[1]} reference images: give one mask "
                                 "per image")
    if unet is not None:
        scale = scales.layer_scales(unet, scale)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim == 0:
        raise BadArgument("scale must be per layer here: pass unet= to expand a float or dict")
    return ImagePrompt(tokens=tokens, scale=scale, masks=masks, lora_scale=jnp.float32(lora_scale))


def split_concatenated(encoder_hidden_states: jax.Array, num_image_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The official code's layout, image tokens appended after the text tokens
    ([B, 77 + T, C]) -> (text [B, 77, C], image tokens [B, 1, T, C])."""
    ehs = jnp.asarray(encoder_hidden_states)
    if not 0 < num_image_tokens < ehs.shape[1]:
        raise BadArgument(f"cannot split {num_image_tokens} image tokens off a sequence of {ehs.shape[1]}")
    return ehs[:, :-num_image_tokens], ehs[:, -num_image_tokens:][:, None]
