"""Several reference images for one adapter: ComfyUI's ways of merging their
embeddings before projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ipadapter_jax.io.errors import BadArgument


COMBINE_MODES = ("concat", "add", "subtract", "average", "norm average")


def combine_embeds(embeds: jax.Array, mode: str = "concat") -> jax.Array:
    """Combine the embeddings of N reference images (axis 0) the way ComfyUI
    does, before projection. ``concat`` keeps all N (their tokens are
    concatenated later); the others return one: ``add`` sums, ``subtract`` is
    the first minus the mean of the rest, ``average`` the mean, ``norm average``
    the mean after dividing each element by its norm across images."""
    embeds = jnp.asarray(embeds)
    if mode == "concat" or embeds.shape[0] == 1:
        if mode not in COMBINE_MODES:
            raise BadArgument(f"unknown combine mode {mode!r}; expected one of {COMBINE_MODES}")
        return embeds
    if mode == "add":
        return embeds.sum(0, keepdims=True)
    if mode == "subtract":
        return embeds[:1] - embeds[1:].mean(0, keepdims=True)
    if mode == "average":
        return embeds.mean(0, keepdims=True)
    if mode == "norm average":
        return (embeds / jnp.linalg.norm(embeds, axis=0, keepdims=True)).mean(0, keepdims=True)
    raise BadArgument(f"unknown combine mode {mode!r}; expected one of {COMBINE_MODES}")
