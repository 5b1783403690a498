"""The parity toolkit: numeric parity of this package against diffusers /
transformers on your own files, per component, per block and per sampling
step (``ipadapter-parity``; README, "Checking parity on your own files").

The tests use the same code for their module, block and end-to-end checks:
``metrics`` (relative / max-abs error, first divergence, the bounds),
``names`` (diffusers' block names), ``capture`` (the reference blocks' inputs
and outputs), ``blocks`` (our blocks on those inputs, or block by block).
"""

from ipadapter_jax.io.lazy import lazy_names
from ipadapter_jax.parity.metrics import BOUNDS, Figure, describe, figure, first_over, max_abs, rel_err
from ipadapter_jax.parity.names import (clip_block_names, controlnet_block_names, unet_block_names,
                                        vae_block_names)

_LAZY = {"Request": "ipadapter_jax.parity.run", "Result": "ipadapter_jax.parity.run",
         "compare": "ipadapter_jax.parity.run", "block_figures": "ipadapter_jax.parity.blocks",
         "run_captured": "ipadapter_jax.parity.blocks", "BlockInputs": "ipadapter_jax.parity.blocks",
         "capture": "ipadapter_jax.parity.capture", "load_reference": "ipadapter_jax.parity.reference"}
__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = ["BOUNDS", "Figure", "clip_block_names", "controlnet_block_names", "describe", "figure", "first_over", "max_abs", "rel_err", "unet_block_names", "vae_block_names",
           *_LAZY]
