"""The bottom layer: files in, arrays out, nothing above it imported.

* ``files``: checkpoint files (safetensors, ``.bin`` pickles through
  ``torch.load(weights_only=True)``), model folders, atomic writes;
* ``params``: torch names and layouts <-> NNX state, the strict fill;
* ``pretrained``: ``from_pretrained`` / ``save_pretrained`` for model folders;
* ``images``: image files -> RGB -> CLIP pixels;
* ``errors``: the user-error classes every layer raises and the CLIs print as one line;
* ``hub``: Hugging Face hub ids (``org/name``, ``org/name:path``) -> local paths.

The names below are imported on first use (PEP 562): ``ipadapter_jax.io.errors``
and ``ipadapter_jax.io.hub`` load without JAX, so the command lines can check
their arguments before JAX starts.
"""

from __future__ import annotations

from ipadapter_jax.io.lazy import lazy_names

_LAZY = {
    **dict.fromkeys(("CheckpointError", "atomic_write", "find_weights", "load_config", "read_state_dict",
                     "read_weights", "save_safetensors"), "ipadapter_jax.io.files"),
    **dict.fromkeys(("LoadReport", "load_state_dict_into", "module_state_dict", "torch_key"),
                    "ipadapter_jax.io.params"),
    **dict.fromkeys(("PretrainedMixin", "load_pretrained", "save_pretrained"), "ipadapter_jax.io.pretrained"),
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
