"""The real SD 1.5 UNet architecture (859.5M parameters, random weights):
small configs can hide mistakes that only the full depth shows. Bound 1e-4."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import block_figures, capture, describe, nchw, nhwc, rel_err, unet_block_names
from ipadapter_jax.models import UNet2DConditionModel

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


@pytest.mark.slow
def test_sd15_unet_full_architecture(tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_model = TorchUNet(**SD15_UNET_CONFIG).eval()
    n_params = sum(p.numel() for p in torch_model.parameters())
    assert n_params == 859_520_964
    torch_model.save_pretrained(tmp_path / "unet")

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 32, 32, 4), dtype=np.float32)
    context = rng.standard_normal((1, 77, 768), dtype=np.float32)
    t = np.array([601])
    # Block inputs and outputs (a few MB at 32x32 latents) are kept as numpy
    # copies; the torch model goes before the JAX one is built.
    with torch.no_grad(), capture(torch_model, unet_block_names(torch_model)) as torch_blocks:
        expected = nhwc(torch_model(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
    del torch_model
    gc.collect()

    model = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(x.size for x in leaves) == n_params
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    actual = forward(state, sample, t, context)
    # On failure only: each JAX block on diffusers' block inputs, to name the first divergence.
    assert rel_err(actual, expected) <= 1e-4, describe(block_figures(model, torch_blocks), 1e-4)
