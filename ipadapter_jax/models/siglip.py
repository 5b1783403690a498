"""SigLIP's vision tower (transformers' ``SiglipVisionModel``) in Flax NNX: the
image encoder of InstantX's FLUX IP-Adapter (``google/siglip-so400m-patch14-384``).

Patches (a biased convolution) plus learned positions, no class token, the
CLIP encoder's pre-norm layers (``models.clip``, same names), a final
LayerNorm, and an attention-pooling head: one learned probe attends the
patch states (torch's ``nn.MultiheadAttention``: fused ``in_proj_weight``),
then LayerNorm and an MLP with a residual; its output is ``pooler_output``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.io.errors import BadArgument, BadFile
from ipadapter_jax.io.pretrained import PretrainedMixin, check_fields
from ipadapter_jax.models import layers
from ipadapter_jax.models.attention import dot_product_attention
from ipadapter_jax.models.clip import CLIPConfig, CLIPEncoder, CLIPMLP

_KINDS = {"hidden_size": "int", "intermediate_size": "int", "num_hidden_layers": "int",
          "num_attention_heads": "int", "num_channels": "int", "image_size": "int", "patch_size": "int",
          "hidden_act": "str", "layer_norm_eps": "pos", "vision_use_head": "bool"}


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """transformers' ``SiglipVisionConfig`` (defaults are its own)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "SigLIP vision config") -> "SiglipVisionConfig":
        """A ``SiglipVisionModel`` config, or a full ``SiglipModel`` one (its ``vision_config``)."""
        check_fields(cfg, {}, source)
        merged = dict(cfg["vision_config"]) if isinstance(cfg.get("vision_config"), dict) else dict(cfg)
        model_type = merged.get("model_type")
        if model_type is not None and model_type not in ("siglip_vision_model", "siglip"):
            raise BadFile(f"{source}: model_type is {model_type!r}, expected 'siglip_vision_model' (a SigLIP "
                          "vision tower, e.g. google/siglip-so400m-patch14-384)")
        check_fields(merged, _KINDS, source, skip_none=True)
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in merged.items() if k in names and v is not None})
        if config.hidden_size % config.num_attention_heads:
            raise BadFile(f"{source}: hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                          f"{config.num_attention_heads}")
        return config

    def encoder_config(self) -> CLIPConfig:
        """The same layers as CLIP's encoder: its config for ``CLIPEncoder`` / ``CLIPMLP``."""
        return CLIPConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                          num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                          hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
                          image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels)


class SiglipVisionOutput(NamedTuple):
    last_hidden_state: jax.Array   # [B, patches, D], after post_layernorm
    pooler_output: jax.Array       # [B, D], the attention-pooling head's (post_layernorm states if no head)


class SiglipVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.image_size = cfg.image_size
        self.patch_embedding = nnx.Conv(cfg.num_channels, cfg.hidden_size, (cfg.patch_size,) * 2,
                                        strides=cfg.patch_size, padding="VALID", dtype=dtype,
                                        param_dtype=jnp.float32, rngs=rngs)
        self.position_embedding = nnx.Embed((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size, rngs=rngs)

    def __call__(self, pixel_values):
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise BadArgument(f"pixel_values are {h}x{w}; this SigLIP tower takes {self.image_size}x"
                              f"{self.image_size} (NHWC) images")
        patches = self.patch_embedding(pixel_values)
        patches = patches.reshape(b, -1, patches.shape[-1])
        return patches + self.position_embedding.embedding[...][None].astype(patches.dtype)


class MultiheadAttention(nnx.Module):
    """torch's ``nn.MultiheadAttention`` (batch first): q / k / v from one fused
    ``in_proj_weight`` [3D, D] and ``in_proj_bias``, then ``out_proj``."""

    def __init__(self, dim: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.heads, self.dtype = heads, dtype
        init = jax.nn.initializers.lecun_normal()
        self.in_proj_weight = nnx.Param(init(rngs.params(), (3 * dim, dim), jnp.float32))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * dim,), jnp.float32))
        self.out_proj = layers.linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, query, key_value):
        w, bias = self.in_proj_weight[...], self.in_proj_bias[...]
        d = w.shape[1]
        q, k, v = ((x @ w[i * d:(i + 1) * d].T.astype(x.dtype) + bias[i * d:(i + 1) * d].astype(x.dtype))
                   for i, x in enumerate((query, key_value, key_value)))
        split = (lambda t: t.reshape(*t.shape[:2], self.heads, -1))
        out = dot_product_attention(split(q), split(k), split(v), scale=(d // self.heads) ** -0.5)
        return self.out_proj(out.reshape(*out.shape[:2], -1))


class SiglipMultiheadAttentionPoolingHead(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.probe = nnx.Param(jax.random.normal(rngs.params(), (1, 1, cfg.hidden_size)))
        self.attention = MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, dtype=dtype, rngs=rngs)
        self.layernorm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(cfg.encoder_config(), dtype=dtype, rngs=rngs)

    def __call__(self, states):
        probe = jnp.broadcast_to(self.probe[...].astype(states.dtype), (states.shape[0], 1, states.shape[-1]))
        h = self.attention(probe, states)
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class SiglipVisionTransformer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, backend: str, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embeddings = SiglipVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg.encoder_config(), dtype=dtype, backend=backend, rngs=rngs)
        self.post_layernorm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.head = SiglipMultiheadAttentionPoolingHead(cfg, dtype=dtype, rngs=rngs) if cfg.vision_use_head \
            else None

    def __call__(self, pixel_values) -> SiglipVisionOutput:
        states = self.encoder(self.embeddings(pixel_values.astype(self.dtype)))[-1]
        last = self.post_layernorm(states)
        pooled = self.head(last) if self.head is not None else last
        return SiglipVisionOutput(last.astype(jnp.float32), pooled.astype(jnp.float32))


def _rename(key: str, value):
    """A full ``SiglipModel`` checkpoint loads its vision tower: the text tower and
    the contrastive scalars are ignored; transformers 5's bare vision files lack the
    ``vision_model.`` prefix."""
    if key.startswith("text_model.") or key in ("logit_scale", "logit_bias") or key.endswith("position_ids"):
        return None
    if key.startswith(("embeddings.", "encoder.", "post_layernorm.", "head.")):
        key = "vision_model." + key
    return key, value


class SiglipVisionModel(PretrainedMixin, nnx.Module):
    """``model(pixel_values) -> SiglipVisionOutput`` (NHWC pixels in [-1, 1], ``preprocess_siglip``)."""

    weights_name = "model"
    rename_key = staticmethod(_rename)

    def __init__(self, config: SiglipVisionConfig | dict, *, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        cfg = config if isinstance(config, SiglipVisionConfig) else SiglipVisionConfig.from_dict(config)
        self.config = cfg
        self.config_json = json.dumps({**dataclasses.asdict(cfg), "model_type": "siglip_vision_model"})
        self.vision_model = SiglipVisionTransformer(cfg, dtype=dtype, backend=attention_backend, rngs=rngs)

    @classmethod
    def parse_config(cls, config: dict) -> SiglipVisionConfig:
        return SiglipVisionConfig.from_dict(config)

    def __call__(self, pixel_values) -> SiglipVisionOutput:
        return self.vision_model(pixel_values)
