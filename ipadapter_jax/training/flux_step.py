"""The FLUX IP-Adapter training step as pure functions: rectified flow.

Per sample: clean packed latents x0 (the VAE's, shifted and scaled), Gaussian
noise, a noise level sigma from a logit-normal distribution (u = sigmoid(n),
n ~ N(``logit_mean``, ``logit_std``); SD3 paper, section 3.1, and diffusers'
FLUX training scripts), moved by the resolution shift (FLUX's mu from the
number of image tokens, e^mu / (e^mu + 1/sigma - 1), the sampling schedule's)
or a fixed ``shift``; x_sigma = (1 - sigma) x0 + sigma noise; the target is the
velocity noise - x0; the transformer (frozen) predicts it with the adapter's
image tokens; MSE in float32. Conditioning dropout as the IP-Adapter paper:
one uniform r per sample, r < ``image_drop_rate`` zeroes the image
embedding, the next ``text_drop_rate`` puts the empty prompt's encodings,
the next ``both_drop_rate`` does both.

Only the adapter (its projection and every ``to_k_ip`` / ``to_v_ip``) is
differentiated; the transformer's weights are frozen input (sharded FSDP by
the task).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ipadapter_jax.ip_adapter.flux import FluxIPAdapter, flux_image_prompt
from ipadapter_jax.models.flux import FluxTransformer2DModel
from ipadapter_jax.schedulers.flow_match import calculate_shift


@dataclasses.dataclass(frozen=True)
class FlowStepConfig:
    """Static settings of the step (resolved before jit)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    # None: the resolution shift of the sampling schedule (mu from the image tokens); a number: a fixed
    # shift s, sigma -> s sigma / (1 + (s - 1) sigma) (1.0: none).
    shift: float | None = None
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    guidance: float = 1.0            # the embedded guidance of guidance-distilled transformers (dev)
    image_drop_rate: float = 0.05
    text_drop_rate: float = 0.05
    both_drop_rate: float = 0.05


class FluxTrainModels(nnx.Module):
    """The frozen transformer and the trained adapter, one graph."""

    def __init__(self, transformer: FluxTransformer2DModel, adapter: FluxIPAdapter):
        self.transformer = transformer
        self.adapter = adapter


# ``nnx.split(models, ADAPTER, ...)``: the trained parameters (the adapter's), then the frozen rest.
ADAPTER = nnx.All(nnx.Param, lambda path, _: path[0] == "adapter")


def shift_sigmas(u: jax.Array, cfg: FlowStepConfig, image_seq_len: int) -> jax.Array:
    """The noise levels of uniform-in-(0, 1) draws ``u`` after the configured shift."""
    if cfg.shift is None:
        mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                             cfg.max_shift)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return cfg.shift * u / (1 + (cfg.shift - 1) * u)


def draw(rng: jax.Array, batch_size: int, latent_shape: tuple, cfg: FlowStepConfig) -> dict:
    """The step's random draws: noise [B, S, C], sigma [B], keep_image / keep_text [B] (0 or 1)."""
    k_noise, k_sigma, k_drop = jax.random.split(rng, 3)
    u = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(k_sigma, (batch_size,)))
    r = jax.random.uniform(k_drop, (batch_size,))
    a, b, c = cfg.image_drop_rate, cfg.text_drop_rate, cfg.both_drop_rate
    drop_image = (r < a) | ((r >= a + b) & (r < a + b + c))
    drop_text = (r >= a) & (r < a + b + c)
    return {"noise": jax.random.normal(k_noise, latent_shape, jnp.float32),
            "sigma": shift_sigmas(u, cfg, latent_shape[1]),
            "keep_image": 1.0 - drop_image.astype(jnp.float32), "keep_text": 1.0 - drop_text.astype(jnp.float32)}


def flow_loss(models: FluxTrainModels, batch: dict, draws: dict, rope, cfg: FlowStepConfig) -> jax.Array:
    """MSE of the velocity prediction. ``batch``: ``latents`` (packed x0 [B, S, C]),
    ``context`` [B, L, D] / ``pooled`` [B, P] (the captions' T5 / CLIP encodings),
    ``empty_context`` [1, L, D] / ``empty_pooled`` [1, P] (the empty prompt's),
    ``image_embeds`` [B, E]; ``draws`` as ``draw`` gives."""
    x0 = batch["latents"].astype(jnp.float32)
    sigma = draws["sigma"][:, None, None]
    noisy = (1 - sigma) * x0 + sigma * draws["noise"]
    keep_text = draws["keep_text"]
    context = jnp.where(keep_text[:, None, None] > 0, batch["context"], batch["empty_context"])
    pooled = jnp.where(keep_text[:, None] > 0, batch["pooled"], batch["empty_pooled"])
    embeds = batch["image_embeds"] * draws["keep_image"][:, None]
    adapter = models.adapter
    tokens = adapter.project(embeds)[:, None]                      # [B, 1, T, C]
    prompt = flux_image_prompt(adapter, tokens, 1.0)
    guidance = None
    if models.transformer.config.guidance_embeds:
        guidance = jnp.full((x0.shape[0],), cfg.guidance, jnp.float32)
    pred = models.transformer(noisy, context, pooled, draws["sigma"], rope, guidance, ip=((adapter, prompt),))
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - (draws["noise"] - x0)))


def make_flux_train_step(graphdef, optimizer, cfg: FlowStepConfig):
    """``step(trainable, opt_state, frozen, batch, rope, rng) -> (trainable, opt_state, metrics)``:
    ``trainable`` the adapter's state, ``frozen`` the transformer's (``nnx.split(models, adapter_filter, ...)``)."""
    def step(trainable, opt_state, frozen, batch, rope, rng):
        draws = draw(rng, batch["latents"].shape[0], batch["latents"].shape, cfg)

        def loss_fn(params):
            return flow_loss(nnx.merge(graphdef, params, frozen), batch, draws, rope, cfg)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return step
