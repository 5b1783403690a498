"""Losses of the models the demo trains from scratch (the IP-Adapter / UNet
diffusion loss lives in ``step.py``): CLIP's symmetric contrastive loss and
the VAE's reconstruction + KL loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# CLIP's (OpenAI) pixel normalisation, as CLIPImageProcessor applies it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(images_uint8: jax.Array) -> jax.Array:
    """uint8 NHWC at the encoder's resolution -> CLIP pixel values."""
    x = images_uint8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def clip_contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array,
                          same_caption: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE over a batch (Radford et al. 2021).

    ``same_caption[i, j]`` marks pairs whose captions are identical: they are
    all positives (the target spreads evenly over them), since a procedural
    dataset repeats captions inside a batch. Returns ``(loss, metrics)``.
    """
    t = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    v = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(logit_scale, jnp.log(100.0)))
    logits = scale * t @ v.T                      # [text, image]
    n = logits.shape[0]
    targets = jnp.eye(n) if same_caption is None else same_caption.astype(jnp.float32)
    targets = targets / targets.sum(axis=1, keepdims=True)
    loss_t = optax.softmax_cross_entropy(logits, targets).mean()
    loss_i = optax.softmax_cross_entropy(logits.T, targets.T / targets.T.sum(axis=1, keepdims=True)).mean()
    accuracy = jnp.mean(targets[jnp.arange(n), jnp.argmax(logits, axis=1)] > 0)
    return (loss_t + loss_i) / 2, {"accuracy": accuracy, "logit_scale": scale}


def vae_loss(vae, pixels: jax.Array, key: jax.Array, kl_weight: float) -> tuple[jax.Array, dict]:
    """L1 + L2 reconstruction (per-pixel means) + ``kl_weight`` x KL(q(z|x) || N(0, I))
    (per-latent-element mean). ``pixels`` NHWC in [-1, 1]. No perceptual or GAN
    term: the demo's flat-coloured shapes do not need them."""
    posterior = vae.encode(pixels)
    recon = vae.decode(posterior.sample(key)).astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(recon - pixels))
    l2 = jnp.mean((recon - pixels) ** 2)
    kl = 0.5 * jnp.mean(posterior.mean ** 2 + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar)
    return l1 + l2 + kl_weight * kl, {"l1": l1, "l2": l2, "kl": kl}
