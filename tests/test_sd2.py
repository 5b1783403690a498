"""SD 2.x folders (the stabilityai/stable-diffusion-2-1 layout) end to end.

A small SD 2.x-style folder saved by diffusers: a transformers ``CLIPTextModel``
with SD 2.x's gelu and 1024-wide states (OpenCLIP-H's width; two layers here), a
UNet with linear projections, per-block head counts and 1024-wide cross
attention, a tokenizer padding with "!", and SD 2.1's scheduler config
(DDIM, ``v_prediction``). ``sample.py --model`` on it equals diffusers'
StableDiffusionPipeline (same initial latents, final latents <= 1e-4) at the
model's default size (UNet sample_size x VAE factor); Euler with v-prediction
from Python too. SD 1.5 IP-Adapters (768-wide) are refused on SD 2.x UNets
(1024-wide), on the small folder and on SD 2.1's real UNet layout.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

import ipadapter_fixtures as fx
import sd_fixtures
from helpers import nchw, nhwc, rel_err
from ipadapter_jax import ip_adapter
from ipadapter_jax.io.errors import Incompatible
from ipadapter_jax.ip_adapter import load_ip_adapter
from ipadapter_jax.models import UNet2DConditionModel
from ipadapter_jax.pipeline import StableDiffusionPipeline, load_pipeline
from test_ip_adapter import write_official
from test_sdxl_models import SameKey
from test_unet_sd15_full import SD15_UNET_CONFIG

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red striped circle on the blue background"
NEGATIVE = "the blurry square"
WIDTH = 1024                       # SD 2.x's text width = its UNet's cross-attention width
SAMPLE_SIZE = 8                    # latents; x 2 (a 2-level VAE) = 16 px, the default image size
LATENT_SHAPE = (1, SAMPLE_SIZE, SAMPLE_SIZE, 4)
STEPS = 5
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# stabilityai/stable-diffusion-2-1 unet/config.json (the keys that differ from diffusers' defaults)
SD21_UNET = dict(SD15_UNET_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                 use_linear_projection=True, upcast_attention=True)


def build_sd2_folder(root: Path, seed: int = 0) -> Path:
    """root/sd2: a small SD 2.x-style pipeline written by diffusers' save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel as TorchUNet
    from diffusers import StableDiffusionPipeline as TorchPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vocab = sd_fixtures.write_tokenizer(root / "tokenizer")
    config = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))  # as SD 2.x
    # SD 2.1's text_encoder/config.json: gelu, legacy ids bos 0 / eos 2 / pad 1 (23 layers of width 1024 there).
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=2,
        pad_token_id=1))
    unet = TorchUNet(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=(2, 4),
                     use_linear_projection=True, upcast_attention=True, cross_attention_dim=WIDTH,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=SAMPLE_SIZE)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=2 * SAMPLE_SIZE)
    pipe = TorchPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(
                             str(root / "tokenizer")), unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                         feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    folder = root / "sd2"
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER))
    return folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    paths = {"sd2": build_sd2_folder(root), "latents": root / "noise.npy"}
    np.save(paths["latents"], np.random.default_rng(0).standard_normal(LATENT_SHAPE).astype(np.float32))
    return paths


@pytest.fixture(scope="module")
def torch_pipe(paths):
    from diffusers import StableDiffusionPipeline as TorchPipeline

    return TorchPipeline.from_pretrained(paths["sd2"])


@pytest.fixture(scope="module")
def jax_pipe(paths):
    return load_pipeline(paths["sd2"])


def diffusers_run(pipe, paths, scheduler: str, prediction_type: str = "v_prediction") -> np.ndarray:
    """diffusers at the model's default size (no height / width given)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    pipe.scheduler = cls.from_config(dict(SD21_SCHEDULER, prediction_type=prediction_type))
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                   latents=nchw(np.load(paths["latents"])), output_type="latent")
    return nhwc(out.images)


def sample_py(argv) -> int:
    """``sample.py``'s ``main`` in this process (no second JAX start-up)."""
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def test_sd2_sample_py_matches_diffusers(paths, torch_pipe, tmp_path, capsys):
    """DDIM with v-prediction from the folder's scheduler config; no --height / --width:
    the size follows the model (sample_size 8 x VAE factor 2 = 16 px), as diffusers."""
    expected = diffusers_run(torch_pipe, paths, "ddim")
    out = tmp_path / "final.npy"
    rc = sample_py(["--model", paths["sd2"], "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", STEPS,
                    "--init-latents", paths["latents"], "--save-latents", out, "--out", tmp_path / "x.png",
                    "--no-progress", "--cache-dir", ""])
    assert rc == 0, capsys.readouterr().err[-2000:]
    latents = np.load(out)
    assert latents.shape == LATENT_SHAPE == expected.shape
    assert rel_err(latents, expected) <= 1e-4


def test_sd2_euler_v_prediction(paths, torch_pipe, jax_pipe):
    assert isinstance(jax_pipe, StableDiffusionPipeline) and jax_pipe.default_size == 2 * SAMPLE_SIZE
    expected = diffusers_run(torch_pipe, paths, "euler")
    out = jax_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                   scheduler="euler", latents=np.load(paths["latents"])).latents
    assert rel_err(out, expected) <= 1e-4
    # The prediction type matters: diffusers reading the model as epsilon is far off.
    assert rel_err(out, diffusers_run(torch_pipe, paths, "euler", prediction_type="epsilon")) > 1e-2


def sd15_adapter_file(tmp_path, n_layers: int, name: str = "ip-adapter_sd15.safetensors") -> Path:
    """An SD 1.5-width (768) base adapter with ``n_layers`` cross-attention layers."""
    r = fx.Rand(0)
    ip = {f"{2 * n + 1}.{kv}.weight": r.w(4, 768) for n in range(n_layers) for kv in ("to_k_ip", "to_v_ip")}
    return write_official(tmp_path, {**r.lin("proj", fx.CLIP_DIM, 4 * 768), **r.ln("norm", 768)}, ip, name)


SD1_ON_SD2 = (r"this is an SD 1.x adapter \({n} cross-attention layers of width 768\) but the UNet is SD 2.x "
              r"\({n} cross-attention layers of width 1024\)\. Use an SD 2.x adapter")


def test_sd15_adapter_refused_on_sd2_folder(paths, jax_pipe, tmp_path, capsys):
    n = len(jax_pipe.unet.cross_attention_layers())
    path = sd15_adapter_file(tmp_path, n)
    with pytest.raises(Incompatible, match=SD1_ON_SD2.format(n=n)):
        jax_pipe.load_ip_adapter(path)
    assert len(jax_pipe.unet.ip_adapters) == 0
    # sample.py: one line naming both widths, exit status 2.
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=fx.CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        image_size=224, patch_size=112, projection_dim=fx.CLIP_DIM)).save_pretrained(tmp_path / "image_encoder")
    image = sd_fixtures.reference_image(tmp_path / "ref.png")
    rc = sample_py(["--model", paths["sd2"], "--ip-adapter", path, "--image", image, "--image-encoder",
                    tmp_path / "image_encoder", "--steps", 1, "--out", tmp_path / "x.png", "--cache-dir", ""])
    err = capsys.readouterr().err
    assert rc == 2 and "sample.py: error:" in err, err[-2000:]
    assert "width 768" in err and "width 1024" in err and "SD 2.x" in err, err


def test_sd21_unet_layout(tmp_path):
    """SD 2.1's real UNet layout (abstract): 16 cross-attention layers of width 1024,
    so SD 1.5's 16-layer 768-wide adapters are refused by width alone; ComfyUI's weight
    types apply as on SD 1.5 (same 16 transformers)."""
    sd21 = nnx.eval_shape(lambda: UNet2DConditionModel(SD21_UNET, rngs=SameKey()))
    sd15 = nnx.eval_shape(lambda: UNet2DConditionModel(SD15_UNET_CONFIG, rngs=SameKey()))
    assert len(sd21.cross_attention_layers()) == 16
    with pytest.raises(Incompatible, match=SD1_ON_SD2.format(n=16)):
        load_ip_adapter(sd15_adapter_file(tmp_path, 16), sd21)
    for weight_type in ("style transfer", "composition", "ease in"):
        np.testing.assert_array_equal(ip_adapter.layer_scales(sd21, 0.8, weight_type=weight_type),
                                      ip_adapter.layer_scales(sd15, 0.8, weight_type=weight_type))
