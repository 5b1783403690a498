"""Image preprocessing against transformers' CLIPImageProcessor (PIL path),
encoding against the transformers vision tower, negatives and embeddings I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ipadapter_fixtures as fx
from helpers import nchw, rel_err
from ipadapter_jax.io.images import preprocess
from ipadapter_jax.ip_adapter import encode_image, load_embeds, prompt_tokens, save_embeds


def reference_pixels(image) -> np.ndarray:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = CLIPImageProcessorPil()(images=image, return_tensors="np")["pixel_values"]
    return np.transpose(out, (0, 2, 3, 1))


def random_image(mode, size=(300, 211), seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "P":
        img = random_image("RGB", size, seed).convert("P")
        img.info["transparency"] = 3
        return img
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("size", [(300, 211), (180, 400), (224, 224)])
def test_preprocess_matches_clip_image_processor(mode, size):
    image = random_image(mode, size)
    np.testing.assert_allclose(preprocess(image), reference_pixels(image), rtol=0, atol=1e-6)


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (64, 80), dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)          # a 16-bit greyscale PNG
    eight_bit = np.round(values / 257.0).astype(np.uint8)
    expected = reference_pixels(Image.fromarray(eight_bit, "L"))
    np.testing.assert_allclose(preprocess(path), expected, rtol=0, atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    image = random_image("RGB", (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6                                     # "rotate 90 CW to view"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    upright = image.transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(preprocess(path), preprocess(upright))


def test_missing_and_unreadable_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        preprocess(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        preprocess(bad)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection as TorchVision

    from ipadapter_jax.models import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("image_encoder")
    cfg = CLIPVisionConfig(hidden_size=fx.CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=224, patch_size=112, projection_dim=fx.CLIP_DIM)
    torch_model = TorchVision(cfg).eval()
    torch_model.save_pretrained(folder)
    return torch_model, CLIPVisionModelWithProjection.from_pretrained(folder)


def test_encode_image_matches_transformers(encoders):
    torch_model, model = encoders
    images = [random_image("RGB", (300, 211), seed=2), random_image("RGBA", (100, 130), seed=3)]
    with torch.no_grad():
        ref = torch_model(nchw(reference_pixels(images)), output_hidden_states=True)
    pixels = preprocess(images)
    assert rel_err(encode_image(model, pixels, "image_embeds"), ref.image_embeds) <= 1e-5
    assert rel_err(encode_image(model, pixels, "hidden_states"), ref.hidden_states[-2]) <= 1e-5


def adapter_for(tmp_path, variant):
    from diffusers import UNet2DConditionModel as TorchUNet
    from safetensors.numpy import save_file

    from ipadapter_jax.ip_adapter import load_ip_adapter
    from ipadapter_jax.models import UNet2DConditionModel

    tu = TorchUNet(**fx.UNET)
    tu.save_pretrained(tmp_path / "unet")
    save_file(fx.flat(fx.image_proj(variant, fx.UNET["cross_attention_dim"]), fx.ip_layers(tu)),
              tmp_path / "a.safetensors")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    return load_ip_adapter(tmp_path / "a.safetensors", unet), tu


def test_default_negatives(encoders, tmp_path):
    """base: projection of zero embeddings; plus: of the encoder on zero pixels
    (diffusers' rule), checked through transformers' encoder."""
    torch_model, model = encoders
    images = [random_image("RGB", seed=4), random_image("RGB", seed=5)]
    base, _ = adapter_for(tmp_path / "base", "base")
    cond, uncond = prompt_tokens(base, image_encoder=model, images=images)
    assert cond.shape == uncond.shape == (1, 2, 4, fx.UNET["cross_attention_dim"])
    np.testing.assert_allclose(uncond[0], np.asarray(base.project(np.zeros((2, fx.CLIP_DIM), np.float32))),
                               rtol=1e-6, atol=1e-6)

    plus, _ = adapter_for(tmp_path / "plus", "plus")
    _, uncond = prompt_tokens(plus, image_encoder=model, images=images)
    with torch.no_grad():
        zero_states = torch_model(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
    expected = np.asarray(plus.project(zero_states.numpy()))
    assert rel_err(uncond[0, 0], expected[0]) <= 1e-5 and rel_err(uncond[0, 1], expected[0]) <= 1e-5


def test_user_negative_image_and_combine(encoders, tmp_path):
    _, model = encoders
    base, _ = adapter_for(tmp_path, "base")
    refs = [random_image("RGB", seed=6), random_image("RGB", seed=7)]
    negative = random_image("RGB", seed=8)
    cond, uncond = prompt_tokens(base, image_encoder=model, images=refs, negative_images=[negative],
                                 combine="average")
    embeds = encode_image(model, preprocess(refs))
    neg_embeds = encode_image(model, preprocess([negative]))
    assert cond.shape[1] == uncond.shape[1] == 1
    np.testing.assert_allclose(cond[0], np.asarray(base.project(embeds.mean(0, keepdims=True))), atol=1e-5)
    np.testing.assert_allclose(uncond[0], np.asarray(base.project(neg_embeds)), atol=1e-5)


def test_embeds_round_trip_and_nan_refused(tmp_path):
    arr = np.random.default_rng(0).standard_normal((2, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(load_embeds(save_embeds(tmp_path / "e.npy", embeds=arr)), arr)
    loaded = load_embeds(save_embeds(tmp_path / "e.safetensors", cond=arr, uncond=arr * 0))
    np.testing.assert_array_equal(loaded["cond"], arr)
    arr[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", arr)
    with pytest.raises(ValueError, match="nan.npy"):
        load_embeds(tmp_path / "nan.npy")
