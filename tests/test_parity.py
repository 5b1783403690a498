"""``ipadapter-parity`` on small random SD 1.5, SDXL and ControlNet folders:
every component within the test suite's bounds, a block row for every block
diffusers has, a trajectory of the requested length, the JSON schema; a copy
with one UNet block and one VAE block changed, given with the original as
--reference, fails naming both blocks; --bound below the measured error exits
1; unreadable files and a missing torch are one line and exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sd_fixtures
from helpers import cpu_env
from ipadapter_jax.cli.parity import main
from ipadapter_jax.parity import controlnet_block_names, unet_block_names, vae_block_names

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_fixtures.build_pipeline_folder(tmp_path_factory.mktemp("parity"), with_image=True)


def parity(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv] + ["--no-progress"])
    except SystemExit as e:   # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def torch_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder)


def components(doc: dict) -> dict:
    return {c["name"]: c for c in doc["components"]}


def check_schema(doc: dict) -> None:
    assert {"components", "trajectory", "image", "versions", "machine", "run"} <= set(doc)
    for c in doc["components"]:
        assert {"name", "rel", "max_abs", "blocks", "first_divergent"} <= set(c), c
        for b in c["blocks"]:
            assert {"name", "rel", "max_abs"} <= set(b)
    for i, step in enumerate(doc["trajectory"]):
        assert step["step"] == i + 1 and isinstance(step["rel"], float)
    assert set(doc["image"]) == {"rel", "max_abs"}
    assert doc["versions"]["torch"] and doc["versions"]["jax"] and doc["versions"]["diffusers"]
    assert doc["machine"]["cores"] >= 1 and doc["run"]["peak_rss_gb"] > 0


def test_sd15_every_component_block_and_step(sd, tmp_path, capsys):
    """SD 1.5 + a base adapter, float32 and bfloat16 side by side, JSON and plot."""
    out_json, out_png = tmp_path / "p.json", tmp_path / "p.png"
    code, stdout, err = parity(["--model", sd["sd"], "--image-encoder", sd["image_encoder"], "--ip-adapter",
                                sd["adapter"], "--image", sd["image"], "--prompt", "a red circle", "--scale", 0.7,
                                "--steps", 3, "--height", 16, "--width", 16, "--dtype", "bfloat16",
                                "--json", out_json, "--plot", out_png], capsys)
    assert code == 0, stdout + err
    doc = json.loads(out_json.read_text())
    check_schema(doc)
    assert doc["dtype"] == "bfloat16" and doc["float32"]["dtype"] == "float32"
    fp32 = components(doc["float32"])
    assert list(fp32) == ["text_encoder", "text_encoder.pooled", "image_encoder", "image_proj.0", "unet",
                          "unet+ip", "vae.encoder", "vae.decoder"]
    for name, c in fp32.items():
        assert c["rel"] <= 1e-5 and c["first_divergent"] is None, (name, c)
        assert all(b["rel"] <= 1e-4 for b in c["blocks"]), (name, c["blocks"])
    expected_blocks = unet_block_names(torch_unet(sd["sd"] / "unet"))
    assert [b["name"] for b in fp32["unet"]["blocks"]] == expected_blocks
    assert [b["name"] for b in fp32["unet+ip"]["blocks"]] == expected_blocks
    assert [b["name"] for b in fp32["text_encoder"]["blocks"]] == ["embeddings", "encoder.layers.0",
                                                                   "encoder.layers.1", "final_layer_norm"]
    assert len(doc["float32"]["trajectory"]) == 3 and len(doc["trajectory"]) == 3
    assert all(s["rel"] <= 1e-4 for s in doc["float32"]["trajectory"])
    assert doc["float32"]["image"]["max_abs"] <= 2e-3
    # bfloat16: within its own bounds, and visibly less exact than float32.
    bf16 = components(doc)
    assert all(c["rel"] <= 5e-2 for c in bf16.values())
    assert bf16["unet"]["rel"] > 10 * fp32["unet"]["rel"]
    assert "| unet+ip |" in stdout and "float32 rel" in stdout and "bfloat16 rel" in stdout
    assert out_png.stat().st_size > 1000


@pytest.fixture(scope="module")
def sdxl(sd, tmp_path_factory):
    from test_sdxl_pipeline import build_sdxl_folder

    return build_sdxl_folder(tmp_path_factory.mktemp("parity_xl"))


def test_sdxl_depth_two(sd, sdxl, tmp_path, capsys):
    """SDXL: both text encoders and the pooled output; --depth 2 names every
    resnet / attention / sampler diffusers has."""
    from diffusers import AutoencoderKL

    out_json = tmp_path / "xl.json"
    code, stdout, err = parity(["--model", sdxl["sdxl"], "--components", "text,unet,vae,trajectory", "--depth", 2,
                                "--prompt", "a cat", "--steps", 2, "--height", 16, "--width", 24,
                                "--scheduler", "euler", "--guidance", 5, "--json", out_json], capsys)
    assert code == 0, stdout + err
    doc = json.loads(out_json.read_text())
    check_schema(doc)
    comps = components(doc)
    assert list(comps) == ["text_encoder", "text_encoder.pooled", "text_encoder_2", "text_encoder_2.pooled",
                           "unet", "vae.encoder", "vae.decoder"]
    assert all(c["rel"] <= 1e-5 for c in comps.values()), comps
    expected = unet_block_names(torch_unet(sdxl["sdxl"] / "unet"), depth=2)
    assert [b["name"] for b in comps["unet"]["blocks"]] == expected
    assert "down_blocks.1.attentions.0" in expected and "up_blocks.0.upsamplers.0" in expected
    vae = AutoencoderKL.from_pretrained(sdxl["sdxl"] / "vae")
    assert [b["name"] for b in comps["vae.decoder"]["blocks"]] == vae_block_names(vae, "decoder", depth=2)
    assert all(b["rel"] <= 1e-4 for c in comps.values() for b in c["blocks"])
    assert len(doc["trajectory"]) == 2 and all(s["rel"] <= 1e-4 for s in doc["trajectory"])


def test_controlnet(sd, tmp_path, capsys):
    from diffusers import ControlNetModel
    from test_controlnet_pipeline import control_png, random_controlnet

    net = random_controlnet(sd_fixtures.fx.UNET, 3, tmp_path / "cn")
    control = control_png(tmp_path / "control.png", 4)
    out_json = tmp_path / "cn.json"
    code, stdout, err = parity(["--model", sd["sd"], "--controlnet", net, "--control-image", control,
                                "--components", "controlnet,trajectory", "--prompt", "a square", "--steps", 2,
                                "--height", 16, "--width", 16, "--json", out_json], capsys)
    assert code == 0, stdout + err
    doc = json.loads(out_json.read_text())
    comps = components(doc)
    assert list(comps) == ["controlnet.0"] and comps["controlnet.0"]["rel"] <= 1e-5
    names = controlnet_block_names(ControlNetModel.from_pretrained(net))
    assert [b["name"] for b in comps["controlnet.0"]["blocks"]] == names
    assert len(doc["trajectory"]) == 2 and doc["image"]["max_abs"] <= 2e-3


def test_changed_blocks_are_named(sd, tmp_path, capsys):
    """A copy of the model with one UNet block's and one VAE decoder block's
    weights changed, against the original as --reference: exit 1, and those
    two blocks (no others) named as the first divergences."""
    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "changed"
    shutil.copytree(sd["sd"], copy)
    for part, key in (("unet", "down_blocks.1.resnets.0.conv2.bias"),
                      ("vae", "decoder.up_blocks.1.resnets.0.conv2.bias")):
        file = copy / part / "diffusion_pytorch_model.safetensors"
        state = load_file(file)
        state[key] = state[key] + 0.5
        save_file(state, file)
    out_json = tmp_path / "changed.json"
    code, stdout, err = parity(["--model", copy, "--reference", sd["sd"], "--components", "unet,vae",
                                "--json", out_json, "--height", 16, "--width", 16], capsys)
    assert code == 1, stdout + err
    comps = components(json.loads(out_json.read_text()))
    assert comps["unet"]["first_divergent"] == "down_blocks.1"
    assert [b["name"] for b in comps["unet"]["blocks"] if b["rel"] > 1e-4] == ["down_blocks.1"]
    assert comps["vae.decoder"]["first_divergent"] == "decoder.up_blocks.1"
    assert [b["name"] for b in comps["vae.decoder"]["blocks"] if b["rel"] > 1e-4] == ["decoder.up_blocks.1"]
    assert comps["vae.encoder"]["first_divergent"] is None
    assert "down_blocks.1" in stdout and "decoder.up_blocks.1" in stdout
    assert "past the bound" in err


def test_bound_below_the_measured_error(sd, capsys):
    code, stdout, err = parity(["--model", sd["sd"], "--components", "text", "--bound", 1e-12], capsys)
    assert code == 1, stdout + err
    assert "(<= 1e-12)" in stdout and "**over**" in stdout and "past the bound: float32 text_encoder" in err


def test_unreadable_adapter_is_one_line(sd, tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, stdout, err = parity(["--model", sd["sd"], "--image-encoder", sd["image_encoder"], "--ip-adapter", bad,
                                "--image", sd["image"]], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ipadapter-parity: error: ") and str(bad) in lines[0], err
    assert "Traceback" not in err and not stdout


def test_bad_arguments_before_jax(sd, capsys):
    for argv, expected in ((["--components", "unet,nope"], "unknown nope"), (["--height", "12"], "--height"),
                           (["--reference", "/no/such/model"], "--reference")):
        code, _, err = parity(["--model", sd["sd"], *argv], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
"""


def test_without_torch_names_the_extra(sd, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = cpu_env()
    env["PYTHONPATH"] = f"{tmp_path}:{ROOT}"
    proc = subprocess.run([sys.executable, "-m", "ipadapter_jax.parity", "--model", str(sd["sd"])],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ipadapter-parity: error: the reference side needs torch and diffusers: pip install 'ipadapter-jax[torch]'"]


def test_demo_without_arguments_refused_with_hint(capsys):
    code, _, err = parity([], capsys)
    assert code == 2 and "--demo" in err


def test_single_file_with_lora_and_embedding(sd, tmp_path, capsys):
    """A single file (from_single_file on the reference side) with a kohya LoRA (load_lora_weights +
    fuse_lora) and an A1111 embedding (load_textual_inversion) in the prompt: within the bounds."""
    from safetensors.numpy import save_file

    from ipadapter_jax.cli.convert import main as convert_main
    from test_community_cli import configs_only
    from test_lora import _kohya_sd15

    file = tmp_path / "finetune.safetensors"
    assert convert_main(["to-single-file", str(sd["sd"]), str(file)]) == 0
    configs = configs_only(sd["sd"], tmp_path / "configs")
    save_file(_kohya_sd15(1), tmp_path / "lora.safetensors")
    width = json.loads((sd["sd"] / "text_encoder" / "config.json").read_text())["hidden_size"]
    vectors = (np.random.default_rng(3).standard_normal((2, width)) * 0.3).astype(np.float32)
    save_file({"emb_params": vectors}, tmp_path / "my-style.safetensors")
    out_json = tmp_path / "sf.json"
    code, stdout, err = parity(["--model", file, "--model-config", configs, "--lora",
                                f"{tmp_path / 'lora.safetensors'}:0.8", "--embedding", tmp_path / "my-style.safetensors",
                                "--prompt", "a circle in my-style", "--components", "text,unet,trajectory",
                                "--steps", 2, "--height", 16, "--width", 16, "--json", out_json], capsys)
    assert code == 0, stdout + err
    doc = json.loads(out_json.read_text())
    assert all(c["rel"] <= 1e-5 for c in doc["components"]), doc["components"]
    assert len(doc["trajectory"]) == 2


def test_cli_groups_are_the_runs():
    """ipadapter_jax.cli.parity keeps its own copy of the component groups (its parser loads no JAX)."""
    from ipadapter_jax.cli.parity import GROUPS as CLI_GROUPS
    from ipadapter_jax.parity.run import GROUPS

    assert CLI_GROUPS == GROUPS
