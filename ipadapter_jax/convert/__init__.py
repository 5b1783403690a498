"""Checkpoint files <-> Flax modules: readers, rename rules, exporters."""

from ipadapter_jax.convert.files import (CheckpointError, find_weights, load_config, read_state_dict,
                                         read_weights, save_safetensors)
from ipadapter_jax.convert.params import (LoadReport, load_state_dict_into, module_state_dict, torch_key)
from ipadapter_jax.convert.pretrained import load_pretrained, save_pretrained

__all__ = ["CheckpointError", "LoadReport", "find_weights", "load_config", "load_pretrained",
           "load_state_dict_into", "module_state_dict", "read_state_dict", "read_weights",
           "save_pretrained", "save_safetensors", "torch_key"]
