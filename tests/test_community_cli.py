"""Community checkpoints through ``sample.py``: a civitai-style single file, a
LoRA, an embedding and an IP-Adapter in one command, against diffusers
(PyTorch, float32, CPU, same initial latents, DDIM).

(1) The issue's "done means" flow: a small SD 1.x diffusers folder written as
    one LDM-layout ``.safetensors`` by our converter CLI, then ``sample.py
    --model FILE --model-config CONFIGS --lora kohya:0.8 --embedding emb
    --ip-adapter ...`` (CONFIGS: the folder's configs and tokenizer without its
    weights, so every weight comes from the file) against diffusers'
    ``from_single_file(FILE, config=CONFIGS)`` + ``load_lora_weights`` +
    ``fuse_lora(lora_scale=0.8)`` + ``load_textual_inversion`` +
    ``load_ip_adapter``: final latents <= 1e-4. The kohya file is
    test_lora's SD 1.x builder, which diffusers applies whole (its text-encoder
    attention LoRA has out_proj; test_lora checks that diffusers changes
    exactly the layers we merge). The LoRA and the embedding each matter:
    diffusers without either is far off.
(2) An SD 2.x-style single file (OpenCLIP text layout) without a
    prediction-type marker, with a config folder whose scheduler says epsilon:
    ``--prediction-type v_prediction`` makes it a v-prediction model, equal to
    diffusers' v-prediction run and far from its epsilon run.
(3) Bad input through sample.py: one ``error:`` line, no traceback, exit status 2
    (a .ckpt without torch installed, --model FILE with no tokenizer to be found too).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sd_fixtures
from helpers import nchw, nhwc, rel_err
from ipadapter_jax.cli.convert import PREDICTION_TYPES as CLI_PREDICTION_TYPES, main as convert_main
from ipadapter_jax.convert.single_file import PREDICTION_TYPES, folder_to_single_file
from ipadapter_jax.io.errors import UserError
from test_lora import _kohya_sd15, _kohya_sdxl_unet
from test_single_file import SD2_SCHEDULER, build_sd2_folder

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
PROMPT = "a red striped circle in my-style on the blue background"   # my-style: the embedding's token
NEGATIVE = "blurry"
STEPS = 4
LORA_SCALE = 0.8
IP_SCALE = 0.7
GUIDANCE = 7.5
LATENT_SHAPE = (1, sd_fixtures.HEIGHT // 2, sd_fixtures.WIDTH // 2, 4)


def _load_sample_py():
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE = _load_sample_py()


def sample_py(argv, capsys) -> tuple[int, str]:
    """``sample.py``'s ``main`` in this process (no second JAX start-up): (exit status, stderr)."""
    try:
        rc = SAMPLE.main([str(a) for a in argv])
    except SystemExit as e:   # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def configs_only(folder: Path, out: Path) -> Path:
    """A copy of a diffusers folder without its weights (configs and tokenizers)."""
    return Path(shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")))


def test_cli_prediction_types_are_the_converters():
    """ipadapter_jax.cli.convert keeps its own copy (its parser loads no JAX)."""
    assert CLI_PREDICTION_TYPES == PREDICTION_TYPES


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """An SD 1.x folder written as a single file by the converter CLI, its configs
    without weights, a kohya LoRA, a 2-vector A1111 embedding, an IP-Adapter."""
    root = tmp_path_factory.mktemp("community")
    paths = sd_fixtures.build_pipeline_folder(root)
    paths["file"] = root / "civitai-finetune.safetensors"
    assert convert_main(["to-single-file", str(paths["sd"]), str(paths["file"])]) == 0
    paths["configs"] = configs_only(paths["sd"], root / "configs")
    paths["lora"] = root / "detail-lora.safetensors"
    save_file(_kohya_sd15(1), paths["lora"])
    paths["embedding"] = root / "my-style.safetensors"          # A1111: the stem is the token
    width = json.loads((paths["sd"] / "text_encoder" / "config.json").read_text())["hidden_size"]
    vectors = np.random.default_rng(3).standard_normal((2, width)) * 0.3
    save_file({"emb_params": vectors.astype(np.float32)}, paths["embedding"])
    paths["image"] = sd_fixtures.reference_image(root / "ref.png")
    paths["latents"] = root / "noise.npy"
    np.save(paths["latents"], np.random.default_rng(0).standard_normal(LATENT_SHAPE).astype(np.float32))
    return paths


def _diffusers_runs(paths) -> dict[str, np.ndarray]:
    """Final latents of diffusers' pipeline from the single file: with LoRA and
    embedding ("full"), LoRA only ("no_embedding"), embedding only ("no_lora")."""
    from diffusers import DDIMScheduler
    from diffusers import StableDiffusionPipeline as TorchSD
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pipe = TorchSD.from_single_file(
        str(paths["file"]), config=str(paths["configs"]), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, feature_extractor=CLIPImageProcessorPil(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(paths["adapter"].parent), subfolder="", weight_name=paths["adapter"].name,
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(IP_SCALE)

    def latents() -> np.ndarray:
        with torch.no_grad():
            out = pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=Image.open(paths["image"]),
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=sd_fixtures.HEIGHT,
                       width=sd_fixtures.WIDTH, latents=nchw(np.load(paths["latents"])), output_type="latent")
        return nhwc(out.images)

    pipe.load_lora_weights(str(paths["lora"]))
    pipe.fuse_lora(lora_scale=LORA_SCALE)
    runs = {"no_embedding": latents()}
    pipe.load_textual_inversion(str(paths["embedding"]), token="my-style")
    runs["full"] = latents()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()   # unfused LoRA layers would still act at run time
    runs["no_lora"] = latents()
    return runs


def test_single_file_lora_embedding_ip_adapter_match_diffusers(sd1, tmp_path, capsys):
    """(1) The "done means" command against diffusers."""
    expected = _diffusers_runs(sd1)
    out = tmp_path / "final.npy"
    rc, err = sample_py(["--model", sd1["file"], "--model-config", sd1["configs"],
                         "--lora", f"{sd1['lora']}:{LORA_SCALE}", "--embedding", sd1["embedding"],
                         "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                         "--image-encoder", sd1["image_encoder"], "--ip-adapter", sd1["adapter"],
                         "--image", sd1["image"], "--scale", IP_SCALE, "--steps", STEPS, "--scheduler", "ddim",
                         "--guidance", GUIDANCE, "--init-latents", sd1["latents"], "--save-latents", out,
                         "--out", tmp_path / "img.png", "--no-progress", "--cache-dir", ""], capsys)
    assert rc == 0, err[-3000:]
    assert (tmp_path / "img.png").is_file()
    assert f"scale {LORA_SCALE:g}): merged 12 text_encoder layers, 33 unet layers" in err, err
    assert "embedding: use 'my-style' in prompts" in err, err
    latents = np.load(out)
    err_full = rel_err(latents, expected["full"])
    err_no_lora = rel_err(latents, expected["no_lora"])
    err_no_embedding = rel_err(latents, expected["no_embedding"])
    print(f"single file + LoRA + embedding + IP-Adapter: final latents rel err {err_full:.2e} "
          f"(diffusers without the LoRA {err_no_lora:.2e}, without the embedding {err_no_embedding:.2e})")
    assert err_full <= TOL
    assert err_no_lora > 100 * TOL and err_no_embedding > 100 * TOL


def test_sd2_file_with_prediction_type_flag(tmp_path, capsys):
    """(2) --prediction-type v_prediction on an SD 2.x-style file that does not say."""
    from diffusers import DDIMScheduler
    from diffusers import StableDiffusionPipeline as TorchSD

    folder = build_sd2_folder(tmp_path)
    marked = folder_to_single_file(folder, tmp_path / "sd2-marked.safetensors")
    tensors = load_file(marked)
    assert "v_pred" in tensors                       # our writer marks v-prediction models (ComfyUI's marker)
    file = tmp_path / "sd2.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "v_pred"}, file)
    configs = configs_only(folder, tmp_path / "configs")
    scheduler = configs / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(dict(SD2_SCHEDULER, prediction_type="epsilon")))   # the default would be eps
    latents = np.random.default_rng(1).standard_normal(LATENT_SHAPE).astype(np.float32)
    np.save(tmp_path / "noise.npy", latents)

    pipe = TorchSD.from_single_file(str(file), config=str(folder), local_files_only=True, safety_checker=None,
                                    requires_safety_checker=False)
    expected = {}
    for prediction in ("v_prediction", "epsilon"):
        pipe.scheduler = DDIMScheduler.from_config(dict(SD2_SCHEDULER, prediction_type=prediction))
        with torch.no_grad():
            out = pipe(PROMPT, num_inference_steps=3, guidance_scale=GUIDANCE, height=16, width=16,
                       latents=nchw(latents), output_type="latent")
        expected[prediction] = nhwc(out.images)

    out = tmp_path / "final.npy"
    rc, err = sample_py(["--model", file, "--model-config", configs, "--prediction-type", "v_prediction",
                         "--prompt", PROMPT, "--steps", 3, "--guidance", GUIDANCE, "--scheduler", "ddim",
                         "--init-latents", tmp_path / "noise.npy", "--save-latents", out,
                         "--out", tmp_path / "img.png", "--no-progress", "--cache-dir", ""], capsys)
    assert rc == 0, err[-3000:]
    ours = np.load(out)
    assert ours.shape == LATENT_SHAPE   # the model's size: sample_size 8 x VAE factor 2 = 16 px
    err_v, err_eps = rel_err(ours, expected["v_prediction"]), rel_err(ours, expected["epsilon"])
    print(f"SD 2.x-style file, --prediction-type v_prediction: rel err {err_v:.2e} (vs epsilon {err_eps:.2e})")
    assert err_v <= TOL and err_eps > 1e-2


# --------------------------------------------------------------------------- (3) bad input

def _sdxl_lora(path: Path) -> Path:
    save_file(_kohya_sdxl_unet(np.random.default_rng(12)), path)
    return path


def _wide_embedding(path: Path) -> Path:
    save_file({"emb_params": np.ones((1, 80), np.float32)}, path)   # the text encoder is 64 wide
    return path


def _no_family(path: Path) -> Path:
    save_file({"encoder.layer.0.weight": np.zeros(2, np.float32), "head.bias": np.zeros(2, np.float32)}, path)
    return path


# name -> (arguments (paths, tmp) added to --model FILE --model-config CONFIGS, or replacing them when they
# hold --model; words the error line must hold)
BAD = {
    "vae_with_a_folder": (lambda p, t: ["--model", p["sd"], "--vae", p["sd"] / "vae"],
                          ("--vae applies to single-file models (--model FILE) only", "is a folder")),
    "no_ema_with_a_folder": (lambda p, t: ["--model", p["sd"], "--no-ema", "--prediction-type", "epsilon"],
                             ("--prediction-type, --no-ema apply to single-file models",)),
    "lora_missing": (lambda p, t: ["--lora", t / "nope.safetensors:0.5"],
                     ("--lora ", "nope.safetensors", "not found")),
    "lora_scale_not_a_number": (lambda p, t: ["--lora", f"{p['lora']}:strong"],
                                ("--lora", "FILE:SCALE with a number SCALE", "'strong'")),
    "lora_scale_nan": (lambda p, t: ["--lora", f"{p['lora']}:nan"], ("--lora", "finite number")),
    "embedding_too_wide": (lambda p, t: ["--embedding", _wide_embedding(t / "wide.safetensors")],
                           ("wide.safetensors", "80 wide", "text_encoder 64")),
    "sdxl_lora_on_sd1_file": (lambda p, t: ["--lora", _sdxl_lora(t / "xl-lora.safetensors")],
                              ("xl-lora.safetensors is an SDXL LoRA", "this model is SD 1.x/2.x")),
    "file_of_no_known_family": (lambda p, t: ["--model", _no_family(t / "other.safetensors"),
                                              "--model-config", p["configs"]],
                                ("other.safetensors", "not a Stable Diffusion checkpoint", "encoder.layer.0.weight")),
    "sdxl_flag_on_sd1_file": (lambda p, t: ["--prompt-2", "a cat"],
                              ("--prompt-2 applies to SDXL models only", "not an SDXL checkpoint")),
    "model_config_missing": (lambda p, t: ["--model-config", t / "nowhere"], ("--model-config", "not found")),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(case, sd1, tmp_path, capsys):
    extra, mentions = BAD[case]
    args = [str(a) for a in extra(sd1, tmp_path)]
    model = [] if "--model" in args else ["--model", sd1["file"], "--model-config", sd1["configs"]]
    base = [*model, "--steps", 1, "--no-progress", "--cache-dir", "", "--out", tmp_path / "x.png"]
    rc, err = sample_py([*base, *args], capsys)
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0], err   # the last line; only argparse's usage before it
    print(errors[0])
    for mention in mentions:
        assert mention in errors[0], (mention, errors[0])
    assert not (tmp_path / "x.png").exists()


def _one_error_line(rc: int, err: str) -> str:
    assert rc == 2 and "Traceback" not in err, (rc, err[-3000:])
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def test_ckpt_without_torch_and_no_tokenizer_anywhere(sd1, tmp_path, monkeypatch, capsys):
    """A .ckpt when torch is not installed, and --model FILE alone with nothing in
    the Hugging Face cache: one error line each, saying what to do."""
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in load_file(sd1["file"]).items()}}, ckpt)
    base = ["--steps", 1, "--no-progress", "--cache-dir", "", "--out", tmp_path / "x.png"]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)   # import torch -> ImportError
        line = _one_error_line(*sample_py(["--model", ckpt, "--model-config", sd1["configs"], *base], capsys))
    assert "model.ckpt is a PyTorch pickle" in line and "pip install torch==2.13.0" in line, line
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    line = _one_error_line(*sample_py(["--model", sd1["file"], *base], capsys))
    for words in ("carries no tokenizer", "--model-config", "local Hugging Face cache", "empty-hub-cache",
                  "stable-diffusion-v1-5/stable-diffusion-v1-5/tokenizer"):
        assert words in line, (words, line)
    assert not (tmp_path / "x.png").exists()


def test_bad_lora_scale_as_a_command(sd1, tmp_path):
    """The real command line: the program's name and exit status 2, before JAX is imported."""
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(sd1["file"]), "--model-config",
           str(sd1["configs"]), "--lora", f"{sd1['lora']}:x", "--cache-dir", ""]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("sample.py: error: --lora "), result.stderr


def test_help_lists_the_community_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        SAMPLE.parse_args(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    for flag in ("--model-config", "--ema", "--no-ema", "--vae", "--prediction-type", "--lora FILE[:SCALE]",
                 "--lora-lenient", "--embedding FILE[:TOKEN]", "community checkpoints"):
        assert flag in text, flag
    assert "single-file" in " ".join(text.split())


def test_family_peek_before_jax(tmp_path):
    """sample.py tells a single file's family from its safetensors header (plain JSON, before JAX is
    imported); a .ckpt is left to the loader (None), and so is a file whose keys name no family; an
    unreadable header is a one-line error naming the file, before any model loads."""
    import argparse

    from ipadapter_jax.cli import sample as sample_cli
    from ipadapter_jax.families import FAMILIES

    save_file({"model.diffusion_model.label_emb.0.0.weight": np.zeros(1, np.float32),
               "conditioner.embedders.0.transformer.x": np.zeros(1, np.float32)}, tmp_path / "xl.safetensors")
    save_file({"model.diffusion_model.out.2.bias": np.zeros(1, np.float32)}, tmp_path / "sd.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    (tmp_path / "model.ckpt").write_bytes(b"x")
    family = lambda name: sample_cli._family(argparse.Namespace(model=str(tmp_path / name)))
    assert family("xl.safetensors") is FAMILIES["sdxl"]
    assert family("sd.safetensors") is None
    assert family("model.ckpt") is None
    with pytest.raises(UserError, match="junk.safetensors"):
        family("junk.safetensors")