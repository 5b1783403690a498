"""Single-file (original LDM layout) checkpoints in and out, against diffusers.

Small random models of each family -- SD 1.x, SD 2.x-style (OpenCLIP text
layout: gelu text encoder, linear projections, v-prediction), SDXL-style -- are
written as diffusers folders, then as single files by our writer:

(a) diffusers' ``from_single_file(FILE, config=FOLDER)`` loads modules whose
    tensors equal the folder's bit for bit (our writer is right);
(b) our reader gives the folder's tensors bit for bit, and a pipeline whose
    final latents match diffusers' from the same file (<= 1e-4; SD 2.x-style
    and SDXL: SD 1.x reads through the same code as SD 2.x's pipeline and
    SDXL's first text encoder);
(c) folder -> file -> folder and file -> folder -> file are bit-exact, and the
    folder we write loads in diffusers;
(d) the ``python -m ipadapter_jax.convert`` commands;
(e) the real SD 1.5 / SD 2.1 / SDXL key sets and shapes (from torch ``meta``
    models of the built-in configurations, written as header-only sparse
    files) are detected as their family from the header alone, match the
    key sets our reader expects, and diffusers' own converters map them onto
    exactly the official models' parameters (the built-in configs are checked
    by the official parameter counts);
(f) bad input: a pickle carrying code, no known family, truncated files, EMA
    asked of a file without it, missing / extra / misshapen keys, a config
    folder of another family, a file without a VAE or a tokenizer, a .ckpt
    without torch installed, ``load_pipeline`` options of the other loader;
(g) upper-case suffixes, the training buffers ``scale_factor`` / ``lvlb_weights``,
    and tokenizers from the local Hugging Face cache when no config folder is
    given (SD 1.x in the family's repo order, SDXL's two).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sd_fixtures
from helpers import nchw, nhwc, rel_err
from ipadapter_jax.cli import run
from ipadapter_jax import families
from ipadapter_jax.convert import components as component_loader
from ipadapter_jax.convert import controlnet
from ipadapter_jax.convert.__main__ import PROG, main as convert_main
from ipadapter_jax.convert.ldm_detect import detect_family, file_prediction_type, read_layout
from ipadapter_jax.families import FAMILIES
from ipadapter_jax.convert.ldm_text import with_text_model_prefix
from ipadapter_jax.convert.build import build_module, expected_shapes
from ipadapter_jax.convert.single_file import (SingleFileModel, folder_to_single_file, ldm_shapes, modules_to_ldm,
                                               read_folder, read_single_file)
from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, MissingFile, Unsupported, UserError
from ipadapter_jax.io.files import CheckpointError, TorchRequired
from ipadapter_jax.io.params import module_state_dict
from ipadapter_jax.pipeline import StableDiffusionXLPipeline, load_pipeline
from ipadapter_jax.pipeline.single_file import load_pipeline_from_single_file
from test_sdxl_pipeline import build_sdxl_folder

PROMPT = "a red striped circle on the blue background"
STEPS = 3
HEIGHT = WIDTH = 16
LATENTS = np.random.default_rng(7).standard_normal((1, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SD2_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                 "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
                 "steps_offset": 1, "trained_betas": None}


def build_sd2_folder(root: Path, seed: int = 0) -> Path:
    """An SD 2.x-style diffusers folder: OpenCLIP-layout text encoder (gelu, no
    projection), linear transformer projections with per-block heads, two
    layers per block, a plain down block (its up block's upsampler sits at
    ``.1.conv``), v-prediction."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    folder = root / "sd2"
    UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=(2, 4),
                         norm_num_groups=8, cross_attention_dim=48, use_linear_projection=True, upcast_attention=True,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8
                         ).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, sample_size=HEIGHT).save_pretrained(folder / "vae")
    vocab = sd_fixtures.write_tokenizer(folder / "tokenizer")
    config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                 bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=1)
                  ).save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps(FAMILIES["sd2"].config("model_index")))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (diffusers folder, single file written by our writer)}."""
    root = tmp_path_factory.mktemp("single_file")
    folders = {"sd1": sd_fixtures.build_pipeline_folder(root / "sd1")["sd"], "sd2": build_sd2_folder(root),
               "sdxl": build_sdxl_folder(root / "xl")["sdxl"]}
    return {name: (folder, folder_to_single_file(folder, root / f"{name}.safetensors"))
            for name, folder in folders.items()}


def folder_tensors(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """{component: {diffusers key: tensor}} as stored (CLIP keys under text_model.)."""
    _, components, _ = read_folder(folder)
    return {name: (with_text_model_prefix(c.state_dict) if name.startswith("text") else c.state_dict)
            for name, c in components.items()}


def assert_same(actual: dict, expected: dict, what: str = "") -> None:
    assert set(actual) == set(expected), (what, sorted(set(actual) ^ set(expected))[:5])
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, (what, key)
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=f"{what} {key}")


def torch_pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


# --------------------------------------------------------------------------- (a) (b) (c)

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_reads_our_file(models, family):
    """(a) diffusers' own single-file loader reads our file into the folder's tensors."""
    folder, file = models[family]
    cls = torch_pipeline_class(family)
    pipe = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    reference = cls.from_pretrained(str(folder))
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in names:
        got = {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()}
        want = {k: v.numpy() for k, v in getattr(reference, name).state_dict().items()}
        assert_same(got, want, name)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_reader_gives_the_folder_tensors(models, family):
    """(b) our reader: the family, every tensor bit for bit, the prediction type."""
    folder, file = models[family]
    model = read_single_file(file, config_dir=folder)
    assert model.family.name == family
    expected = folder_tensors(folder)
    assert set(model.components) == set(expected)
    for name, tensors in expected.items():
        assert_same(model.components[name].state_dict, tensors, name)
    assert model.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert file_prediction_type(read_layout(file)) == ("v_prediction" if family == "sd2" else None)


def diffusers_latents(family, folder, file) -> np.ndarray:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    pipe = torch_pipeline_class(family).from_single_file(str(file), config=str(folder), local_files_only=True)
    scheduler = EulerDiscreteScheduler if family == "sdxl" else DDIMScheduler
    pipe.scheduler = scheduler.from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=HEIGHT, width=WIDTH,
                   latents=nchw(LATENTS), output_type="latent")
    return nhwc(out.images)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_pipeline_from_file_matches_diffusers(models, family):
    """(b) the pipeline built from the file against diffusers' from the same
    file: final latents <= 1e-4 (SD 2.x-style: v-prediction; SDXL: both encoders)."""
    folder, file = models[family]
    expected = diffusers_latents(family, folder, file)
    pipe = load_pipeline(file, config_dir=folder)   # a file: load_pipeline_from_single_file
    assert isinstance(pipe, StableDiffusionXLPipeline) == (family == "sdxl")
    # prepare + denoise: the latents without compiling the VAE decoder too
    request = pipe.prepare(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=HEIGHT, width=WIDTH,
                           scheduler="euler" if family == "sdxl" else "ddim", latents=LATENTS)
    err = rel_err(np.asarray(pipe.denoise(request)[0]), expected)
    print(f"{family}: final latents rel err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_round_trips_through_the_cli(models, family, tmp_path, capsys):
    """(c, d) file -> folder -> file and folder -> file -> folder are bit-exact;
    the folder we write loads in diffusers with the original's tensors."""
    folder, file = models[family]
    back = tmp_path / "folder"
    assert convert_main(["to-diffusers", str(file), str(back), "--model-config", str(folder)]) == 0
    assert_same(folder_tensors(back)["unet"], folder_tensors(folder)["unet"])
    for name, tensors in folder_tensors(folder).items():
        assert_same(folder_tensors(back)[name], tensors, name)
    again = tmp_path / "again.safetensors"
    assert convert_main(["to-single-file", str(back), str(again)]) == 0
    assert_same(load_file(again), load_file(file))
    reloaded = torch_pipeline_class(family).from_pretrained(str(back))
    original = torch_pipeline_class(family).from_pretrained(str(folder))
    for name in ("unet", "text_encoder"):
        got = {k: v.numpy() for k, v in getattr(reloaded, name).state_dict().items()}
        assert_same(got, {k: v.numpy() for k, v in getattr(original, name).state_dict().items()}, name)
    assert "wrote" in capsys.readouterr().out


def test_half_precision_file(models, tmp_path):
    folder, file = models["sd1"]
    assert convert_main(["to-single-file", str(folder), str(tmp_path / "half.safetensors"), "--half"]) == 0
    assert_same(load_file(tmp_path / "half.safetensors"), {k: v.astype(np.float16) for k, v in load_file(file).items()})


def test_modules_to_ldm_equals_folder_writer(models):
    """The writer from loaded Flax modules gives the folder writer's tensors (as float32)."""
    folder, file = models["sd2"]
    model = read_single_file(file, config_dir=folder)
    modules = {name: build_module(name, c) for name, c in model.components.items()}
    state = modules_to_ldm(modules["unet"], modules["vae"], modules["text_encoder"],
                           prediction_type="v_prediction")
    assert_same(state, load_file(file))


# --------------------------------------------------------------------------- EMA, .ckpt, fp16, VAE

def test_ckpt_fp16_ema_and_ignored_keys(models, tmp_path):
    """A training-style .ckpt: state_dict nesting, scalars beside it, fp16,
    EMA copies (model_ema.<key without dots>), DDPM buffers and position ids."""
    folder, file = models["sd1"]
    tensors = {k: v.astype(np.float16) for k, v in load_file(file).items()}
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + "".join(k.split(".")[1:]): (tensors[k] + 1).astype(np.float16) for k in unet_keys}
    extra = {"alphas_cumprod": np.ones(1000, np.float32), "model_ema.decay": np.float32(0.999),
             "model_ema.num_updates": np.int32(5),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77)[None]}
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in {**tensors, **ema, **extra}.items()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 10, "epoch": 1}, ckpt)
    plain = read_single_file(ckpt, config_dir=folder)
    averaged = read_single_file(ckpt, config_dir=folder, ema=True)
    want = {k: v.astype(np.float16) for k, v in folder_tensors(folder)["unet"].items()}
    assert_same(plain.components["unet"].state_dict, want)
    assert_same(averaged.components["unet"].state_dict, {k: (v + 1).astype(np.float16) for k, v in want.items()})
    assert_same(plain.components["vae"].state_dict,
                {k: v.astype(np.float16) for k, v in folder_tensors(folder)["vae"].items()})
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "flat.pth")   # no nesting
    assert_same(read_single_file(tmp_path / "flat.pth", config_dir=folder).components["unet"].state_dict, want)


def configs_only(folder: Path, out: Path) -> Path:
    """A copy of a diffusers folder without its weights (configs and tokenizers)."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def test_file_without_vae(models, tmp_path):
    """No first_stage_model.*: an error, unless ``vae`` gives a folder or an LDM
    VAE file, or the config folder holds VAE weights."""
    folder, file = models["sd1"]
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")},
              tmp_path / "novae.safetensors")
    with pytest.raises(BadFile, match="has no VAE.*--vae"):
        read_single_file(tmp_path / "novae.safetensors", config_dir=configs_only(folder, tmp_path / "configs"))
    save_file({k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")},
              tmp_path / "vae.safetensors")
    want = folder_tensors(folder)["vae"]
    for vae in (folder / "vae", tmp_path / "vae.safetensors", folder / "vae" / "diffusion_pytorch_model.safetensors"):
        model = read_single_file(tmp_path / "novae.safetensors", config_dir=tmp_path / "configs", vae=vae)
        assert_same(model.components["vae"].state_dict, want, str(vae))
    model = read_single_file(tmp_path / "novae.safetensors", config_dir=folder)   # the folder's VAE
    assert_same(model.components["vae"].state_dict, want)


def test_sd2_file_with_openclip_extras(models, tmp_path):
    """Real SD 2.x files keep OpenCLIP's last resblock, text_projection and
    logit_scale, which diffusers' SD 2.x text encoder does not use: ignored."""
    folder, file = models["sd2"]
    tensors = load_file(file)
    prefix = "cond_stage_model.model.transformer.resblocks."
    extra = {k.replace(f"{prefix}2.", f"{prefix}3."): v + 1 for k, v in tensors.items() if k.startswith(f"{prefix}2.")}
    extra.update({"cond_stage_model.model.text_projection": np.ones((48, 48), np.float32),
                  "cond_stage_model.model.logit_scale": np.array(4.6, np.float32)})
    save_file({**tensors, **extra}, tmp_path / "full.safetensors")
    model = read_single_file(tmp_path / "full.safetensors", config_dir=folder)
    assert_same(model.components["text_encoder"].state_dict, folder_tensors(folder)["text_encoder"])


# --------------------------------------------------------------------------- (e) full size

def _meta_shapes(family) -> dict[str, dict[str, tuple]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clean(config):
        return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}

    out = {}
    with torch.device("meta"):
        out["unet"] = UNet2DConditionModel(**clean(family.config("unet")))
        out["vae"] = AutoencoderKL(**clean(family.config("vae")))
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**clean(family.config("text_encoder"))))
        if "text_encoder_2" in family.configs:
            out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**clean(family.config("text_encoder_2"))))
    return {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in out.items()}


def _sparse_safetensors(path: Path, shapes: dict[str, tuple]) -> Path:
    """A safetensors file with this header and all-zero fp16 data left as a hole
    (sparse: the tensors take no disk space)."""
    header, offset = {}, 0
    for key, shape in sorted(shapes.items()):
        size = 2 * int(np.prod(shape))
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


# Parameter counts of the official models (diffusers / transformers): the configs are the real ones.
COUNTS = {"sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
          "sd2": {"unet": 865_910_724, "vae": 83_653_863},
          "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480}}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_detected_from_header(family, tmp_path):
    """(e) The full-size key set and shapes, from torch meta models through our
    writer's key map, equal the layout our reader expects from the built-in
    config, and a header-only file of them is detected as its family."""
    fam = FAMILIES[family]
    torch_shapes = _meta_shapes(fam)
    for name, count in COUNTS[family].items():
        assert sum(int(np.prod(s)) for s in torch_shapes[name].values()) == count, name
    layout = ldm_shapes(fam, torch_shapes, fam.configs)
    ours = ldm_shapes(fam, {name: expected_shapes(name, fam.config(name)) for name in torch_shapes}, fam.configs)
    assert layout == ours
    file = _sparse_safetensors(tmp_path / f"{family}.safetensors", layout)
    read = read_layout(file)
    file.unlink()   # 2-7 GB on filesystems without sparse files
    assert read.shapes == layout
    assert detect_family(read.shapes) is fam
    assert diffusers_conversion(fam, layout) == {name: shapes for name, shapes in torch_shapes.items()}


def diffusers_conversion(family, layout: dict[str, tuple]) -> dict[str, dict[str, tuple]]:
    """diffusers' own single-file converters on the layout (as meta tensors):
    {component: {diffusers key: shape}}."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    out = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, family.config("unet")),
           "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, family.config("vae"))}
    for slot in family.text:
        if slot.layout == "clip":
            state = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(checkpoint).items()
                     if k.startswith("text_model.")}   # transformers 5's bare CLIPTextModel names
        else:
            config = {k: v for k, v in family.config(slot.component).items() if k != "architectures"}
            with torch.device("meta"):
                model = CLIPTextModel(CLIPTextConfig(**config))
            state = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=slot.prefix)
            if slot.component == "text_encoder":
                state = {k.removeprefix("text_model."): v for k, v in state.items()}
        out[slot.component] = state
    return {name: {k: tuple(v.shape) for k, v in state.items()} for name, state in out.items()}


# --------------------------------------------------------------------------- (f) bad input

def test_pickle_with_code_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="carrying code.*refused"):
        read_single_file(path)
    assert not marker.exists()


def test_unknown_family_names_keys(tmp_path):
    save_file({"encoder.layer.0.weight": np.zeros(2, np.float32), "head.bias": np.zeros(2, np.float32)},
              tmp_path / "other.safetensors")
    with pytest.raises(BadFile, match="not a Stable Diffusion checkpoint.*encoder.layer.0.weight"):
        read_single_file(tmp_path / "other.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 4), np.float32)},
              tmp_path / "lora.safetensors")
    with pytest.raises(BadFile, match="LoRA"):
        read_single_file(tmp_path / "lora.safetensors")
    save_file({"model.diffusion_model.out.2.bias": np.zeros(4, np.float32),
               "conditioner.embedders.0.model.ln_final.bias": np.zeros(4, np.float32)}, tmp_path / "refiner.safetensors")
    with pytest.raises(Unsupported, match="refiner"):
        read_single_file(tmp_path / "refiner.safetensors")


def test_truncated_files(models, tmp_path):
    _, file = models["sd1"]
    data = file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_single_file(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        read_single_file(tmp_path / "head.safetensors")
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4000)}}, tmp_path / "m.ckpt")
    blob = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_single_file(tmp_path / "cut.ckpt")


def _edited(file: Path, path: Path, drop=(), add=None) -> Path:
    tensors = {k: v for k, v in load_file(file).items() if k not in drop}
    save_file({**tensors, **(add or {})}, path)
    return path


def test_strict_keys_named(models, tmp_path):
    folder, file = models["sd1"]
    with pytest.raises(BadArgument, match="EMA weights were asked for.*no model_ema"):
        read_single_file(file, config_dir=folder, ema=True)
    missing = _edited(file, tmp_path / "missing.safetensors", drop={"model.diffusion_model.out.2.bias"})
    with pytest.raises(CheckpointError, match=r"unet parameters are missing: model\.diffusion_model\.out\.2\.bias"):
        read_single_file(missing, config_dir=folder)
    extra = _edited(file, tmp_path / "extra.safetensors",
                    add={"model.diffusion_model.input_blocks.9.0.op.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"match no parameter of the unet: model\.diffusion_model\.input_blocks"):
        read_single_file(extra, config_dir=folder)
    stray = _edited(file, tmp_path / "stray.safetensors", add={"cond_stage_model.proj.weight": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"belong to no part of an SD 1.x model: cond_stage_model\.proj\.weight"):
        read_single_file(stray, config_dir=folder)
    mixed = _edited(file, tmp_path / "mixed.safetensors", add={"cond_stage_model.model.ln_final.bias": np.zeros(3)})
    with pytest.raises(BadFile, match="several families.*SD 2.x, SD 1.x"):
        read_single_file(mixed, config_dir=folder)
    key = "first_stage_model.decoder.mid.attn_1.q.weight"
    shaped = _edited(file, tmp_path / "shape.safetensors", add={key: np.zeros((32, 16, 1, 1), np.float32)})
    with pytest.raises(CheckpointError, match=r"wrong shape: first_stage_model\.decoder\.mid\.attn_1\.q\.weight "
                                              r"\(32, 16, 1, 1\) \(expected \(32, 32, 1, 1\)\)"):
        read_single_file(shaped, config_dir=folder)
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight "
                                              r"\(32, 4, 3, 3\) \(expected \(320, 4, 3, 3\)\).*standard SD 1.x "
                                              r"configuration.*--model-config"):
        read_single_file(file)   # the standard SD 1.5 configuration does not fit a tiny model
    marked = _edited(file, tmp_path / "ztsnr.safetensors", add={"ztsnr": np.zeros(0, np.float32)})
    with pytest.raises(Unsupported, match="zero-terminal-SNR"):
        read_single_file(marked, config_dir=folder)


def test_config_folder_of_another_family(models):
    with pytest.raises(Incompatible, match="SD 1.x checkpoint but the model config folder.*SDXL"):
        read_single_file(models["sd1"][1], config_dir=models["sdxl"][0])
    with pytest.raises(Incompatible, match="SDXL checkpoint but the model config folder.*SD 2.x"):
        read_single_file(models["sdxl"][1], config_dir=models["sd2"][0])


def test_tokenizers_needed(models, tmp_path, monkeypatch):
    _, file = models["sd1"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))   # whatever this machine has cached
    with pytest.raises(MissingFile, match="carries no tokenizer.*--model-config"):
        load_pipeline_from_single_file(file)
    with pytest.raises(MissingFile, match="not found"):
        read_single_file(file, config_dir=tmp_path / "nowhere")


def test_cli_errors_are_one_line(models, tmp_path, capsys):
    folder, file = models["sd1"]
    assert run(PROG, convert_main, ["to-diffusers", str(tmp_path / "none.safetensors"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: single-file checkpoint not found") and err.count("\n") == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert run(PROG, convert_main, ["to-diffusers", str(file), str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert run(PROG, convert_main, ["to-single-file", str(folder), str(tmp_path / "out.ckpt")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        convert_main(["to-diffusers", "--help"])
    assert exit_.value.code == 0 and "--model-config" in capsys.readouterr().out


# --------------------------------------------------------------------------- community-file details

def test_pickles_without_torch(models, tmp_path, monkeypatch, capsys):
    """A .ckpt without torch installed: a user error naming the file and how to
    install torch (one line from the CLI), not an ImportError traceback."""
    _, file = models["sd1"]
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in load_file(file).items()}}, tmp_path / "m.ckpt")
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch -> ImportError
    message = r"m.ckpt is a PyTorch pickle.*not installed: pip install torch==2.13.0"
    with pytest.raises(TorchRequired, match=message) as error:
        read_single_file(tmp_path / "m.ckpt")
    assert isinstance(error.value, UserError)
    assert run(PROG, convert_main, ["to-diffusers", str(tmp_path / "m.ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: ") and err.count("\n") == 1 and "pip install torch==2.13.0" in err


def test_suffix_case_and_training_buffers(models, tmp_path):
    """``.SAFETENSORS`` / ``.CKPT`` read as their lower-case forms; the training
    buffers ``scale_factor`` and ``lvlb_weights`` are ignored like the rest of the
    DDPM schedule (one list, shared with the ControlNet reader)."""
    folder, file = models["sd1"]
    want = read_single_file(file, config_dir=folder).components
    tensors = load_file(file)
    upper = tmp_path / "MODEL.SAFETENSORS"
    upper.write_bytes(file.read_bytes())
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}}, tmp_path / "model.CKPT")
    buffers = _edited(file, tmp_path / "buffers.safetensors", add={
        "scale_factor": np.array(0.18215, np.float32), "lvlb_weights": np.ones(1000, np.float32),
        "betas": np.ones(1000, np.float32)})
    for path in (upper, tmp_path / "model.CKPT", buffers):
        got = read_single_file(path, config_dir=folder).components
        for name, component in want.items():
            assert_same(got[name].state_dict, component.state_dict, f"{path.name} {name}")
    assert controlnet.DDPM_BUFFERS is families.DDPM_BUFFERS <= families.IGNORED_KEYS


def test_load_pipeline_refuses_the_other_loaders_options(models):
    """``load_pipeline``: ``variant`` names a folder's weights files, a file has
    one set; a single file's options given with a folder are refused too."""
    folder, file = models["sd1"]
    with pytest.raises(BadArgument, match=r"variant='fp16'.*sd1.safetensors is a single-file checkpoint"):
        load_pipeline(file, variant="fp16")
    with pytest.raises(BadArgument, match=r"vae=.*ema=True.*is a diffusers folder"):
        load_pipeline(folder, vae=folder / "vae", ema=True)


def _hub_snapshot(cache: Path, repo: str, tokenizer: Path, subfolder: str | None = None) -> Path:
    """A Hugging Face hub cache entry as huggingface_hub lays it out: refs/main
    names a commit, snapshots/<commit>/[subfolder/] holds the tokenizer files."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    target = entry / "snapshots" / commit / (subfolder or "")
    shutil.copytree(tokenizer, target)
    return target


def test_tokenizers_from_the_hub_cache(models, tmp_path, monkeypatch):
    """Without config_dir the family's tokenizers come from the local Hugging
    Face cache (HF_HUB_CACHE; never the network), first repo found of the
    family's list; the pipeline tokenizes as the folder's tokenizer does. The
    tiny model is read as the family's standard configuration (swapped in for
    SD 1.x's, which is full size). Nothing cached: an error naming the cache and
    the repos, before the file is read."""
    from transformers import CLIPTokenizer

    folder, file = models["sd1"]
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    sd1 = FAMILIES["sd1"]
    for name in ("unet", "vae", "text_encoder"):
        monkeypatch.setitem(sd1.configs, name, json.loads((folder / name / "config.json").read_text()))

    def refused_before_reading(path, **_):
        raise AssertionError(f"{path} was read")

    with monkeypatch.context() as m:
        m.setattr(component_loader, "read_single_file", refused_before_reading)
        with pytest.raises(MissingFile, match=r"carries no tokenizer.*nor is the SD 1.x tokenizer in the local "
                                              r"Hugging Face cache \(.*hub;.*stable-diffusion-v1-5/stable-diffusion-"
                                              r"v1-5/tokenizer / runwayml.* / openai/clip-vit-large-patch14"):
            load_pipeline_from_single_file(file)
        (tmp_path / "configs" / "tokenizer").mkdir(parents=True)   # a config folder whose tokenizer/ is empty
        with pytest.raises(MissingFile, match=r"tokenizer holds no vocab.json"):
            load_pipeline_from_single_file(file, config_dir=tmp_path / "configs")

    # Looked up in the family's order: the last one alone, then the first beside it.
    last = _hub_snapshot(cache, "openai/clip-vit-large-patch14", folder / "tokenizer")
    assert [f for f, _ in component_loader.hub_tokenizers(sd1)] == [last]
    first = _hub_snapshot(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", folder / "tokenizer", "tokenizer")
    assert [f for f, _ in component_loader.hub_tokenizers(sd1)] == [first]

    pipe = load_pipeline_from_single_file(file)
    reference = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    assert len(pipe.tokenizer) == len(reference) > 300   # (an empty tokenizer has 2 tokens)
    for text in (PROMPT, "", "the the thé, 3 cats!"):
        ours = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours == reference(text, padding="max_length", max_length=77, truncation=True).input_ids, text
    assert_same(module_state_dict(pipe.unet), folder_tensors(folder)["unet"])


def test_sdxl_tokenizers_from_the_hub_cache(models, tmp_path, monkeypatch):
    """SDXL takes two tokenizers; the fallback repos (OpenAI's CLIP-L, LAION's
    bigG) give them, the second padded with "!" as SDXL's tokenizer_2 is."""
    from transformers import CLIPTokenizer

    folder, _ = models["sdxl"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_snapshot(tmp_path / "hub", "openai/clip-vit-large-patch14", folder / "tokenizer")
    plain = tmp_path / "plain"   # bigG's tokenizer pads with <|endoftext|>
    sd_fixtures.write_tokenizer(plain)
    _hub_snapshot(tmp_path / "hub", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", plain)
    model = SingleFileModel(FAMILIES["sdxl"], {}, {}, {}, "epsilon")
    first, second = component_loader.load_tokenizers(model)
    for ours, name in ((first, "tokenizer"), (second, "tokenizer_2")):
        reference = CLIPTokenizer.from_pretrained(str(folder / name), local_files_only=True)
        assert ours.pad_token == reference.pad_token == ("!" if name == "tokenizer_2" else "<|endoftext|>")
        assert ours(PROMPT, padding="max_length", max_length=77).input_ids == \
            reference(PROMPT, padding="max_length", max_length=77).input_ids
