"""Official-format export round trips and loads in diffusers; every bad adapter
input is refused with a message naming the culprit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import ipadapter_fixtures as fx
from helpers import rel_err
from ipadapter_jax import ip_adapter
from ipadapter_jax.io import CheckpointError
from ipadapter_jax.ip_adapter import load_ip_adapter, save_ip_adapter
from ipadapter_jax.models import UNet2DConditionModel
from test_ip_adapter import (B, embeds_for, inputs, project, torch_forward, torch_unet,  # noqa: F401
                             unet_folder, write_official)


@pytest.mark.parametrize("variant, lora", [("base", None), ("plus", None), ("faceid", 4), ("faceid-plus", None),
                                           ("full-face", None)])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_export_round_trip_is_bit_exact(unet_folder, tmp_path, variant, lora, suffix):
    tu = torch_unet(unet_folder)
    original = fx.flat(fx.image_proj(variant, fx.UNET["cross_attention_dim"]), fx.ip_layers(tu, lora_rank=lora))
    save_file(original, tmp_path / "in.safetensors")
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    adapter = load_ip_adapter(tmp_path / "in.safetensors", unet)
    out = save_ip_adapter(adapter, tmp_path / f"out{suffix}")
    if suffix == ".safetensors":
        exported = load_file(out)
    else:
        nested = torch.load(out, weights_only=True)
        exported = {f"{group}.{k}": v.numpy() for group, d in nested.items() for k, v in d.items()}
    assert exported.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_exported_file_loads_in_diffusers(unet_folder, tmp_path, suffix):
    """diffusers' own ``load_ip_adapter`` (the pipeline mixin) reads our export
    and computes what we compute."""
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    class Holder(IPAdapterMixin):
        def __init__(self, unet):
            self.unet = unet

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    tu = torch_unet(unet_folder)
    adapter = load_ip_adapter(write_official(tmp_path, fx.image_proj("plus", fx.UNET["cross_attention_dim"]),
                                             fx.ip_layers(tu)), unet)
    path = save_ip_adapter(adapter, tmp_path / "export" / f"ip-adapter-plus{suffix}")
    Holder(tu).load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    embeds, _ = embeds_for("plus")
    x, t, text = inputs()
    expected = torch_forward(tu, x, t, text, [embeds])
    prompt = ip_adapter.image_prompt(adapter, project(adapter, embeds), 1.0, unet=unet)
    assert rel_err(unet(x, t, text, [prompt]), expected) <= 1e-5


# ------------------------------------------------------------------ bad input

@pytest.fixture()
def unet(unet_folder):
    return UNet2DConditionModel.from_pretrained(unet_folder)


def test_sdxl_adapter_on_sd15_unet(unet, tmp_path):
    """An SDXL adapter (70 cross-attention layers, 2048-wide tokens) is refused by name."""
    r = fx.Rand(0)
    ip = {f"{2 * n + 1}.{kv}.weight": r.w(8, 2048) for n in range(70) for kv in ("to_k_ip", "to_v_ip")}
    proj = {**r.lin("proj", 16, 4 * 2048), **r.ln("norm", 2048)}
    path = write_official(tmp_path, proj, ip, "ip-adapter_sdxl.safetensors")
    with pytest.raises(CheckpointError, match=r"70 cross-attention layers of width 2048 \(SDXL\); the UNet has 7 of width 64"):
        load_ip_adapter(path, unet)
    assert len(unet.ip_adapters) == 0


def test_plus_adapter_given_base_embeddings(unet, tmp_path, unet_folder):
    tu = torch_unet(unet_folder)
    adapter = load_ip_adapter(write_official(tmp_path, fx.image_proj("plus", 64), fx.ip_layers(tu)), unet)
    with pytest.raises(ValueError, match=r"'plus' IP-Adapter: it takes CLIP hidden_states\[-2\]"):
        adapter.project(np.zeros((1, fx.CLIP_DIM), np.float32))
    with pytest.raises(ValueError, match="width 40, got 24"):
        adapter.project(np.zeros((1, 5, fx.CLIP_DIM), np.float32))


def test_unknown_key_layout(unet, tmp_path):
    r = fx.Rand(0)
    path = write_official(tmp_path, {"mystery.weight": r.w(3, 3)}, {"1.to_k_ip.weight": r.w(32, 64)})
    with pytest.raises(CheckpointError, match="unknown image_proj key layout"):
        load_ip_adapter(path, unet)


def test_not_an_ip_adapter_file(unet, tmp_path, unet_folder):
    with pytest.raises(CheckpointError, match="not an IP-Adapter file"):
        load_ip_adapter(unet_folder / "diffusion_pytorch_model.safetensors", unet)


def test_truncated_adapter_file(unet, tmp_path, unet_folder):
    path = write_official(tmp_path, fx.image_proj("base", 64), fx.ip_layers(torch_unet(unet_folder)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_ip_adapter(path, unet)


def test_missing_layer_weight(unet, tmp_path, unet_folder):
    ip = fx.ip_layers(torch_unet(unet_folder))
    del ip["3.to_v_ip.weight"]
    path = write_official(tmp_path, fx.image_proj("base", 64), ip)
    with pytest.raises(CheckpointError, match=r"layers.1.to_v_ip.weight"):
        load_ip_adapter(path, unet)


def test_more_masks_than_images(unet, tmp_path, unet_folder):
    adapter = load_ip_adapter(write_official(tmp_path, fx.image_proj("base", 64),
                                             fx.ip_layers(torch_unet(unet_folder))), unet)
    tokens = project(adapter, embeds_for("base", n_images=2)[0])
    masks = ip_adapter.mask_pyramid(np.ones((3, 64, 64), np.float32), unet, 8, 8)
    with pytest.raises(ValueError, match="3 masks for 2 reference images"):
        ip_adapter.image_prompt(adapter, tokens, 1.0, unet=unet, masks=masks)


def test_nan_tokens_refused(unet, tmp_path, unet_folder):
    adapter = load_ip_adapter(write_official(tmp_path, fx.image_proj("base", 64),
                                             fx.ip_layers(torch_unet(unet_folder))), unet)
    tokens = np.full((B, 1, 4, 64), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        ip_adapter.image_prompt(adapter, tokens, 1.0, unet=unet)


def test_prompt_count_must_match_attached_adapters(unet, tmp_path, unet_folder):
    adapter = load_ip_adapter(write_official(tmp_path, fx.image_proj("base", 64),
                                             fx.ip_layers(torch_unet(unet_folder))), unet)
    prompt = ip_adapter.image_prompt(adapter, project(adapter, embeds_for("base")[0]), 1.0, unet=unet)
    x, t, text = inputs()
    with pytest.raises(ValueError, match="2 image prompts for 1 attached"):
        unet(x, t, text, [prompt, prompt])


def test_adapter_for_another_unet_is_not_attached(unet, tmp_path, unet_folder):
    from flax import nnx

    from ipadapter_jax.ip_adapter.image_proj import ImageProjModel

    other = UNet2DConditionModel(dict(fx.UNET, block_out_channels=(32, 32)), rngs=nnx.Rngs(0))
    adapter = ip_adapter.IPAdapter.for_unet(other, ImageProjModel(8, 64, rngs=nnx.Rngs(0)), variant="base",
                                          rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="maps 64 -> 32, the UNet needs 64 -> 64"):
        ip_adapter.attach(unet, adapter)


def test_lora_keys_in_a_variant_without_lora_are_refused(unet_folder, tmp_path):
    """Only the variants whose files carry LoRA (the registry's ``lora``) may have LoRA keys."""
    from ipadapter_jax.io.files import CheckpointError

    tu = torch_unet(unet_folder)
    bad = fx.flat(fx.image_proj("base", fx.UNET["cross_attention_dim"]), fx.ip_layers(tu, lora_rank=4))
    save_file(bad, tmp_path / "base-with-lora.safetensors")
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    with pytest.raises(CheckpointError, match=r"LoRA keys .* 'base' adapter.*faceid"):
        load_ip_adapter(tmp_path / "base-with-lora.safetensors", unet)
