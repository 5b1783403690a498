"""AutoencoderKL parity with diffusers: encoder (mean/logvar), decoder, <= 1e-5."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from helpers import (assert_same_weights_file, block_figures, capture, describe, first_over, nchw, nhwc, rel_err,
                     vae_block_names)
from ipadapter_jax.models import AutoencoderKL

TOL = 1e-5
CONFIG = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8, layers_per_block=2,
              sample_size=32)


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(0)
    model = TorchVAE(**CONFIG).eval()
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, AutoencoderKL.from_pretrained(folder), folder


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_vae_encoder_parity(vae_pair, hw):
    torch_model, model, _ = vae_pair
    x = np.random.default_rng(0).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    with torch.no_grad(), capture(torch_model, vae_block_names(torch_model, "encoder")) as blocks:
        dist = torch_model.encode(nchw(x)).latent_dist
    posterior = model.encode(x)

    def where():
        return describe(block_figures(model, blocks), TOL)

    assert rel_err(posterior.mean, nhwc(dist.mean)) <= TOL, where()
    assert rel_err(posterior.logvar, nhwc(dist.logvar)) <= TOL, where()
    assert rel_err(posterior.std, nhwc(dist.std)) <= TOL, where()
    # Sampling is mean + std * noise: check against the torch formula on the same noise.
    key = jax.random.key(0)
    noise = np.asarray(jax.random.normal(key, posterior.mean.shape))
    assert rel_err(posterior.sample(key), nhwc(dist.mean) + nhwc(dist.std) * noise) <= TOL, where()


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_vae_decoder_parity(vae_pair, hw):
    torch_model, model, _ = vae_pair
    z = np.random.default_rng(1).standard_normal((2, *hw, 4)).astype(np.float32)
    assert_decoder_parity(torch_model, model, z)


def assert_decoder_parity(torch_model, model, z):
    """decode(z) within TOL of diffusers'; a failure names the first decoder
    block that differs."""
    with torch.no_grad(), capture(torch_model, vae_block_names(torch_model, "decoder")) as blocks:
        expected = nhwc(torch_model.decode(nchw(z)).sample)
    assert rel_err(model.decode(z), expected) <= TOL, describe(block_figures(model, blocks), TOL)


def test_vae_scaling_factor_from_config(vae_pair):
    torch_model, model, _ = vae_pair
    assert model.scaling_factor == torch_model.config.scaling_factor


def test_vae_legacy_attention_names(vae_pair, tmp_path):
    """Pre-0.14 diffusers checkpoints name the mid-block attention
    query/key/value/proj_attn (sometimes as 1x1 convs); they load the same."""
    import shutil

    from safetensors.numpy import load_file, save_file

    torch_model, model, folder = vae_pair
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in key:
                key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                if key.endswith("weight") and old in ("query", "proj_attn"):
                    value = value[:, :, None, None]
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    out = tmp_path / "legacy"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    save_file(legacy, out / "diffusion_pytorch_model.safetensors")
    z = np.random.default_rng(2).standard_normal((1, 8, 8, 4)).astype(np.float32)
    np.testing.assert_array_equal(AutoencoderKL.from_pretrained(out).decode(z), model.decode(z))


def test_vae_export_round_trip(vae_pair, tmp_path):
    from diffusers import AutoencoderKL as TorchVAE
    _, model, folder = vae_pair
    model.save_pretrained(tmp_path / "export")
    assert_same_weights_file(folder / "diffusion_pytorch_model.safetensors",
                             tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    reloaded = TorchVAE.from_pretrained(tmp_path / "export").eval()
    z = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    assert_decoder_parity(reloaded, model, z)


def test_vae_block_figures_locate_a_divergence(vae_pair):
    """The per-block diagnosis the parity tests print (and ipadapter-parity
    reports): every encoder and decoder block, fed diffusers' block input,
    matches; a perturbed decoder block is named, and only that one."""
    torch_model, model, folder = vae_pair
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    z = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    names = vae_block_names(torch_model, "encoder") + vae_block_names(torch_model, "decoder")
    with torch.no_grad(), capture(torch_model, names) as torch_blocks:
        torch_model.encode(nchw(x))
        torch_model.decode(nchw(z))
    assert list(torch_blocks) == names and "decoder.conv_norm_out" in names
    figures = block_figures(model, torch_blocks)
    assert [f.name for f in figures] == names
    assert first_over(figures, TOL) is None, describe(figures, TOL)

    perturbed = AutoencoderKL.from_pretrained(folder)
    bias = perturbed.decoder.up_blocks[1].resnets[0].conv2.bias
    bias[...] = bias[...] + 0.5
    figures = block_figures(perturbed, torch_blocks)
    assert [f.name for f in figures if f.over(TOL)] == ["decoder.up_blocks.1"], describe(figures, TOL)
