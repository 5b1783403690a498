"""The T5 encoder (transformers' ``T5EncoderModel``) in Flax NNX: FLUX's
second text encoder (T5 v1.1 XXL).

Pre-norm blocks with RMS layer norms (no mean, no bias), unscaled attention
logits plus a learned relative-position bias (bucketed distances, computed in
the first block and shared by all), and a feed-forward that is gated
(``wi_0`` through the activation times ``wi_1``, T5 v1.1's ``gated-gelu``) or
plain (``relu``, T5 1.0). transformers dropped its Flax T5, so this is
written from its PyTorch model; names mirror it, so checkpoints load by rule.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.io.errors import Unsupported
from ipadapter_jax.io.pretrained import PretrainedMixin, check_fields
from ipadapter_jax.models import layers


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Fields of a transformers T5 ``config.json`` that the encoder reads."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    _KINDS = {"vocab_size": "int", "d_model": "int", "d_kv": "int", "d_ff": "int", "num_layers": "int",
              "num_heads": "int", "relative_attention_num_buckets": "int",
              "relative_attention_max_distance": "int", "layer_norm_epsilon": "pos", "feed_forward_proj": "str"}

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "T5 config") -> "T5Config":
        check_fields(cfg, cls._KINDS, source)
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in cfg.items() if k in names})
        parts = config.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in layers.ACTIVATIONS:
            raise Unsupported(f"{source}: feed_forward_proj {config.feed_forward_proj!r}; expected ACT or gated-ACT "
                              f"with ACT one of {sorted(layers.ACTIVATIONS)}")
        return config

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps T5 v1.1's "gated-gelu" to the tanh approximation.
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[length, length] bucket of each (query, key) distance, bidirectional: half
    the buckets per direction, exact up to a quarter of them, then logarithmic
    up to ``max_distance`` (float32 arithmetic in transformers' order, so the
    boundaries fall where they fall there)."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """RMS norm: x * rsqrt(mean(x^2) + eps) * weight (no mean, no bias), in float32."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        variance = jnp.mean(xf * xf, axis=-1, keepdims=True)
        return (self.weight[...] * (xf * jax.lax.rsqrt(variance + self.eps))).astype(x.dtype)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, *, dtype, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = layers.linear(cfg.d_model, inner, bias=False, dtype=dtype, rngs=rngs)
        self.k = layers.linear(cfg.d_model, inner, bias=False, dtype=dtype, rngs=rngs)
        self.v = layers.linear(cfg.d_model, inner, bias=False, dtype=dtype, rngs=rngs)
        self.o = layers.linear(inner, cfg.d_model, bias=False, dtype=dtype, rngs=rngs)
        self.relative_attention_bias = (nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                                  param_dtype=jnp.float32, rngs=rngs) if has_bias else None)

    def position_bias(self, length: int) -> jax.Array:
        """[1, H, L, L] from the bucket table (a constant of the sequence length)."""
        buckets = relative_position_buckets(length, self.cfg.relative_attention_num_buckets,
                                            self.cfg.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(jnp.asarray(buckets)), (2, 0, 1))[None]

    def __call__(self, x, bias, mask=None):
        b, length, _ = x.shape
        heads = self.cfg.num_heads

        def split(t):
            return t.reshape(b, length, heads, -1)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        if mask is not None:    # [B, L] 1 = attend
            logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, -1)
        return self.o(out)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, *, dtype, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, has_bias, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x, bias, mask=None):
        return x + self.SelfAttention(self.layer_norm(x), bias, mask)


class T5DenseActDense(nnx.Module):
    """``wi`` -> act -> ``wo``, or gated: act(``wi_0``) * ``wi_1`` -> ``wo``."""

    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.act = layers.activation(cfg.activation)
        if cfg.gated:
            self.wi_0 = layers.linear(cfg.d_model, cfg.d_ff, bias=False, dtype=dtype, rngs=rngs)
            self.wi_1 = layers.linear(cfg.d_model, cfg.d_ff, bias=False, dtype=dtype, rngs=rngs)
        else:
            self.wi = layers.linear(cfg.d_model, cfg.d_ff, bias=False, dtype=dtype, rngs=rngs)
        self.wo = layers.linear(cfg.d_ff, cfg.d_model, bias=False, dtype=dtype, rngs=rngs)
        self.gated = cfg.gated

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseActDense(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([T5LayerSelfAttention(cfg, has_bias, dtype=dtype, rngs=rngs),
                               T5LayerFF(cfg, dtype=dtype, rngs=rngs)])

    def __call__(self, x, bias, mask=None):
        return self.layer[1](self.layer[0](x, bias, mask))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.block = nnx.List([T5Block(cfg, i == 0, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x, mask=None):
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        for block in self.block:
            x = block(x, bias, mask)
        return self.final_layer_norm(x)


class T5EncoderModel(PretrainedMixin, nnx.Module):
    """``model(input_ids[, attention_mask]) -> last_hidden_state`` [B, L, d_model]
    (float32). FLUX passes no mask: padding tokens are attended, as diffusers."""

    weights_name = "model"

    def __init__(self, config: T5Config | dict, *, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        del attention_backend   # the position bias needs the explicit softmax
        cfg = config if isinstance(config, T5Config) else T5Config.from_dict(config)
        self.config = cfg
        self.config_json = json.dumps(dataclasses.asdict(cfg))
        self.dtype = dtype
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, rngs=rngs)
        self.encoder = T5Stack(cfg, dtype=dtype, rngs=rngs)

    @classmethod
    def parse_config(cls, config: dict) -> T5Config:
        return T5Config.from_dict(config)

    @staticmethod
    def rename_key(key: str, value):
        # The encoder's embedding is tied to ``shared``; files hold either name or both.
        return ("shared.weight", value) if key == "encoder.embed_tokens.weight" else (key, value)

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        x = self.shared(jnp.asarray(input_ids)).astype(self.dtype)
        return self.encoder(x, attention_mask).astype(jnp.float32)
