"""The IP-Adapter training step as pure functions (paper section 4.1.2 and the
official tutorial_train scripts).

Per sample: VAE-encode the image (or take cached latents) and scale them;
draw t ~ U{0..999} and Gaussian noise; DDPM ``add_noise``; encode the caption
with the frozen text encoder (or take cached embeddings); encode the reference
image with the frozen CLIP vision tower (or take cached embeddings); apply the
conditioning dropout (one uniform r per sample: r < 0.05 image dropped,
0.05 <= r < 0.10 caption set to "", 0.10 <= r < 0.15 both); project the image
embedding to tokens; predict with the UNet and its image branches; MSE in
float32 against the noise (or the velocity for v-prediction).

With no adapter attached the same step trains a text-to-image UNet (the
demo's base model): no image branch, and the trainable rule selects UNet
parameters. With ``image_conditioning="concat"`` the adapter's tokens are
appended to the text sequence instead (the paper's "simple adapter" ablation).

Only the parameters whose path matches ``trainable`` (a regex over
"/"-joined state paths, default the attached adapter: image projection and
``to_k_ip``/``to_v_ip``) are differentiated and updated; everything else is
frozen input. ``train_step`` is one jittable function of
``(trainable, opt_state, frozen, batch, rng, step)``.

The text conditioning is the base model's family's (``ipadapter_jax.families``,
found from the UNet's config in ``Trainer.create``; the function in
``families.text`` the pipelines use too): SD 1.x / 2.x take the text
encoder's last hidden state; SDXL takes both encoders' ``hidden_states[-2]``
side by side, encoder 2's pooled ``text_embeds`` and the batch's per-image
``time_ids`` (original size + crop top-left + target size), as the official
``tutorial_train_sdxl.py`` does (a dropped caption is the empty prompt through
both encoders, pooled included).
``noise_offset`` (default 0: off) adds ``noise_offset * N(0, 1)`` per sample
and channel to the noise.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ipadapter_jax import families, schedulers
from ipadapter_jax.families import Family
from ipadapter_jax.families.text import TEXT_CONDITIONING, added_conditioning
from ipadapter_jax.io.errors import BadArgument, Incompatible
from ipadapter_jax.models.conditioning import ImagePrompt, UNetConditioning

ADAPTER_ONLY = r"^ip_adapters/"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (resolved in Python before jit)."""

    prediction_type: str = "epsilon"          # or "v_prediction"
    # What the adapter projects (``variants.Variant.input_kind``): "image_embeds" | "hidden_states" |
    # "face_id" (the batch's ``id_embeds``) | "face_id+hidden_states" (and the face crop's hidden states).
    image_input: str = "image_embeds"
    image_drop_rate: float = 0.05
    text_drop_rate: float = 0.05
    both_drop_rate: float = 0.05
    num_train_timesteps: int = 1000
    scaling_factor: float = 0.18215
    # How the adapter's image tokens reach the UNet: "decoupled" (the paper: separate
    # to_k_ip/to_v_ip in every cross-attention) or "concat" (the paper's "simple
    # adapter" ablation: tokens appended to the text sequence of the frozen
    # cross-attention). Ignored when no adapter is attached (text-only UNet training).
    image_conditioning: str = "decoupled"
    # > 0: noise += noise_offset * N(0, 1) of shape [B, 1, 1, C] (the official scripts' --noise_offset).
    noise_offset: float = 0.0
    # > 0: min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    # Weighting Strategy"; diffusers' training scripts' --snr_gamma); 0: the paper's plain MSE.
    snr_gamma: float = 0.0
    # Which cross-attention layers have an image branch (1.0 / 0.0 per layer, processor order;
    # ``ip_adapter.image_layer_mask``); None: all of them.
    image_layer_scale: tuple | None = None


def diffusion_loss(pred: jax.Array, target: jax.Array, alphas_cumprod: jax.Array, timesteps: jax.Array, *,
                   prediction_type: str = "epsilon", snr_gamma: float = 0.0) -> jax.Array:
    """MSE of a prediction [B, ...]; with ``snr_gamma`` > 0 each sample's MSE is
    weighted by min(SNR(t), gamma) / SNR(t) (epsilon targets) or / (SNR(t) + 1)
    (v-prediction), SNR(t) = alpha_bar_t / (1 - alpha_bar_t), as diffusers'
    training scripts weight it (``--snr_gamma``)."""
    if not snr_gamma:
        return jnp.mean((pred - target) ** 2)
    per_sample = jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
    alpha_bar = alphas_cumprod[timesteps]
    snr = alpha_bar / (1.0 - alpha_bar)
    weight = jnp.minimum(snr, snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)
    return jnp.mean(per_sample * weight)


class TextConditioning(NamedTuple):
    """The text side of a UNet call with added conditioning (SDXL): the
    cross-attention context and ``{"text_embeds": pooled, "time_ids"}``."""

    context: jax.Array
    added_cond: dict | None = None


def text_conditioning(trainer: "Trainer", frozen, batch: dict, drop_text: jax.Array):
    """The family's text conditioning (``families.text``, as the pipelines use
    it) with dropped captions replaced: the context [B, 77, C] (SD 1.x / 2.x),
    or a ``TextConditioning`` for families with added conditioning (SDXL: both
    encoders' ``hidden_states[-2]`` side by side, encoder 2's pooled
    ``text_embeds``, the batch's per-image ``time_ids`` [B, 6]).

    batch: ``input_ids`` [B, 77] (``input_ids_2`` for a second encoder) and
    ``empty_text`` (the ids of "": [77], or [n, 77] for n encoders); or cached
    ``text_embeds`` [B, 77, C] with ``empty_text`` [77, C] (its embedding), and
    for added conditioning ``pooled_text_embeds`` [B, P] / ``empty_pooled`` [P].
    """
    family = trainer.family
    if "text_embeds" in batch:
        context = jnp.where(drop_text[:, None, None], batch["empty_text"][None], batch["text_embeds"])
        pooled = (jnp.where(drop_text[:, None], batch["empty_pooled"][None], batch["pooled_text_embeds"])
                  if "pooled_text_embeds" in batch else None)
    else:
        empty = batch["empty_text"].reshape(-1, batch["empty_text"].shape[-1])
        keys = ["input_ids"] + [f"input_ids_{i + 2}" for i in range(len(family.text) - 1)]
        ids = [jnp.where(drop_text[:, None], empty[i][None], batch[key]) for i, key in enumerate(keys)]
        encoders = [trainer._module(slot.component, frozen) for slot in family.text]
        context, pooled = TEXT_CONDITIONING[family.text_conditioning](encoders, ids)
    added = added_conditioning(family, None if pooled is None else pooled.astype(jnp.float32),
                               None if family.added_conditioning is None else
                               jnp.asarray(batch["time_ids"], jnp.float32))
    return context if added is None else TextConditioning(context, added)


def path_filter(pattern: str) -> Callable:
    """An nnx filter selecting ``Param``s whose "/"-joined path matches ``pattern``."""
    regex = re.compile(pattern)

    def select(path, value) -> bool:
        return isinstance(value, nnx.Param) and bool(regex.search("/".join(str(p) for p in path)))

    return select


def _check_text_encoders(family: Family, unet, text_encoder, text_encoder_2) -> None:
    """The encoders given fit ``family`` and the UNet (both or none, for cached text embeddings)."""
    given = [e for e in (text_encoder, text_encoder_2) if e is not None]
    if text_encoder_2 is not None and len(family.text) < 2:
        raise BadArgument(f"text_encoder_2 is given but the UNet is an {family.title} UNet, which uses one text "
                          "encoder")
    if given and len(given) != len(family.text):
        raise BadArgument(f"an {family.title} UNet needs {len(family.text)} text encoders "
                          f"({', '.join(s.component for s in family.text)}), or none with cached text embeddings")
    if family.added_conditioning is None or text_encoder_2 is None:
        return
    pooled = getattr(text_encoder_2.config, "projection_dim", None)
    if not hasattr(text_encoder_2, "text_projection") or pooled is None:
        raise BadArgument("text_encoder_2 must be a CLIPTextModelWithProjection (SDXL pools its projected "
                          "text_embeds)")
    widths = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    added = pooled + 6 * unet.config.addition_time_embed_dim
    expected = unet.config.projection_class_embeddings_input_dim
    if widths not in np.ravel(unet.config.cross_attention_dim) or added != expected:
        raise Incompatible(
            f"the text encoders do not fit this SDXL UNet: hidden sizes {text_encoder.config.hidden_size} + "
            f"{text_encoder_2.config.hidden_size} = {widths} (UNet cross_attention_dim "
            f"{unet.config.cross_attention_dim}); pooled {pooled} + 6 x {unet.config.addition_time_embed_dim} = "
            f"{added} (UNet projection_class_embeddings_input_dim "
            f"{unet.config.projection_class_embeddings_input_dim})")


@dataclasses.dataclass
class Trainer:
    """Graph definitions of the frozen encoders and of the UNet (with its attached
    adapter), and the pure functions over their states.

    ``frozen`` holds ``{"unet": rest-of-UNet state, "vae", "text_encoder",
    "image_encoder"}`` (encoders may be absent when the batch carries cached
    latents / embeddings); ``trainable`` is the UNet state selected by the rule.
    """

    unet_graphdef: Any
    encoder_graphdefs: dict
    config: StepConfig
    optimizer: optax.GradientTransformation
    alphas_cumprod: np.ndarray
    vae_factor: int = 8
    latent_channels: int = 4
    has_adapter: bool = True
    family: Family | None = None            # the base model's (``ipadapter_jax.families``; set by ``create``)

    @classmethod
    def create(cls, unet, *, vae=None, text_encoder=None, image_encoder=None, optimizer=None,
               trainable: str = ADAPTER_ONLY, config: StepConfig = StepConfig(),
               scheduler_config: dict | None = None, text_encoder_2=None):
        """Returns ``(trainer, trainable_state, frozen_state)``. ``text_encoder_2``
        (a ``CLIPTextModelWithProjection``) is SDXL's second text encoder, needed
        with ``text_encoder`` when the UNet's ``addition_embed_type`` is "text_time"."""
        if len(unet.ip_adapters) > 1:
            raise BadArgument(f"training expects at most one attached IP-Adapter, found {len(unet.ip_adapters)}")
        if config.image_conditioning not in ("decoupled", "concat"):
            raise BadArgument(f"image_conditioning must be 'decoupled' or 'concat', got {config.image_conditioning!r}")
        family = families.of_unet_config(unet.config)
        _check_text_encoders(family, unet, text_encoder, text_encoder_2)
        if config.noise_offset < 0:
            raise BadArgument(f"noise_offset must be >= 0, got {config.noise_offset}")
        graphdef, trainable_state, rest = nnx.split(unet, path_filter(trainable), ...)
        if not jax.tree.leaves(trainable_state):
            raise BadArgument(f"the trainable rule {trainable!r} selects no parameter")
        frozen = {"unet": rest}
        graphdefs = {}
        for name, module in (("vae", vae), ("text_encoder", text_encoder), ("image_encoder", image_encoder),
                             ("text_encoder_2", text_encoder_2)):
            if module is not None:
                graphdefs[name], frozen[name] = nnx.split(module)
        optimizer = optimizer or optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
        alphas = schedulers.ddpm_alphas_cumprod(scheduler_config or {})
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        trainer = cls(graphdef, graphdefs, config, optimizer, np.asarray(alphas), factor,
                      unet.config.in_channels, has_adapter=len(unet.ip_adapters) == 1, family=family)
        return trainer, trainable_state, frozen

    def init_optimizer(self, trainable_state):
        return self.optimizer.init(trainable_state)

    # ------------------------------------------------------------------ pieces

    def _module(self, name, frozen):
        return nnx.merge(self.encoder_graphdefs[name], frozen[name])

    def draw(self, rng, batch_size: int, latent_shape) -> dict:
        """Timesteps, noise and dropout decisions for one batch (one uniform r per sample)."""
        k_t, k_n, k_r, k_v = jax.random.split(rng, 4)
        c = self.config
        drop_image, drop_text = self.dropout(jax.random.uniform(k_r, (batch_size,)))
        noise = jax.random.normal(k_n, latent_shape, jnp.float32)
        if c.noise_offset:
            shape = (latent_shape[0],) + (1,) * (len(latent_shape) - 2) + (latent_shape[-1],)   # [B, 1, 1, C]
            offset = jax.random.normal(jax.random.fold_in(k_n, 1), shape, jnp.float32)
            noise = noise + c.noise_offset * offset
        return {"timesteps": jax.random.randint(k_t, (batch_size,), 0, c.num_train_timesteps), "noise": noise,
                "drop_image": drop_image, "drop_text": drop_text, "vae_key": k_v}

    def dropout(self, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(drop_image, drop_text)`` [B] from one uniform ``r`` [B] per sample, as the
        official datasets decide: image below the first rate, caption in the next band,
        both in the band after."""
        c = self.config
        image_end = c.image_drop_rate
        text_end = image_end + c.text_drop_rate
        both_end = text_end + c.both_drop_rate
        return (r < image_end) | ((r >= text_end) & (r < both_end)), (r >= image_end) & (r < both_end)

    def encode(self, frozen, batch: dict, draws: dict) -> tuple[jax.Array, Any, jax.Array]:
        """-> (latents, text conditioning, image embeddings) with the dropout applied.
        The text conditioning is ``text_conditioning``'s (the family's): an array [B, S, C]
        (SD 1.x) or a ``TextConditioning`` (SDXL: see ``text_conditioning`` for its keys).

        batch keys: ``pixels`` [B,H,W,3] in [-1,1] or ``latents`` (scaled);
        ``input_ids`` [B,77] or ``text_embeds``; ``clip_pixels`` (normalised) or
        ``image_embeds``; ``id_embeds`` [B, 512] (FaceID; FaceID-Plus also takes
        the face crop's ``clip_pixels`` and gets ``(ids, hidden states)`` back);
        ``empty_text`` (ids [77] or embedding [77,C] of "");
        ``uncond_image`` (what a dropped image becomes: zeros for image_embeds,
        the encoder on zero pixels for hidden states; only needed with cached
        hidden states).
        """
        c = self.config
        if "latents" in batch:
            latents = batch["latents"].astype(jnp.float32)
        else:
            vae = self._module("vae", frozen)
            posterior = vae.encode(batch["pixels"])
            eps = draws.get("vae_noise")    # given by tests to match a reference's posterior draw
            sample = posterior.sample(draws["vae_key"]) if eps is None else (
                posterior.mean + posterior.std * jnp.asarray(eps, posterior.mean.dtype))
            latents = sample * c.scaling_factor

        text = text_conditioning(self, frozen, batch, draws["drop_text"])

        drop_image = draws["drop_image"]
        if not self.has_adapter:
            return latents, text, None
        ids = None
        if c.image_input.startswith("face_id"):
            # FaceID (tutorial_train_faceid.py): a dropped image is a zero ID embedding.
            ids = batch["id_embeds"].astype(jnp.float32)
            ids = jnp.where(drop_image[:, None], 0.0, ids)
            if c.image_input == "face_id":
                return latents, text, ids
        if "image_embeds" in batch:
            embeds = batch["image_embeds"].astype(jnp.float32)
            uncond = batch.get("uncond_image", jnp.zeros_like(embeds[0]))
            mask = drop_image.reshape((-1,) + (1,) * (embeds.ndim - 1))
            embeds = jnp.where(mask, uncond[None], embeds)
        else:
            encoder = self._module("image_encoder", frozen)
            pixels = batch["clip_pixels"]
            if c.image_input.endswith("hidden_states"):
                # Plus recipe: a dropped image is zero CLIP pixels through the encoder.
                pixels = jnp.where(drop_image[:, None, None, None], 0.0, pixels)
                embeds = encoder(pixels).hidden_states[-2].astype(jnp.float32)
            else:
                out = encoder(pixels).image_embeds.astype(jnp.float32)
                embeds = jnp.where(drop_image[:, None], 0.0, out)
        return latents, text, embeds if ids is None else (ids, embeds)

    def loss(self, trainable, frozen, latents, text, image_embeds, noise, timesteps) -> jax.Array:
        """MSE (float32) of the UNet's prediction, given everything sampled.
        ``text``: the context [B, S, C], or a ``TextConditioning`` (context and
        the UNet's added conditioning, SDXL)."""
        c = self.config
        text, added = (text.context, text.added_cond) if isinstance(text, TextConditioning) else (text, None)
        unet = nnx.merge(self.unet_graphdef, trainable, frozen["unet"])
        alphas = jnp.asarray(self.alphas_cumprod, jnp.float32)
        noisy = schedulers.ddpm_add_noise(alphas, latents, noise, timesteps)
        if not len(unet.ip_adapters):
            pred = unet(noisy, timesteps, UNetConditioning(text, added_cond=added))
        else:
            adapter = unet.ip_adapters[0]
            # FaceID-Plus: (ID embeddings, the face crop's hidden states); PlusV2's shortcut at s_scale 1.
            tokens = (adapter.project(*image_embeds) if isinstance(image_embeds, tuple)
                      else adapter.project(image_embeds))
            if c.image_conditioning == "concat":
                context = jnp.concatenate([text, tokens.astype(text.dtype)], axis=1)
                pred = unet(noisy, timesteps, UNetConditioning(context, added_cond=added))
            else:
                scale = (jnp.ones((len(adapter.layers),), jnp.float32) if c.image_layer_scale is None
                         else jnp.asarray(c.image_layer_scale, jnp.float32))
                prompt = ImagePrompt(tokens=tokens[:, None], scale=scale)
                pred = unet(noisy, timesteps, UNetConditioning(text, (prompt,), added_cond=added))
        pred = pred.astype(jnp.float32)
        target = noise if c.prediction_type == "epsilon" else schedulers.ddpm_velocity(alphas, latents, noise,
                                                                                        timesteps)
        return diffusion_loss(pred, target.astype(jnp.float32), alphas, timesteps,
                              prediction_type=c.prediction_type, snr_gamma=c.snr_gamma)

    # ------------------------------------------------------------------ the step

    def train_step(self, trainable, opt_state, frozen, batch: dict, rng: jax.Array, step: jax.Array,
                   draws: dict | None = None):
        """One optimisation step; returns ``(trainable, opt_state, metrics)``.
        ``draws`` replaces ``draw``'s (tests give a reference's random values)."""
        if draws is None:
            rng = jax.random.fold_in(rng, step)
            latent_shape = self.latent_shape(frozen, batch)
            draws = self.draw(rng, latent_shape[0], latent_shape)
        latents, text, embeds = self.encode(frozen, batch, draws)
        latents, text, embeds = jax.lax.stop_gradient((latents, text, embeds))
        loss, grads = jax.value_and_grad(self.loss)(trainable, frozen, latents, text, embeds, draws["noise"],
                                                   draws["timesteps"])
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return trainable, opt_state, metrics

    def latent_shape(self, frozen, batch) -> tuple:
        if "latents" in batch:
            return batch["latents"].shape
        b, h, w, _ = batch["pixels"].shape
        return (b, h // self.vae_factor, w // self.vae_factor, self.latent_channels)
