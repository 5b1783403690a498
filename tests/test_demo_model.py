"""The shipped demo model: it loads in JAX and in diffusers with the same
latents, `python sample.py` works with no arguments, and the trained adapter
really carries the image prompt (CLIP-I and colour checks with margins)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import nchw, nhwc, rel_err
from ipadapter_jax import demo

ROOT = Path(__file__).resolve().parent.parent
PATHS = demo.demo_paths()
# Measured on the shipped model (v4; this 2-core CPU, float32): CLIP-I 0.559 with the image prompt (scale 0.5)
# against 0.449 for the caption alone, a margin of 0.110 over these 16 held-out cases. The bound is 0.06.
MARGIN = 0.06
# Colour, measured on the shipped adapter (v4): with the reference alone as the prompt (scale 1), the generated
# shape has the reference's colour in 20 of 32 images over 16 held-out references (0.625); chance is 1 in 8.
COLOUR_MIN = 0.4
# "a circle" + a red reference (v4, scale 1): red in 19 of 32 images (0.594; 12 of 32 at scale 0.5), against
# 4 of 32 (0.125, chance) for "a circle" alone. Bounds: 3x chance, and 0.25 above the no-image rate.
RED_SCALE = 1.0
RED_MIN = 0.375


@pytest.fixture(scope="module")
def pipe():
    from ipadapter_jax.pipeline import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(PATHS["sd"], image_encoder=PATHS["image_encoder"])
    p.load_ip_adapter(PATHS["adapter"])
    return p


def test_shipped_files_are_standard_and_small():
    total = sum(f.stat().st_size for f in demo.MODEL_DIR.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, f"the demo model is {total / 2**20:.1f} MB"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (PATHS["sd"] / sub).is_dir()
    assert (PATHS["sd"] / "model_index.json").is_file()
    assert (PATHS["image_encoder"] / "config.json").is_file()


def test_jax_and_diffusers_give_the_same_latents(pipe):
    """diffusers' StableDiffusionPipeline + load_ip_adapter on the shipped folders
    reproduce our latents from the same noise (relative 1e-4)."""
    from diffusers import StableDiffusionPipeline as TorchPipeline
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ipadapter_jax.pipeline import ImagePromptSpec

    noise = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    prompt, scale, steps = demo.DEFAULT_PROMPT, 0.8, 10
    ours = pipe(prompt, ip_adapter_prompts=[ImagePromptSpec(images=[PATHS["reference"]], scale=scale)],
                num_inference_steps=steps, guidance_scale=5.0, height=64, width=64, num_images=2, latents=noise)
    torch_pipe = TorchPipeline.from_pretrained(
        PATHS["sd"], safety_checker=None, requires_safety_checker=False,
        feature_extractor=CLIPImageProcessorPil.from_pretrained(PATHS["image_encoder"]),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(PATHS["image_encoder"]))
    torch_pipe.load_ip_adapter(str(PATHS["adapter"].parent), subfolder="", weight_name=PATHS["adapter"].name,
                               image_encoder_folder=None)
    torch_pipe.set_ip_adapter_scale(scale)
    with torch.no_grad():
        expected = torch_pipe(prompt, ip_adapter_image=Image.open(PATHS["reference"]), num_inference_steps=steps,
                              guidance_scale=5.0, height=64, width=64, num_images_per_prompt=2,
                              latents=nchw(noise), output_type="latent").images
    err = rel_err(ours.latents, nhwc(expected))
    print(f"JAX vs diffusers latents: relative error {err:.2e}")
    assert err <= 1e-4


def test_sample_py_with_no_arguments(tmp_path):
    env = {**os.environ, "IPADAPTER_JAX_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--no-progress"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted((tmp_path / "outputs").glob("demo-*.png"))
    assert len(written) == 5 and "wrote" in result.stdout      # 4 images + grid
    from PIL import Image

    assert Image.open(written[0]).size == (64, 64)


def test_image_prompt_brings_generations_closer_to_the_reference(pipe):
    """CLIP-I (demo CLIP) on 16 held-out references: caption + image prompt (scale
    0.5) against the caption alone, same seeds. Measured at commit: see MARGIN."""
    from ipadapter_jax import eval as eval_lib

    cases = eval_lib.demo_cases(16)
    generator = eval_lib.Generator(pipe, pipe.unet.ip_adapters[0], steps=25, guidance=5.0, height=64, width=64,
                                   num_images=2)
    scorer = eval_lib.ClipScorer(PATHS["clip"])
    result = eval_lib.evaluate(generator, scorer, cases, modes=("text", "image+text"), scales=(0.5,),
                               progress=False)
    by_mode = {r["mode"]: r for r in result["rows"]}
    margin = by_mode["image+text"]["clip_i"] - by_mode["text"]["clip_i"]
    print(f"CLIP-I margin {margin:.4f}", result["rows"])
    assert margin >= MARGIN, (margin, result["rows"])


def test_prompt_embeds_equal_prompts_and_concat_generator_runs():
    """The pipeline's prompt_embeds path gives the prompt path's latents; the
    simple-adapter generator appends 4 image tokens and produces images."""
    from ipadapter_jax import eval as eval_lib
    from ipadapter_jax.pipeline import StableDiffusionPipeline

    fresh = StableDiffusionPipeline.from_pretrained(PATHS["sd"], image_encoder=PATHS["image_encoder"])
    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, height=64, width=64, seed=1)
    by_text = fresh("a red circle on a blue background", **kwargs)
    by_embeds = fresh(prompt_embeds=fresh.encode_prompt(["a red circle on a blue background"]),
                      negative_prompt_embeds=fresh.encode_prompt([""]), **kwargs)
    assert np.array_equal(by_text.latents, by_embeds.latents)
    with pytest.raises(ValueError, match="both"):
        fresh(prompt_embeds=fresh.encode_prompt(["a"]), **kwargs)
    generator = eval_lib.Generator(fresh, PATHS["adapter"], conditioning="concat", steps=5, height=64, width=64)
    assert len(fresh.unet.ip_adapters) == 0
    case = eval_lib.demo_cases(1)[0]
    images = generator(case, "image+text", 1.0, seed=0)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()



def test_image_prompt_carries_colour(pipe):
    """The shape of an image-prompted generation takes its reference's colour
    (``shapes.classify_colours``) far more often than chance (1/8): 16 held-out
    references, empty caption, scale 1, fixed seeds. Measured: see COLOUR_MIN."""
    from ipadapter_jax import eval as eval_lib
    from ipadapter_jax.eval.ablation import colour_transfer

    generator = eval_lib.Generator(pipe, pipe.unet.ip_adapters[0], steps=25, guidance=5.0, height=64, width=64,
                                   num_images=2)
    rows = colour_transfer(generator, 16, [("image", 1.0)])
    print("colour match", rows)
    assert rows[0]["n"] == 32
    assert rows[0]["colour_match"] >= COLOUR_MIN, rows


def test_a_circle_with_a_red_reference_comes_out_red(pipe):
    """The issue's colour check: "a circle" with a red reference (the first 16
    held-out red shapes, of any kind) gives predominantly red shapes
    (``shapes.classify_colours``) far more often than chance (1/8) and than the
    same prompt without the image. Scale RED_SCALE, fixed seeds. Measured: see RED_MIN."""
    from ipadapter_jax import eval as eval_lib
    from ipadapter_jax.eval.ablation import colour_transfer

    generator = eval_lib.Generator(pipe, pipe.unet.ip_adapters[0], steps=25, guidance=5.0, height=64, width=64,
                                   num_images=2)
    text, image = colour_transfer(generator, 16, [("text", 0.0), ("image+text", RED_SCALE)], prompt="a circle",
                                  colour="red")
    print("red from 'a circle':", text, image)
    assert image["n"] == 32
    assert image["colour_match"] >= RED_MIN, (text, image)
    assert image["colour_match"] >= text["colour_match"] + 0.25, (text, image)

