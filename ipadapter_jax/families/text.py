"""The text side of each family, shared by the pipelines and the training step.

``token_ids`` is the one padded tokenization (prompts -> [B, 77] ids);
``TEXT_CONDITIONING[family.text_conditioning]`` turns each text encoder's ids
into the UNet's cross-attention context (and the pooled embedding a family
with added conditioning needs); ``time_ids`` builds SDXL's size / crop
micro-conditioning. The functions work on any callables with the encoders'
outputs (modules, jitted modules, or merged states inside a jitted step).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.io.errors import BadArgument

log = logging.getLogger(__name__)


def token_ids(tokenizer, prompts: str | Sequence[str], *, warn: bool = True) -> np.ndarray:
    """Prompts -> [B, L] int32 ids padded to the tokenizer's length (77 for CLIP);
    longer prompts are truncated, with a warning naming the dropped words as
    diffusers gives (``warn=False``: silently, as the training scripts do)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    max_len = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="np").input_ids
    if warn:
        full = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
        if full.shape[-1] > ids.shape[-1]:
            removed = tokenizer.batch_decode(full[:, max_len - 1:-1])
            log.warning("The following part of your input was truncated because CLIP can only handle sequences up "
                        "to %d tokens: %s", max_len, removed)
    return np.asarray(ids, np.int32)


class EncodedText(NamedTuple):
    """The text side of a UNet call: the cross-attention context [B, L, C] and,
    for families with added conditioning, the pooled text embedding [B, P]."""

    context: object
    pooled: object | None = None


def last_hidden_state(encoders: Sequence[Callable], ids: Sequence, *, layer: int | None = None) -> EncodedText:
    """SD 1.x / 2.x: the one text encoder's last hidden state."""
    if layer is not None:
        raise BadArgument("clip_skip is not supported for this model (it conditions on the last hidden state)")
    return EncodedText(encoders[0](ids[0]).last_hidden_state)


def penultimate_pair_pooled(encoders: Sequence[Callable], ids: Sequence, *, layer: int | None = None
                            ) -> EncodedText:
    """SDXL: both encoders' ``hidden_states[layer]`` (default -2, the penultimate
    block) side by side on the last axis, and encoder 2's projected ``text_embeds``."""
    layer = -2 if layer is None else layer
    first, second = encoders[0](ids[0]), encoders[1](ids[1])
    if -layer > len(first.hidden_states) or -layer > len(second.hidden_states):
        raise BadArgument(f"hidden_states[{layer}]: the text encoders have fewer layers (clip_skip too large)")
    states = first.hidden_states[layer]
    context = jnp.concatenate([states, second.hidden_states[layer].astype(states.dtype)], axis=-1)
    return EncodedText(context, second.text_embeds)


def t5_tokens_clip_pooled(encoders: Sequence[Callable], ids: Sequence, *, layer: int | None = None) -> EncodedText:
    """FLUX: encoder 2's (T5) last hidden state as the token context and encoder
    1's (CLIP) pooled output (``pooler_output``, not projected) as the pooled text."""
    if layer is not None:
        raise BadArgument("clip_skip is not supported for FLUX (it conditions on T5's last hidden state)")
    return EncodedText(encoders[1](ids[1]), encoders[0](ids[0]).pooler_output)


# ``Family.text_conditioning`` -> its function (encoders, ids, *, layer) -> EncodedText.
TEXT_CONDITIONING: dict[str, Callable[..., EncodedText]] = {
    "last_hidden_state": last_hidden_state,
    "penultimate_pair_pooled": penultimate_pair_pooled,
    "t5_tokens_clip_pooled": t5_tokens_clip_pooled,
}


def time_ids(original_size, crop_top_left, target_size) -> np.ndarray:
    """[B, 6] float32 SDXL time ids: original size (h, w) + crop top-left (top,
    left) + target size (h, w); each argument [B, 2] or one pair for all."""
    parts = [np.asarray(p, np.float32).reshape(-1, 2) for p in (original_size, crop_top_left, target_size)]
    n = max(len(p) for p in parts)
    return np.concatenate([np.broadcast_to(p, (n, 2)) for p in parts], axis=1).astype(np.float32)


def added_conditioning(family, pooled, ids) -> dict | None:
    """The UNet's added conditioning of ``family``: ``{"text_embeds", "time_ids"}``
    for SDXL's ``text_time``, None for families without any."""
    if family.added_conditioning is None:
        return None
    if family.added_conditioning != "text_time":
        raise BadArgument(f"unknown added conditioning {family.added_conditioning!r}")
    return {"text_embeds": pooled, "time_ids": ids}
