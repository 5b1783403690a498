"""FLUX LoRA files merged at load against diffusers' ``load_lora_weights`` +
``fuse_lora`` on a tiny random FLUX transformer: a diffusers / PEFT file (with
its alpha in the file's metadata) and a kohya file in BFL's fused names (qkv,
linear1, alpha != rank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flux_fixtures as ff
from helpers import rel_err


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_lora")
    ff.build_flux_folder(root, guidance=True)
    return root


def _fused_reference(root, lora_dir, weight_name):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(root / "flux-dev")
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    return {k: v.detach().numpy() for k, v in pipe.transformer.state_dict().items()}


def _ours(root, path):
    from ipadapter_jax.io.params import module_state_dict
    from ipadapter_jax.models.flux import FluxTransformer2DModel
    from ipadapter_jax.convert.flux_lora import apply_flux_lora

    model = FluxTransformer2DModel.from_pretrained(root / "flux-dev" / "transformer")
    report = apply_flux_lora(model, path, 0.7)
    return module_state_dict(model), report


def _compare(ours, expected, base):
    changed = 0
    for key, value in expected.items():
        if not np.array_equal(value, base[key]):
            changed += 1
        assert rel_err(ours[key], value) <= 1e-6, key
    return changed


def test_peft_lora_matches_diffusers(root, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    ref = FluxTransformer2DModel.from_pretrained(root / "flux-dev" / "transformer")
    base = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "proj_mlp",
                                        "ff.net.2", "norm1.linear", "norm.linear"])
    ref.add_adapter(config)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=config.to_dict())
    expected = _fused_reference(root, tmp_path, "pytorch_lora_weights.safetensors")
    ours, report = _ours(root, tmp_path / "pytorch_lora_weights.safetensors")
    assert report.layout == "peft" and report.layers > 0
    assert _compare(ours, expected, base) == report.layers


def test_kohya_lora_in_bfl_names_matches_diffusers(root, tmp_path):
    from safetensors.torch import save_file
    from safetensors.numpy import load_file

    base = load_file(root / "flux-dev" / "transformer" / "diffusion_pytorch_model.safetensors")
    rng = np.random.default_rng(1)
    d, r = 32, 4
    layers = {"double_blocks_0_img_attn_qkv": (3 * d, d), "double_blocks_1_txt_attn_qkv": (3 * d, d),
              "double_blocks_0_img_mlp_0": (4 * d, d), "double_blocks_1_txt_mod_lin": (6 * d, d),
              "single_blocks_1_linear2": (d, 5 * d),
              "single_blocks_1_modulation_lin": (3 * d, d)}
    state = {}
    for name, (rows, cols) in layers.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.from_numpy(rng.standard_normal((r, cols)).astype(np.float32) * 0.1)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.from_numpy(rng.standard_normal((rows, r)).astype(np.float32) * 0.1)
        state[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    save_file(state, tmp_path / "kohya.safetensors")
    expected = _fused_reference(root, tmp_path, "kohya.safetensors")
    ours, report = _ours(root, tmp_path / "kohya.safetensors")
    assert report.layout == "kohya" and report.layers == 10   # qkv x2 -> 6, four plain layers
    assert _compare(ours, expected, base) == report.layers   # a weight per layer; no bias changes


def test_kohya_linear1_splits_into_qkv_and_mlp(root, tmp_path):
    """A single block's fused ``linear1`` (q, k, v, MLP input): diffusers' kohya converter assumes FLUX.1's
    full width there, so the tiny model's is checked against the formula, m x alpha / rank x up @ down."""
    from safetensors.numpy import load_file, save_file

    base = load_file(root / "flux-dev" / "transformer" / "diffusion_pytorch_model.safetensors")
    rng = np.random.default_rng(2)
    d, r = 32, 4
    down = rng.standard_normal((r, d)).astype(np.float32)
    up = rng.standard_normal((7 * d, r)).astype(np.float32)
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": down,
               "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
               "lora_unet_single_blocks_0_linear1.alpha": np.asarray(8.0, np.float32)}, tmp_path / "l1.safetensors")
    ours, report = _ours(root, tmp_path / "l1.safetensors")
    delta = 0.7 * (8.0 / r) * (up @ down)
    prefix = "single_transformer_blocks.0."
    for name, rows in (("attn.to_q", slice(0, d)), ("attn.to_k", slice(d, 2 * d)), ("attn.to_v", slice(2 * d, 3 * d)),
                       ("proj_mlp", slice(3 * d, 7 * d))):
        np.testing.assert_allclose(ours[f"{prefix}{name}.weight"], base[f"{prefix}{name}.weight"] + delta[rows],
                                   rtol=1e-5, atol=1e-6)
