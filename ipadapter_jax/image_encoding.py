"""Compatibility name: reference-image encoding lives in
``ipadapter_jax.ip_adapter.encoding``, image loading and CLIP preprocessing
in ``ipadapter_jax.io.images``; this module re-exports both."""

from ipadapter_jax.io.images import CLIP_MEAN, CLIP_STD, load_image, load_rgb, preprocess, to_rgb  # noqa: F401
from ipadapter_jax.ip_adapter.encoding import (encode_image, load_embeds, prompt_tokens,  # noqa: F401
                                               save_embeds, zero_image_states)
