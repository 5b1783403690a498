"""UNet2DConditionModel (diffusers) in Flax NNX, NHWC.

The module tree mirrors diffusers so checkpoint conversion is a rename:
``down_blocks[i].attentions[j].transformer_blocks[k].attn2.to_k`` here is
``down_blocks.i.attentions.j.transformer_blocks.k.attn2.to_k`` there.

Covers the SD 1.x / 2.x family (CrossAttn/plain down and up blocks, the
cross-attention mid block, linear or conv projections, per-block head counts and
transformer depths, ``scale_shift`` time conditioning) and SDXL's
``addition_embed_type="text_time"``: the pooled text embedding and the
micro-conditioning time ids (``UNetConditioning.added_cond``) become an extra
embedding added to ``emb`` in ``UNet2DConditionModel.time_conditioning``.
Config options outside that family raise a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.io.errors import BadArgument, BadFile, Unsupported
from ipadapter_jax.io.pretrained import PretrainedMixin, check_fields, check_groups
from ipadapter_jax.models import hoisting, layers
from ipadapter_jax.models.attention import Attention
from ipadapter_jax.models.conditioning import UNetConditioning
from ipadapter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers ``unet/config.json`` this implementation reads.

    Defaults are diffusers' defaults. ``from_dict`` rejects values this
    implementation cannot compute, naming the key, instead of ignoring them.
    """

    sample_size: int | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: Any = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool | None = False   # null in SDXL's config; softmax runs in float32 anyway
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    # Options with a single supported value here: (key, supported values).
    _FIXED = {
        "dual_cross_attention": (False, None),
        "class_embed_type": (None,),
        "num_class_embeds": (None,),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "time_embedding_type": ("positional",),
        "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,),
        "time_cond_proj_dim": (None,),
        "attention_type": ("default",),
        "cross_attention_norm": (None,),
        "resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1.0, 1),
        "mid_block_only_cross_attention": (None, False),
        "class_embeddings_concat": (False,),
        "reverse_transformer_layers_per_block": (None,),
        "dropout": (0.0, 0),
    }

    # The type / range of each field (``io.pretrained.check_fields`` kinds).
    _KINDS = {
        "sample_size": "int?|list[int]", "in_channels": "int", "out_channels": "int",
        "center_input_sample": "bool", "flip_sin_to_cos": "bool", "freq_shift": "num",
        "down_block_types": "list[str]", "mid_block_type": "str?", "up_block_types": "list[str]",
        "only_cross_attention": "bool|list[bool]", "block_out_channels": "list[int]",
        "layers_per_block": "int|list[int]", "downsample_padding": "int0", "mid_block_scale_factor": "num",
        "act_fn": "str", "norm_num_groups": "int", "norm_eps": "pos", "cross_attention_dim": "int|list[int]",
        "transformer_layers_per_block": "int|list[int]|list[list[int]]", "attention_head_dim": "int|list[int]",
        "num_attention_heads": "int?|list[int]", "use_linear_projection": "bool", "upcast_attention": "bool?",
        "resnet_time_scale_shift": "str", "time_embedding_dim": "int?", "conv_in_kernel": "int",
        "conv_out_kernel": "int", "addition_embed_type": "str?", "addition_time_embed_dim": "int?",
        "projection_class_embeddings_input_dim": "int?",
    }

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "UNetConfig":
        check_fields(cfg, cls._KINDS, source)
        for key, allowed in cls._FIXED.items():
            if key in cfg and cfg[key] not in allowed:
                raise Unsupported(f"{source}: {key}={cfg[key]!r} is not supported "
                                          f"(supported: {allowed})")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names}
        config = cls(**kwargs)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        check_fields(dataclasses.asdict(self), self._KINDS, source)
        n = len(self.down_block_types)
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise Unsupported(f"{source}: unknown down block type {t!r}; supported: {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise Unsupported(f"{source}: unknown up block type {t!r}; supported: {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise Unsupported(f"{source}: unknown mid block type {self.mid_block_type!r}; "
                             f"supported: {MID_BLOCK_TYPES}")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise BadFile(f"{source}: down_block_types, up_block_types and block_out_channels "
                             f"must have the same length, got {n}, {len(self.up_block_types)}, "
                             f"{len(self.block_out_channels)}")
        for key in ("only_cross_attention", "attention_head_dim", "num_attention_heads",
                    "cross_attention_dim", "layers_per_block", "transformer_layers_per_block"):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != n:
                raise BadFile(f"{source}: {key} has {len(value)} entries, expected one per block ({n})")
            if isinstance(value, tuple) and any(isinstance(v, (tuple, list)) for v in value):
                raise Unsupported(f"{source}: nested lists in {key} are not supported")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise Unsupported(f"{source}: resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not "
                              "supported (supported: 'default', 'scale_shift')")
        try:
            layers.activation(self.act_fn)
        except BadArgument as e:
            raise Unsupported(f"{source}: act_fn: {e}") from None
        check_groups(self.block_out_channels, self.norm_num_groups, source)
        self._validate_added_conditioning(source)
        for i, (heads, channels) in enumerate(zip(self.heads, self.block_out_channels)):
            attends = self.down_block_types[i].startswith("CrossAttn") or (i == n - 1 and self.mid_block_type)
            if attends and heads > channels:
                raise BadFile(f"{source}: block {i} has {heads} attention heads for {channels} channels "
                              "(attention_head_dim / num_attention_heads: at most one head per channel)")

    ADDITION_EMBED_TYPES = (None, "text_time")

    def _validate_added_conditioning(self, source: str) -> None:
        if self.addition_embed_type not in self.ADDITION_EMBED_TYPES:
            raise Unsupported(f"{source}: addition_embed_type={self.addition_embed_type!r} is not supported "
                              f"(supported: {self.ADDITION_EMBED_TYPES}; 'text_time' is SDXL's)")
        if self.addition_embed_type != "text_time":
            return
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if getattr(self, key) is None:
                raise BadFile(f"{source}: addition_embed_type='text_time' needs {key} (SDXL: "
                              "addition_time_embed_dim 256, projection_class_embeddings_input_dim 2816)")
        if self.projection_class_embeddings_input_dim <= self.addition_time_embed_dim:
            raise BadFile(f"{source}: projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim}"
                          f" leaves no room for the pooled text embedding beside the time ids "
                          f"(addition_time_embed_dim={self.addition_time_embed_dim} per id; it is the pooled "
                          "width + number of time ids x addition_time_embed_dim)")

    def per_block(self, key: str) -> tuple:
        value = getattr(self, key)
        return tuple(value) if isinstance(value, tuple) else (value,) * len(self.down_block_types)

    @property
    def heads(self) -> tuple:
        # diffusers' historical naming: ``attention_head_dim`` holds the number
        # of heads unless ``num_attention_heads`` is given.
        value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return tuple(value) if isinstance(value, tuple) else (value,) * len(self.down_block_types)


# --------------------------------------------------------------------------- time embedding

def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       downscale_freq_shift: float, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps -> [B, dim], float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_channels: int, time_embed_dim: int, *, act_fn: str = "silu",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.act = layers.activation(act_fn)
        self.linear_1 = layers.linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = layers.linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# --------------------------------------------------------------------------- added conditioning (SDXL)

ADDED_COND_KEYS = ("text_embeds", "time_ids")


def added_embedding(add_embedding: TimestepEmbedding, cfg: UNetConfig, added_cond: dict, dtype) -> jax.Array:
    """SDXL's ``text_time`` embedding: each time id through ``add_time_proj``
    (sinusoidal, ``addition_time_embed_dim`` wide), flattened per sample,
    after the pooled ``text_embeds``, then ``add_embedding`` -> [B, time_embed_dim].
    Shared by the UNet and the ControlNet (same names, same formula)."""
    text_embeds, time_ids = jnp.asarray(added_cond["text_embeds"]), jnp.asarray(added_cond["time_ids"])
    time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                     flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
    time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
    add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
    return add_embedding(add_embeds.astype(dtype))


def check_added_cond(cfg: UNetConfig, added_cond, batch: int | None = None, *, model: str = "UNet") -> dict | None:
    """Refuse ``added_cond`` that does not fit ``cfg.addition_embed_type`` (shapes
    are static, so this runs at trace time); ``batch``: the sample's; ``model``
    names the model in the messages (``UNet``, ``ControlNet``)."""
    if cfg.addition_embed_type != "text_time":
        if added_cond is not None:
            raise BadArgument(f"this {model} has no added conditioning (addition_embed_type is None): "
                              "added_cond must be None")
        return None
    need = "{'text_embeds': [B, pooled width], 'time_ids': [B, number of ids]}"
    if not isinstance(added_cond, dict):
        raise BadArgument(f"this {model} has addition_embed_type='text_time' (SDXL): pass a UNetConditioning "
                          f"whose added_cond is {need}; got added_cond={type(added_cond).__name__}")
    missing = [k for k in ADDED_COND_KEYS if k not in added_cond]
    unknown = sorted(set(added_cond) - set(ADDED_COND_KEYS))
    if missing or unknown:
        raise BadArgument(f"added_cond of a 'text_time' (SDXL) {model} must hold exactly {need}: "
                          + (f"missing {missing}" if missing else "")
                          + ("; " if missing and unknown else "") + (f"unexpected {unknown}" if unknown else ""))
    text_embeds, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
    for key, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
        shape = tuple(jnp.shape(value))
        if len(shape) != 2 or (batch is not None and shape[0] not in (1, batch)):
            raise BadArgument(f"added_cond[{key!r}] must be [B, width] with B the sample's batch"
                              + (f" ({batch})" if batch is not None else "") + f" or 1, got shape {shape}")
    if jnp.shape(text_embeds)[0] != jnp.shape(time_ids)[0]:
        raise BadArgument(f"added_cond: text_embeds has batch {jnp.shape(text_embeds)[0]} but time_ids has "
                          f"batch {jnp.shape(time_ids)[0]}")
    width, n_ids = jnp.shape(text_embeds)[1], jnp.shape(time_ids)[1]
    got = width + n_ids * cfg.addition_time_embed_dim
    if got != cfg.projection_class_embeddings_input_dim:
        raise BadArgument(
            f"added_cond: text_embeds width {width} + time_ids width {n_ids} x addition_time_embed_dim "
            f"{cfg.addition_time_embed_dim} = {got}, but this {model}'s projection_class_embeddings_input_dim is "
            f"{cfg.projection_class_embeddings_input_dim} (SDXL base: 1280 pooled + 6 time ids x 256 = 2816)")
    return added_cond


# --------------------------------------------------------------------------- transformer

class GEGLU(nnx.Module):
    def __init__(self, dim_in: int, dim_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = layers.linear(dim_in, dim_out * 2, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * layers.gelu(gate)


class FeedForward(nnx.Module):
    """``net.0`` GEGLU, ``net.1`` dropout (no params), ``net.2`` Linear."""

    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, dtype=dtype, rngs=rngs), layers.Identity(),
                             layers.linear(inner, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LN self-attention, cross-attention and GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, cross_attention_dim: int,
                 only_cross_attention: bool = False, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        self.only_cross_attention = only_cross_attention
        attn = dict(heads=heads, dim_head=dim_head, dtype=dtype, backend=attention_backend, rngs=rngs)
        self.norm1 = layers.layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               **attn)
        self.norm2 = layers.layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn)
        self.norm3 = layers.layer_norm(dim, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, ip: tuple = ()) -> jax.Array:
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None, ip=ip) + x
        x = self.attn2(self.norm2(x), context, ip=ip) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in -> transformer blocks over H*W tokens -> proj_out, residual."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, *, num_layers: int,
                 cross_attention_dim: int, norm_num_groups: int, use_linear_projection: bool,
                 only_cross_attention: bool, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = layers.group_norm(norm_num_groups, in_channels, eps=1e-6, dtype=dtype, rngs=rngs)
        if use_linear_projection:
            self.proj_in = layers.linear(in_channels, inner, dtype=dtype, rngs=rngs)
            self.proj_out = layers.linear(inner, in_channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = layers.conv(in_channels, inner, 1, dtype=dtype, rngs=rngs)
            self.proj_out = layers.conv(inner, in_channels, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention, dtype=dtype,
                                  attention_backend=attention_backend, rngs=rngs)
            for _ in range(num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array, ip: tuple = ()) -> jax.Array:
        b, h, w, _ = x.shape
        residual = x
        x = self.norm(x)
        # A 1x1 conv and a Linear are the same map on NHWC; only the key layout differs.
        x = self.proj_in(x).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            x = block(x, context, ip)
        x = self.proj_out(x.reshape(b, h, w, -1))
        return x + residual


# --------------------------------------------------------------------------- blocks

def transformers(n: int, heads: int, channels: int, *, cfg: "UNetConfig", transformer_layers: int,
                 cross_attention_dim: int, only_cross_attention: bool, dtype, attention_backend: str,
                 rngs: nnx.Rngs) -> nnx.List:
    """A block's ``attentions``: ``n`` Transformer2DModels at ``channels`` wide."""
    return nnx.List([
        Transformer2DModel(heads, channels // heads, channels, num_layers=transformer_layers,
                           cross_attention_dim=cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
                           use_linear_projection=cfg.use_linear_projection,
                           only_cross_attention=only_cross_attention, dtype=dtype,
                           attention_backend=attention_backend, rngs=rngs)
        for _ in range(n)])


class DownBlock(nnx.Module):
    """``DownBlock2D`` (no ``attentions``) and ``CrossAttnDownBlock2D``."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, has_attention: bool,
                 add_downsample: bool, temb_channels: int, cfg: UNetConfig, heads: int,
                 transformer_layers: int, cross_attention_dim: int, only_cross_attention: bool,
                 dtype, attention_backend: str, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn,
                          time_embedding_norm=cfg.resnet_time_scale_shift, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.attentions = transformers(num_layers, heads, out_channels, cfg=cfg, transformer_layers=transformer_layers,
                                       cross_attention_dim=cross_attention_dim,
                                       only_cross_attention=only_cross_attention, dtype=dtype,
                                       attention_backend=attention_backend, rngs=rngs) if has_attention else None
        self.downsamplers = nnx.List([
            Downsample2D(out_channels, padding=cfg.downsample_padding, dtype=dtype, rngs=rngs)
        ]) if add_downsample else None

    def __call__(self, x, temb, context, ip=()):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, ip)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """``UpBlock2D`` and ``CrossAttnUpBlock2D``: each resnet eats one skip."""

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, *, num_layers: int,
                 has_attention: bool, add_upsample: bool, temb_channels: int, cfg: UNetConfig, heads: int,
                 transformer_layers: int, cross_attention_dim: int, only_cross_attention: bool,
                 dtype, attention_backend: str, rngs: nnx.Rngs):
        def resnet(i):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_output_channels if i == 0 else out_channels
            return ResnetBlock2D(res_in + skip_channels, out_channels, temb_channels=temb_channels,
                                 groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn,
                                 time_embedding_norm=cfg.resnet_time_scale_shift, dtype=dtype, rngs=rngs)

        self.resnets = nnx.List([resnet(i) for i in range(num_layers)])
        self.attentions = transformers(num_layers, heads, out_channels, cfg=cfg, transformer_layers=transformer_layers,
                                       cross_attention_dim=cross_attention_dim,
                                       only_cross_attention=only_cross_attention, dtype=dtype,
                                       attention_backend=attention_backend, rngs=rngs) if has_attention else None
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x, skips, temb, context, ip=(), upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, ip)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, channels: int, *, temb_channels: int, cfg: UNetConfig, heads: int,
                 transformer_layers: int, cross_attention_dim: int, dtype, attention_backend: str,
                 rngs: nnx.Rngs):
        def resnet():
            return ResnetBlock2D(channels, channels, temb_channels=temb_channels, groups=cfg.norm_num_groups,
                                 eps=cfg.norm_eps, act_fn=cfg.act_fn,
                                 time_embedding_norm=cfg.resnet_time_scale_shift,
                                 output_scale_factor=cfg.mid_block_scale_factor, dtype=dtype, rngs=rngs)

        self.resnets = nnx.List([resnet(), resnet()])
        self.attentions = nnx.List([
            Transformer2DModel(heads, channels // heads, channels, num_layers=transformer_layers,
                               cross_attention_dim=cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
                               use_linear_projection=cfg.use_linear_projection, only_cross_attention=False,
                               dtype=dtype, attention_backend=attention_backend, rngs=rngs)])

    def __call__(self, x, temb, context, ip=()):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, ip)
        return self.resnets[1](x, temb)


# --------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class CrossAttentionLayer:
    """Where one cross-attention layer sits: ``index`` in processor order
    (official ``ip_adapter`` key ``2 * index + 1``), diffusers ``name``,
    ``group`` (down/mid/up), ``block`` and ``attention_index`` within it."""

    index: int
    name: str
    group: str
    block: int
    attention_index: int
    attention: Any = dataclasses.field(repr=False, compare=False)
    hidden_size: int = 0
    token_dim: int = 0


REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(remat: bool | str):
    """The ``jax.checkpoint`` policy of a UNet ``remat`` setting, None for no remat.

    ``"none"`` (or False) keeps every activation for the backward pass; ``"full"`` (or
    True) keeps only each block's inputs and recomputes the block (least memory, about
    one more forward pass); ``"dots"`` keeps the outputs of matmuls and convolutions
    and recomputes the cheap elementwise work (norms, activations) between them.
    """
    if remat is True or remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat is False or remat is None or remat == "none":
        return None
    if remat == "dots":
        return jax.checkpoint_policies.dots_saveable
    raise BadArgument(f"unknown remat policy {remat!r}; expected one of {REMAT_POLICIES} (or a bool)")


class UNet2DConditionModel(PretrainedMixin, nnx.Module):
    """Conditional UNet: ``model(sample, timesteps, conditioning)``.

    Args of ``__call__``:
      sample: [B, H, W, C] noisy latents (NHWC).
      timesteps: scalar or [B] (int or float).
      conditioning: a ``UNetConditioning`` (text tokens, image prompts, SDXL's
        added text/time conditioning, ControlNet residuals), or just the
        [B, S, cross_attention_dim] text tokens (UNets without added conditioning).
      image_prompts: with text tokens only: one ``ImagePrompt`` per attached
        IP-Adapter (image tokens, per-layer scales, masks).
    Returns the [B, H, W, out_channels] prediction (diffusers' ``.sample``).
    """

    weights_name = "diffusion_pytorch_model"

    @classmethod
    def parse_config(cls, config: dict) -> UNetConfig:
        return UNetConfig.from_dict(config, source="unet config")

    def __init__(self, config: UNetConfig | dict, *, dtype=jnp.float32, attention_backend: str = "auto",
                 remat: bool | str = False, rngs: nnx.Rngs):
        cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
        self.config = cfg
        remat_policy(remat)  # fail at construction on an unknown policy
        self.remat = remat
        self.config_json = json.dumps(dataclasses.asdict(cfg))
        self.dtype = dtype
        boc = cfg.block_out_channels
        n = len(boc)
        heads = cfg.heads
        cross_dims = cfg.per_block("cross_attention_dim")
        only_cross = cfg.per_block("only_cross_attention")
        layers_per_block = cfg.per_block("layers_per_block")
        transformer_layers = cfg.per_block("transformer_layers_per_block")
        time_embed_dim = cfg.time_embedding_dim or boc[0] * 4
        common = dict(cfg=cfg, temb_channels=time_embed_dim, dtype=dtype,
                      attention_backend=attention_backend, rngs=rngs)

        self.conv_in = layers.conv(cfg.in_channels, boc[0], cfg.conv_in_kernel,
                                   padding=(cfg.conv_in_kernel - 1) // 2, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(boc[0], time_embed_dim, act_fn=cfg.act_fn, dtype=dtype, rngs=rngs)
        # SDXL: ``add_time_proj`` (sinusoidal, no weights: ``added_embedding``) and
        # ``add_embedding``; diffusers builds the latter with its default SiLU, whatever act_fn is.
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_embed_dim,
                                               dtype=dtype, rngs=rngs) \
            if cfg.addition_embed_type == "text_time" else None

        down = []
        for i, block_type in enumerate(cfg.down_block_types):
            down.append(DownBlock(boc[max(i - 1, 0)], boc[i], num_layers=layers_per_block[i],
                                  has_attention=block_type.startswith("CrossAttn"), add_downsample=i < n - 1,
                                  heads=heads[i], transformer_layers=transformer_layers[i],
                                  cross_attention_dim=cross_dims[i], only_cross_attention=only_cross[i],
                                  **common))
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetMidBlock2DCrossAttn(
            boc[-1], heads=heads[-1], transformer_layers=transformer_layers[-1],
            cross_attention_dim=cross_dims[-1], **common) if cfg.mid_block_type else None

        up = []
        rev_boc, rev_heads = boc[::-1], heads[::-1]
        rev_layers, rev_tl = layers_per_block[::-1], transformer_layers[::-1]
        rev_cross, rev_only = cross_dims[::-1], only_cross[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            up.append(UpBlock(rev_boc[min(i + 1, n - 1)], rev_boc[max(i - 1, 0)], rev_boc[i],
                              num_layers=rev_layers[i] + 1, has_attention=block_type.startswith("CrossAttn"),
                              add_upsample=i < n - 1, heads=rev_heads[i], transformer_layers=rev_tl[i],
                              cross_attention_dim=rev_cross[i], only_cross_attention=rev_only[i], **common))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = layers.group_norm(cfg.norm_num_groups, boc[0], eps=cfg.norm_eps, dtype=dtype,
                                               rngs=rngs)
        self.conv_out = layers.conv(boc[0], cfg.out_channels, cfg.conv_out_kernel,
                                    padding=(cfg.conv_out_kernel - 1) // 2, dtype=dtype, rngs=rngs)

        for i, (_, attn) in enumerate(self.attention_processors()):
            attn.processor_index = i
        for layer in self.cross_attention_layers():
            layer.attention.cross_index = layer.index
        # IP-Adapters attached with ``ipadapter_jax.ip_adapter.attach``; the i-th
        # entry of ``image_prompts`` in ``__call__`` conditions the i-th adapter.
        self.ip_adapters = nnx.List([])

    def attention_processors(self) -> list[tuple[str, Attention]]:
        """Every attention layer with its diffusers name, in diffusers'
        ``attn_processors`` order (down blocks, up blocks, then the mid block:
        module registration order), attn1 before attn2. Official IP-Adapter
        files number their layers by this order."""
        out = []
        groups = [("down_blocks", self.down_blocks), ("up_blocks", self.up_blocks)]
        if self.mid_block is not None:
            groups.append(("mid_block", [self.mid_block]))
        for group, blocks in groups:
            for b, block in enumerate(blocks):
                prefix = f"{group}.{b}" if group != "mid_block" else group
                for a, transformer in enumerate(block.attentions or []):
                    for t, tb in enumerate(transformer.transformer_blocks):
                        name = f"{prefix}.attentions.{a}.transformer_blocks.{t}"
                        out += [(f"{name}.attn1", tb.attn1), (f"{name}.attn2", tb.attn2)]
        return out

    def cross_attention_layers(self) -> list["CrossAttentionLayer"]:
        """The attn2 layers (where image branches go), in processor order."""
        layers_ = []
        for name, attn in self.attention_processors():
            if name.endswith("attn2"):
                parts = name.split(".")
                group = parts[0].split("_")[0]                    # down / up / mid
                block = int(parts[1]) if group != "mid" else 0
                attention = int(parts[-4])
                layers_.append(CrossAttentionLayer(index=len(layers_), name=name, group=group, block=block,
                                                   attention_index=attention, attention=attn,
                                                   hidden_size=attn.heads * attn.dim_head,
                                                   token_dim=attn.to_k.in_features))
        return layers_

    def time_conditioning(self, timesteps: jax.Array, batch: int, added_cond: dict | None = None) -> jax.Array:
        """Timesteps (plus SDXL's ``added_cond``) -> the ``emb`` every resnet
        receives ([B, time_embed_dim])."""
        t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(t, self.config.block_out_channels[0],
                                   flip_sin_to_cos=self.config.flip_sin_to_cos,
                                   downscale_freq_shift=self.config.freq_shift)
        emb = self.time_embedding(t_emb.astype(self.dtype))
        if self.add_embedding is not None:
            # The pooled text and the time ids are the same at every denoising step.
            emb = emb + hoisting.constant(self, "added_embedding", self.added_embedding,
                                          self.check_added_cond(added_cond, batch))
        return emb

    def added_embedding(self, added_cond: dict) -> jax.Array:
        """SDXL's ``text_time`` embedding (see ``added_embedding``) -> [B, time_embed_dim]."""
        return added_embedding(self.add_embedding, self.config, added_cond, self.dtype)

    ADDED_COND_KEYS = ADDED_COND_KEYS

    def check_added_cond(self, added_cond, batch: int | None = None) -> dict | None:
        """Refuse ``added_cond`` that does not fit this UNet's ``addition_embed_type``
        (see ``check_added_cond``); ``batch``: the sample's."""
        return check_added_cond(self.config, added_cond, batch)

    def conditioning(self, conditioning, image_prompts=None) -> UNetConditioning:
        """The call's conditioning as a checked ``UNetConditioning``: an array
        argument is the text context (with ``image_prompts`` beside it)."""
        if isinstance(conditioning, UNetConditioning):
            if image_prompts is not None:
                raise BadArgument("image_prompts go inside the UNetConditioning when one is given")
            cond = conditioning
        else:
            cond = UNetConditioning(conditioning, tuple(image_prompts or ()))
        if len(cond.image_prompts) and len(cond.image_prompts) != len(self.ip_adapters):
            raise BadArgument(f"got {len(cond.image_prompts)} image prompts for {len(self.ip_adapters)} attached "
                             "IP-Adapters; pass one ImagePrompt per adapter (in attach order)")
        self.check_added_cond(cond.added_cond)
        return cond

    def __call__(self, sample: jax.Array, timesteps: jax.Array, conditioning: UNetConditioning | jax.Array,
                 image_prompts: tuple | list | None = None) -> jax.Array:
        cfg = self.config
        cond = self.conditioning(conditioning, image_prompts)
        ip = tuple(zip(self.ip_adapters, cond.image_prompts))
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        sample = sample.astype(self.dtype)
        context = hoisting.constant(self, "context", lambda c: c.astype(self.dtype), cond.encoder_hidden_states)
        emb = self.time_conditioning(timesteps, sample.shape[0], cond.added_cond)

        # Rematerialisation per UNet block (jax.checkpoint): training memory for compute.
        # Sampling takes no gradient: no remat inside a denoising loop (whose hoisted values would
        # otherwise be computed inside a checkpoint's trace).
        policy = None if hoisting.active() else remat_policy(self.remat)
        if policy is None:
            run = lambda fn, *a: fn(*a)
        else:
            run = lambda fn, *a: jax.checkpoint(fn, policy=policy)(*a)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = run(lambda x, e, c, block=block: block(x, e, c, ip), x, emb, context)
            skips.extend(block_skips)
        skips = add_residuals(skips, cond.down_block_residuals)
        if self.mid_block is not None:
            x = run(lambda x, e, c: self.mid_block(x, e, c, ip), x, emb, context)
        if cond.mid_block_residual is not None:
            x = x + cond.mid_block_residual.astype(x.dtype)
        for i, block in enumerate(self.up_blocks):
            n_res = len(block.resnets)
            block_skips, skips = skips[-n_res:], skips[:-n_res]
            # Upsample to the next skip's size so odd latent sizes round as in diffusers.
            size = skips[-1].shape[1:3] if skips and block.upsamplers is not None else None
            x = run(lambda x, s, e, c, block=block, size=size: block(x, list(s), e, c, ip, upsample_size=size),
                    x, tuple(block_skips), emb, context)
        x = self.conv_out(layers.activation(cfg.act_fn)(self.conv_norm_out(x)))
        return x.astype(jnp.float32)


def add_residuals(skips: list, residuals) -> list:
    """Skips plus ControlNet's down-block residuals (one per skip, same shapes)."""
    if residuals is None:
        return skips
    if len(residuals) != len(skips):
        raise BadArgument(f"got {len(residuals)} down-block residuals for the UNet's {len(skips)} skip connections")
    return [s + r.astype(s.dtype) for s, r in zip(skips, residuals)]
