"""CLIP text and vision towers (transformers ``CLIPTextModel``,
``CLIPTextModelWithProjection``, ``CLIPVisionModelWithProjection``) in Flax NNX.

Attribute names mirror transformers (``text_model.encoder.layers[i].self_attn.q_proj``,
``vision_model.pre_layrnorm`` with its historical spelling), so a checkpoint
loads by name. Pixel values are NHWC, already normalised (see the image
processor). Every output carries all hidden states: under ``jit`` the unused
ones cost nothing, and IP-Adapter Plus needs ``hidden_states[-2]``.

The same classes cover SDXL's towers: text encoder 1 (CLIP ViT-L,
``CLIPTextModel``) and 2 (OpenCLIP bigG, ``CLIPTextModelWithProjection``,
gelu), whose ``hidden_states[-2]`` make the context and whose encoder-2
``text_embeds`` is the pooled prompt; and the ViT-bigG/14 image encoder
(width 1664, 16 heads of 104, projection 1280).
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.io.errors import BadArgument, BadFile, Unsupported
from ipadapter_jax.io.pretrained import PretrainedMixin, check_fields
from ipadapter_jax.models import layers
from ipadapter_jax.models.attention import dot_product_attention, resolve_backend


# The type / range of each CLIPConfig field (``io.pretrained.check_fields`` kinds).
_CLIP_KINDS = {
    "hidden_size": "int", "intermediate_size": "int", "projection_dim": "int", "num_hidden_layers": "int",
    "num_attention_heads": "int", "hidden_act": "str", "layer_norm_eps": "pos", "vocab_size": "int",
    "max_position_embeddings": "int", "eos_token_id": "int0", "image_size": "int", "patch_size": "int",
    "num_channels": "int",
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """One tower's config (transformers ``CLIPTextConfig`` / ``CLIPVisionConfig``)."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # text
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    # vision
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3

    @classmethod
    def from_dict(cls, cfg: dict, tower: str) -> "CLIPConfig":
        """``tower`` is ``"text"`` or ``"vision"``; a full ``CLIPModel`` config
        (with ``text_config``/``vision_config``) is accepted too."""
        source = f"CLIP {tower} config"
        check_fields(cfg, {}, source)
        nested = cfg.get(f"{tower}_config")
        merged = dict(nested) if isinstance(nested, dict) else dict(cfg)
        if isinstance(nested, dict) and "projection_dim" in cfg:
            merged["projection_dim"] = cfg["projection_dim"]
        model_type = merged.get("model_type")
        expected = f"clip_{tower}_model"
        if model_type is not None and model_type not in (expected, "clip"):
            raise BadFile(f"config model_type is {model_type!r}, expected {expected!r} for a CLIP {tower} tower")
        check_fields(merged, _CLIP_KINDS, source, skip_none=True)
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in merged.items() if k in names and v is not None})
        if tower == "vision" and config.patch_size > config.image_size:
            raise BadFile(f"{source}: patch_size {config.patch_size} is larger than image_size "
                          f"{config.image_size} (no patches)")
        if config.hidden_size % config.num_attention_heads:
            raise BadFile(f"{source}: hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                             f"{config.num_attention_heads}")
        try:
            layers.activation(config.hidden_act)  # fail early on an unknown activation
        except BadArgument as e:
            raise Unsupported(f"{source}: hidden_act: {e}") from None
        return config


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, backend: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.head_dim = d // self.heads
        self.backend = resolve_backend(backend)
        self.q_proj = layers.linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = layers.linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = layers.linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = layers.linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask=None):
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.heads, self.head_dim)
        h = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                  scale=self.head_dim ** -0.5, mask=mask, backend=self.backend)
        return self.out_proj(h.reshape(b, n, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, rngs: nnx.Rngs):
        self.act = layers.activation(cfg.hidden_act)
        self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, backend: str, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.layer_norm1 = layers.layer_norm(cfg.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, backend=backend, rngs=rngs)
        self.layer_norm2 = layers.layer_norm(cfg.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, backend: str, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, backend=backend, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, mask=None) -> tuple[jax.Array, ...]:
        """Returns every hidden state: the input, then each layer's output."""
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return tuple(states)


# --------------------------------------------------------------------------- text

class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array   # [B, S, D], after final_layer_norm
    pooler_output: jax.Array       # [B, D], the EOS token's state
    hidden_states: tuple           # num_layers + 1 arrays, before final_layer_norm
    text_embeds: jax.Array | None = None  # [B, projection_dim], WithProjection only


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

    def __call__(self, input_ids):
        return self.token_embedding(input_ids) + self.position_embedding.embedding[...][: input_ids.shape[1]][None]


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, backend: str, rngs: nnx.Rngs):
        self.eos_token_id = cfg.eos_token_id
        self.max_length = cfg.max_position_embeddings
        self.dtype = dtype
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, backend=backend, rngs=rngs)
        self.final_layer_norm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        b, n = input_ids.shape
        if n > self.max_length:
            raise BadArgument(f"input_ids has {n} tokens; this text encoder takes at most {self.max_length}")
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        states = self.encoder(self.embeddings(input_ids).astype(self.dtype), mask)
        last = self.final_layer_norm(states[-1])
        if self.eos_token_id == 2:
            # Legacy configs (SD 1.x, both SDXL encoders) name a wrong EOS id;
            # transformers then takes the (first) highest token id, which is the
            # real EOS (49407) whether the tokenizer pads with EOS or with "!" (id 0).
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = last[jnp.arange(b), eos]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)


def _drop_keys(*prefixes: str, tower: str = "text_model."):
    """A rename hook that ignores buffers and the other tower's weights, so a
    full ``CLIPModel`` checkpoint loads into one tower. transformers 5 saves a
    bare ``CLIPTextModel`` without the ``text_model.`` prefix that SD
    checkpoints (and transformers 4) use; both load."""

    def rename(key, value):
        if key.endswith("position_ids") or key == "logit_scale" or key.startswith(prefixes):
            return None
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.", "pre_layrnorm.", "post_layernorm.")):
            key = tower + key
        return key, value

    return staticmethod(rename)


class _Tower(PretrainedMixin):
    """What the text and vision models share: weights name, config parsing
    for their tower kind, and the config kept as JSON for ``save_pretrained``."""

    weights_name = "model"
    kind = "text"                    # "text" or "vision": which CLIPConfig defaults apply
    model_type = "clip_text_model"

    @classmethod
    def parse_config(cls, config: dict) -> CLIPConfig:
        return CLIPConfig.from_dict(config, cls.kind)

    def _set_config(self, config: CLIPConfig | dict) -> CLIPConfig:
        cfg = config if isinstance(config, CLIPConfig) else self.parse_config(config)
        self.config = cfg
        self.config_json = json.dumps({**dataclasses.asdict(cfg), "model_type": self.model_type})
        return cfg


class CLIPTextModel(_Tower, nnx.Module):
    """``model(input_ids, attention_mask=None) -> CLIPTextOutput``."""

    rename_key = _drop_keys("vision_model.", "visual_projection.", "text_projection.")

    def __init__(self, config: CLIPConfig | dict, *, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        cfg = self._set_config(config)
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, backend=attention_backend, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask)


class CLIPTextModelWithProjection(CLIPTextModel):
    """Adds ``text_projection`` (bias-free) of the pooled output: ``text_embeds``."""

    rename_key = _drop_keys("vision_model.", "visual_projection.")

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "auto", rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, attention_backend=attention_backend, rngs=rngs)
        self.text_projection = layers.linear(self.config.hidden_size, self.config.projection_dim, bias=False,
                                             dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask)
        return out._replace(text_embeds=self.text_projection(out.pooler_output))


# --------------------------------------------------------------------------- vision

class CLIPVisionOutput(NamedTuple):
    image_embeds: jax.Array        # [B, projection_dim], projected CLS (not L2-normalised)
    last_hidden_state: jax.Array   # [B, 1 + patches, D], no post-LN
    pooler_output: jax.Array       # [B, D], post-LN CLS
    hidden_states: tuple           # num_layers + 1; [0] is after pre_layrnorm


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, rngs: nnx.Rngs):
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.hidden_size,)) * 0.02)
        self.patch_embedding = nnx.Conv(cfg.num_channels, cfg.hidden_size, (cfg.patch_size,) * 2,
                                        strides=cfg.patch_size, padding="VALID", use_bias=False, dtype=dtype,
                                        param_dtype=jnp.float32, rngs=rngs)
        self.position_embedding = nnx.Embed(num_positions, cfg.hidden_size, rngs=rngs)

    def __call__(self, pixel_values):
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise BadArgument(f"pixel_values are {h}x{w}; this vision tower takes "
                             f"{self.image_size}x{self.image_size} (NHWC) images")
        patches = self.patch_embedding(pixel_values).reshape(b, -1, self.class_embedding.shape[0])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...][None]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, backend: str, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.dtype = dtype
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = layers.layer_norm(cfg.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, backend=backend, rngs=rngs)
        self.post_layernorm = layers.layer_norm(cfg.hidden_size, eps=eps, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values):
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values.astype(self.dtype))))
        pooled = self.post_layernorm(states[-1][:, 0])
        return states, pooled


class CLIPVisionModelWithProjection(_Tower, nnx.Module):
    """``model(pixel_values) -> CLIPVisionOutput`` (pixel_values NHWC, normalised)."""

    kind = "vision"
    model_type = "clip_vision_model"
    rename_key = _drop_keys("text_model.", "text_projection.", tower="vision_model.")

    def __init__(self, config: CLIPConfig | dict, *, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        cfg = self._set_config(config)
        self.vision_model = CLIPVisionTransformer(cfg, dtype=dtype, backend=attention_backend, rngs=rngs)
        self.visual_projection = layers.linear(cfg.hidden_size, cfg.projection_dim, bias=False, dtype=dtype,
                                               rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        states, pooled = self.vision_model(pixel_values)
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled).astype(jnp.float32),
                                last_hidden_state=states[-1], pooler_output=pooled, hidden_states=states)
