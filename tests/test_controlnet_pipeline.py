"""ControlNet + IP-Adapter end to end against diffusers' ControlNet pipelines
(``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``
+ ``load_ip_adapter``), same initial latents: final latents <= 1e-4 relative.
Cases: base and Plus adapters with one ControlNet at scale 0.8 ending at 0.7;
two ControlNets with different scales; guess mode; SDXL; sample.py. Also the
ControlNets' view of the conditioning (text only, the conditional half in
guess mode) and the bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ipadapter_fixtures as fx
import sd_fixtures
from helpers import cpu_env, nchw, nhwc, rel_err
from ipadapter_jax.io.errors import BadArgument, Incompatible, UserError
from ipadapter_jax.models.conditioning import UNetConditioning
from ipadapter_jax.pipeline import ImagePromptSpec, StableDiffusionPipeline
from ipadapter_jax.pipeline.control import ControlInputs, ControlNetSpec, controlled, keep_table

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red striped circle on the blue background"
STEPS = 6
TOL = 1e-4


def random_controlnet(unet_config: dict, seed: int, folder: Path) -> Path:
    """A diffusers ControlNet for ``unet_config`` whose zero convolutions are
    random (a trained ControlNet's are not zero), saved to ``folder``."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    keys = ("block_out_channels", "layers_per_block", "attention_head_dim", "norm_num_groups", "cross_attention_dim",
            "down_block_types", "transformer_layers_per_block", "use_linear_projection", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim")
    net = ControlNetModel(**{k: v for k, v in unet_config.items() if k in keys},
                          conditioning_embedding_out_channels=(8, 16))  # 2x down: the fixtures' VAE factor
    with torch.no_grad():
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            module.weight.normal_(0.0, 0.3)
            module.bias.normal_(0.0, 0.1)
    net.save_pretrained(folder)
    return folder


def control_png(path: Path, seed: int, size=(16, 16)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    paths = sd_fixtures.build_pipeline_folder(root)
    paths["image"] = sd_fixtures.reference_image(root / "ref.png")
    paths["cn1"] = random_controlnet(fx.UNET, 1, root / "cn1")
    paths["cn2"] = random_controlnet(fx.UNET, 2, root / "cn2")
    paths["map1"] = control_png(root / "map1.png", 1)
    paths["map2"] = control_png(root / "map2.png", 2)
    paths["latents"] = root / "noise.npy"
    np.save(paths["latents"], np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32))
    return paths


def diffusers_run(paths, adapter: str, nets: list[str], scales: list[float], *, start=0.0, end=1.0,
                  guess_mode=False) -> np.ndarray:
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    controlnets = [ControlNetModel.from_pretrained(paths[n]) for n in nets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        paths["sd"], controlnet=controlnets if len(nets) > 1 else controlnets[0], safety_checker=None,
        requires_safety_checker=False, feature_extractor=CLIPImageProcessorPil(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(paths[adapter].parent), subfolder="", weight_name=paths[adapter].name,
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    maps = [Image.open(paths[f"map{n[-1]}"]) for n in nets]
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt="", image=maps if len(nets) > 1 else maps[0],
                   ip_adapter_image=Image.open(paths["image"]), num_inference_steps=STEPS, guidance_scale=7.5,
                   height=16, width=16, latents=nchw(np.load(paths["latents"])), output_type="latent",
                   controlnet_conditioning_scale=scales if len(nets) > 1 else scales[0],
                   control_guidance_start=start, control_guidance_end=end, guess_mode=guess_mode)
    return nhwc(out.images)


@pytest.fixture(scope="module")
def jax_pipe(paths):
    return StableDiffusionPipeline.from_pretrained(paths["sd"], image_encoder=paths["image_encoder"])


def jax_run(pipe, paths, adapter: str, nets: list[str], scales: list[float], *, start=0.0, end=1.0,
            guess_mode=False) -> np.ndarray:
    pipe.detach_ip_adapters()
    pipe.detach_controlnets()
    pipe.load_ip_adapter(paths[adapter])
    for n in nets:
        pipe.load_controlnet(paths[n])
    specs = [ControlNetSpec(paths[f"map{n[-1]}"], scale=s, start=start, end=end) for n, s in zip(nets, scales)]
    return pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(images=[paths["image"]], scale=0.7)],
                num_inference_steps=STEPS, guidance_scale=7.5, scheduler="ddim", height=16, width=16,
                latents=np.load(paths["latents"]), controlnet_inputs=specs, guess_mode=guess_mode).latents


CASES = {
    "base_scale_0.8_end_0.7": ("adapter", ["cn1"], [0.8], dict(end=0.7)),
    "plus_scale_0.8_end_0.7": ("plus", ["cn1"], [0.8], dict(end=0.7)),
    "two_controlnets": ("adapter", ["cn1", "cn2"], [0.5, 1.2], dict(start=0.2)),
    "guess_mode": ("adapter", ["cn1"], [1.0], dict(guess_mode=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sd15_controlnet_parity(paths, jax_pipe, case):
    adapter, nets, scales, options = CASES[case]
    expected = diffusers_run(paths, adapter, nets, scales, **options)
    actual = jax_run(jax_pipe, paths, adapter, nets, scales, **options)
    assert rel_err(actual, expected) <= TOL
    # The control is not a no-op: without it the result moves.
    jax_pipe.detach_controlnets()
    plain = jax_pipe(PROMPT, ip_adapter_prompts=[ImagePromptSpec(images=[paths["image"]], scale=0.7)],
                     num_inference_steps=STEPS, guidance_scale=7.5, scheduler="ddim", height=16, width=16,
                     latents=np.load(paths["latents"])).latents
    assert rel_err(plain, expected) > 1e-3


def test_sample_py_matches_diffusers(paths, tmp_path):
    """Two ControlNets through sample.py, the second as a single file in the
    original layout (control_model.* keys, SD 1.5-style)."""
    from safetensors.numpy import load_file, save_file

    from ipadapter_jax.convert.controlnet import controlnet_to_original

    expected = diffusers_run(paths, "adapter", ["cn1", "cn2"], [0.5, 1.2], start=0.2)
    original = tmp_path / "control_v11p_sd15_test.safetensors"
    save_file(controlnet_to_original(load_file(paths["cn2"] / "diffusion_pytorch_model.safetensors")), original)
    out = tmp_path / "final.npy"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(paths["sd"]), "--image-encoder",
           str(paths["image_encoder"]), "--ip-adapter", str(paths["adapter"]), "--image", str(paths["image"]),
           "--scale", "0.7", "--prompt", PROMPT, "--steps", str(STEPS), "--scheduler", "ddim", "--height", "16",
           "--width", "16", "--controlnet", str(paths["cn1"]), "--control-image", str(paths["map1"]),
           "--controlnet", str(original), "--controlnet-config", str(paths["cn2"]), "--control-image",
           str(paths["map2"]), "--control-scale", "0.5",
           "--control-scale", "1.2", "--control-start", "0.2", "--init-latents", str(paths["latents"]),
           "--save-latents", str(out), "--out", str(tmp_path / "img.png"), "--cache-dir", ""]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert rel_err(np.load(out), expected) <= TOL


# --------------------------------------------------------------------------- what the ControlNets see

class Recorder:
    """Stands in for a ControlNet: records its inputs, returns fixed residuals."""

    def __init__(self):
        self.calls = []

    def __call__(self, sample, timestep, text, image, *, conditioning_scale, added_cond, guess_mode):
        self.calls.append(dict(sample=sample, text=text, image=image, scale=conditioning_scale, added=added_cond,
                               guess_mode=guess_mode))
        return (jnp.ones_like(sample),), jnp.ones_like(sample) * 2


def test_controlnets_see_text_only_and_guess_mode_the_conditional_half():
    text = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)        # [uncond; cond]
    tokens = jnp.full((2, 1, 5, 4), 7.0)
    cond = UNetConditioning(text, ({"tokens": tokens},), added_cond={"text_embeds": jnp.arange(2.0)[:, None],
                                                                      "time_ids": jnp.ones((2, 6))})
    x = jnp.stack([jnp.zeros((2, 2, 1)), jnp.ones((2, 2, 1))])
    control = ControlInputs(params=(), images=(jnp.full((1, 4, 4, 3), 0.5),), scales=jnp.asarray([[0.3, 0.6]]))
    net = Recorder()
    out = controlled([net], control, cond, x, 10, 1, cfg=True, guess_mode=False)
    call = net.calls[-1]
    assert call["text"] is text and call["image"].shape[0] == 2 and float(call["scale"]) == pytest.approx(0.6)
    assert out.down_block_residuals[0].shape == x.shape and out.image_prompts == cond.image_prompts
    out = controlled([net], control, cond, x, 10, 0, cfg=True, guess_mode=True)
    call = net.calls[-1]
    np.testing.assert_array_equal(call["text"], text[1:])
    np.testing.assert_array_equal(call["sample"], x[1:])
    np.testing.assert_array_equal(call["added"]["text_embeds"], [[1.0]])
    assert call["image"].shape[0] == 1 and call["guess_mode"]
    np.testing.assert_array_equal(out.down_block_residuals[0][0], 0.0)      # unconditional half: no control
    np.testing.assert_array_equal(out.mid_block_residual[1], 2.0)


def test_keep_table_follows_diffusers():
    spec = ControlNetSpec(None, scale=0.8, start=0.2, end=0.7)
    n = 10
    expected = [0.0 if (i / n < 0.2 or (i + 1) / n > 0.7) else 0.8 for i in range(n)]
    np.testing.assert_allclose(keep_table([spec], n, 0)[0], expected)
    # img2img: the fractions count the steps run, from the start step.
    np.testing.assert_allclose(keep_table([spec], n + 4, 4)[0, 4:], expected)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs(paths, jax_pipe, tmp_path):
    jax_pipe.detach_ip_adapters()
    jax_pipe.detach_controlnets()
    jax_pipe.load_controlnet(paths["cn1"])
    call = lambda specs: jax_pipe(PROMPT, num_inference_steps=2, height=16, width=16,  # noqa: E731
                                  controlnet_inputs=specs)
    with pytest.raises(BadArgument, match="2 control inputs for 1 loaded ControlNets"):
        call([ControlNetSpec(paths["map1"]), ControlNetSpec(paths["map2"])])
    with pytest.raises(BadArgument, match="0 control inputs for 1"):
        call([])
    with pytest.raises(BadArgument, match="start < end"):
        call([ControlNetSpec(paths["map1"], start=0.5, end=0.5)])
    with pytest.raises(BadArgument, match="scale must be a finite number"):
        call([ControlNetSpec(paths["map1"], scale=float("nan"))])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        call([ControlNetSpec(broken)])
    with pytest.raises(BadArgument, match="preprocess"):
        call([ControlNetSpec(paths["map1"], preprocess="depth")])
    jax_pipe.detach_controlnets()


def test_family_mismatch_names_both(paths, jax_pipe, tmp_path):
    sdxl_net = random_controlnet(fx.SDXL_UNET, 3, tmp_path / "sdxl_cn")
    with pytest.raises(Incompatible, match="SDXL-style.*SD 1.x/2.x-style.*cross_attention_dim: ControlNet"):
        jax_pipe.load_controlnet(sdxl_net)
    assert jax_pipe.controlnets == []


def test_canny_without_opencv_names_the_extra(paths, jax_pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)     # import cv2 -> ImportError
    from ipadapter_jax.pipeline.control import load_control_image

    with pytest.raises(UserError, match=r"ipadapter-jax\[control\]"):
        load_control_image(paths["map1"], 16, 16, preprocess="canny")


def test_canny_preprocess_is_the_documented_opencv_canny(tmp_path):
    """``--control-preprocess canny`` (sample.py's ``ControlNetSpec(image, preprocess="canny")``,
    default thresholds) gives the control image of diffusers' ControlNet guide, on a real
    image: ``cv2.Canny(image, 100, 200)`` as three channels, then the pipeline's control
    image processor at the output size."""
    import cv2
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from ipadapter_jax import demo
    from ipadapter_jax.pipeline.control import ControlNetSpec, control_images

    # Upscaled so the edges are a few pixels apart, as in a photo, not one-pixel noise.
    photo = Image.open(demo.MODEL_DIR / "reference.png").convert("RGB").resize((192, 192), Image.BICUBIC)
    photo.save(tmp_path / "photo.png")
    height, width = 96, 128     # the map is resized too, to a different aspect

    image = np.array(photo)
    low_threshold, high_threshold = 100, 200
    image = cv2.Canny(image, low_threshold, high_threshold)
    image = image[:, :, None]
    image = np.concatenate([image, image, image], axis=2)
    canny_image = Image.fromarray(image)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    expected = processor.preprocess(canny_image, height=height, width=width).permute(0, 2, 3, 1).numpy()

    actual = control_images(ControlNetSpec(str(tmp_path / "photo.png"), preprocess="canny"), 1, height, width,
                            "control")
    edges = image[:, :, 0] > 0
    assert 0.005 < edges.mean() < 0.5, edges.mean()   # an edge map (2.5% here), neither empty nor everything
    np.testing.assert_array_equal(actual, expected)
    plain = control_images(ControlNetSpec(str(tmp_path / "photo.png")), 1, height, width, "control")
    assert not np.array_equal(plain, expected)


# --------------------------------------------------------------------------- SDXL

def test_sdxl_controlnet_parity(tmp_path):
    """SDXL + an SDXL-style ControlNet (text_time) + base adapter, Euler, no
    negative prompt (zero negative conditioning), non-square 16x24 output."""
    from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
    from PIL import Image

    import test_sdxl_pipeline as sx
    from ipadapter_jax.pipeline import StableDiffusionXLPipeline

    paths = sx.build_sdxl_folder(tmp_path)
    net = random_controlnet(fx.SDXL_UNET, 4, tmp_path / "sdxl_cn")
    control = control_png(tmp_path / "map.png", 4, size=(sx.WIDTH, sx.HEIGHT))
    latents = np.random.default_rng(0).standard_normal(sx.LATENT_SHAPE).astype(np.float32)
    embeds = np.random.default_rng(1).standard_normal((1, fx.CLIP_DIM)).astype(np.float32)

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(paths["sdxl"],
                                                               controlnet=ControlNetModel.from_pretrained(net))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(paths["adapter"].parent), subfolder="", weight_name=paths["adapter"].name,
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    e = torch.from_numpy(embeds)[None]
    with torch.no_grad():
        expected = nhwc(pipe(sx.PROMPT, image=Image.open(control), num_inference_steps=sx.STEPS, guidance_scale=5.0,
                             height=sx.HEIGHT, width=sx.WIDTH, latents=nchw(latents), output_type="latent",
                             ip_adapter_image_embeds=[torch.cat([torch.zeros_like(e), e])],
                             controlnet_conditioning_scale=0.8, control_guidance_end=0.7).images)

    mine = StableDiffusionXLPipeline.from_pretrained(paths["sdxl"])
    mine.load_ip_adapter(paths["adapter"])
    mine.load_controlnet(net)
    out = mine(sx.PROMPT, num_inference_steps=sx.STEPS, guidance_scale=5.0, scheduler="euler", height=sx.HEIGHT,
               width=sx.WIDTH, latents=latents, ip_adapter_prompts=[ImagePromptSpec(embeds=embeds, scale=0.7)],
               controlnet_inputs=[ControlNetSpec(control, scale=0.8, end=0.7)]).latents
    assert rel_err(out, expected) <= TOL
    with pytest.raises(Incompatible, match="SD 1.x/2.x-style.*SDXL-style"):
        mine.load_controlnet(random_controlnet(fx.UNET, 5, tmp_path / "sd15_cn"))


# --------------------------------------------------------------------------- with the rest of the pipeline

COMBINED = """
import sys, numpy as np, jax
from ipadapter_jax.pipeline import ControlNetSpec, ImagePromptSpec, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({sd!r}, image_encoder={enc!r})
pipe.load_ip_adapter({adapter!r})
pipe.load_ip_adapter({plus!r})
pipe.load_controlnet({cn!r})
call = dict(ip_adapter_prompts=[ImagePromptSpec(images=[{image!r}], scale=0.7, masks=[{mask!r}]),
                                ImagePromptSpec(images=[{image!r}], scale=0.4, start=0.2)],
            controlnet_inputs=[ControlNetSpec({control!r}, scale=0.9, start=0.1, end=0.8)],
            num_inference_steps=5, height=16, width=16, num_images=8, seed=1, init_image={image!r}, strength=0.7)
out = pipe("a red circle", **call)
# Step by step (the progress bar): the hoisted values computed in one call, sharded as the loop's.
stepped = pipe("a red circle", progress=True, **call)
assert np.array_equal(stepped.latents, out.latents), np.abs(stepped.latents - out.latents).max()
np.save({out!r}, out.latents)
print(jax.device_count())
"""


def test_with_img2img_masks_two_adapters_and_the_mesh(paths, tmp_path):
    """ControlNet + img2img + a masked adapter + a gated second adapter: the
    same call on 8 virtual CPU devices (batch split over the data axis, whole
    loop and step by step) and on 1 device agree; bfloat16 compute stays close
    to float32."""
    from PIL import Image

    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "x8.npy"
    script = COMBINED.format(sd=str(paths["sd"]), enc=str(paths["image_encoder"]), adapter=str(paths["adapter"]),
                             plus=str(paths["plus"]), cn=str(paths["cn1"]), image=str(paths["image"]),
                             mask=str(tmp_path / "mask.png"), control=str(paths["map1"]), out=str(out))
    env = cpu_env(devices=8)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "8"

    def combined(pipe):
        pipe.load_ip_adapter(paths["adapter"])
        pipe.load_ip_adapter(paths["plus"])
        pipe.load_controlnet(paths["cn1"])
        return pipe("a red circle", ip_adapter_prompts=[
            ImagePromptSpec(images=[paths["image"]], scale=0.7, masks=[tmp_path / "mask.png"]),
            ImagePromptSpec(images=[paths["image"]], scale=0.4, start=0.2)],
            controlnet_inputs=[ControlNetSpec(paths["map1"], scale=0.9, start=0.1, end=0.8)], num_inference_steps=5,
            height=16, width=16, num_images=8, seed=1, init_image=paths["image"], strength=0.7).latents

    one = combined(StableDiffusionPipeline.from_pretrained(paths["sd"], image_encoder=paths["image_encoder"]))
    assert np.isfinite(one).all()
    assert rel_err(np.load(out), one) <= 1e-5
    bf16 = combined(StableDiffusionPipeline.from_pretrained(paths["sd"], image_encoder=paths["image_encoder"],
                                                            dtype=jnp.bfloat16))
    assert rel_err(bf16, one) <= 5e-2


@pytest.mark.parametrize("flags, message", [
    (["--controlnet", "{cn1}"], "one --control-image per --controlnet"),
    (["--controlnet", "{cn1}", "--control-image", "{map1}", "--control-image", "{map2}"],
     "one --control-image per --controlnet"),
    (["--controlnet", "{cn1}", "--control-image", "{map1}", "--control-start", "0.6", "--control-end", "0.5"],
     "--control-start < --control-end"),
    (["--controlnet", "{cn1}", "--control-image", "{map1}", "--control-scale", "nan"], "finite"),
    (["--controlnet", "{cn1}", "--control-image", "missing.png"], "file not found: missing.png"),
    (["--controlnet", "nowhere", "--control-image", "{map1}"], "--controlnet nowhere: ControlNet folder or file not found"),
    (["--guess-mode"], "need a --controlnet"),
    (["--control-scale", "0.5", "--control-end", "0.5"], "--control-scale, --control-end need a --controlnet"),
])
def test_sample_py_control_flag_errors(paths, tmp_path, flags, message):
    flags = [f.format(**{k: str(v) for k, v in paths.items()}) for f in flags]
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(paths["sd"]), *flags, "--out",
           str(tmp_path / "x.png")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- control images

def test_control_images_as_diffusers_prepares_them(tmp_path):
    """RGBA with a transparent background, 16-bit grey, palette and RGB maps of
    another (non-square) size: ours equal diffusers' control image processor
    (VaeImageProcessor with do_convert_rgb, no normalisation, Lanczos resize)."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from ipadapter_jax.pipeline.control import control_images, load_control_image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)
    rgba[:, :10, 3] = 0                                                     # transparent half
    maps = {"rgba.png": Image.fromarray(rgba, "RGBA"),
            "depth16.png": Image.fromarray(rng.integers(0, 65536, (30, 18), dtype=np.uint16)),
            "palette.png": Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert("P"),
            "rgb.png": Image.fromarray(rng.integers(0, 256, (40, 28, 3), dtype=np.uint8))}
    processor = VaeImageProcessor(vae_scale_factor=2, do_convert_rgb=True, do_normalize=False)
    for name, image in maps.items():
        image.save(tmp_path / name)
        expected = nhwc(processor.preprocess(Image.open(tmp_path / name), height=16, width=24))
        actual = load_control_image(tmp_path / name, 16, 24)
        assert actual.shape == expected.shape == (1, 16, 24, 3), name
        np.testing.assert_allclose(actual, expected, atol=1e-6, err_msg=name)
    # One image per batch image, in order; a single image is repeated; other counts are refused.
    spec = ControlNetSpec([tmp_path / "rgb.png", tmp_path / "rgba.png"])
    pair = control_images(spec, 2, 16, 24, "controlnet 0")
    np.testing.assert_array_equal(pair[1:], load_control_image(tmp_path / "rgba.png", 16, 24))
    assert control_images(ControlNetSpec(tmp_path / "rgb.png"), 3, 16, 24, "c").shape == (3, 16, 24, 3)
    with pytest.raises(BadArgument, match="2 control images for a batch of 3"):
        control_images(spec, 3, 16, 24, "controlnet 0")


def test_request_prepared_for_other_controlnets_refused(paths, jax_pipe):
    jax_pipe.detach_ip_adapters()
    jax_pipe.detach_controlnets()
    jax_pipe.load_controlnet(paths["cn1"])
    request = jax_pipe.prepare(PROMPT, num_inference_steps=2, controlnet_inputs=[ControlNetSpec(paths["map1"])])
    jax_pipe.detach_controlnets()
    with pytest.raises(BadArgument, match="prepared for 1 ControlNets but the pipeline now has 0"):
        jax_pipe.denoise(request)


def test_sample_py_canny_without_opencv(paths, monkeypatch, capsys):
    """Refused while parsing (before any model loads), naming the extra to install."""
    import importlib.util

    sys.path.insert(0, str(ROOT))
    import sample

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(["--model", str(paths["sd"]), "--controlnet", str(paths["cn1"]), "--control-image",
                           str(paths["map1"]), "--control-preprocess", "canny"])
    assert exit_info.value.code == 2 and "pip install 'ipadapter-jax[control]'" in capsys.readouterr().err
