"""Per-layer adapter scales: one scale per cross-attention layer (processor
order), from a float, a per-layer sequence, diffusers' per-block dict
(InstantStyle) or a ComfyUI weight type over ComfyUI's layer order."""

from __future__ import annotations

from typing import Any

import numpy as np

from ipadapter_jax.io.errors import BadArgument, Unsupported


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
        raise Unsupported(f"weight type {weight_type!r} is defined for SD1.5's 16 layers; this UNet has {n}")
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
        raise BadArgument(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    return np.array([table[weight_type].get(i, 0.0) for i in range(n)])


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
            raise BadArgument("weight_type needs a single float scale")
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
        raise BadArgument(f"per-layer scales must have {n} entries (one per cross-attention layer), got {arr.shape}")
    return arr
