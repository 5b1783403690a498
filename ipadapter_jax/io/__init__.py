"""The bottom layer: files in, arrays out, nothing above it imported.

* ``files``: checkpoint files (safetensors, ``.bin`` pickles through
  ``torch.load(weights_only=True)``), model folders, atomic writes;
* ``params``: torch names and layouts <-> NNX state, the strict fill;
* ``pretrained``: ``from_pretrained`` / ``save_pretrained`` for model folders;
* ``images``: image files -> RGB -> CLIP pixels;
* ``errors``: the user-error classes every layer raises and the CLIs print as one line.
"""

from ipadapter_jax.io.files import (CheckpointError, atomic_write, find_weights, load_config, read_state_dict,
                                    read_weights, save_safetensors)
from ipadapter_jax.io.params import LoadReport, load_state_dict_into, module_state_dict, torch_key
from ipadapter_jax.io.pretrained import PretrainedMixin, load_pretrained, save_pretrained

__all__ = ["CheckpointError", "LoadReport", "PretrainedMixin", "atomic_write", "find_weights", "load_config",
           "load_pretrained", "load_state_dict_into", "module_state_dict", "read_state_dict", "read_weights",
           "save_pretrained", "save_safetensors", "torch_key"]
