"""IP-Adapter: the variants, the module attached to a UNet, official files,
image tokens, and the controls over them. One idea per file:

* ``variants``   the variant registry (detection, projection, input, negative);
* ``image_proj`` the projection modules (embeddings -> image tokens);
* ``modules``    ``IPAdapter``, ``attach``, ``image_prompt``;
* ``official``   official files (h94/IP-Adapter layout) in and out;
* ``encoding``   reference images -> embeddings -> tokens (with negatives);
* ``scales``     per-layer scales (float, per-block dict, ComfyUI weight types);
* ``combine``    several reference images -> one embedding (ComfyUI modes);
* ``masks``      a mask per reference image -> every attention resolution;
* ``gates``      start/end fractions of the schedule -> a 0/1 gate per step.
"""

from ipadapter_jax.ip_adapter.combine import COMBINE_MODES, combine_embeds
from ipadapter_jax.ip_adapter.encoding import (encode_image, load_embeds, prompt_tokens, save_embeds,
                                               zero_image_states)
from ipadapter_jax.ip_adapter.gates import schedule_gates
from ipadapter_jax.ip_adapter.masks import mask_pyramid, resize_mask
from ipadapter_jax.ip_adapter.modules import (AttentionLoRA, IPAdapter, IPAdapterLayer, LoRALinear, attach,
                                              detach_all, image_prompt, split_concatenated)
from ipadapter_jax.ip_adapter.official import (ip_adapter_state_dict, load_ip_adapter, read_ip_adapter,
                                               save_ip_adapter)
from ipadapter_jax.ip_adapter.scales import WEIGHT_TYPES, comfy_order, image_layer_mask, layer_scales
from ipadapter_jax.ip_adapter.variants import VARIANTS, Variant
from ipadapter_jax.models.conditioning import ImagePrompt

__all__ = ["AttentionLoRA", "COMBINE_MODES", "IPAdapter", "IPAdapterLayer", "ImagePrompt", "LoRALinear", "VARIANTS",
           "Variant", "WEIGHT_TYPES", "attach", "combine_embeds", "comfy_order", "detach_all", "encode_image",
           "image_layer_mask", "image_prompt", "ip_adapter_state_dict", "layer_scales", "load_embeds", "load_ip_adapter",
           "mask_pyramid", "prompt_tokens", "read_ip_adapter", "resize_mask", "save_embeds", "save_ip_adapter",
           "schedule_gates", "split_concatenated", "zero_image_states"]
