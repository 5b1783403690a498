"""ControlNetModel (diffusers) in Flax NNX, NHWC.

A ControlNet is a trainable copy of the UNet's encoder half (``conv_in``, the
time embeddings, ``down_blocks``, ``mid_block``) that also sees a control
image (edges, depth, pose) through ``controlnet_cond_embedding``: a small conv
stack from pixels down to latent size whose zero-initialised ``conv_out`` is
added after ``conv_in``. Every encoder skip and the mid block's output go
through a zero-initialised 1x1 conv (``controlnet_down_blocks``,
``controlnet_mid_block``); the results, times ``conditioning_scale``, are the
residuals a ``UNet2DConditionModel`` adds to its skips and mid block
(``UNetConditioning.down_block_residuals`` / ``mid_block_residual``).

Names mirror diffusers, so ``from_pretrained`` reads a diffusers ControlNet
folder as is; ``ipadapter_jax.convert.controlnet`` reads the original
single-file layout (``control_model.input_hint_block.*``, ``zero_convs.*``).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, Unsupported
from ipadapter_jax.io.pretrained import PretrainedMixin, check_fields
from ipadapter_jax.models import hoisting, layers
from ipadapter_jax.models.resnet import ResnetBlock2D
from ipadapter_jax.models.unet import (DownBlock, TimestepEmbedding, UNetConfig, UNetMidBlock2DCrossAttn,
                                       added_embedding, check_added_cond, timestep_embedding)

CONTROLNET_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
CHANNEL_ORDERS = ("rgb", "bgr")

# The keys of a diffusers ControlNet config.json that describe its UNet-encoder
# half (``ControlNetModel.__init__`` takes them with the UNet's meaning). Other
# UNet keys (out_channels, up_block_types, conv_in_kernel, time_embedding_dim, ...)
# are not ControlNet options: diffusers ignores them, and so does this reader.
ENCODER_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
)
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A diffusers ``ControlNetModel`` config.json: ``unet`` holds the
    encoder-half settings as a ``UNetConfig`` (its up blocks mirror the down
    blocks only so that it validates; they are never built), the other fields
    are the ControlNet's own. Defaults are diffusers' defaults."""

    unet: UNetConfig = UNetConfig()
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64   # only read by addition_embed_type "text" (not supported)

    _KINDS = {
        "mid_block_type": "str?", "conditioning_channels": "int", "controlnet_conditioning_channel_order": "str",
        "conditioning_embedding_out_channels": "list[int]", "global_pool_conditions": "bool",
        "addition_embed_type_num_heads": "int",
        # One value for every block: diffusers' ControlNet takes no per-block lists here.
        "layers_per_block": "int", "cross_attention_dim": "int",
    }

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "controlnet config") -> "ControlNetConfig":
        check_fields(cfg, cls._KINDS, source)
        encoder = {k: cfg[k] for k in ENCODER_KEYS if k in cfg}
        down = cfg.get("down_block_types", UNetConfig.down_block_types)
        if isinstance(down, (list, tuple)) and all(isinstance(t, str) for t in down):
            encoder["up_block_types"] = [_UP_OF_DOWN.get(t, t) for t in reversed(down)]
        # The UNet config's mid block says whether the last block's width needs attention
        # heads; the ControlNet's own mid_block_type is checked in ``validate``.
        mid = cfg.get("mid_block_type", cls.mid_block_type)
        encoder["mid_block_type"] = "UNetMidBlock2DCrossAttn" if mid == "UNetMidBlock2DCrossAttn" else None
        own = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name != "unet" and f.name in cfg}
        own = {k: tuple(v) if isinstance(v, list) else v for k, v in own.items()}
        config = cls(unet=UNetConfig.from_dict(encoder, source), **own)
        config.validate(source)
        return config

    def validate(self, source: str = "controlnet config") -> None:
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise Unsupported(f"{source}: controlnet_conditioning_channel_order="
                              f"{self.controlnet_conditioning_channel_order!r} is not supported "
                              f"(supported: {CHANNEL_ORDERS})")
        if self.mid_block_type not in CONTROLNET_MID_BLOCK_TYPES:
            raise Unsupported(f"{source}: mid_block_type={self.mid_block_type!r} is not supported by a ControlNet "
                              f"(supported: {CONTROLNET_MID_BLOCK_TYPES})")
        for key in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(getattr(self.unet, key), int):
                raise BadFile(f"{source}: {key} must be one integer for a ControlNet, got "
                              f"{list(getattr(self.unet, key))}")

    @property
    def downscale(self) -> int:
        """Control-image pixels per latent pixel (8 with the default embedding)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def to_dict(self) -> dict:
        """The diffusers ``config.json`` of this config."""
        unet = dataclasses.asdict(self.unet)
        out = {"_class_name": "ControlNetModel"}
        out.update({k: unet[k] for k in ENCODER_KEYS if k in unet})
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unet"})
        # ``_FIXED`` options live in UNetConfig only as checks; write diffusers' values for them.
        out.update(encoder_hid_dim=None, encoder_hid_dim_type=None, class_embed_type=None, num_class_embeds=None)
        return json.loads(json.dumps(out))   # tuples -> lists, as the JSON file holds them


# --------------------------------------------------------------------------- blocks

def zero_conv(in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0, dtype,
              rngs: nnx.Rngs) -> nnx.Conv:
    """A conv initialised to zero (diffusers' ``zero_module``): a new ControlNet
    starts as a no-op on the UNet it is attached to."""
    conv = layers.conv(in_channels, out_channels, kernel_size, padding=padding, dtype=dtype, rngs=rngs)
    conv.kernel.set_value(jnp.zeros_like(conv.kernel[...]))
    conv.bias.set_value(jnp.zeros_like(conv.bias[...]))
    return conv


class ControlNetConditioningEmbedding(nnx.Module):
    """Control image (pixels) -> latent-sized features: ``conv_in``, then per
    width step a 3x3 conv and a stride-2 3x3 conv, SiLU after each, then the
    zero-initialised ``conv_out`` to ``block_out_channels[0]``."""

    def __init__(self, conditioning_embedding_channels: int, *, conditioning_channels: int,
                 block_out_channels: tuple, dtype=jnp.float32, rngs: nnx.Rngs):
        boc = block_out_channels
        self.conv_in = layers.conv(conditioning_channels, boc[0], 3, padding=1, dtype=dtype, rngs=rngs)
        blocks = []
        for c_in, c_out in zip(boc[:-1], boc[1:]):
            blocks.append(layers.conv(c_in, c_in, 3, padding=1, dtype=dtype, rngs=rngs))
            blocks.append(layers.conv(c_in, c_out, 3, stride=2, padding=1, dtype=dtype, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_out = zero_conv(boc[-1], conditioning_embedding_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.silu(self.conv_in(x))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)


class UNetMidBlock2D(nnx.Module):
    """diffusers' ``UNetMidBlock2D`` as a ControlNet builds it (``num_layers=0``,
    no attention): one resnet (the small SDXL ControlNets)."""

    def __init__(self, channels: int, *, temb_channels: int, cfg: UNetConfig, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, temb_channels=temb_channels, groups=cfg.norm_num_groups,
                          eps=cfg.norm_eps, act_fn=cfg.act_fn, time_embedding_norm=cfg.resnet_time_scale_shift,
                          output_scale_factor=cfg.mid_block_scale_factor, dtype=dtype, rngs=rngs)])

    def __call__(self, x, temb, context=None, ip=()):
        return self.resnets[0](x, temb)


# --------------------------------------------------------------------------- model

class ControlNetModel(PretrainedMixin, nnx.Module):
    """``model(sample, timesteps, encoder_hidden_states, controlnet_cond)`` ->
    ``(down_block_residuals, mid_block_residual)``, as diffusers' ``ControlNetModel``.

    Args of ``__call__``:
      sample: [B, h, w, C] noisy latents (NHWC).
      timesteps: scalar or [B].
      encoder_hidden_states: [B, S, cross_attention_dim] text tokens (never the
        image-prompt tokens: a ControlNet sees text only).
      controlnet_cond: [B or 1, h x 8, w x 8, conditioning_channels] control
        image, RGB in [0, 1] (a ``bgr`` ControlNet flips it itself).
      conditioning_scale: scalar or [B] (an array is traced: changing it never
        recompiles); multiplies every residual.
      added_cond: SDXL (``addition_embed_type="text_time"``): ``{"text_embeds":
        [B, P], "time_ids": [B, N]}`` as for the UNet; None otherwise.
      guess_mode: static; with it (and not ``global_pool_conditions``) the
        residuals are scaled by ``logspace(-1, 0)`` (0.1 for the first skip to
        1.0 for the mid block) times ``conditioning_scale``.
    Returns a tuple of one NHWC residual per UNet skip connection and the mid
    block residual (``global_pool_conditions``: each averaged to 1x1).
    """

    weights_name = "diffusion_pytorch_model"

    @classmethod
    def parse_config(cls, config: dict) -> ControlNetConfig:
        return ControlNetConfig.from_dict(config, source="controlnet config")

    def __init__(self, config: ControlNetConfig | dict, *, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        cfg = config if isinstance(config, ControlNetConfig) else ControlNetConfig.from_dict(config)
        self.config = cfg
        self.config_json = json.dumps(cfg.to_dict(), sort_keys=True)
        self.dtype = dtype
        ucfg = cfg.unet
        boc = ucfg.block_out_channels
        n = len(boc)
        time_embed_dim = boc[0] * 4
        common = dict(cfg=ucfg, temb_channels=time_embed_dim, dtype=dtype, attention_backend=attention_backend,
                      rngs=rngs)

        self.conv_in = layers.conv(ucfg.in_channels, boc[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(boc[0], time_embed_dim, act_fn=ucfg.act_fn, dtype=dtype, rngs=rngs)
        # SDXL: as the UNet's (diffusers builds it with its default SiLU, whatever act_fn is).
        self.add_embedding = TimestepEmbedding(ucfg.projection_class_embeddings_input_dim, time_embed_dim,
                                               dtype=dtype, rngs=rngs) \
            if ucfg.addition_embed_type == "text_time" else None
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            boc[0], conditioning_channels=cfg.conditioning_channels,
            block_out_channels=cfg.conditioning_embedding_out_channels, dtype=dtype, rngs=rngs)

        heads = ucfg.heads
        transformer_layers = ucfg.per_block("transformer_layers_per_block")
        only_cross = ucfg.per_block("only_cross_attention")
        lpb = ucfg.layers_per_block
        down, zero_convs = [], [zero_conv(boc[0], boc[0], 1, dtype=dtype, rngs=rngs)]
        for i, block_type in enumerate(ucfg.down_block_types):
            down.append(DownBlock(boc[max(i - 1, 0)], boc[i], num_layers=lpb,
                                  has_attention=block_type.startswith("CrossAttn"), add_downsample=i < n - 1,
                                  heads=heads[i], transformer_layers=transformer_layers[i],
                                  cross_attention_dim=ucfg.cross_attention_dim, only_cross_attention=only_cross[i],
                                  **common))
            # One zero conv per skip the block returns: its resnets, then its downsampler.
            zero_convs += [zero_conv(boc[i], boc[i], 1, dtype=dtype, rngs=rngs)
                           for _ in range(lpb + (i < n - 1))]
        self.down_blocks = nnx.List(down)
        self.controlnet_down_blocks = nnx.List(zero_convs)

        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(boc[-1], heads=heads[-1],
                                                     transformer_layers=transformer_layers[-1],
                                                     cross_attention_dim=ucfg.cross_attention_dim, **common)
        else:
            self.mid_block = UNetMidBlock2D(boc[-1], temb_channels=time_embed_dim, cfg=ucfg, dtype=dtype, rngs=rngs)
        self.controlnet_mid_block = zero_conv(boc[-1], boc[-1], 1, dtype=dtype, rngs=rngs)

    @classmethod
    def from_unet(cls, unet, *, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: tuple = (16, 32, 96, 256), conditioning_channels: int = 3,
                  load_weights_from_unet: bool = True, seed: int = 0) -> "ControlNetModel":
        """A new ControlNet shaped like ``unet`` (a ``UNet2DConditionModel``), as
        diffusers' ``ControlNetModel.from_unet``: with ``load_weights_from_unet``
        its ``conv_in``, time (and SDXL added) embeddings, down and mid blocks are
        copies of the UNet's, the conditioning embedding is drawn as torch
        initialises a conv (uniform within 1/sqrt(fan_in), from ``seed``) and every
        zero conv is zero, so it starts as a no-op on that UNet."""
        config = {k: v for k, v in dataclasses.asdict(unet.config).items() if k in ENCODER_KEYS}
        config.update(mid_block_type=unet.config.mid_block_type,
                      controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                      conditioning_embedding_out_channels=list(conditioning_embedding_out_channels),
                      conditioning_channels=conditioning_channels)
        config = json.loads(json.dumps(config))
        try:
            parsed = ControlNetConfig.from_dict(config, source="ControlNetModel.from_unet")
        except BadFile as e:   # a UNet layout a ControlNet cannot copy (per-block lists)
            raise Incompatible(str(e)) from None
        if not load_weights_from_unet:
            return cls(parsed, dtype=unet.dtype, rngs=nnx.Rngs(seed))
        # Build abstractly and fill with numpy: random init op by op compiles a kernel
        # per shape (slow), and the copied parts' init would be thrown away anyway.
        model = nnx.eval_shape(lambda: cls(parsed, dtype=unet.dtype, rngs=nnx.Rngs(0)))
        for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
            if getattr(model, name) is not None:
                # Copies, not shared buffers: donating one model's params must not free the other's.
                state = jax.tree.map(lambda a: jnp.asarray(np.array(a)), nnx.state(getattr(unet, name), nnx.Param))
                nnx.update(getattr(model, name), state)
        rng = np.random.default_rng(seed)
        embedding = model.controlnet_cond_embedding
        for conv in (embedding.conv_in, *embedding.blocks):
            shape = conv.kernel.get_value().shape              # HWIO
            bound = 1.0 / np.sqrt(np.prod(shape[:3]))
            conv.kernel.set_value(jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32)))
            conv.bias.set_value(jnp.asarray(rng.uniform(-bound, bound, shape[-1:]).astype(np.float32)))
        for conv in (embedding.conv_out, *model.controlnet_down_blocks, model.controlnet_mid_block):
            for param in (conv.kernel, conv.bias):
                param.set_value(jnp.asarray(np.zeros(param.get_value().shape, np.float32)))
        abstract = [p for p, v in nnx.to_flat_state(nnx.state(model))
                    if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
        assert not abstract, f"from_unet left parameters uninitialised: {abstract}"
        return model

    # ----------------------------------------------------------------- inputs

    def time_conditioning(self, timesteps: jax.Array, batch: int, added_cond: dict | None = None) -> jax.Array:
        """Timesteps (plus SDXL's ``added_cond``) -> [B, time_embed_dim], as the UNet's."""
        cfg = self.config.unet
        t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   downscale_freq_shift=cfg.freq_shift)
        emb = self.time_embedding(t_emb.astype(self.dtype))
        if self.add_embedding is not None:
            emb = emb + hoisting.constant(self, "added_embedding",
                                          lambda a: added_embedding(self.add_embedding, cfg, a, self.dtype), added_cond)
        return emb

    def check_inputs(self, sample, encoder_hidden_states, controlnet_cond, conditioning_scale, added_cond) -> None:
        """Refuse inputs of the wrong shape with a message naming them (shapes
        are static: this runs at trace time)."""
        cfg = self.config
        if jnp.ndim(sample) != 4 or jnp.shape(sample)[-1] != cfg.unet.in_channels:
            raise BadArgument(f"sample must be [B, h, w, {cfg.unet.in_channels}] latents (NHWC), got shape "
                              f"{tuple(jnp.shape(sample))}")
        b, h, w, _ = jnp.shape(sample)
        ctx = tuple(jnp.shape(encoder_hidden_states))
        if len(ctx) != 3 or ctx[0] != b or ctx[2] != cfg.unet.cross_attention_dim:
            raise BadArgument(f"encoder_hidden_states must be [B ({b}), tokens, {cfg.unet.cross_attention_dim}] "
                              f"(this ControlNet's cross_attention_dim), got shape {ctx}")
        self.check_controlnet_cond(controlnet_cond, b, (h, w))
        if tuple(jnp.shape(conditioning_scale)) not in ((), (b,)):
            raise BadArgument(f"conditioning_scale must be a scalar or one value per sample ([{b}]), got shape "
                              f"{tuple(jnp.shape(conditioning_scale))}")
        if added_cond is None and cfg.unet.addition_embed_type == "text_time":
            raise BadArgument("this ControlNet has addition_embed_type='text_time' (an SDXL ControlNet): pass "
                              "added_cond={'text_embeds': [B, pooled width], 'time_ids': [B, number of ids]}, "
                              "as for the SDXL UNet")
        check_added_cond(cfg.unet, added_cond, b, model="ControlNet")

    def check_controlnet_cond(self, controlnet_cond, batch: int, latent_size: tuple) -> None:
        cfg = self.config
        shape = tuple(jnp.shape(controlnet_cond))
        if len(shape) != 4 or shape[0] not in (1, batch) or shape[-1] != cfg.conditioning_channels:
            raise BadArgument(f"controlnet_cond must be [B ({batch}) or 1, H, W, {cfg.conditioning_channels}] "
                              f"(NHWC, RGB in [0, 1]), got shape {shape}")
        embedded = shape[1:3]
        for _ in range(len(cfg.conditioning_embedding_out_channels) - 1):
            embedded = tuple((s - 1) // 2 + 1 for s in embedded)   # a stride-2, pad-1 3x3 conv
        if embedded != tuple(latent_size):
            h, w = latent_size
            raise BadArgument(f"controlnet_cond is {shape[1]}x{shape[2]} pixels, which this ControlNet's conditioning "
                              f"embedding maps to {embedded[0]}x{embedded[1]}, but the latents are {h}x{w}: pass the "
                              f"control image at the output size ({h * cfg.downscale}x{w * cfg.downscale})")

    # ----------------------------------------------------------------- forward

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: jax.Array | float = 1.0,
                 added_cond: dict | None = None, guess_mode: bool = False) -> tuple[tuple, jax.Array]:
        cfg = self.config
        scale = jnp.asarray(conditioning_scale, dtype=jnp.float32)
        self.check_inputs(sample, encoder_hidden_states, controlnet_cond, scale, added_cond)
        context = hoisting.constant(self, "context", lambda c: c.astype(self.dtype), encoder_hidden_states)
        emb = self.time_conditioning(timesteps, sample.shape[0], added_cond)

        def embed_control(image):   # the control image is the same at every denoising step
            if cfg.controlnet_conditioning_channel_order == "bgr":
                image = image[..., ::-1]
            return self.controlnet_cond_embedding(image.astype(self.dtype))

        x = self.conv_in(sample.astype(self.dtype))
        x = x + hoisting.constant(self, "control_embedding", embed_control, controlnet_cond)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, emb, context)

        down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        return self.scale_residuals(down, mid, scale, guess_mode)

    def scale_residuals(self, down: list, mid: jax.Array, scale: jax.Array, guess_mode: bool):
        """``conditioning_scale`` (guess mode: times 0.1 ... 1.0, log-spaced over
        the skips then the mid block), then ``global_pool_conditions``' pooling."""
        if scale.ndim == 1:                      # one scale per sample
            scale = scale[:, None, None, None]
        n = len(down) + 1
        if guess_mode and not self.config.global_pool_conditions:
            steps = np.logspace(-1, 0, n).astype(np.float32)
            scales = [jnp.asarray(s) * scale for s in steps]
        else:
            scales = [scale] * n
        down = [r * s.astype(r.dtype) for r, s in zip(down, scales[:-1])]
        mid = mid * scales[-1].astype(mid.dtype)
        if self.config.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid
