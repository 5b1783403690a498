"""Checkpoint reading: file formats and variants, strictness, and every bad
input raising a clear error that names the culprit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from helpers import rel_err, saved_diffusers
from ipadapter_jax.io import CheckpointError, read_state_dict
from ipadapter_jax.models import AutoencoderKL, UNet2DConditionModel

UNET = dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
            cross_attention_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    return saved_diffusers(tmp_path_factory, "unet", "UNet2DConditionModel", UNET)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return saved_diffusers(tmp_path_factory, "vae", "AutoencoderKL", VAE)


def copy_folder(src, dst, state=None, config=None):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    if state is not None:
        save_file(state, dst / WEIGHTS)
    return dst


def outputs(model):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 4), dtype=np.float32)
    c = rng.standard_normal((1, 3, 8), dtype=np.float32)
    return np.asarray(model(x, np.array([7]), c))


# ------------------------------------------------------------------ formats

def test_bin_checkpoint_loads_with_weights_only(unet_folder, tmp_path):
    state = load_file(unet_folder / WEIGHTS)
    folder = copy_folder(unet_folder, tmp_path / "bin")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, folder / "diffusion_pytorch_model.bin")
    np.testing.assert_array_equal(outputs(UNet2DConditionModel.from_pretrained(folder)),
                                  outputs(UNet2DConditionModel.from_pretrained(unet_folder)))


def test_bin_refuses_pickled_code(tmp_path):
    """A pickle that is not plain tensors is refused (weights_only=True), never executed."""
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "obj": shutil.copy}, path)
    with pytest.raises(CheckpointError, match="evil.bin"):
        read_state_dict(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_variant(unet_folder, tmp_path, dtype):
    """``variant="fp16"`` reads ``*.fp16.safetensors``; fp16 and bf16 tensors are cast to float32."""
    import safetensors.torch

    state = load_file(unet_folder / WEIGHTS)
    folder = copy_folder(unet_folder, tmp_path / "half")
    safetensors.torch.save_file({k: torch.from_numpy(v).to(dtype) for k, v in state.items()},
                                folder / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        UNet2DConditionModel.from_pretrained(folder)
    model = UNet2DConditionModel.from_pretrained(folder, variant="fp16")
    kernel = np.asarray(model.conv_in.kernel[...])
    assert kernel.dtype == np.float32
    expected = torch.from_numpy(state["conv_in.weight"]).to(dtype).float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(kernel, expected)


def test_sharded_checkpoint(unet_folder, tmp_path):
    state = load_file(unet_folder / WEIGHTS)
    folder = copy_folder(unet_folder, tmp_path / "sharded")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, folder / name)
        weight_map.update({k: name for k in shard_keys})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_array_equal(outputs(UNet2DConditionModel.from_pretrained(folder)),
                                  outputs(UNet2DConditionModel.from_pretrained(unet_folder)))


def test_non_strict_reports_what_it_skipped(unet_folder, tmp_path):
    state = load_file(unet_folder / WEIGHTS)
    dropped = "conv_out.bias"
    state.pop(dropped)
    state["extra.weight"] = np.zeros(3, np.float32)
    folder = copy_folder(unet_folder, tmp_path / "partial", state=state)
    with pytest.raises(CheckpointError, match="conv_out.bias"):
        UNet2DConditionModel.from_pretrained(folder)
    model, report = UNet2DConditionModel.from_pretrained(folder, strict=False, return_report=True)
    assert report.missing == [dropped] and report.unexpected == ["extra.weight"]
    np.testing.assert_array_equal(np.asarray(model.conv_in.bias[...]), state["conv_in.bias"])


# ------------------------------------------------------------------ bad input

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        UNet2DConditionModel.from_pretrained(tmp_path / "nowhere")


def test_missing_config(unet_folder, tmp_path):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copy(unet_folder / WEIGHTS, folder / WEIGHTS)
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet2DConditionModel.from_pretrained(folder)


def test_missing_weights(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        UNet2DConditionModel.from_pretrained(folder)


def test_invalid_config_json(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path / "badjson")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        UNet2DConditionModel.from_pretrained(folder)


def test_unknown_block_type(unet_folder, tmp_path):
    config = json.loads((unet_folder / "config.json").read_text())
    config["down_block_types"] = ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]
    folder = copy_folder(unet_folder, tmp_path / "badblock", config=config)
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNet2DConditionModel.from_pretrained(folder)


def test_unsupported_config_option(unet_folder, tmp_path):
    config = json.loads((unet_folder / "config.json").read_text())
    config["class_embed_type"] = "timestep"
    folder = copy_folder(unet_folder, tmp_path / "classembed", config=config)
    with pytest.raises(NotImplementedError, match="class_embed_type"):
        UNet2DConditionModel.from_pretrained(folder)


def test_weights_of_another_model(unet_folder, vae_folder, tmp_path):
    """UNet weights in a VAE folder: unexpected and missing keys are named."""
    folder = copy_folder(vae_folder, tmp_path / "vae_with_unet", state=load_file(unet_folder / WEIGHTS))
    with pytest.raises(CheckpointError) as err:
        AutoencoderKL.from_pretrained(folder)
    message = str(err.value)
    assert "match no parameter: conv_in.bias, conv_in.weight" in message
    assert "not in the checkpoint: decoder.conv_in.bias" in message
    assert "another model" in message and WEIGHTS in message


def test_truncated_safetensors(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path / "truncated")
    data = (unet_folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        UNet2DConditionModel.from_pretrained(folder)


def test_shape_mismatch_names_key_and_shapes(unet_folder, tmp_path):
    state = load_file(unet_folder / WEIGHTS)
    state["conv_in.weight"] = np.zeros((16, 4, 5, 5), np.float32)
    folder = copy_folder(unet_folder, tmp_path / "shape", state=state)
    with pytest.raises(CheckpointError, match=r"conv_in.weight: checkpoint \(16, 4, 5, 5\) vs model \(16, 4, 3, 3\)"):
        UNet2DConditionModel.from_pretrained(folder)


def test_unsupported_dtype(unet_folder, tmp_path):
    state = load_file(unet_folder / WEIGHTS)
    state["conv_in.bias"] = state["conv_in.bias"].astype(np.int32)
    folder = copy_folder(unet_folder, tmp_path / "int", state=state)
    with pytest.raises(CheckpointError, match="conv_in.bias.*int32"):
        UNet2DConditionModel.from_pretrained(folder)


def test_unknown_weights_format(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="weights.npz"):
        read_state_dict(tmp_path / "weights.npz")


def test_core_does_not_import_torch_or_diffusers():
    code = ("import sys, ipadapter_jax, ipadapter_jax.models, ipadapter_jax.io.files, ipadapter_jax.io.pretrained, "
            "ipadapter_jax.convert.controlnet, ipadapter_jax.convert.lora, ipadapter_jax.convert.single_file, "
            "ipadapter_jax.convert.textual_inversion; "
            "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_safetensors_without_torch_matches(unet_folder):
    """The safetensors path reads with numpy only; values equal torch's view of the file."""
    import safetensors.torch

    mine = read_state_dict(unet_folder / WEIGHTS)
    theirs = safetensors.torch.load_file(unet_folder / WEIGHTS)
    assert mine.keys() == theirs.keys()
    # Bit for bit, zeros included (a reader that returned zeros for a tensor would fail here).
    differ = [k for k in mine if not np.array_equal(mine[k], theirs[k].numpy())]
    assert not differ, differ[:5]
    assert any(np.any(v) for v in mine.values())


def test_atomic_write_keeps_the_old_file_on_failure_and_gives_normal_permissions(tmp_path):
    """A failed write leaves the previous file and no temporary; a finished one
    has the permissions of a plainly created file (not mkstemp's owner-only)."""
    import os

    from ipadapter_jax.io.files import atomic_write, save_safetensors

    target = tmp_path / "w.safetensors"
    save_safetensors({"a": np.ones((2,), np.float32)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as tmp:
            open(tmp, "wb").write(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    (tmp_path / "plain").write_bytes(b"")
    assert os.stat(target).st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777
