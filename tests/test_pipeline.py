"""End-to-end parity with diffusers' StableDiffusionPipeline + load_ip_adapter
(same initial latents): final latents <= 1e-4 relative, decoded images <= 2e-3
max abs; the same through sample.py; and the pipeline's bad inputs."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import sd_fixtures
from helpers import cpu_env, nchw, nhwc, rel_err
from ipadapter_jax.pipeline import ImagePromptSpec, StableDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red striped circle on the blue background"
LATENT_SHAPE = (1, 8, 8, 4)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    paths = sd_fixtures.build_pipeline_folder(root)
    paths["image"] = sd_fixtures.reference_image(root / "ref.png")
    paths["latents"] = root / "noise.npy"
    np.save(paths["latents"], np.random.default_rng(0).standard_normal(LATENT_SHAPE).astype(np.float32))
    return paths


def diffusers_run(paths, scheduler: str, steps: int, scale: float = 0.7, output_type: str = "latent",
                  guidance_rescale: float = 0.0):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    from diffusers import StableDiffusionPipeline as TorchPipeline
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pipe = TorchPipeline.from_pretrained(
        paths["sd"], safety_checker=None, requires_safety_checker=False, feature_extractor=CLIPImageProcessorPil(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]))
    cls = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(paths["adapter"].parent), subfolder="", weight_name=paths["adapter"].name,
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    latents = nchw(np.load(paths["latents"]))
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt="", ip_adapter_image=Image.open(paths["image"]),
                   num_inference_steps=steps, guidance_scale=7.5, height=sd_fixtures.HEIGHT,
                   width=sd_fixtures.WIDTH, latents=latents, output_type=output_type,
                   guidance_rescale=guidance_rescale)
    return nhwc(out.images) if output_type == "latent" else np.asarray(out.images)


@pytest.fixture(scope="module")
def jax_pipe(paths):
    pipe = StableDiffusionPipeline.from_pretrained(paths["sd"], image_encoder=paths["image_encoder"])
    pipe.load_ip_adapter(paths["adapter"])
    return pipe


def jax_run(pipe, paths, scheduler, steps, scale=0.7, guidance_rescale=0.0):
    return pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(images=[paths["image"]], scale=scale)],
                num_inference_steps=steps, guidance_scale=7.5, scheduler=scheduler, height=sd_fixtures.HEIGHT,
                width=sd_fixtures.WIDTH, latents=np.load(paths["latents"]), guidance_rescale=guidance_rescale)


@pytest.mark.parametrize("scheduler, steps", [("ddim", 10), ("dpm++2m", 8)])
def test_end_to_end_parity(paths, jax_pipe, scheduler, steps):
    expected_latents = diffusers_run(paths, scheduler, steps)
    expected_images = diffusers_run(paths, scheduler, steps, output_type="np")
    out = jax_run(jax_pipe, paths, scheduler, steps)
    assert rel_err(out.latents, expected_latents) <= 1e-4
    # Decoded in float32 as the VAE parity tests (1e-5); measured 8.6e-7 / 6.6e-7 max-abs, 5e-7 relative.
    assert np.abs(out.images - expected_images).max() <= 1e-5
    assert rel_err(out.images, expected_images) <= 1e-5
    # The image prompt matters: without it the latents are far off.
    plain = jax_run(jax_pipe, paths, scheduler, steps, scale=0.0)
    assert rel_err(plain.latents, expected_latents) > 1e-3


def test_guidance_rescale_parity(paths, jax_pipe):
    expected = diffusers_run(paths, "ddim", 6, guidance_rescale=0.7)
    out = jax_run(jax_pipe, paths, "ddim", 6, guidance_rescale=0.7)
    assert rel_err(out.latents, expected) <= 1e-4
    assert rel_err(jax_run(jax_pipe, paths, "ddim", 6).latents, expected) > 1e-3


def test_bfloat16_compute_is_close(paths, jax_pipe):
    bf16 = StableDiffusionPipeline.from_pretrained(paths["sd"], image_encoder=paths["image_encoder"],
                                                   dtype=jax.numpy.bfloat16)
    bf16.load_ip_adapter(paths["adapter"])
    ref = jax_run(jax_pipe, paths, "ddim", 5)
    out = jax_run(bf16, paths, "ddim", 5)
    assert bf16.unet.conv_in.kernel[...].dtype == np.float32           # master weights stay float32
    assert rel_err(out.latents, ref.latents) <= 5e-2                    # bf16 has 8 mantissa bits


SHARDED = """
import os, sys, numpy as np, jax
sys.path.insert(0, {tests!r})
assert jax.device_count() == 8, jax.devices()
from ipadapter_jax.pipeline import ImagePromptSpec, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({sd!r}, image_encoder={enc!r})
pipe.load_ip_adapter({adapter!r})
out = pipe("a red circle", ip_adapter_prompts=[ImagePromptSpec(images=[{image!r}], scale=0.7)],
           num_inference_steps=4, height=16, width=16, num_images=8, seed=1)
np.save({out!r}, out.latents)
"""


def test_batch_sharded_over_eight_devices_matches_one(paths, jax_pipe, tmp_path):
    """The same call on 8 (virtual CPU) devices, batch split over the data axis,
    gives the latents of 1 device."""
    script = SHARDED.format(tests=str(ROOT / "tests"), sd=str(paths["sd"]), enc=str(paths["image_encoder"]),
                            adapter=str(paths["adapter"]), image=str(paths["image"]), out=str(tmp_path / "x.npy"))
    env = cpu_env(devices=8)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one = jax_pipe("a red circle", ip_adapter_prompts=[ImagePromptSpec(images=[paths["image"]], scale=0.7)],
                   num_inference_steps=4, height=16, width=16, num_images=8, seed=1)
    assert rel_err(np.load(tmp_path / "x.npy"), one.latents) <= 1e-5


def test_sample_py_matches_diffusers(paths, tmp_path):
    expected = diffusers_run(paths, "ddim", 10)
    out_latents = tmp_path / "final.npy"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(paths["sd"]), "--image-encoder",
           str(paths["image_encoder"]), "--ip-adapter", str(paths["adapter"]), "--image", str(paths["image"]),
           "--scale", "0.7", "--prompt", PROMPT, "--steps", "10", "--scheduler", "ddim", "--height", "16",
           "--width", "16", "--init-latents", str(paths["latents"]), "--save-latents", str(out_latents),
           "--out", str(tmp_path / "img.png"), "--cache-dir", ""]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and (tmp_path / "img.png").is_file()
    assert "steps/s" in result.stdout
    assert rel_err(np.load(out_latents), expected) <= 1e-4


def test_same_seed_same_images(jax_pipe, paths):
    spec = [ImagePromptSpec(images=[paths["image"]], scale=0.5)]
    kwargs = dict(ip_adapter_prompts=spec, num_inference_steps=3, height=16, width=16, num_images=2,
                  scheduler="euler-a")
    a, b = jax_pipe(PROMPT, seed=3, **kwargs), jax_pipe(PROMPT, seed=3, **kwargs)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, jax_pipe(PROMPT, seed=4, **kwargs).images)


def test_new_prompt_seed_scale_or_image_never_recompile(jax_pipe, paths, tmp_path):
    """Prompts, seeds, adapter scales and reference images are array inputs of the one
    compiled loop: changing them adds no executable to the pipeline's cache."""
    from PIL import Image

    other = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(other)
    base = dict(num_inference_steps=3, height=16, width=16, scheduler="ddim", progress=False)
    jax_pipe(PROMPT, seed=0, ip_adapter_prompts=[ImagePromptSpec(images=[paths["image"]], scale=0.5)], **base)
    compiled = jax_pipe.num_compiled
    for prompt, seed, scale, image in [("another prompt", 0, 0.5, paths["image"]), (PROMPT, 7, 0.5, paths["image"]),
                                       (PROMPT, 0, 0.9, paths["image"]), (PROMPT, 0, 0.5, other)]:
        out = jax_pipe(prompt, seed=seed, ip_adapter_prompts=[ImagePromptSpec(images=[image], scale=scale)], **base)
        assert out.images.shape == (1, 16, 16, 3)
        assert jax_pipe.num_compiled == compiled, (prompt, seed, scale, image)


def test_img2img_runs_from_part_way(jax_pipe, paths):
    out = jax_pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(images=[paths["image"]])], num_inference_steps=10,
                   height=16, width=16, init_image=paths["image"], strength=0.5)
    assert out.timings["steps"] == 5 and out.images.shape == (1, 16, 16, 3)


# ------------------------------------------------------------------ bad input

def test_missing_image_named(jax_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        jax_pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(images=[tmp_path / "nope.png"])],
                 num_inference_steps=2, height=16, width=16)


def test_size_not_multiple_of_8(jax_pipe):
    with pytest.raises(ValueError, match="multiples of 8, got 20x16"):
        jax_pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(embeds=np.zeros((1, 24), np.float32))],
                 height=20, width=16)


def test_more_masks_than_images(jax_pipe, paths):
    mask = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match="2 masks for 1 reference images"):
        jax_pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(images=[paths["image"]], masks=[mask, mask])],
                 num_inference_steps=2, height=16, width=16)


def test_unknown_scheduler_lists_valid(jax_pipe):
    with pytest.raises(ValueError, match="ddim.*pndm.*euler"):
        jax_pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(embeds=np.zeros((1, 24), np.float32))],
                 scheduler="heun", height=16, width=16)


def test_long_prompt_truncated_with_warning(jax_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        emb = jax_pipe.encode_prompt(["word " * 100])
    assert emb.shape == (1, 77, 64)
    assert "truncated" in caplog.text


def test_nan_embeddings_refused(jax_pipe):
    bad = np.full((1, 24), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        jax_pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(embeds=bad)], num_inference_steps=2, height=16,
                 width=16)


def test_adapter_for_other_width_refused(jax_pipe, tmp_path):
    from safetensors.numpy import save_file

    import ipadapter_fixtures as fx
    from ipadapter_jax.io import CheckpointError

    r = fx.Rand(0)
    ip = {f"{2 * n + 1}.{kv}.weight": r.w(8, 1024) for n in range(7) for kv in ("to_k_ip", "to_v_ip")}
    save_file(fx.flat({**r.lin("proj", 24, 4 * 1024), **r.ln("norm", 1024)}, ip), tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointError, match="width 1024 \\(SD 2.x\\)"):
        jax_pipe.load_ip_adapter(tmp_path / "sd2.safetensors")


def test_sample_py_errors(paths, tmp_path):
    base = [sys.executable, str(ROOT / "sample.py"), "--model", str(paths["sd"])]
    for extra, message in [(["--ip-adapter", str(paths["adapter"]), "--image", str(tmp_path / "x.png"),
                             "--image-encoder", str(paths["image_encoder"])], "file not found"),
                           (["--ip-adapter", str(paths["adapter"]), "--image", str(paths["image"])],
                            "--image needs --image-encoder"),
                           (["--scheduler", "euler", "--eta", "0.5"], "ddim scheduler only"),
                           (["--num-images", "0"], "at least 1"),
                           (["--height", "20"], "multiple of 8"),
                           (["--scheduler", "heun"], "valid: ddim, pndm")]:
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr[-500:])


def test_free_encoders_after_prepare(paths):
    """A prepared request denoises the same without the encoders; encoding afterwards is a clear error."""
    from ipadapter_jax.io.errors import BadArgument

    pipe = StableDiffusionPipeline.from_pretrained(paths["sd"], image_encoder=paths["image_encoder"])
    pipe.load_ip_adapter(paths["adapter"])
    specs = [ImagePromptSpec(images=[paths["image"]], scale=0.7)]
    options = dict(num_inference_steps=2, height=sd_fixtures.HEIGHT, width=sd_fixtures.WIDTH,
                   latents=np.load(paths["latents"]))
    expected = pipe(PROMPT, ip_adapter_prompts=specs, **options).latents
    request = pipe.prepare(PROMPT, ip_adapter_prompts=specs, **options)
    pipe.free_encoders()
    assert pipe.text_encoder is None and pipe.image_encoder is None
    np.testing.assert_array_equal(np.asarray(pipe.denoise(request)[0]), expected)
    with pytest.raises(BadArgument, match="free_encoders"):
        pipe.prepare(PROMPT, **options)
