"""Flax modules of a pipeline's parts from in-memory tensors (no folder):
abstract builds for the parameter names and shapes a part must have, and the
strict fill of those names from a state dict.
"""

from __future__ import annotations

import functools
import json

import numpy as np
from flax import nnx

from ipadapter_jax.io.params import AbstractRngs, load_state_dict_into, to_torch_layout, torch_key
from ipadapter_jax.models import AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel

MODEL_CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                 "text_encoder_2": CLIPTextModelWithProjection}
WEIGHTS_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                 "text_encoder_2": "model"}


def _constructor(name: str, config: dict, rngs, **options):
    """A function building part ``name`` from ``config`` with ``rngs``."""
    cls = MODEL_CLASSES[name]

    def make():
        module = cls.from_config(config, rngs=rngs, **options)
        module.config_json = json.dumps(config, sort_keys=True)   # what save_pretrained writes back
        return module

    return make


def _abstract(name: str, config: dict, **options) -> nnx.Module:
    # AbstractRngs: a real nnx.Rngs draw inside the trace costs time growing with
    # the graph traced so far (99 s for the SDXL UNet's 1,680 parameters, against 3 s).
    return nnx.eval_shape(_constructor(name, config, AbstractRngs(), **options))


@functools.lru_cache(maxsize=16)
def _expected(name: str, config_json: str) -> dict[str, tuple]:
    state = nnx.state(_abstract(name, json.loads(config_json)), nnx.Param)
    return {torch_key(path): tuple(to_torch_layout(path, np.broadcast_to(np.uint8(0), var.shape)).shape)
            for path, var in nnx.to_flat_state(state)}


def expected_shapes(name: str, config: dict) -> dict[str, tuple]:
    """{diffusers key: torch-layout shape} of the parameters of component ``name`` built from ``config``."""
    return _expected(name, json.dumps(config, sort_keys=True))


def build_module(name: str, component, **options) -> nnx.Module:
    """The Flax module of part ``name`` (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``) filled from ``component`` (``.config``: its diffusers
    config; ``.state_dict``: its tensors under diffusers names; ``.source``:
    where they came from, for messages). Strict: every parameter filled, every
    tensor used, shapes checked (float32 parameters). ``options`` (``dtype``,
    ``attention_backend``) go to the constructor."""
    cls = MODEL_CLASSES[name]
    cls.parse_config(component.config)
    module, _ = load_state_dict_into(lambda: _constructor(name, component.config, nnx.Rngs(0), **options)(),
                                     component.state_dict, source=component.source, rename=cls.rename_key,
                                     make_abstract=_constructor(name, component.config, AbstractRngs(), **options))
    return module
