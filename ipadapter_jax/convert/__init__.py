"""Checkpoint conversion between layouts: the layer above the models and the
IP-Adapter, where converters that need both (single-file checkpoints, LoRA)
belong. Today it re-exports the file readers and the strict fill of
``ipadapter_jax.io`` so ``from ipadapter_jax.convert import ...`` keeps
working. ``ipadapter_jax.convert.ip_adapter`` is the official IP-Adapter
file format (``ipadapter_jax.ip_adapter.official``)."""

from ipadapter_jax.io import (CheckpointError, LoadReport, find_weights, load_config, load_pretrained,
                              load_state_dict_into, module_state_dict, read_state_dict, read_weights,
                              save_pretrained, save_safetensors, torch_key)

__all__ = ["CheckpointError", "LoadReport", "find_weights", "load_config", "load_pretrained",
           "load_state_dict_into", "module_state_dict", "read_state_dict", "read_weights",
           "save_pretrained", "save_safetensors", "torch_key"]
