"""ipadapter-jax: IP-Adapter for Stable Diffusion in JAX/Flax NNX.

``import ipadapter_jax`` loads no JAX: the public names below are imported on
first use (PEP 562), so the command lines answer ``--help`` and argument errors
before JAX starts. The core never imports torch or diffusers; they are needed
only to read ``.bin`` pickles and for the parity tests.
"""

from __future__ import annotations

from ipadapter_jax.io.lazy import lazy_names

__version__ = "0.1.0"

# Public name -> the module that defines it (imported when the name is first used).
_LAZY = {
    "AutoencoderKL": "ipadapter_jax.models",
    "CLIPTextModel": "ipadapter_jax.models",
    "CLIPTextModelWithProjection": "ipadapter_jax.models",
    "CLIPVisionModelWithProjection": "ipadapter_jax.models",
    "UNet2DConditionModel": "ipadapter_jax.models",
    "CheckpointError": "ipadapter_jax.io.files",
}
__all__ = sorted([*_LAZY, "__version__"])

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
