"""UNet2DConditionModel parity with diffusers (float32, CPU): relative error <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_same_weights_file, nchw, nhwc, rel_err
from ipadapter_jax.models import UNet2DConditionModel

TOL = 1e-5

SMALL = dict(in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=24)

CONFIGS = {
    # SD 1.5 layout at small width: conv projections, one int head count.
    "sd15_like": dict(SMALL, block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=4,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x: linear projections, per-block head counts, upcast attention, v-pred irrelevant here.
    "sd2_like": dict(SMALL, block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=[2, 4, 8],
                     use_linear_projection=True, upcast_attention=True,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # Less common options: scale-shift time conditioning, several transformer layers,
    # only-cross-attention blocks, per-block layer counts, center_input_sample, freq_shift.
    "options": dict(SMALL, block_out_channels=(16, 32), layers_per_block=[1, 2], attention_head_dim=2,
                    transformer_layers_per_block=[2, 1], only_cross_attention=[True, False],
                    resnet_time_scale_shift="scale_shift", center_input_sample=True, freq_shift=1,
                    flip_sin_to_cos=False, time_embedding_dim=40, act_fn="silu",
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


def reference_unet(tmp_path, config: dict):
    from diffusers import UNet2DConditionModel as TorchUNet

    model = TorchUNet(**config).eval()
    folder = tmp_path / "unet"
    model.save_pretrained(folder)
    return model, folder


def compare(torch_model, jax_model, shape, seq=7, timesteps=(3, 917)):
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(shape, dtype=np.float32)
    context = rng.standard_normal((shape[0], seq, jax_model.config.per_block("cross_attention_dim")[0]),
                                  dtype=np.float32)
    t = np.array(timesteps[: shape[0]])
    with torch.no_grad():
        expected = nhwc(torch_model(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
    actual = jax_model(sample, t, context)
    return rel_err(actual, expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_parity(tmp_path, name):
    torch_model, folder = reference_unet(tmp_path, CONFIGS[name])
    model = UNet2DConditionModel.from_pretrained(folder)
    assert compare(torch_model, model, (2, 16, 16, 4)) <= TOL


@pytest.mark.parametrize("hw", [(16, 24), (18, 14)])
def test_unet_non_square_and_odd_latents(tmp_path, hw):
    """Non-square latents, including sizes that do not halve evenly (the
    upsampler then resizes to the skip connection's size, as diffusers does)."""
    torch_model, folder = reference_unet(tmp_path, CONFIGS["sd15_like"])
    model = UNet2DConditionModel.from_pretrained(folder)
    assert compare(torch_model, model, (2, *hw, 4)) <= TOL


def test_unet_scalar_and_float_timesteps(tmp_path):
    torch_model, folder = reference_unet(tmp_path, CONFIGS["sd15_like"])
    model = UNet2DConditionModel.from_pretrained(folder)
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    context = rng.standard_normal((2, 5, 24), dtype=np.float32)
    for t in (np.float32(421.75), np.array(10)):
        with torch.no_grad():
            expected = nhwc(torch_model(nchw(sample), torch.tensor(t), torch.from_numpy(context)).sample)
        assert rel_err(model(sample, t, context), expected) <= TOL


def test_unet_jit_matches_eager(tmp_path):
    from flax import nnx
    import jax

    _, folder = reference_unet(tmp_path, CONFIGS["sd2_like"])
    model = UNet2DConditionModel.from_pretrained(folder)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 8, 8, 4), dtype=np.float32)
    c = rng.standard_normal((1, 3, 24), dtype=np.float32)
    assert rel_err(step(state, x, np.array([5]), c), model(x, np.array([5]), c)) <= 1e-6


def test_unet_export_round_trip(tmp_path):
    """Flax -> torch-layout safetensors is exact, and diffusers loads it."""
    from diffusers import UNet2DConditionModel as TorchUNet
    torch_model, folder = reference_unet(tmp_path, CONFIGS["sd2_like"])
    model = UNet2DConditionModel.from_pretrained(folder)
    model.save_pretrained(tmp_path / "export")
    assert_same_weights_file(folder / "diffusion_pytorch_model.safetensors",
                             tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    reloaded = TorchUNet.from_pretrained(tmp_path / "export").eval()
    assert compare(reloaded, model, (1, 8, 8, 4)) <= TOL
