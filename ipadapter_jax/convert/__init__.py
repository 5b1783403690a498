"""Checkpoint conversion between layouts: the layer above the models and the
IP-Adapter, where converters that need both (single-file checkpoints, LoRA)
belong. Today it re-exports the file readers and the strict fill of
``ipadapter_jax.io`` so ``from ipadapter_jax.convert import ...`` keeps
working. ``ipadapter_jax.convert.ip_adapter`` is the official IP-Adapter
file format (``ipadapter_jax.ip_adapter.official``); ``ipadapter_jax.convert.controlnet``
reads ControlNets (diffusers folders and the original single-file layout);
``ipadapter_jax.convert.single_file`` reads and writes whole SD 1.x / 2.x / SDXL
single-file checkpoints (``python -m ipadapter_jax.convert`` on the command line)."""

from ipadapter_jax.convert.controlnet import controlnet_to_original, load_controlnet
from ipadapter_jax.io import (CheckpointError, LoadReport, find_weights, load_config, load_pretrained,
                              load_state_dict_into, module_state_dict, read_state_dict, read_weights,
                              save_pretrained, save_safetensors, torch_key)
from ipadapter_jax.convert.lora import (LoraReport, apply_lora, apply_lora_to_models, apply_loras, parse_lora_spec,
                                        read_lora, sgm_to_diffusers)
from ipadapter_jax.convert.textual_inversion import (TextualInversionTokenizer, load_embeddings,
                                                     load_textual_inversion, parse_embedding_spec, read_embedding)
from ipadapter_jax.convert.single_file import (SingleFileModel, folder_to_single_file, ldm_state_dict,
                                               modules_to_ldm, read_single_file, single_file_to_diffusers)

__all__ = ["CheckpointError", "LoadReport", "controlnet_to_original", "find_weights", "load_config",
           "load_controlnet", "load_pretrained", "load_state_dict_into", "module_state_dict", "read_state_dict",
           "read_weights", "save_pretrained", "save_safetensors", "torch_key",
           "LoraReport", "apply_lora", "apply_lora_to_models", "apply_loras", "parse_lora_spec", "read_lora",
           "sgm_to_diffusers",
           "TextualInversionTokenizer", "load_embeddings", "load_textual_inversion", "parse_embedding_spec",
           "read_embedding",
           "SingleFileModel", "folder_to_single_file", "ldm_state_dict", "modules_to_ldm", "read_single_file",
           "single_file_to_diffusers"]
