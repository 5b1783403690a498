"""IP-Adapter parity with diffusers (float32, CPU): every variant loaded from an
official-format file; UNet outputs and projections <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import ipadapter_fixtures as fx
from helpers import nchw, nhwc, rel_err, saved_diffusers
from ipadapter_jax import ip_adapter
from ipadapter_jax.ip_adapter import load_ip_adapter
from ipadapter_jax.models import UNet2DConditionModel

TOL = 1e-5
B, HW, SEQ = 2, 8, 5


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    return saved_diffusers(tmp_path_factory, "unet", "UNet2DConditionModel", fx.UNET)


def torch_unet(folder):
    from diffusers import UNet2DConditionModel as TorchUNet

    return TorchUNet.from_pretrained(folder).eval()


def inputs(seed=0, hw=(HW, HW)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, *hw, 4), dtype=np.float32), np.array([11, 873]),
            rng.standard_normal((B, SEQ, fx.UNET["cross_attention_dim"]), dtype=np.float32))


def embeds_for(variant, n_images=1, seed=3):
    """(what the adapter projects, extra clip states for faceid-plus), with an image axis."""
    rng = np.random.default_rng(seed)
    if variant == "base":
        return rng.standard_normal((B, n_images, fx.CLIP_DIM), dtype=np.float32), None
    if variant in ("plus", "full-face"):
        return rng.standard_normal((B, n_images, fx.CLIP_TOKENS, fx.CLIP_HIDDEN), dtype=np.float32), None
    ids = rng.standard_normal((B, n_images, fx.ID_DIM), dtype=np.float32)
    if variant == "faceid":
        return ids, None
    return ids, rng.standard_normal((B, n_images, fx.CLIP_TOKENS, fx.CLIP_HIDDEN), dtype=np.float32)


def write_official(tmp_path, proj, ip, name="ip-adapter.safetensors"):
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(fx.flat(proj, ip), path)
    else:
        torch.save(fx.torch_nested(proj, ip), path)
    return path


def torch_forward(tu, x, t, text, embeds, **kwargs):
    with torch.no_grad():
        return nhwc(tu(nchw(x), torch.from_numpy(t), torch.from_numpy(text),
                       added_cond_kwargs={"image_embeds": [torch.from_numpy(e) for e in embeds]}, **kwargs).sample)


def project(adapter, embeds, clip_states=None):
    """[B, N, ...] per-image embeddings -> [B, N, T, C] tokens."""
    b, n = embeds.shape[:2]
    flat_clip = None if clip_states is None else clip_states.reshape(b * n, *clip_states.shape[2:])
    tokens = adapter.project(embeds.reshape(b * n, *embeds.shape[2:]), flat_clip)
    return tokens.reshape(b, n, *tokens.shape[1:])


@pytest.mark.parametrize("variant, filename", [
    ("base", "ip-adapter_sd15.safetensors"), ("plus", "ip-adapter-plus_sd15.bin"),
    ("full-face", "ip-adapter-full-face_sd15.safetensors"), ("faceid", "ip-adapter-faceid-portrait_sd15.bin"),
    ("faceid-plus", "ip-adapter-faceid-plusv2_sd15.bin")])
def test_variant_parity(unet_folder, tmp_path, variant, filename):
    tu = torch_unet(unet_folder)
    proj = fx.image_proj(variant, fx.UNET["cross_attention_dim"])
    ip = fx.ip_layers(tu)
    path = write_official(tmp_path, proj, ip, filename)
    tu._load_ip_adapter_weights([fx.torch_nested(proj, ip)], low_cpu_mem_usage=False)

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    adapter = load_ip_adapter(path, unet)
    assert adapter.variant == variant
    embeds, clip = embeds_for(variant)
    shortcut = variant == "faceid-plus"
    if variant == "faceid-plus":
        layer = tu.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds, layer.shortcut, layer.shortcut_scale = torch.from_numpy(clip), shortcut, 0.7
        tokens = project_with_scale(adapter, embeds, clip, 0.7)
    else:
        tokens = project(adapter, embeds)

    # The projection alone.
    with torch.no_grad():
        ref_tokens = tu.encoder_hid_proj([torch.from_numpy(embeds)])[0].numpy()
    assert rel_err(tokens, ref_tokens) <= TOL

    x, t, text = inputs()
    expected = torch_forward(tu, x, t, text, [embeds])
    out = unet(x, t, text, [ip_adapter.image_prompt(adapter, tokens, 1.0, unet=unet)])
    assert rel_err(out, expected) <= TOL
    # ...and the image branch really contributes (the test could not pass without it).
    assert rel_err(unet(x, t, text), expected) > 1e-3


def project_with_scale(adapter, ids, clip, s_scale):
    b, n = ids.shape[:2]
    tokens = adapter.project(ids.reshape(b * n, -1), clip.reshape(b * n, *clip.shape[2:]), s_scale=s_scale)
    return tokens.reshape(b, n, *tokens.shape[1:])


def test_faceid_lora_parity(unet_folder, tmp_path):
    """FaceID files carry LoRA on every attention layer: reference is diffusers'
    UNet with the IP processors and the LoRA deltas merged into its weights."""
    tu = torch_unet(unet_folder)
    proj = fx.image_proj("faceid", fx.UNET["cross_attention_dim"])
    ip = fx.ip_layers(tu, lora_rank=8)
    path = write_official(tmp_path, proj, ip, "ip-adapter-faceid_sd15.bin")
    tu._load_ip_adapter_weights([fx.torch_nested(proj, ip)], low_cpu_mem_usage=False)
    strength = 0.8
    fx.merge_lora_into_torch_unet(tu, ip, strength)

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    adapter = load_ip_adapter(path, unet)
    assert adapter.lora is not None and len(adapter.lora) == len(tu.attn_processors)
    embeds, _ = embeds_for("faceid")
    x, t, text = inputs()
    expected = torch_forward(tu, x, t, text, [embeds])
    prompt = ip_adapter.image_prompt(adapter, project(adapter, embeds), 1.0, unet=unet, lora_scale=strength)
    assert rel_err(unet(x, t, text, [prompt]), expected) <= TOL


def test_two_adapters_and_per_block_scales(unet_folder, tmp_path):
    tu = torch_unet(unet_folder)
    c = fx.UNET["cross_attention_dim"]
    files = [(fx.image_proj("base", c, seed=0), fx.ip_layers(tu, seed=1)),
             (fx.image_proj("plus", c, seed=2), fx.ip_layers(tu, seed=3))]
    tu._load_ip_adapter_weights([fx.torch_nested(*f) for f in files], low_cpu_mem_usage=False)
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    loaded = [load_ip_adapter(write_official(tmp_path, *f, f"a{i}.safetensors"), unet) for i, f in enumerate(files)]
    base_embeds, _ = embeds_for("base", seed=4)
    plus_embeds, _ = embeds_for("plus", seed=5)
    x, t, text = inputs(1)
    block_scale = {"down": {"block_0": 0.0, "block_1": [1.5]}, "up": {"block_0": [0.5, 0.0]}, "mid": 0.25}
    # diffusers: one config per adapter; a dict expands to per-layer scales.
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
    configs = _maybe_expand_lora_scales(tu, [0.6, block_scale], default_scale=0.0)
    for name, proc in tu.attn_processors.items():
        if hasattr(proc, "scale"):
            for i, cfg in enumerate(configs):
                if isinstance(cfg, dict):
                    for k, s in cfg.items():
                        if name.startswith(k):
                            proc.scale[i] = s
                else:
                    proc.scale[i] = cfg
    expected = torch_forward(tu, x, t, text, [base_embeds, plus_embeds])
    prompts = [ip_adapter.image_prompt(loaded[0], project(loaded[0], base_embeds), 0.6, unet=unet),
               ip_adapter.image_prompt(loaded[1], project(loaded[1], plus_embeds), block_scale, unet=unet)]
    assert rel_err(unet(x, t, text, prompts), expected) <= TOL


def test_masks_on_two_reference_images(unet_folder, tmp_path):
    tu = torch_unet(unet_folder)
    proj, ip = fx.image_proj("base", fx.UNET["cross_attention_dim"]), fx.ip_layers(tu)
    tu._load_ip_adapter_weights([fx.torch_nested(proj, ip)], low_cpu_mem_usage=False)
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    adapter = load_ip_adapter(write_official(tmp_path, proj, ip), unet)
    embeds, _ = embeds_for("base", n_images=2)
    masks = np.zeros((2, 64, 64), np.float32)     # output image 64x64 (latents 8x8), left / right halves
    masks[0, :, :32], masks[1, :, 32:] = 1.0, 1.0
    x, t, text = inputs(2)
    expected = torch_forward(tu, x, t, text, [embeds],
                             cross_attention_kwargs={"ip_adapter_masks": [torch.from_numpy(masks[None])]})
    pyramid = ip_adapter.mask_pyramid(masks, unet, HW, HW)
    prompt = ip_adapter.image_prompt(adapter, project(adapter, embeds), 1.0, unet=unet, masks=pyramid)
    assert rel_err(unet(x, t, text, [prompt]), expected) <= TOL


def test_official_concatenated_layout(unet_folder, tmp_path):
    """Official code appends the image tokens to the 77 text tokens; splitting
    them off gives the same output as passing them separately."""
    tu = torch_unet(unet_folder)
    proj, ip = fx.image_proj("base", fx.UNET["cross_attention_dim"]), fx.ip_layers(tu)
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    adapter = load_ip_adapter(write_official(tmp_path, proj, ip), unet)
    tokens = project(adapter, embeds_for("base")[0])
    x, t, text = inputs()
    concatenated = np.concatenate([text, np.asarray(tokens[:, 0])], axis=1)
    text2, tokens2 = ip_adapter.split_concatenated(concatenated, adapter.num_tokens)
    a = unet(x, t, text, [ip_adapter.image_prompt(adapter, tokens, 0.7, unet=unet)])
    b = unet(x, t, text2, [ip_adapter.image_prompt(adapter, tokens2, 0.7, unet=unet)])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unet_without_prompts_is_the_plain_unet(unet_folder, tmp_path):
    tu = torch_unet(unet_folder)
    plain = UNet2DConditionModel.from_pretrained(unet_folder)
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    load_ip_adapter(write_official(tmp_path, fx.image_proj("base", 64), fx.ip_layers(tu)), unet)
    x, t, text = inputs()
    np.testing.assert_array_equal(np.asarray(unet(x, t, text)), np.asarray(plain(x, t, text)))
