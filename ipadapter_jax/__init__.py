"""ipadapter-jax: IP-Adapter for Stable Diffusion in JAX/Flax NNX.

The core never imports torch or diffusers; they are needed only to read
``.bin`` pickles and for the parity tests.
"""

from ipadapter_jax.io import CheckpointError
from ipadapter_jax.models import (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection,
                                  CLIPVisionModelWithProjection, UNet2DConditionModel)

__version__ = "0.1.0"
__all__ = ["AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection",
           "CheckpointError", "UNet2DConditionModel", "__version__"]
