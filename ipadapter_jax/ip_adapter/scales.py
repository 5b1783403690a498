"""Per-layer adapter scales: one scale per cross-attention layer (processor
order), from a float, a per-layer sequence, diffusers' per-block dict
(InstantStyle) or a ComfyUI weight type over ComfyUI's block order.

ComfyUI_IPAdapter_plus weighs by ``transformer_index``: the position of the
layer's transformer (a ``Transformer2DModel``, ComfyUI's ``SpatialTransformer``)
in forward order, input -> middle -> output blocks. Every attention layer of
one transformer shares its weight: SD 1.x/2.x have 16 transformers of one layer
each; SDXL has 11 holding its 70 layers (up to 10 each). The special types
(style transfer, composition, ...) name transformers of a given layout, kept as
data in ``COMFY_LAYOUTS``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ipadapter_jax.families import FAMILIES, ComfyLayout
from ipadapter_jax.io.errors import BadArgument, Unsupported


WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak middle",
                "weak output", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "strong style and composition")
_KINDS = {"down": "input", "mid": "middle", "up": "output"}      # diffusers' block groups, ComfyUI's names


# Keyed by the number of transformers in the (input, middle, output) blocks; the
# layouts are the families' (``ipadapter_jax.families``: ``Family.comfy``).
COMFY_LAYOUTS: dict[tuple[int, int, int], ComfyLayout] = {f.comfy.counts: f.comfy for f in FAMILIES.values()
                                                          if f.comfy is not None}


def _transformers(unet) -> list[tuple[str, int, int]]:
    """(group, block, attention) of each transformer, in ComfyUI's forward order
    (down -> mid -> up; blocks and their attentions in order)."""
    rank = {"down": 0, "mid": 1, "up": 2}
    found = {(c.group, c.block, c.attention_index) for c in unet.cross_attention_layers()}
    return sorted(found, key=lambda k: (rank[k[0]], k[1], k[2]))


def comfy_order(unet) -> list[int]:
    """ComfyUI's ``transformer_index`` of each cross-attention layer, listed in
    processor order (down -> up -> mid): the position of the layer's transformer
    in forward order (input -> middle -> output)."""
    position = {k: i for i, k in enumerate(_transformers(unet))}
    return [position[(c.group, c.block, c.attention_index)] for c in unet.cross_attention_layers()]


def comfy_layout(unet) -> ComfyLayout | None:
    """The ``COMFY_LAYOUTS`` entry of this UNet's transformer layout (None: another layout)."""
    transformers = _transformers(unet)
    return COMFY_LAYOUTS.get(tuple(sum(g == group for g, _, _ in transformers) for group in ("down", "mid", "up")))


def _special_weights(weight_type: str, weight: float, composition: float, layout: ComfyLayout,
                     n: int) -> np.ndarray:
    """The special weight types: a weight on the transformers they name, 0 elsewhere."""
    style = {t: weight for t in layout.style}
    strong = {t: weight for t in layout.strong_style}
    table = {
        "style transfer": style,
        "composition": {t: weight * f for t, f in layout.composition.items()},
        "strong style transfer": strong,
        "style and composition": {**style, **{t: composition * f for t, f in layout.composition.items()}},
        "strong style and composition": {**strong, **{t: composition * f
                                                      for t, f in layout.strong_composition.items()}},
    }
    if weight_type not in table:
        raise BadArgument(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    return np.array([table[weight_type].get(t, 0.0) for t in range(n)])


def _comfy_weights(weight_type: str, weight: float, composition: float, kinds: list[str],
                   layout: ComfyLayout | None) -> np.ndarray:
    """ComfyUI_IPAdapter_plus weight types over its transformer index t (0..n-1);
    ``kinds[t]``: input / middle / output."""
    n = len(kinds)
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
        return np.where(np.isin(kinds, weak[weight_type]), w * 0.2, w)
    if weight_type not in WEIGHT_TYPES:
        raise BadArgument(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    if layout is None:
        known = "; ".join(f"{v.name}: {k[0]} input, {k[1]} middle, {k[2]} output" for k, v in COMFY_LAYOUTS.items())
        counts = [kinds.count(k) for k in ("input", "middle", "output")]
        raise Unsupported(f"weight type {weight_type!r} names transformers of the SD 1.x/2.x and SDXL UNets "
                          f"({known}); this UNet has {counts[0]} input, {counts[1]} middle, {counts[2]} output")
    return _special_weights(weight_type, weight, composition, layout, n)


def _block_dict_scales(unet, scale: dict) -> np.ndarray:
    """diffusers' per-block form: ``{"down": {"block_2": [0.0, 1.0]}, "up": {...},
    "mid": 0.0}``; unspecified parts get 0; a block's list has one entry per
    attention (Transformer2DModel) in it, a bare number covers all of them."""
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise BadArgument(f"per-block scale keys must be 'down', 'mid', 'up'; got {sorted(unknown)}")
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
                raise BadArgument(f"per-block scale {group}.{key}: this UNet's {group} blocks with attention are "
                                 f"{['block_%d' % v for v in valid]}")
            n_attn = blocks[(group, b)]
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n_attn
            if len(values) == 1:
                values = values * n_attn
            if len(values) != n_attn:
                raise BadArgument(f"per-block scale {group}.{key} has {len(values)} entries; the block has "
                                 f"{n_attn} attentions")
            for c in cross:
                if c.group == group and c.block == b:
                    out[c.index] = values[c.attention_index]
    mid = scale.get("mid", 0.0)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise BadArgument(f"per-block scale 'mid' takes one value, got {len(mid)}")
        mid = mid[0]
    for c in cross:
        if c.group == "mid":
            out[c.index] = mid
    return out


def layer_scales(unet, scale: Any = 1.0, *, weight_type: str | None = None,
                 composition_weight: float = 1.0) -> np.ndarray:
    """One scale per cross-attention layer (processor order), float32.

    scale: a float (every layer), a per-layer sequence, or diffusers'
      per-block dict (InstantStyle: ``{"up": {"block_0": [0, 1, 0]}}`` style-only
      on SDXL, ``{"up": {"block_1": [0, 1, 0]}}`` on SD1.5; add ``"down":
      {"block_2": [0, 1]}`` for layout); a block's entry covers every layer of
      that attention (all its transformer blocks), as diffusers'
      ``set_ip_adapter_scale``.
    weight_type: a ComfyUI weight type (``WEIGHT_TYPES``) applied to the float
      ``scale`` over ComfyUI's transformer order (input -> middle -> output;
      every layer of a transformer shares its weight; the special types on the
      SD 1.x/2.x and SDXL layouts, ``COMFY_LAYOUTS``); ``composition_weight``
      is the composition weight of the "style and composition" types.
    """
    cross = unet.cross_attention_layers()
    n = len(cross)
    if weight_type is not None:
        if not isinstance(scale, (int, float)):
            raise BadArgument("weight_type needs a single float scale")
        kinds = [_KINDS[group] for group, _, _ in _transformers(unet)]
        weights = _comfy_weights(weight_type, scale, composition_weight, kinds, comfy_layout(unet))
        return np.asarray([weights[t] for t in comfy_order(unet)], np.float32)
    if isinstance(scale, dict):
        return _block_dict_scales(unet, scale).astype(np.float32)
    arr = np.asarray(scale, np.float32)
    if arr.ndim == 0:
        return np.full(n, float(arr), np.float32)
    if arr.shape != (n,):
        raise BadArgument(f"per-layer scales must have {n} entries (one per cross-attention layer), got {arr.shape}")
    return arr


LAYER_GROUPS = ("all", "down", "mid", "up")


def image_layer_mask(unet, layers: Any = "all") -> np.ndarray:
    """Which cross-attention layers get an image branch: 1.0 / 0.0 per layer (processor order).

    layers: ``"all"``; a group, ``"down"``, ``"mid"`` or ``"up"`` (those blocks only; the paper's
      ablations and InstantStyle use the up blocks); diffusers layer names
      (``up_blocks.1.attentions.0.transformer_blocks.0.attn2``, ``.processor`` optional); or several of
      these, comma-separated or as a list (``"mid,up"``).
    """
    cross = unet.cross_attention_layers()
    names = [n.strip() for n in (layers.split(",") if isinstance(layers, str) else layers)]
    known = {c.name.removesuffix(".processor"): c.index for c in cross}
    unknown = [n for n in names if n not in LAYER_GROUPS and n.removesuffix(".processor") not in known]
    if unknown or not names or not all(names):
        raise BadArgument(f"image layers: {', '.join(map(repr, unknown)) or repr(layers)} is not one of "
                          f"{list(LAYER_GROUPS)} or of this UNet's cross-attention layers "
                          f"({', '.join(sorted(known))})")
    mask = np.zeros(len(cross), np.float32)
    for n in names:
        if n in LAYER_GROUPS:
            in_group = [c.index for c in cross if n == "all" or c.group == n]
            if not in_group:
                raise BadArgument(f"image layers {n!r}: this UNet has no cross-attention layer in its {n} blocks")
            mask[in_group] = 1.0
        else:
            mask[known[n.removesuffix(".processor")]] = 1.0
    return mask
