"""End-to-end parity of ``StableDiffusionXLPipeline`` with diffusers'
StableDiffusionXLPipeline on a small random SDXL folder (two text encoders,
``text_time`` UNet, SDXL's VAE scaling factor and Euler config), same initial
latents: final latents <= 1e-4 relative. Euler and DDIM; the zero-negative
rule; prompt_2 / clip_skip; non-square size and micro-conditioning; an SDXL
IP-Adapter from precomputed embeddings; the class picked from
``model_index.json``; and the same through sample.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ipadapter_fixtures as fx
import sd_fixtures
from helpers import nchw, nhwc, rel_err
from ipadapter_jax.io.errors import MissingFile, Unsupported
from ipadapter_jax.pipeline import (ImagePromptSpec, StableDiffusionPipeline, StableDiffusionXLPipeline,
                                    load_pipeline)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red striped circle on the blue background"
HEIGHT, WIDTH = 16, 24                 # pixels; latents 8 x 12 with a 2-level VAE
LATENT_SHAPE = (1, HEIGHT // 2, WIDTH // 2, 4)
STEPS = 4
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def build_sdxl_folder(root: Path, seed: int = 0) -> dict:
    """root/sdxl (diffusers' save_pretrained) and root/ip-adapter_sdxl.safetensors."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers import StableDiffusionXLPipeline as TorchXL
    from safetensors.numpy import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    vocab = sd_fixtures.write_tokenizer(root / "tok1")
    sd_fixtures.write_tokenizer(root / "tok2")
    config = json.loads((root / "tok2" / "tokenizer_config.json").read_text())
    (root / "tok2" / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))  # as SDXL's
    w1, w2 = fx.SDXL_TEXT_WIDTHS
    common = dict(vocab_size=vocab, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                  bos_token_id=vocab - 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, hidden_size=w1, intermediate_size=64,
                                                eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    # Encoder 2 as SDXL's config: gelu, legacy eos_token_id 2 (pools at the highest id).
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        **common, hidden_size=w2, intermediate_size=96, hidden_act="gelu", projection_dim=fx.SDXL_POOLED,
        eos_token_id=2, pad_token_id=1))
    unet = UNet2DConditionModel(**fx.SDXL_UNET)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=HEIGHT, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SDXL_SCHEDULER.items()
                                          if k in ("beta_end", "beta_schedule", "beta_start", "steps_offset",
                                                   "timestep_spacing", "num_train_timesteps")})
    pipe = TorchXL(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                   tokenizer=CLIPTokenizer.from_pretrained(str(root / "tok1")),
                   tokenizer_2=CLIPTokenizer.from_pretrained(str(root / "tok2")), unet=unet, scheduler=scheduler,
                   image_encoder=None, feature_extractor=None)
    folder = root / "sdxl"
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    adapter = root / "ip-adapter_sdxl.safetensors"
    c = fx.SDXL_UNET["cross_attention_dim"]
    save_file(fx.flat(fx.image_proj("base", c, seed=seed), fx.ip_layers(unet, seed=seed + 1)), adapter)
    return {"sdxl": folder, "adapter": adapter}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    paths = build_sdxl_folder(root)
    paths["latents"] = root / "noise.npy"
    np.save(paths["latents"], np.random.default_rng(0).standard_normal(LATENT_SHAPE).astype(np.float32))
    paths["embeds"] = np.random.default_rng(1).standard_normal((1, fx.CLIP_DIM)).astype(np.float32)
    return paths


@pytest.fixture(scope="module")
def torch_pipe(paths):
    from diffusers import StableDiffusionXLPipeline as TorchXL

    return TorchXL.from_pretrained(paths["sdxl"])


@pytest.fixture(scope="module")
def jax_pipe(paths):
    return StableDiffusionXLPipeline.from_pretrained(paths["sdxl"])


def diffusers_run(pipe, paths, scheduler: str = "euler", embeds=None, **kwargs) -> np.ndarray:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[scheduler]
    pipe.scheduler = cls.from_config(json.loads((paths["sdxl"] / "scheduler" / "scheduler_config.json").read_text()))
    if embeds is not None:
        e = torch.from_numpy(embeds)[None]                           # [1, N, D]
        kwargs["ip_adapter_image_embeds"] = [torch.cat([torch.zeros_like(e), e])]
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=HEIGHT, width=WIDTH,
                   latents=nchw(np.load(paths["latents"])), output_type="latent", **kwargs)
    return nhwc(out.images)


def jax_run(pipe, paths, scheduler: str = "euler", **kwargs) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, scheduler=scheduler, height=HEIGHT,
                width=WIDTH, latents=np.load(paths["latents"]), **kwargs).latents


MICRO = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(32, 40),
             negative_original_size=(8, 8), negative_crops_coords_top_left=(0, 2), negative_target_size=(16, 16))
CASES = {
    "euler_zero_negative": ("euler", {}),
    "euler_negative_prompt_2_clip_skip": ("euler", dict(negative_prompt="blurry, the worst", prompt_2="the circle",
                                                        negative_prompt_2="a square", clip_skip=1)),
    "ddim_zero_negative_micro": ("ddim", MICRO),
    "ddim_empty_negative": ("ddim", dict(negative_prompt="")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdxl_parity(paths, torch_pipe, jax_pipe, case):
    scheduler, kwargs = CASES[case]
    expected = diffusers_run(torch_pipe, paths, scheduler, **kwargs)
    out = jax_run(jax_pipe, paths, scheduler, **kwargs)
    assert rel_err(out, expected) <= 1e-4


def test_conditioning_matters(paths, jax_pipe):
    """The zero-negative rule, prompt_2 and the time ids each change the result."""
    base = jax_run(jax_pipe, paths)
    for kwargs in (dict(negative_prompt=""), dict(prompt_2="a square"), dict(original_size=(64, 48))):
        assert rel_err(jax_run(jax_pipe, paths, **kwargs), base) > 1e-3, kwargs


def test_force_zeros_off(paths, torch_pipe, jax_pipe):
    """force_zeros_for_empty_prompt=False encodes "" as the negative prompt."""
    torch_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    jax_pipe.force_zeros_for_empty_prompt = False
    try:
        expected = diffusers_run(torch_pipe, paths)
        out = jax_run(jax_pipe, paths)
    finally:
        torch_pipe.register_to_config(force_zeros_for_empty_prompt=True)
        jax_pipe.force_zeros_for_empty_prompt = True
    assert rel_err(out, expected) <= 1e-4
    assert rel_err(out, jax_run(jax_pipe, paths, negative_prompt="")) == 0.0


def test_sdxl_ip_adapter_parity(paths):
    from diffusers import StableDiffusionXLPipeline as TorchXL

    pipe = TorchXL.from_pretrained(paths["sdxl"])
    pipe.load_ip_adapter(str(paths["adapter"].parent), subfolder="", weight_name=paths["adapter"].name,
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    expected = diffusers_run(pipe, paths, embeds=paths["embeds"])
    mine = StableDiffusionXLPipeline.from_pretrained(paths["sdxl"])
    mine.load_ip_adapter(paths["adapter"])
    out = jax_run(mine, paths, ip_adapter_prompts=[ImagePromptSpec(embeds=paths["embeds"], scale=0.7)])
    assert rel_err(out, expected) <= 1e-4
    plain = jax_run(mine, paths, ip_adapter_prompts=[ImagePromptSpec(embeds=paths["embeds"], scale=0.0)])
    assert rel_err(plain, expected) > 1e-3


def test_default_size_and_scaling(jax_pipe):
    assert jax_pipe.vae.scaling_factor == pytest.approx(0.13025)
    assert jax_pipe.default_size == fx.SDXL_UNET["sample_size"] * 2
    request = jax_pipe.prepare(PROMPT, num_inference_steps=2)
    assert request.latents.shape == (1, 8, 8, 4)
    assert request.cond.added_cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2


def test_class_from_model_index(paths, tmp_path):
    assert isinstance(load_pipeline(paths["sdxl"]), StableDiffusionXLPipeline)
    with pytest.raises(Unsupported, match="use StableDiffusionXLPipeline"):
        StableDiffusionPipeline.from_pretrained(paths["sdxl"])
    broken = tmp_path / "no_te2"
    broken.mkdir()
    for sub in paths["sdxl"].iterdir():
        if sub.name != "text_encoder_2":
            (broken / sub.name).symlink_to(sub)
    with pytest.raises(MissingFile, match="text_encoder_2"):
        StableDiffusionXLPipeline.from_pretrained(broken)


def test_sample_py_matches_api(paths, jax_pipe, tmp_path):
    out = tmp_path / "final.npy"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(paths["sdxl"]), "--height", str(HEIGHT),
           "--width", str(WIDTH), "--steps", "2", "--scheduler", "euler", "--guidance", "5",
           "--prompt", PROMPT, "--prompt-2", "the circle", "--original-size", "64", "48", "--crop", "4", "8",
           "--target-size", "32", "40", "--init-latents", str(paths["latents"]), "--save-latents", str(out),
           "--out", str(tmp_path / "x.png"), "--no-progress", "--cache-dir", ""]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = jax_pipe(PROMPT, prompt_2="the circle", num_inference_steps=2, guidance_scale=5.0,
                        scheduler="euler", height=HEIGHT, width=WIDTH, latents=np.load(paths["latents"]),
                        original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(32, 40)).latents
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-5)
