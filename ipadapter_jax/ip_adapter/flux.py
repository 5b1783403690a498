"""IP-Adapters for FLUX transformers: modules, files, image tokens.

XLabs' ``flux-ip-adapter`` (v1: 4 tokens, v2: 16), the layout diffusers'
``FluxIPAdapterMixin`` loads: CLIP ViT-L/14 ``image_embeds`` -> ``image_proj``
(Linear D -> N x C, LayerNorm; C = the transformer's ``joint_attention_dim``)
-> per double-stream block ``to_k_ip`` / ``to_v_ip`` (C -> inner, with bias).
In a block the image stream's queries, after their QK norm and before RoPE,
attend the image tokens; the output, times the scale, is added to the image
stream after the block's feed-forward.

Files (``read_flux_ip_adapter``): XLabs' safetensors keys
``ip_adapter_proj_model.{proj,norm}.*`` and
``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``, or the
same weights in diffusers' converted naming (``image_proj.*``,
``ip_adapter.{i}.to_{k,v}_ip.*``, flat or a torch pickle of the two dicts).
``save_flux_ip_adapter`` writes XLabs' layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.io.errors import BadArgument, Incompatible
from ipadapter_jax.io.files import CheckpointError, read_state_dict, save_safetensors
from ipadapter_jax.io.params import load_state_dict_into, module_state_dict
from ipadapter_jax.ip_adapter.image_proj import ImageProjModel
from ipadapter_jax.models import hoisting, layers
from ipadapter_jax.models.attention import dot_product_attention
from ipadapter_jax.models.conditioning import ImagePrompt

XLABS = "xlabs"
INSTANTX = "instantx"
# InstantX's image keys: RMS-normed per head, no affine weight (its processor's norm_added_k; its
# norm_added_v is commented out there, and the values stay as projected).
INSTANTX_NORM_EPS = 1e-5

_XLABS_PROJ = "ip_adapter_proj_model."
_XLABS_KV = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")
_DIFFUSERS_KV = re.compile(r"^ip_adapter\.(\d+)\.to_([kv])_ip\.(weight|bias)$")


class MLPProjModel(nnx.Module):
    """InstantX's projection: ``proj.0`` Linear(D, 2D) -> GELU -> ``proj.2`` Linear(2D, T x C),
    then ``norm`` LayerNorm(C) per token (``proj.1`` is the GELU)."""

    def __init__(self, embed_dim: int, hidden: int, token_dim: int, num_tokens: int, *, rngs: nnx.Rngs):
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.proj = nnx.List([layers.linear(embed_dim, hidden, rngs=rngs), layers.Identity(),
                              layers.linear(hidden, num_tokens * token_dim, rngs=rngs)])
        self.norm = layers.layer_norm(token_dim, rngs=rngs)

    def __call__(self, embeds: jax.Array) -> jax.Array:
        x = self.proj[2](layers.gelu(self.proj[0](embeds)))
        return self.norm(x.reshape(-1, self.num_tokens, self.token_dim))

    @property
    def input_dim(self) -> int:
        return self.proj[0].in_features


class FluxIPLayer(nnx.Module):
    """One block's image keys and values: ``to_k_ip`` / ``to_v_ip`` (token width -> inner)."""

    def __init__(self, token_dim: int, inner: int, *, bias: bool = True, rngs: nnx.Rngs):
        self.to_k_ip = layers.linear(token_dim, inner, bias=bias, rngs=rngs)
        self.to_v_ip = layers.linear(token_dim, inner, bias=bias, rngs=rngs)


class FluxIPAdapter(nnx.Module):
    """An image-prompt adapter of a FLUX transformer: ``image_proj`` (embeddings
    -> tokens) and one ``FluxIPLayer`` per adapted block (XLabs: the double-stream
    blocks, in order). Parameters are float32 whatever the transformer computes in."""

    def __init__(self, image_proj: nnx.Module, ip_layers: list, *, heads: int, head_dim: int,
                 layout: str = XLABS, num_double: int | None = None):
        self.image_proj = image_proj
        self.layers = nnx.List(ip_layers)
        self.heads, self.head_dim, self.layout = heads, head_dim, layout
        # XLabs: the double-stream blocks only, its output after each block's feed-forward. InstantX: every
        # block (double-stream first), into the attention output, with RMS-normed image keys.
        self.num_double = len(ip_layers) if num_double is None else num_double
        self.site = "attention" if layout == INSTANTX else "output"

    # ---- what the transformer asks
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_tokens(self) -> int:
        return self.image_proj.num_tokens

    @property
    def input_dim(self) -> int:
        return self.image_proj.input_dim

    def layer_index(self, kind: str, index: int) -> int:
        return index if kind == "double" else self.num_double + index

    def has_layer(self, kind: str, index: int) -> bool:
        if kind == "double":
            return index < self.num_double
        return self.layout == INSTANTX and self.num_double + index < len(self.layers)

    def project(self, embeds) -> jax.Array:
        """Image embeddings [N, D] -> tokens [N, T, C]."""
        return self.image_proj(jnp.asarray(embeds, jnp.float32))

    def attend(self, kind: str, index: int, q: jax.Array, prompt: ImagePrompt) -> jax.Array:
        """scale x Attn(q, image keys, image values) for block ``index``: q [B, S, H, D]
        -> [B, S, H x D]. Several images are one token sequence; with masks
        ({S: [B, N, S]}) each image is attended alone and weighted by its mask."""
        index = self.layer_index(kind, index)
        layer = self.layers[index]
        b, n, t, c = prompt.tokens.shape
        scale = prompt.scale[index].astype(q.dtype)
        normed = self.layout == INSTANTX

        def project(tokens, i=None):   # the same at every denoising step: computed once per loop
            tokens = tokens.astype(q.dtype)
            tokens = tokens.reshape(b, n * t, c) if i is None else tokens[:, i]
            split = (lambda x: x.reshape(b, -1, self.heads, self.head_dim))
            k, v = split(layer.to_k_ip(tokens)), split(layer.to_v_ip(tokens))
            return (_rms(k), v) if normed else (k, v)

        def attention(k, v):
            out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=self.head_dim ** -0.5)
            return out.reshape(*out.shape[:2], -1)

        if prompt.masks is None:
            return scale * attention(*hoisting.constant(layer, "kv", project, prompt.tokens))
        masks = prompt.masks[q.shape[1]].astype(q.dtype)        # [B, N, S]
        out = 0
        for i in range(n):
            kv = hoisting.constant(layer, f"kv{i}", lambda tokens, i=i: project(tokens, i), prompt.tokens)
            out = out + attention(*kv) * masks[:, i, :, None]
        return scale * out


def is_instantx(keys) -> bool:
    """InstantX's file: an MLP projection with a ``norm`` and image keys from block 0 on (h94's FaceID
    projections have the same projection keys, but their image keys sit at odd processor indices)."""
    keys = set(keys)
    return {"image_proj.proj.0.weight", "image_proj.norm.weight", "ip_adapter.0.to_k_ip.weight"} <= keys


def _rms(x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + INSTANTX_NORM_EPS)).astype(x.dtype)


# --------------------------------------------------------------------------- building

def new_flux_ip_adapter(transformer, image_embed_dim: int, num_tokens: int = 4, *,
                        rngs: nnx.Rngs | None = None, layout: str = XLABS) -> FluxIPAdapter:
    """A freshly initialised adapter for ``transformer`` (training): XLabs' layout
    (CLIP ``image_embeds``, the double-stream blocks, biased k/v) or InstantX's
    (SigLIP ``pooler_output``, an MLP projection of width 2 x the embedding, every
    block, bias-free k/v)."""
    cfg = transformer.config
    rngs = rngs or nnx.Rngs(0)
    if layout not in (XLABS, INSTANTX):
        raise BadArgument(f"FLUX adapter layout must be {XLABS!r} or {INSTANTX!r}, got {layout!r}")
    if layout == INSTANTX:
        proj = MLPProjModel(image_embed_dim, 2 * image_embed_dim, cfg.joint_attention_dim, num_tokens, rngs=rngs)
        count, bias = cfg.num_layers + cfg.num_single_layers, False
    else:
        proj = ImageProjModel(image_embed_dim, cfg.joint_attention_dim, num_tokens, rngs=rngs)
        count, bias = cfg.num_layers, True
    ip_layers = [FluxIPLayer(cfg.joint_attention_dim, cfg.inner_dim, bias=bias, rngs=rngs) for _ in range(count)]
    return FluxIPAdapter(proj, ip_layers, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                         layout=layout, num_double=cfg.num_layers)


def _canonical(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """XLabs or diffusers key names -> ``image_proj.*`` / ``layers.{i}.to_{k,v}_ip.*``."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(_XLABS_PROJ):
            out["image_proj." + key[len(_XLABS_PROJ):]] = value
        elif key.startswith("image_proj."):
            out[key] = value
        elif m := (_XLABS_KV.match(key) or _DIFFUSERS_KV.match(key)):
            out[f"layers.{m.group(1)}.to_{m.group(2)}_ip.{m.group(3)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys for a FLUX IP-Adapter (XLabs layout): "
                              f"{', '.join(sorted(unknown)[:6])}{' ...' if len(unknown) > 6 else ''}")
    return out


def describe_file(state: dict[str, np.ndarray]) -> str | None:
    """What kind of IP-Adapter file a state dict is, by its keys: ``"flux"`` (XLabs
    or its diffusers naming, with biases; InstantX's, its projection an MLP with a
    ``norm``), ``"sd"`` (h94 layout) or None."""
    keys = list(state)
    if any(k.startswith(_XLABS_PROJ) or _XLABS_KV.match(k) for k in keys):
        return "flux"
    if is_instantx(state):
        return "flux"
    if any(_DIFFUSERS_KV.match(k) and k.endswith(".bias") for k in keys):
        return "flux"
    if any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys):
        return "sd"
    return None


def read_flux_ip_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A FLUX adapter file -> canonical flat arrays; an SD (h94) file is refused naming the family."""
    state = read_state_dict(Path(path))
    kind = describe_file(state)
    if kind == "sd":
        raise Incompatible(f"{path} is a Stable Diffusion IP-Adapter (h94 layout: image_proj / ip_adapter keys "
                           "without biases); this is a FLUX model: use a FLUX IP-Adapter (XLabs flux-ip-adapter)")
    if kind is None:
        raise CheckpointError(f"{path}: not an IP-Adapter file (no ip_adapter_proj_model.* / double_blocks.* "
                              "or image_proj.* / ip_adapter.* keys)")
    return _canonical(state, str(path))


def flux_ip_adapter_from_state(state: dict[str, np.ndarray], transformer, source: str) -> FluxIPAdapter:
    """Build an adapter from canonical arrays (XLabs' or InstantX's layout, told
    apart by the projection), checking them against ``transformer``."""
    cfg = transformer.config
    instantx = "image_proj.proj.0.weight" in state and "layers.0.to_k_ip.weight" in state
    try:
        if instantx:
            hidden, embed_dim = state["image_proj.proj.0.weight"].shape
            rows = state["image_proj.proj.2.weight"].shape[0]
        else:
            rows, embed_dim = state["image_proj.proj.weight"].shape
        token_dim = state["image_proj.norm.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{source}: missing {e.args[0]} (FLUX IP-Adapter projection)") from None
    if token_dim != cfg.joint_attention_dim or rows % token_dim:
        raise Incompatible(f"{source}: image tokens {token_dim} wide (projection to {rows}), but this FLUX "
                           f"transformer's joint_attention_dim is {cfg.joint_attention_dim}: the adapter is for "
                           "another model")
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    wanted = cfg.num_layers + cfg.num_single_layers if instantx else cfg.num_layers
    if indices != list(range(wanted)):
        what = "blocks" if instantx else "double-stream blocks"
        raise Incompatible(f"{source}: image key/value layers {indices[:1]}..{indices[-1:]} ({len(indices)}), but "
                           f"this transformer has {wanted} {what}")
    bias = any(k.endswith("to_k_ip.bias") for k in state)
    num_tokens = rows // token_dim

    def build(rngs):
        if instantx:
            proj = MLPProjModel(embed_dim, hidden, token_dim, num_tokens, rngs=rngs)
        else:
            proj = ImageProjModel(embed_dim, token_dim, num_tokens, rngs=rngs)
        ip_layers = [FluxIPLayer(token_dim, cfg.inner_dim, bias=bias, rngs=rngs) for _ in range(wanted)]
        return FluxIPAdapter(proj, ip_layers, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                             layout=INSTANTX if instantx else XLABS, num_double=cfg.num_layers)

    adapter, _ = load_state_dict_into(lambda: build(nnx.Rngs(0)), state, source=source)
    return adapter


def load_flux_ip_adapter(path: str | os.PathLike, transformer) -> FluxIPAdapter:
    """Read an XLabs FLUX IP-Adapter file for ``transformer``."""
    return flux_ip_adapter_from_state(read_flux_ip_adapter(path), transformer, str(path))


def flux_ip_adapter_state_dict(adapter: FluxIPAdapter) -> dict[str, np.ndarray]:
    """The adapter's weights under its layout's key names: XLabs', or InstantX's
    (``image_proj.*``, ``ip_adapter.{i}.to_{k,v}_ip.weight``, its pickle's two dicts flattened)."""
    if adapter.layout == INSTANTX:
        return {(k if k.startswith("image_proj.") else "ip_adapter." + k[len("layers."):]): v
                for k, v in module_state_dict(adapter).items()}
    out = {}
    for key, value in module_state_dict(adapter).items():
        if key.startswith("image_proj."):
            out[_XLABS_PROJ + key[len("image_proj."):]] = value
        else:
            _, i, name, leaf = key.split(".")
            out[f"double_blocks.{i}.processor.ip_adapter_double_stream_{name[3]}_proj.{leaf}"] = value
    return out


def save_flux_ip_adapter(adapter: FluxIPAdapter, path: str | os.PathLike) -> Path:
    """Write ``adapter`` as a safetensors file in its layout (XLabs': diffusers' ``load_ip_adapter`` reads it)."""
    return save_safetensors(flux_ip_adapter_state_dict(adapter), path)


# --------------------------------------------------------------------------- calls

def flux_image_prompt(adapter: FluxIPAdapter, tokens, scale: Any = 1.0, *, masks: dict | None = None
                      ) -> ImagePrompt:
    """An ``ImagePrompt`` for ``adapter``: tokens [B, N, T, C]; ``scale`` a float
    or one value per adapted block (diffusers' ``set_ip_adapter_scale`` list)."""
    values = np.asarray(scale, np.float32)
    if values.ndim == 0:
        values = np.full((adapter.num_layers,), values, np.float32)
    if values.shape != (adapter.num_layers,):
        raise BadArgument(f"IP-Adapter scale: {values.size} values for {adapter.num_layers} adapted blocks; give one "
                          "number or one per block")
    if not np.all(np.isfinite(values)):
        raise BadArgument("IP-Adapter scale must be finite")
    return ImagePrompt(tokens=jnp.asarray(tokens), scale=jnp.asarray(values), masks=masks)
