"""IP-Adapters attached to a UNet, and the controls over them.

An ``IPAdapter`` holds what an official adapter file holds: the image
projection (``image_proj``), one bias-free ``to_k_ip``/``to_v_ip`` pair per
UNet cross-attention layer (``layers[n]``, official key ``ip_adapter.{2n+1}``)
and, for FaceID files, LoRA on every attention layer (``lora[p]``, official
``ip_adapter.{p}``). It is attached to the UNet (``attach``), so one ``nnx``
split of the UNet carries it and path rules can pick it out for training.

Each UNet call then takes one ``ImagePrompt`` per attached adapter: the image
tokens, a per-layer scale array, optional masks, all arrays, so changing any
of them never recompiles. The controls below only build those arrays:

* ``layer_scales``: a float, diffusers' per-block dict (InstantStyle), or a
  ComfyUI weight type -> one scale per cross-attention layer;
* ``combine_embeds``: several reference images -> concat / add / subtract /
  average / norm average (ComfyUI semantics);
* ``mask_pyramid``: one mask per reference image -> the mask at every attention
  resolution (diffusers' ``ip_adapter_masks``);
* ``schedule_gates``: start/end fractions of the denoising schedule -> a 0/1
  multiplier per step.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ipadapter_jax.models import layers
from ipadapter_jax.models.image_proj import (FaceIDPlusModel, FaceIDProjModel, ImageProjModel, MLPProjModel,
                                             Resampler)

# variant -> (what ``project`` takes, official files it covers)
VARIANTS = {
    "base": ("image_embeds", "ip-adapter_sd15, ip-adapter_sd15_light, ip-adapter_sd15_vit-G"),
    "full-face": ("hidden_states", "ip-adapter-full-face_sd15"),
    "plus": ("hidden_states", "ip-adapter-plus_sd15, ip-adapter-plus-face_sd15"),
    "faceid": ("face_id", "ip-adapter-faceid_sd15, ip-adapter-faceid-portrait_sd15"),
    "faceid-plus": ("face_id+hidden_states", "ip-adapter-faceid-plus_sd15, ip-adapter-faceid-plusv2_sd15"),
}


# --------------------------------------------------------------------------- modules

@struct.dataclass
class ImagePrompt:
    """One adapter's conditioning for one UNet call.

    tokens: [B, N, T, C] projected tokens of N reference images (B includes the
      unconditional half under classifier-free guidance).
    scale: [L] scale per cross-attention layer (processor order); 0 disables.
    masks: optional ``{num_queries: [B or 1, N, num_queries]}`` from
      ``mask_pyramid``; with masks each image is attended separately.
    lora_scale: strength of the adapter's LoRA (FaceID files), scalar.
    """

    tokens: jax.Array
    scale: jax.Array
    masks: dict | None = None
    lora_scale: jax.Array | float = 1.0


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
    official file with ``ipadapter_jax.convert.ip_adapter.load_ip_adapter``.
    """

    def __init__(self, image_proj: nnx.Module, *, variant: str, hidden_sizes: Sequence[int], token_dim: int,
                 lora_dims: Sequence[tuple[int, int]] | None = None, lora_rank: int = 128,
                 shortcut: bool = False, rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"unknown IP-Adapter variant {variant!r}; expected one of {sorted(VARIANTS)}")
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
    def input_kind(self) -> str:
        return VARIANTS[self.variant][0]

    def project(self, embeds: jax.Array, clip_hidden_states: jax.Array | None = None, *,
                s_scale: float | jax.Array = 1.0) -> jax.Array:
        """Embeddings of one image per row -> [B, T, C] image tokens.

        ``embeds`` is what the variant takes (``input_kind``): CLIP ``image_embeds``
        [B, D] (base), CLIP ``hidden_states[-2]`` [B, 257, D] (plus, full-face) or an
        InsightFace ID embedding [B, 512] (faceid, faceid-plus, which also need the
        face crop's ``clip_hidden_states``; ``s_scale`` weighs PlusV2's shortcut).
        """
        embeds = jnp.asarray(embeds)
        kind = self.input_kind
        want_rank = 3 if kind == "hidden_states" else 2
        if embeds.ndim != want_rank:
            what = {2: "CLIP image_embeds / ID embeddings [B, D]", 3: "CLIP hidden_states[-2] [B, tokens, D]"}
            raise ValueError(f"this is a {self.variant!r} IP-Adapter: it takes {what[want_rank]}, got an array "
                             f"of shape {tuple(embeds.shape)} (see ipadapter_jax.image_encoding.encode_image)")
        expected = self.embed_dim
        if embeds.shape[-1] != expected:
            raise ValueError(f"{self.variant!r} IP-Adapter expects embeddings of width {expected}, got "
                             f"{embeds.shape[-1]}: was it encoded by the image encoder this adapter was "
                             "trained with?")
        if kind == "face_id+hidden_states":
            if clip_hidden_states is None or jnp.ndim(clip_hidden_states) != 3:
                raise ValueError("a 'faceid-plus' IP-Adapter needs clip_hidden_states [B, 257, D] of the face "
                                 "crop as well as the ID embedding")
            return self.image_proj(embeds, jnp.asarray(clip_hidden_states), shortcut=self.shortcut,
                                   s_scale=s_scale)
        return self.image_proj(embeds)

    @property
    def embed_dim(self) -> int:
        proj = self.image_proj
        if isinstance(proj, ImageProjModel):
            return proj.proj.in_features
        if isinstance(proj, MLPProjModel):
            return proj.proj[0].in_features
        if isinstance(proj, Resampler):
            return proj.proj_in.in_features
        return proj.proj[0].in_features  # FaceID models: the ID embedding width

    @property
    def num_tokens(self) -> int:
        """Tokens per reference image."""
        proj = self.image_proj
        if isinstance(proj, (ImageProjModel, FaceIDProjModel, FaceIDPlusModel)):
            return proj.num_tokens
        if isinstance(proj, Resampler):
            return proj.latents.shape[1]
        return -1  # full-face: one token per CLIP token (257 at 224 px)

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
    if len(adapter.layers) != len(cross):
        raise ValueError(f"the IP-Adapter has {len(adapter.layers)} cross-attention layers, the UNet "
                         f"{len(cross)}: it was made for another base model (SD1.5: 16, SDXL: 70)")
    for layer, info in zip(adapter.layers, cross):
        if (layer.to_k_ip.in_features, layer.to_k_ip.out_features) != (info.token_dim, info.hidden_size):
            raise ValueError(f"IP-Adapter layer {info.index} ({info.name}) maps {layer.to_k_ip.in_features} -> "
                             f"{layer.to_k_ip.out_features}, the UNet needs {info.token_dim} -> {info.hidden_size}")
    if adapter.lora is not None and len(adapter.lora) != len(unet.attention_processors()):
        raise ValueError(f"the IP-Adapter carries LoRA for {len(adapter.lora)} attention layers, the UNet has "
                         f"{len(unet.attention_processors())}")
    unet.ip_adapters.append(adapter)
    return len(unet.ip_adapters) - 1


def detach_all(unet) -> None:
    """Remove every attached adapter (the UNet computes its plain output again)."""
    unet.ip_adapters = nnx.List([])


def image_prompt(adapter_or_unet, tokens: jax.Array, scale: Any = 1.0, *, masks: dict | None = None,
                 lora_scale: float = 1.0, unet=None) -> ImagePrompt:
    """Assemble an ``ImagePrompt``.

    tokens: [B, T, C] (one image per row) or [B, N, T, C] (N images).
    scale: a float, a per-layer array, or anything ``layer_scales`` accepts
      (needs ``unet=`` then for the layer layout).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim == 3:
        tokens = tokens[:, None]
    if tokens.ndim != 4:
        raise ValueError(f"image tokens must be [B, T, C] or [B, N, T, C], got shape {tuple(tokens.shape)}")
    try:
        finite = bool(np.isfinite(np.asarray(tokens)).all())
    except jax.errors.TracerArrayConversionError:  # inside jit: values unknown, checked by the caller
        finite = True
    if not finite:
        raise ValueError("image tokens contain NaN or inf; refusing to condition on them")
    if masks is not None:
        for q, m in masks.items():
            if m.shape[1] != tokens.shape[1]:
                raise ValueError(f"{m.shape[1]} masks for {tokens.shape[1]} reference images: give one mask "
                                 "per image")
    if unet is not None:
        scale = layer_scales(unet, scale)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim == 0:
        raise ValueError("scale must be per layer here: pass unet= to expand a float or dict")
    return ImagePrompt(tokens=tokens, scale=scale, masks=masks, lora_scale=jnp.float32(lora_scale))


def split_concatenated(encoder_hidden_states: jax.Array, num_image_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The official code's layout, image tokens appended after the text tokens
    ([B, 77 + T, C]) -> (text [B, 77, C], image tokens [B, 1, T, C])."""
    ehs = jnp.asarray(encoder_hidden_states)
    if not 0 < num_image_tokens < ehs.shape[1]:
        raise ValueError(f"cannot split {num_image_tokens} image tokens off a sequence of {ehs.shape[1]}")
    return ehs[:, :-num_image_tokens], ehs[:, -num_image_tokens:][:, None]


# --------------------------------------------------------------------------- per-layer scales

WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak middle",
                "weak output", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "strong style and composition")


def comfy_order(unet) -> list[int]:
    """ComfyUI's transformer index (input -> middle -> output) of each
    cross-attention layer, listed in processor order (down -> up -> mid)."""
    cross = unet.cross_attention_layers()
    ordered = ([c for c in cross if c.group == "down"] + [c for c in cross if c.group == "mid"]
               + [c for c in cross if c.group == "up"])
    position = {c.index: i for i, c in enumerate(ordered)}
    return [position[c.index] for c in cross]


def _comfy_weights(weight_type: str, weight: float, composition: float, n: int,
                   block_types: list[str]) -> np.ndarray:
    """ComfyUI_IPAdapter_plus weight types over its transformer index t (0..n-1)."""
    t = np.arange(n, dtype=np.float64)
    w = np.full(n, float(weight))
    half = n / 2
    if weight_type == "linear":
        return w
    if weight_type == "ease in":
        return w * (0.05 + 0.95 * (1 - t / n))
    if weight_type == "ease out":
        return w * (0.05 + 0.95 * (t / n))
    if weight_type == "ease in-out":
        return w * (0.05 + 0.95 * (1 - np.abs(t - half) / half))
    if weight_type == "reverse in-out":
        return w * (0.05 + 0.95 * (np.abs(t - half) / half))
    weak = {"weak input": ("input",), "weak middle": ("middle",), "weak output": ("output",),
            "strong middle": ("input", "output")}
    if weight_type in weak:
        return np.where(np.isin(block_types, weak[weight_type]), w * 0.2, w)
    if n != 16:
        raise NotImplementedError(f"weight type {weight_type!r} is defined for SD1.5's 16 layers; this UNet has {n}")
    style = [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    strong_style = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    table = {
        "style transfer": {i: weight for i in style},
        "composition": {4: weight * 0.25, 5: weight},
        "strong style transfer": {i: weight for i in strong_style},
        "style and composition": {**{i: weight for i in style}, 4: composition * 0.25, 5: composition},
        "strong style and composition": {**{i: weight for i in strong_style}, 4: composition, 5: composition},
    }
    if weight_type not in table:
        raise ValueError(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    return np.array([table[weight_type].get(i, 0.0) for i in range(n)])


def _block_dict_scales(unet, scale: dict) -> np.ndarray:
    """diffusers' per-block form: ``{"down": {"block_2": [0.0, 1.0]}, "up": {...},
    "mid": 0.0}``; unspecified parts get 0; a block's list has one entry per
    attention (Transformer2DModel) in it, a bare number covers all of them."""
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"per-block scale keys must be 'down', 'mid', 'up'; got {sorted(unknown)}")
    cross = unet.cross_attention_layers()
    out = np.zeros(len(cross))
    blocks: dict[tuple[str, int], int] = {}
    for c in cross:
        blocks[(c.group, c.block)] = max(blocks.get((c.group, c.block), 0), c.attention_index + 1)
    for group in ("down", "up"):
        spec = scale.get(group, 0.0)
        valid = sorted(b for g, b in blocks if g == group)
        if not isinstance(spec, dict):
            spec = {f"block_{b}": spec for b in valid}
        for key, value in spec.items():
            try:
                b = int(key.removeprefix("block_"))
            except ValueError:
                b = -1
            if not key.startswith("block_") or (group, b) not in blocks:
                raise ValueError(f"per-block scale {group}.{key}: this UNet's {group} blocks with attention are "
                                 f"{['block_%d' % v for v in valid]}")
            n_attn = blocks[(group, b)]
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n_attn
            if len(values) == 1:
                values = values * n_attn
            if len(values) != n_attn:
                raise ValueError(f"per-block scale {group}.{key} has {len(values)} entries; the block has "
                                 f"{n_attn} attentions")
            for c in cross:
                if c.group == group and c.block == b:
                    out[c.index] = values[c.attention_index]
    mid = scale.get("mid", 0.0)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise ValueError(f"per-block scale 'mid' takes one value, got {len(mid)}")
        mid = mid[0]
    for c in cross:
        if c.group == "mid":
            out[c.index] = mid
    return out


def layer_scales(unet, scale: Any = 1.0, *, weight_type: str | None = None,
                 composition_weight: float = 1.0) -> np.ndarray:
    """One scale per cross-attention layer (processor order), float32.

    scale: a float (every layer), a per-layer sequence, or diffusers'
      per-block dict (InstantStyle: ``{"up": {"block_1": [0, 1, 0]}}`` style-only
      on SD1.5; add ``"down": {"block_2": [0, 1]}`` for layout).
    weight_type: a ComfyUI weight type (``WEIGHT_TYPES``) applied to the float
      ``scale`` over ComfyUI's layer order (input -> middle -> output);
      ``composition_weight`` is the composition weight of the "style and
      composition" types.
    """
    cross = unet.cross_attention_layers()
    n = len(cross)
    if weight_type is not None:
        if not isinstance(scale, (int, float)):
            raise ValueError("weight_type needs a single float scale")
        order = comfy_order(unet)
        kinds = {"down": "input", "mid": "middle", "up": "output"}
        by_t = [None] * n
        for c, t in zip(cross, order):
            by_t[t] = kinds[c.group]
        weights = _comfy_weights(weight_type, scale, composition_weight, n, by_t)
        return np.asarray([weights[t] for t in order], np.float32)
    if isinstance(scale, dict):
        return _block_dict_scales(unet, scale).astype(np.float32)
    arr = np.asarray(scale, np.float32)
    if arr.ndim == 0:
        return np.full(n, float(arr), np.float32)
    if arr.shape != (n,):
        raise ValueError(f"per-layer scales must have {n} entries (one per cross-attention layer), got {arr.shape}")
    return arr


# --------------------------------------------------------------------------- several images

COMBINE_MODES = ("concat", "add", "subtract", "average", "norm average")


def combine_embeds(embeds: jax.Array, mode: str = "concat") -> jax.Array:
    """Combine the embeddings of N reference images (axis 0) the way ComfyUI
    does, before projection. ``concat`` keeps all N (their tokens are
    concatenated later); the others return one: ``add`` sums, ``subtract`` is
    the first minus the mean of the rest, ``average`` the mean, ``norm average``
    the mean after dividing each element by its norm across images."""
    embeds = jnp.asarray(embeds)
    if mode == "concat" or embeds.shape[0] == 1:
        if mode not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {mode!r}; expected one of {COMBINE_MODES}")
        return embeds
    if mode == "add":
        return embeds.sum(0, keepdims=True)
    if mode == "subtract":
        return embeds[:1] - embeds[1:].mean(0, keepdims=True)
    if mode == "average":
        return embeds.mean(0, keepdims=True)
    if mode == "norm average":
        return (embeds / jnp.linalg.norm(embeds, axis=0, keepdims=True)).mean(0, keepdims=True)
    raise ValueError(f"unknown combine mode {mode!r}; expected one of {COMBINE_MODES}")


# --------------------------------------------------------------------------- masks

def _cubic_weights(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of torch's bicubic interpolation (align_corners=False,
    A=-0.75, border-clamped taps), so resizing is two matrix products."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    base = np.floor(src)
    frac = src - base
    m = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        idx = np.clip(base + k, 0, n_in - 1).astype(int)
        np.add.at(m, (np.arange(n_out), idx), _cubic_weights(frac - k))
    return m


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of [..., H, W] masks like ``F.interpolate(mode="bicubic")``."""
    mask = np.asarray(mask, np.float64)
    rows = _bicubic_matrix(mask.shape[-2], height)
    cols = _bicubic_matrix(mask.shape[-1], width)
    return np.einsum("oh,...hw,pw->...op", rows, mask, cols)


def _mask_grid(num_queries: int, mask_h: int, mask_w: int) -> tuple[int, int]:
    # diffusers' IPAdapterMaskProcessor.downsample: the grid follows the mask's
    # aspect ratio, and rounds the height up when it does not divide.
    ratio = mask_w / mask_h
    h = int(math.sqrt(num_queries / ratio))
    h = h + int(num_queries % h != 0)
    return h, num_queries // h


def mask_pyramid(masks: np.ndarray, unet, latent_height: int, latent_width: int) -> dict[int, jax.Array]:
    """Masks of N reference images ([N, H, W] or [B, N, H, W], values in [0, 1],
    already at output resolution) -> ``{num_queries: [B, N, num_queries]}`` for
    every attention resolution of ``unet`` at this latent size.

    Same grid and bicubic resampling as diffusers, padded with 0 / cut when the
    mask's aspect ratio does not match the image (diffusers warns then too).
    """
    masks = np.asarray(masks, np.float64)
    if masks.ndim == 3:
        masks = masks[None]
    if masks.ndim != 4:
        raise ValueError(f"masks must be [N, H, W] or [B, N, H, W], got shape {masks.shape}")
    out = {}
    for q in _query_lengths(unet, latent_height, latent_width):
        h, w = _mask_grid(q, masks.shape[-2], masks.shape[-1])
        flat = resize_mask(masks, h, w).reshape(*masks.shape[:2], h * w)
        if flat.shape[-1] < q:
            flat = np.pad(flat, ((0, 0), (0, 0), (0, q - flat.shape[-1])))
        out[q] = jnp.asarray(flat[..., :q], jnp.float32)
    return out


def _query_lengths(unet, latent_height: int, latent_width: int) -> list[int]:
    """Token counts of the attention layers: the latent grid after each
    downsampling (conv stride 2, padding 1: ceil halving)."""
    h, w = latent_height, latent_width
    sizes = []
    for i, block in enumerate(unet.down_blocks):
        if block.attentions is not None:
            sizes.append(h * w)
        if block.downsamplers is not None:
            h, w = (h + 1) // 2, (w + 1) // 2
    if unet.mid_block is not None:
        sizes.append(h * w)
    return sorted(set(sizes))


# --------------------------------------------------------------------------- schedule

def schedule_gates(num_steps: int, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """1.0 for the denoising steps where an adapter is active, else 0.0.

    Step i (0-based) of ``num_steps`` sits at progress i / num_steps of the
    schedule; it is active when ``start <= progress < end`` (``end=1`` keeps
    the last step). Multiply the adapter's scale by the gate of each step.
    """
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    progress = np.arange(num_steps) / num_steps
    return ((progress >= start) & ((progress < end) | (end >= 1.0))).astype(np.float32)
