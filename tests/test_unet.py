"""UNet2DConditionModel parity with diffusers (float32, CPU): relative error <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import (assert_same_weights_file, block_figures, capture, describe, first_over, nchw, nhwc, rel_err,
                     unet_block_names)
from ipadapter_jax.models import UNet2DConditionModel
from ipadapter_jax.models.conditioning import UNetConditioning

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
    """(rel err of the prediction, where): ``where(bound)`` runs each block of
    the JAX UNet on the inputs diffusers' block received and names the first
    that differs by more than ``bound`` (evaluated only when an assertion fails)."""
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(shape, dtype=np.float32)
    context = rng.standard_normal((shape[0], seq, jax_model.config.per_block("cross_attention_dim")[0]),
                                  dtype=np.float32)
    t = np.array(timesteps[: shape[0]])
    return compare_inputs(torch_model, jax_model, sample, t, context)


def compare_inputs(torch_model, jax_model, sample, t, context, down_residuals=None, mid_residual=None):
    """As ``compare`` on given inputs; optional ControlNet residuals (NHWC)."""
    kwargs, conditioning = {}, context
    if down_residuals is not None:
        kwargs = dict(down_block_additional_residuals=tuple(nchw(r) for r in down_residuals),
                      mid_block_additional_residual=nchw(mid_residual))
        conditioning = UNetConditioning(encoder_hidden_states=context, down_block_residuals=tuple(down_residuals),
                                        mid_block_residual=mid_residual)
    with torch.no_grad(), capture(torch_model, unet_block_names(torch_model)) as torch_blocks:
        expected = nhwc(torch_model(nchw(sample), torch.as_tensor(t), torch.from_numpy(context), **kwargs).sample)
    err = rel_err(jax_model(sample, t, conditioning), expected)
    return err, lambda bound: describe(block_figures(jax_model, torch_blocks), bound)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_parity(tmp_path, name):
    torch_model, folder = reference_unet(tmp_path, CONFIGS[name])
    model = UNet2DConditionModel.from_pretrained(folder)
    err, where = compare(torch_model, model, (2, 16, 16, 4))
    assert err <= TOL, where(TOL)


@pytest.mark.parametrize("hw", [(16, 24), (18, 14)])
def test_unet_non_square_and_odd_latents(tmp_path, hw):
    """Non-square latents, including sizes that do not halve evenly (the
    upsampler then resizes to the skip connection's size, as diffusers does)."""
    torch_model, folder = reference_unet(tmp_path, CONFIGS["sd15_like"])
    model = UNet2DConditionModel.from_pretrained(folder)
    err, where = compare(torch_model, model, (2, *hw, 4))
    assert err <= TOL, where(TOL)


def test_unet_scalar_and_float_timesteps(tmp_path):
    torch_model, folder = reference_unet(tmp_path, CONFIGS["sd15_like"])
    model = UNet2DConditionModel.from_pretrained(folder)
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    context = rng.standard_normal((2, 5, 24), dtype=np.float32)
    for t in (np.float32(421.75), np.array(10)):
        err, where = compare_inputs(torch_model, model, sample, t, context)
        assert err <= TOL, where(TOL)


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
    err, where = compare(reloaded, model, (1, 8, 8, 4))
    assert err <= TOL, where(TOL)


def skip_shapes(model, shape):
    """Shapes of the UNet's skip connections (conv_in, then each resnet /
    downsampler output of each down block) and of the mid block's output."""
    b, h, w, _ = shape
    boc = model.config.block_out_channels
    shapes = [(b, h, w, boc[0])]
    for i, block in enumerate(model.down_blocks):
        shapes += [(b, h, w, boc[i])] * len(block.resnets)
        if block.downsamplers is not None:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((b, h, w, boc[i]))
    return shapes, (b, h, w, boc[-1])


def test_unet_controlnet_residuals(tmp_path):
    """ControlNet residuals in a UNetConditioning match diffusers'
    down_block_additional_residuals / mid_block_additional_residual."""
    torch_model, folder = reference_unet(tmp_path, CONFIGS["sd15_like"])
    model = UNet2DConditionModel.from_pretrained(folder)
    rng = np.random.default_rng(4)
    shape = (2, 16, 16, 4)
    sample = rng.standard_normal(shape, dtype=np.float32)
    context = rng.standard_normal((2, 7, 24), dtype=np.float32)
    down_shapes, mid_shape = skip_shapes(model, shape)
    down = tuple(rng.standard_normal(s, dtype=np.float32) for s in down_shapes)
    mid = rng.standard_normal(mid_shape, dtype=np.float32)
    err, where = compare_inputs(torch_model, model, sample, np.array([3, 917]), context, down, mid)
    assert err <= 1e-5, where(1e-5)
    # The residuals matter: without them the output is far off.
    with_residuals = model(sample, np.array([3, 917]), UNetConditioning(context, down_block_residuals=down,
                                                                        mid_block_residual=mid))
    assert rel_err(model(sample, np.array([3, 917]), context), with_residuals) > 1e-2


def test_block_figures_locate_a_divergence(tmp_path):
    """The per-block diagnosis the parity tests print (and ipadapter-parity
    reports): every block, fed diffusers' block input, matches diffusers'
    output; a perturbed block is named, and only that one."""
    torch_model, folder = reference_unet(tmp_path, CONFIGS["sd15_like"])
    model = UNet2DConditionModel.from_pretrained(folder)
    rng = np.random.default_rng(5)
    sample = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)
    context = rng.standard_normal((2, 7, 24), dtype=np.float32)
    t = np.array([3, 917])
    names = unet_block_names(torch_model)
    with torch.no_grad(), capture(torch_model, names) as torch_blocks:
        torch_model(nchw(sample), torch.from_numpy(t), torch.from_numpy(context))
    assert list(torch_blocks) == names and "conv_norm_out" in names
    figures = block_figures(model, torch_blocks)
    assert [f.name for f in figures] == names
    assert first_over(figures, TOL) is None, describe(figures, TOL)

    bias = model.down_blocks[1].resnets[0].conv2.bias
    bias[...] = bias[...] + 0.5
    figures = block_figures(model, torch_blocks)
    assert [f.name for f in figures if f.over(TOL)] == ["down_blocks.1"], describe(figures, TOL)
    assert describe(figures, TOL).startswith("first block past 1e-05: down_blocks.1 (rel")
