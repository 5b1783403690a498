"""What a UNet call is conditioned on, as one pytree.

``UNetConditioning`` gathers every kind of conditioning a UNet call takes; a
new kind is a new field, not a new positional argument. All fields are arrays
(or None), so changing their values never recompiles a jitted loop; which
fields are set is part of the pytree structure, fixed before ``jit``.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class ImagePrompt:
    """One IP-Adapter's conditioning for one UNet call.

    tokens: [B, N, T, C] projected tokens of N reference images (B includes the
      unconditional half under classifier-free guidance).
    scale: [L] scale per cross-attention layer (processor order); 0 disables.
    masks: optional ``{num_queries: [B or 1, N, num_queries]}`` (see
      ``ipadapter_jax.ip_adapter.masks.mask_pyramid``); with masks each image is
      attended separately.
    lora_scale: strength of the adapter's LoRA (FaceID files), scalar.
    """

    tokens: jax.Array
    scale: jax.Array
    masks: dict | None = None
    lora_scale: jax.Array | float = 1.0


@struct.dataclass
class UNetConditioning:
    """Everything a ``UNet2DConditionModel`` call is conditioned on.

    encoder_hidden_states: [B, S, C] text tokens (cross-attention context).
    image_prompts: one ``ImagePrompt`` per attached IP-Adapter, in attach order.
    added_cond: added conditioning of UNets with an ``addition_embed_type``;
      None for SD 1.x / 2.x (refused by a UNet without one). SDXL
      (``"text_time"``, required there): ``{"text_embeds": [B, P], "time_ids":
      [B, N]}``, the pooled prompt (text encoder 2's projected ``text_embeds``,
      P = 1280) and N micro-conditioning ids (base: 6 = original size (h, w),
      crop top-left (y, x), target size (h, w); refiner: 5), with
      P + N x ``addition_time_embed_dim`` = ``projection_class_embeddings_input_dim``.
      B is the sample's batch or 1.
    down_block_residuals: ControlNet residuals added to the down-block skips
      (one per skip, in order), or None.
    mid_block_residual: ControlNet residual added to the mid block's output.
    """

    encoder_hidden_states: jax.Array
    image_prompts: tuple = ()
    added_cond: dict | None = None
    down_block_residuals: tuple | None = None
    mid_block_residual: jax.Array | None = None
