"""Checkpoint conversion between layouts: the layer above the models and the
IP-Adapter, where converters that need both belong. Its modules:

* ``build``: Flax modules of a pipeline's parts from in-memory tensors, and the strict fill;
* ``components``: a family's models, tokenizers and scheduler config from a folder or a single file;
* ``controlnet``: ControlNets from diffusers folders and the original single-file layout;
* ``ldm_detect``: what a single file holds (family, parts, prediction type) from its keys and shapes;
* ``ldm_plan``: key maps between diffusers models and the LDM layout, as data (``Link``s and their operations);
* ``ldm_text``: the text encoders' LDM names (CLIP and OpenCLIP) from their transformers names;
* ``ldm_unet``: the UNet's LDM / sgm names from its diffusers names;
* ``ldm_vae``: the VAE's LDM names from its diffusers names;
* ``lora``: LoRA files (kohya, diffusers / PEFT) merged into the weights at load;
* ``single_file``: whole SD 1.x / 2.x / SDXL single-file checkpoints in and out;
* ``textual_inversion``: textual-inversion embeddings, new tokens for the text encoders;
* ``__main__``: ``python -m ipadapter_jax.convert``, single files <-> diffusers folders.

Official IP-Adapter files are read and written by ``ipadapter_jax.ip_adapter.official``;
the file readers and the folder loader are ``ipadapter_jax.io``.
"""

from __future__ import annotations

from ipadapter_jax.io.lazy import lazy_names

# The converters' public names (the README's ``from ipadapter_jax.convert import apply_lora, ...``),
# imported from their modules on first use (PEP 562): importing the package loads nothing.
_LAZY = {
    **dict.fromkeys(("apply_lora", "apply_loras", "read_lora", "LoraReport"), "ipadapter_jax.convert.lora"),
    **dict.fromkeys(("load_textual_inversion", "load_embeddings", "read_embedding"),
                    "ipadapter_jax.convert.textual_inversion"),
    **dict.fromkeys(("load_controlnet",), "ipadapter_jax.convert.controlnet"),
    **dict.fromkeys(("read_single_file", "folder_to_single_file", "single_file_to_diffusers"),
                    "ipadapter_jax.convert.single_file"),
    **dict.fromkeys(("Components", "load_components"), "ipadapter_jax.convert.components"),
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
