"""AutoencoderKL (diffusers) in Flax NNX, NHWC: ``encoder`` -> ``quant_conv`` ->
diagonal Gaussian over latents; ``post_quant_conv`` -> ``decoder``."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ipadapter_jax.io.errors import BadArgument, BadFile, Unsupported
from ipadapter_jax.io.pretrained import PretrainedMixin, check_fields, check_groups
from ipadapter_jax.models import layers
from ipadapter_jax.models.attention import Attention
from ipadapter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Fields of a diffusers ``vae/config.json`` (defaults are diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    # The type / range of each field (``io.pretrained.check_fields`` kinds).
    _KINDS = {
        "in_channels": "int", "out_channels": "int", "down_block_types": "list[str]",
        "up_block_types": "list[str]", "block_out_channels": "list[int]", "layers_per_block": "int",
        "act_fn": "str", "latent_channels": "int", "norm_num_groups": "int", "sample_size": "int|list[int]",
        "scaling_factor": "pos", "shift_factor": "num?", "use_quant_conv": "bool",
        "use_post_quant_conv": "bool", "mid_block_add_attention": "bool",
    }

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "vae config") -> "VAEConfig":
        check_fields(cfg, cls._KINDS, source)
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for t in cfg.get(key, ()):
                if t != allowed:
                    raise Unsupported(f"{source}: unknown {key[:-6]} type {t!r}; supported: {allowed!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names})
        if not len(config.down_block_types) == len(config.up_block_types) == len(config.block_out_channels):
            raise BadFile(f"{source}: down_block_types, up_block_types and block_out_channels must have the same "
                          f"length, got {len(config.down_block_types)}, {len(config.up_block_types)}, "
                          f"{len(config.block_out_channels)}")
        try:
            layers.activation(config.act_fn)
        except BadArgument as e:
            raise Unsupported(f"{source}: act_fn: {e}") from None
        check_groups(config.block_out_channels, config.norm_num_groups, source)
        return config


@struct.dataclass
class DiagonalGaussian:
    """The VAE posterior: ``mean`` and ``logvar`` ([B, h, w, latent_channels])."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class UNetMidBlock2D(nnx.Module):
    """resnet -> single-head spatial self-attention -> resnet, without time conditioning."""

    def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool, dtype, backend: str,
                 rngs: nnx.Rngs):
        def resnet():
            return ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=1e-6, act_fn=act_fn,
                                 dtype=dtype, rngs=rngs)

        self.resnets = nnx.List([resnet(), resnet()])
        self.attentions = nnx.List([
            Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, norm_eps=1e-6,
                      residual_connection=True, dtype=dtype, backend=backend, rngs=rngs)
        ]) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    """``DownEncoderBlock2D``."""

    def __init__(self, in_channels, out_channels, *, num_layers, add_downsample, groups, act_fn, dtype, rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=1e-6, act_fn=act_fn, dtype=dtype, rngs=rngs) for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype, rngs=rngs)]
                                     ) if add_downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nnx.Module):
    """``UpDecoderBlock2D``."""

    def __init__(self, in_channels, out_channels, *, num_layers, add_upsample, groups, act_fn, dtype, rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=1e-6, act_fn=act_fn, dtype=dtype, rngs=rngs) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, backend, rngs: nnx.Rngs):
        boc, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.act = layers.activation(cfg.act_fn)
        self.conv_in = layers.conv(cfg.in_channels, boc[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(boc[max(i - 1, 0)], boc[i], num_layers=cfg.layers_per_block,
                         add_downsample=i < len(boc) - 1, groups=groups, act_fn=cfg.act_fn, dtype=dtype, rngs=rngs)
            for i in range(len(boc))])
        self.mid_block = UNetMidBlock2D(boc[-1], groups=groups, act_fn=cfg.act_fn,
                                        add_attention=cfg.mid_block_add_attention, dtype=dtype, backend=backend,
                                        rngs=rngs)
        self.conv_norm_out = layers.group_norm(groups, boc[-1], eps=1e-6, dtype=dtype, rngs=rngs)
        self.conv_out = layers.conv(boc[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, backend, rngs: nnx.Rngs):
        boc, groups = cfg.block_out_channels, cfg.norm_num_groups
        rev = boc[::-1]
        self.act = layers.activation(cfg.act_fn)
        self.conv_in = layers.conv(cfg.latent_channels, boc[-1], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(boc[-1], groups=groups, act_fn=cfg.act_fn,
                                        add_attention=cfg.mid_block_add_attention, dtype=dtype, backend=backend,
                                        rngs=rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(rev[max(i - 1, 0)], rev[i], num_layers=cfg.layers_per_block + 1,
                         add_upsample=i < len(rev) - 1, groups=groups, act_fn=cfg.act_fn, dtype=dtype, rngs=rngs)
            for i in range(len(rev))])
        self.conv_norm_out = layers.group_norm(groups, boc[0], eps=1e-6, dtype=dtype, rngs=rngs)
        self.conv_out = layers.conv(boc[0], cfg.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(PretrainedMixin, nnx.Module):
    """``encode(images) -> DiagonalGaussian``; ``decode(latents) -> images``.

    Images are NHWC in [-1, 1]; latents are the raw (unscaled) VAE latents:
    multiply by ``scaling_factor`` before the UNet and divide before ``decode``,
    as diffusers does.
    """

    weights_name = "diffusion_pytorch_model"

    def __init__(self, config: VAEConfig | dict, *, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        self.config = cfg
        self.config_json = json.dumps(dataclasses.asdict(cfg))
        self.dtype = dtype
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, dtype=dtype, backend=attention_backend, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, backend=attention_backend, rngs=rngs)
        self.quant_conv = layers.conv(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = (layers.conv(lc, lc, 1, dtype=dtype, rngs=rngs)
                                if cfg.use_post_quant_conv else None)

    @classmethod
    def parse_config(cls, config: dict) -> VAEConfig:
        return VAEConfig.from_dict(config)

    @staticmethod
    def rename_key(key: str, value):
        # Checkpoints saved before diffusers 0.14 name the mid-block attention
        # query/key/value/proj_attn, sometimes as 1x1 convolutions.
        parts = key.split(".")
        if len(parts) >= 2 and ".attentions." in key and parts[-2] in _LEGACY_ATTENTION_NAMES:
            parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
            return ".".join(parts), value
        return key, value

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, *, sample_posterior: bool = False,
                 key: jax.Array | None = None) -> jax.Array:
        posterior = self.encode(images)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z)
