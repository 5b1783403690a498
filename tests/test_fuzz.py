"""The fuzzed input surface: bad inputs thrown at every reader and command line.

Each bad input must give a clear error: a ``UserError`` of the right subclass
whose message names the file / key / argument and what was expected; never a
hang (an alarm bounds every in-process case, a timeout every subprocess),
never an interpreter crash, never a silent wrong result, never a huge
allocation (claimed sizes are checked before anything is allocated). Valid but
unusual inputs (a 1x1 image, CMYK, 16-bit, palette with transparency, an
animated GIF, an extreme aspect ratio) must work.

The bad inputs are the parametrized cases of ``WEIGHTS``, ``LOADER_WEIGHTS``,
``ADAPTERS``, ``SHARD_INDEXES``, ``CONFIGS``, ``BAD_IMAGES``, ``BAD_ARRAYS``,
``EMBEDS``, ``JSON_DATA``, ``EVAL_CASES``, the data-source tests, ``SAMPLE_PY``
and ``EVAL_CLI``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import sd_fixtures
from ipadapter_jax.eval import load_cases
from ipadapter_jax.io import images as images_lib
from ipadapter_jax.io.errors import BadArgument, BadFile, MissingFile, Unsupported, UserError
from ipadapter_jax.io.files import find_weights, read_state_dict
from ipadapter_jax.io.images import load_rgb, preprocess
from ipadapter_jax.ip_adapter.encoding import load_embeds
from ipadapter_jax.ip_adapter.official import load_ip_adapter
from ipadapter_jax.models import (AutoencoderKL, CLIPTextModel, CLIPVisionModelWithProjection,
                                  UNet2DConditionModel)
from ipadapter_jax.training.data import CachedSource, JsonImageTextSource, TFDSImageTextSource, make_loader

ROOT = Path(__file__).resolve().parents[1]
CASE_SECONDS = 60          # in-process cases: each far under a second or two; an alarm catches a hang


@pytest.fixture(autouse=True)
def _no_hang(request):
    """Fail (instead of hanging) an in-process case that runs past CASE_SECONDS; the
    command-line cases have their subprocess timeouts instead."""
    if request.node.name.startswith(("test_sample_py", "test_eval_cli")) or not hasattr(signal, "SIGALRM"):
        yield
        return

    def timeout(signum, frame):
        raise TimeoutError(f"a fuzz case ran past {CASE_SECONDS} s: a hang?")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(CASE_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny random SD folder, image encoder and adapters of ``sd_fixtures``, made once."""
    return sd_fixtures.build_pipeline_folder(tmp_path_factory.mktemp("fuzz_models"), with_image=True)


@pytest.fixture(scope="module")
def unet(models):
    return UNet2DConditionModel.from_pretrained(models["sd"] / "unet")


def refused(kind, fn, *mentions):
    """``fn()`` raises a ``kind`` user error whose message holds every mention; returns the message."""
    with pytest.raises(UserError) as info:
        fn()
    error = info.value
    message = str(error)
    assert isinstance(error, kind), f"expected {kind.__name__}, got {type(error).__name__}: {message}"
    for mention in mentions:
        assert str(mention) in message, f"{mention!r} not in the message: {message}"
    return message


# --------------------------------------------------------------------------- weights files

def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


class RunsCode:
    """A pickle that runs a shell command when unpickled without ``weights_only``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_zip_with_code(path: Path, marker: Path):
    import torch

    torch.save({"w": RunsCode(marker)}, path)


def _raw_pickle_with_code(path: Path, marker: Path):
    path.write_bytes(pickle.dumps({"w": RunsCode(marker)}, protocol=2))


def _truncated(path: Path, models) -> None:
    data = models["adapter"].read_bytes()
    path.write_bytes(data[:len(data) // 2])


# name -> (suffix, writer(path, models, marker), words the message must hold besides the file name)
F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
WEIGHTS = {
    "random_bytes": (".safetensors", lambda p, m, k: p.write_bytes(np.random.default_rng(0).bytes(1000)), ()),
    "header_size_2**62": (".safetensors", lambda p, m, k: p.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}"),
                          ("header too large",)),
    "header_longer_than_file": (".safetensors",
                                lambda p, m, k: p.write_bytes(safetensors_bytes({}, length=4096)), ("header",)),
    "header_not_json": (".safetensors", lambda p, m, k: p.write_bytes(struct.pack("<Q", 8) + b"notjson!"),
                        ("JSON",)),
    "header_a_list": (".safetensors", lambda p, m, k: p.write_bytes(safetensors_bytes([1, 2])), ("JSON",)),
    "unknown_dtype": (".safetensors", lambda p, m, k: p.write_bytes(
        safetensors_bytes({"w": {**F32x4, "dtype": "Q7"}}, b"\0" * 16)), ("Q7",)),
    "offsets_past_end": (".safetensors", lambda p, m, k: p.write_bytes(safetensors_bytes({"w": F32x4}, b"\0" * 8)),
                         ()),
    "dtype_shape_vs_offsets": (".safetensors", lambda p, m, k: p.write_bytes(
        safetensors_bytes({"w": {**F32x4, "shape": [3]}}, b"\0" * 16)), ()),
    "shape_overflows": (".safetensors", lambda p, m, k: p.write_bytes(
        safetensors_bytes({"w": {**F32x4, "shape": [2 ** 62, 2 ** 62]}}, b"\0" * 16)), ()),
    "overlapping_offsets": (".safetensors", lambda p, m, k: p.write_bytes(
        safetensors_bytes({"a": F32x4, "b": F32x4}, b"\0" * 16)), ()),
    "metadata_not_strings": (".safetensors", lambda p, m, k: p.write_bytes(
        safetensors_bytes({"__metadata__": {"format": 1}})), ()),
    "unsupported_dtype_F4": (".safetensors", lambda p, m, k: p.write_bytes(
        safetensors_bytes({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2)), ("F4",)),
    "empty_file": (".safetensors", lambda p, m, k: p.write_bytes(b""), ("empty",)),
    "truncated_valid_file": (".safetensors", lambda p, m, k: _truncated(p, m), ()),
    "a_folder": (".safetensors", lambda p, m, k: p.mkdir(), ("folder",)),
    "bin_torch_pickle_with_code": (".bin", lambda p, m, k: _torch_zip_with_code(p, k), ("posix.system",)),
    "bin_raw_pickle_with_code": (".bin", lambda p, m, k: _raw_pickle_with_code(p, k), ("system",)),
    "bin_random_bytes": (".bin", lambda p, m, k: p.write_bytes(np.random.default_rng(1).bytes(500)), ()),
    "bin_empty": (".bin", lambda p, m, k: p.write_bytes(b""), ("empty",)),
    "bin_a_list": (".bin", lambda p, m, k: __import__("torch").save([__import__("torch").zeros(2)], p),
                   ("list",)),
    "bin_not_a_tensor": (".bin", lambda p, m, k: __import__("torch").save({"w": 3}, p), ("'w'",)),
    "unknown_suffix": (".npz", lambda p, m, k: p.write_bytes(b"PK\3\4"), (".npz",)),
}


def make_weights(case: str, folder: Path, models, stem: str = "bad") -> tuple[Path, Path]:
    suffix, write, _ = WEIGHTS[case]
    folder.mkdir(parents=True, exist_ok=True)
    path, marker = folder / f"{stem}{suffix}", folder / "CODE_RAN"
    write(path, models, marker)
    return path, marker


@pytest.mark.parametrize("case", WEIGHTS)
def test_read_state_dict_refuses(case, models, tmp_path):
    path, marker = make_weights(case, tmp_path, models)
    refused(BadFile, lambda: read_state_dict(path), path.name, *WEIGHTS[case][2])
    assert not marker.exists(), "unpickling ran the file's code"


LOADER_WEIGHTS = [c for c, (suffix, _, _) in WEIGHTS.items() if suffix in (".safetensors", ".bin")]


@pytest.mark.parametrize("case", LOADER_WEIGHTS)
def test_from_pretrained_refuses_bad_weights(case, models, tmp_path):
    """A model folder whose weights file is bad: the loader names the file."""
    folder = tmp_path / "image_encoder"
    folder.mkdir()
    shutil.copy(models["image_encoder"] / "config.json", folder)
    path, marker = make_weights(case, folder, models, stem="model")
    refused(BadFile, lambda: CLIPVisionModelWithProjection.from_pretrained(folder), path.name)
    assert not marker.exists(), "unpickling ran the file's code"


@pytest.mark.parametrize("case", LOADER_WEIGHTS)
def test_load_ip_adapter_refuses_bad_file(case, models, unet, tmp_path):
    path, marker = make_weights(case, tmp_path, models, stem="ip-adapter")
    refused(BadFile, lambda: load_ip_adapter(path, unet), path.name)
    assert not marker.exists(), "unpickling ran the file's code"


def _adapter_with(models, change) -> dict:
    state = load_file(models["adapter"])
    change(state)
    return state


# Valid safetensors files whose tensors are not a usable adapter: name -> (change, words in the message).
ADAPTERS = {
    "int_weights": (lambda s: s.update({"ip_adapter.1.to_k_ip.weight": s["ip_adapter.1.to_k_ip.weight"]
                                        .astype(np.int32)}), ("ip_adapter.1.to_k_ip.weight", "int32")),
    "vector_kv_weight": (lambda s: s.update({"ip_adapter.1.to_k_ip.weight": np.ones(64, np.float32)}),
                         ("ip_adapter.1.to_k_ip.weight",)),
    "scalar_proj_weight": (lambda s: s.update({"image_proj.proj.weight": np.array(1.0, np.float32)}), ("image_proj",)),
    "empty_norm": (lambda s: s.update({"image_proj.norm.weight": np.ones(0, np.float32)}), ("image_proj",)),
    "only_image_proj": (lambda s: [s.pop(k) for k in list(s) if k.startswith("ip_adapter.")],
                        ("not an IP-Adapter file",)),
    "extra_key": (lambda s: s.update({"text_model.x": np.ones(2, np.float32)}), ("text_model.x",)),
    "wrong_kv_shape": (lambda s: s.update({"ip_adapter.1.to_k_ip.weight": np.ones((64, 7), np.float32)}),
                       ("width 7",)),
    "even_kv_index": (lambda s: s.update({"ip_adapter.2.to_k_ip.weight": s.pop("ip_adapter.1.to_k_ip.weight")}),
                      ("ip_adapter.2.to_k_ip.weight", "odd")),
}


@pytest.mark.parametrize("case", ADAPTERS)
def test_load_ip_adapter_refuses_bad_contents(case, models, unet, tmp_path):
    change, mentions = ADAPTERS[case]
    path = tmp_path / "ip-adapter.safetensors"
    save_file(_adapter_with(models, change), path)
    refused(BadFile, lambda: load_ip_adapter(path, unet), path.name, *mentions)


def test_load_ip_adapter_a_unet_weights_file(models, unet):
    """Another model's weights file given as the adapter."""
    path = models["sd"] / "unet" / "diffusion_pytorch_model.safetensors"
    refused(BadFile, lambda: load_ip_adapter(path, unet), path.name, "not an IP-Adapter file")


# Sharded checkpoints: name -> (index.json text, words in the message)
SHARD_INDEXES = {
    "invalid_json": ("{not json", ("not valid JSON",)),
    "a_list": ("[1, 2]", ("weight_map",)),
    "weight_map_a_list": ('{"weight_map": ["a.safetensors"]}', ("weight_map",)),
    "shard_outside_folder": ('{"weight_map": {"w": "../x.safetensors"}}', ("../x.safetensors",)),
    "missing_shard": ('{"weight_map": {"w": "model-00001.safetensors"}}', ("model-00001.safetensors",)),
}


@pytest.mark.parametrize("case", SHARD_INDEXES)
def test_bad_shard_index(case, tmp_path):
    text, mentions = SHARD_INDEXES[case]
    (tmp_path / "model.safetensors.index.json").write_text(text)
    kind = MissingFile if case == "missing_shard" else BadFile
    refused(kind, lambda: find_weights(tmp_path, "model"), "model.safetensors.index.json", *mentions)


def test_float8_weights_are_read(tmp_path):
    """Not an error: float8 tensors (numpy has no such dtype) are read with ml_dtypes."""
    path = tmp_path / "f8.safetensors"
    path.write_bytes(safetensors_bytes({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}},
                                       bytes([0x38, 0x40, 0xB8, 0x00])))    # 1, 2, -1, 0
    np.testing.assert_array_equal(read_state_dict(path)["w"].astype(np.float32), [1, 2, -1, 0])


# --------------------------------------------------------------------------- configs

MODEL_FOLDERS = {   # model class, its folder in the fixture, its weights file
    "unet": (UNet2DConditionModel, ("sd", "unet"), "diffusion_pytorch_model.safetensors"),
    "vae": (AutoencoderKL, ("sd", "vae"), "diffusion_pytorch_model.safetensors"),
    "clip_vision": (CLIPVisionModelWithProjection, ("image_encoder",), "model.safetensors"),
    "clip_text": (CLIPTextModel, ("sd", "text_encoder"), "model.safetensors"),
}


def _set(**changes):
    return lambda cfg: {**cfg, **changes}


def _drop(key):
    return lambda cfg: {k: v for k, v in cfg.items() if k != key}


# Every model: raw config.json text (or a change to the config dict) -> (error class, words in the message)
COMMON_CONFIGS = {
    "invalid_json": ("{not json", BadFile, ("not valid JSON",)),
    "a_json_list": ("[1, 2]", BadFile, ("JSON list", "object")),
    "a_json_string": ('"config"', BadFile, ("JSON str", "object")),
    "not_utf8": (b"\xff\xfe{}", BadFile, ("UTF-8",)),
    "nested_100000_deep": ("[" * 100000 + "]" * 100000, BadFile, ("nested too deeply",)),
    "empty_object": (lambda cfg: {}, BadFile, ()),     # every field at its default: not these weights
}
PER_MODEL_CONFIGS = {
    "unet": {
        "block_out_channels_a_string": (_set(block_out_channels="abc"), BadFile, ("block_out_channels", "'abc'")),
        "layers_per_block_a_word": (_set(layers_per_block="two"), BadFile, ("layers_per_block", "'two'")),
        "missing_block_out_channels": (_drop("block_out_channels"), BadFile, ("block_out_channels",)),
        "unknown_down_block": (_set(down_block_types=["FancyDownBlock2D", "CrossAttnDownBlock2D"]), Unsupported,
                               ("FancyDownBlock2D",)),
        "unknown_mid_block": (_set(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), Unsupported,
                              ("UNetMidBlock2DSimpleCrossAttn",)),
        "block_types_a_string": (_set(down_block_types="CrossAttnDownBlock2D"), BadFile, ("down_block_types",)),
        "zero_channels": (_set(block_out_channels=[0, 32]), BadFile, ("block_out_channels", "positive")),
        "norm_num_groups_0": (_set(norm_num_groups=0), BadFile, ("norm_num_groups",)),
        "norm_num_groups_not_dividing": (_set(norm_num_groups=7), BadFile, ("norm_num_groups=7",)),
        "layers_per_block_-1": (_set(layers_per_block=-1), BadFile, ("layers_per_block", "-1")),
        "attention_head_dim_0": (_set(attention_head_dim=0), BadFile, ("attention_head_dim",)),
        "more_heads_than_channels": (_set(attention_head_dim=1000), BadFile, ("1000 attention heads",)),
        "cross_attention_dim_null": (_set(cross_attention_dim=None), BadFile, ("cross_attention_dim",)),
        "bool_as_string": (_set(use_linear_projection="false"), BadFile, ("use_linear_projection",)),
        "negative_eps": (_set(norm_eps=-1), BadFile, ("norm_eps",)),
        "fractional_channels": (_set(in_channels=2.5), BadFile, ("in_channels",)),
        "lengths_differ": (_set(block_out_channels=[32]), BadFile, ("block_out_channels",)),
        "unknown_activation": (_set(act_fn="sigmoidish"), Unsupported, ("act_fn", "sigmoidish")),
        "unknown_time_shift": (_set(resnet_time_scale_shift="ada_norm"), Unsupported, ("resnet_time_scale_shift",)),
        "unsupported_option": (_set(class_embed_type="timestep"), Unsupported, ("class_embed_type",)),
    },
    "vae": {
        "block_out_channels_a_string": (_set(block_out_channels="abc"), BadFile, ("block_out_channels", "'abc'")),
        "layers_per_block_a_word": (_set(layers_per_block="two"), BadFile, ("layers_per_block", "'two'")),
        "missing_block_out_channels": (_drop("block_out_channels"), BadFile, ("block_out_channels",)),
        "unknown_up_block": (_set(up_block_types=["UpDecoderBlock2D", "FancyUpBlock"]), Unsupported,
                             ("FancyUpBlock",)),
        "zero_channels": (_set(block_out_channels=[0, 32]), BadFile, ("block_out_channels",)),
        "norm_num_groups_0": (_set(norm_num_groups=0), BadFile, ("norm_num_groups",)),
        "norm_num_groups_not_dividing": (_set(norm_num_groups=5), BadFile, ("norm_num_groups=5",)),
        "layers_per_block_-1": (_set(layers_per_block=-1), BadFile, ("layers_per_block",)),
        "latent_channels_0": (_set(latent_channels=0), BadFile, ("latent_channels",)),
        "scaling_factor_a_string": (_set(scaling_factor="x"), BadFile, ("scaling_factor",)),
        "up_blocks_fewer": (_set(up_block_types=["UpDecoderBlock2D"]), BadFile, ("up_block_types",)),
        "unknown_activation": (_set(act_fn="sigmoidish"), Unsupported, ("act_fn",)),
    },
    "clip_vision": {
        "hidden_size_a_string": (_set(hidden_size="abc"), BadFile, ("hidden_size", "'abc'")),
        "num_hidden_layers_a_word": (_set(num_hidden_layers="two"), BadFile, ("num_hidden_layers",)),
        "missing_hidden_size": (_drop("hidden_size"), BadFile, ()),
        "hidden_size_0": (_set(hidden_size=0), BadFile, ("hidden_size",)),
        "num_attention_heads_0": (_set(num_attention_heads=0), BadFile, ("num_attention_heads",)),
        "num_hidden_layers_-1": (_set(num_hidden_layers=-1), BadFile, ("num_hidden_layers",)),
        "patch_size_0": (_set(patch_size=0), BadFile, ("patch_size",)),
        "patch_larger_than_image": (_set(patch_size=1000), BadFile, ("patch_size 1000",)),
        "heads_not_dividing": (_set(num_attention_heads=7), BadFile, ("num_attention_heads",)),
        "unknown_activation": (_set(hidden_act="bogus"), Unsupported, ("hidden_act", "bogus")),
        "another_model_type": (_set(model_type="bert"), BadFile, ("bert",)),
        "image_size_a_list": (_set(image_size=[224, 224]), BadFile, ("image_size",)),
        "eps_a_string": (_set(layer_norm_eps="small"), BadFile, ("layer_norm_eps",)),
    },
    "clip_text": {
        "vocab_size_0": (_set(vocab_size=0), BadFile, ("vocab_size",)),
        "max_positions_a_string": (_set(max_position_embeddings="77"), BadFile, ("max_position_embeddings",)),
        "hidden_size_negative": (_set(hidden_size=-8), BadFile, ("hidden_size",)),
        "intermediate_size_a_float": (_set(intermediate_size=96.5), BadFile, ("intermediate_size",)),
    },
}
CONFIGS = [(model, name) for model in MODEL_FOLDERS for name in [*COMMON_CONFIGS, *PER_MODEL_CONFIGS[model]]]


@pytest.mark.parametrize("model,case", CONFIGS, ids=[f"{m}-{c}" for m, c in CONFIGS])
def test_bad_config(model, case, models, tmp_path):
    cls, where, weights = MODEL_FOLDERS[model]
    source = models[where[0]].joinpath(*where[1:])
    change, kind, mentions = {**COMMON_CONFIGS, **PER_MODEL_CONFIGS[model]}[case]
    folder = tmp_path / model
    folder.mkdir()
    (folder / weights).symlink_to(source / weights)
    if isinstance(change, (str, bytes)):
        (folder / "config.json").write_bytes(change.encode() if isinstance(change, str) else change)
    else:
        (folder / "config.json").write_text(json.dumps(change(json.loads((source / "config.json").read_text()))))
    message = refused(kind, lambda: cls.from_pretrained(folder), *mentions)
    # The file is named: config.json, or (a config of other sizes) the weights it does not fit.
    assert str(folder / "config.json") in message or weights in message, message


# --------------------------------------------------------------------------- images

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def gif_declaring(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b","
            + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;")


MAX_PIXELS = Image.MAX_IMAGE_PIXELS
BAD_IMAGES = {   # name -> (file name, writer(path, models), error class, words in the message)
    "zero_bytes": ("x.png", lambda p, m: p.write_bytes(b""), BadFile, ()),
    "text_named_png": ("x.png", lambda p, m: p.write_text("not an image\n"), BadFile, ()),
    "random_bytes_named_jpg": ("x.jpg", lambda p, m: p.write_bytes(np.random.default_rng(2).bytes(300)), BadFile,
                               ()),
    "truncated_png": ("x.png", lambda p, m: p.write_bytes(m["image"].read_bytes()[:200]), BadFile, ("truncated",)),
    # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS (then decodes): refused all the same.
    "bomb_warning_level_png": ("x.png", lambda p, m: p.write_bytes(png_declaring(10000, MAX_PIXELS // 10000 + 100)),
                               BadFile, ("MAX_IMAGE_PIXELS", str(MAX_PIXELS))),
    "bomb_error_level_png": ("x.png", lambda p, m: p.write_bytes(png_declaring(60000, 60000)), BadFile,
                             ("MAX_IMAGE_PIXELS", str(MAX_PIXELS))),
    "bomb_gif": ("x.gif", lambda p, m: p.write_bytes(gif_declaring(65535, 65535)), BadFile, ("MAX_IMAGE_PIXELS",)),
    "nan_float_tiff": ("x.tif", lambda p, m: Image.fromarray(np.full((4, 4), np.nan, np.float32), "F").save(p),
                       BadFile, ("NaN",)),
    "a_folder": ("x.png", lambda p, m: p.mkdir(), BadFile, ("folder",)),
    "missing": ("x.png", lambda p, m: None, MissingFile, ()),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_file(case, models, tmp_path):
    name, write, kind, mentions = BAD_IMAGES[case]
    path = tmp_path / name
    write(path, models)
    refused(kind, lambda: preprocess([path]), path.name, *mentions)


BAD_ARRAYS = {
    "zero_size": np.zeros((0, 5, 3), np.uint8),
    "float": np.zeros((4, 4, 3), np.float32),
    "two_dims": np.zeros((4, 4), np.uint8),
    "five_channels": np.zeros((4, 4, 5), np.uint8),
}


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_bad_array_image(case):
    array = BAD_ARRAYS[case]
    refused(BadArgument, lambda: preprocess([array]), "uint8 [H, W, 3 or 4]", str(array.shape))
    refused(BadArgument, lambda: load_rgb(array), str(array.shape))


def test_one_pixel_image_works(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
    pixels = preprocess([path])
    assert pixels.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(pixels[0, 100, 100], (np.array([10, 200, 30]) / 255 - images_lib.CLIP_MEAN)
                               / images_lib.CLIP_STD, atol=1e-5)
    assert preprocess([path], 64, 64).shape == (1, 64, 64, 3)


def test_cmyk_jpeg_is_converted(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(path)    # full cyan
    assert Image.open(path).mode == "CMYK"
    rgb = np.asarray(load_rgb(path)).astype(int)
    assert np.abs(rgb[16, 16] - [0, 255, 255]).max() <= 8
    assert preprocess([path]).shape == (1, 224, 224, 3)


def test_16_bit_png_is_scaled(tmp_path):
    path = tmp_path / "deep.png"
    values = np.zeros((8, 8), np.uint16)
    values[:4] = 65535
    values[4:, :4] = 32896    # 128.5 * 256: rounds to 128
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(path))
    assert (rgb[:4] == 255).all() and (rgb[4:, :4] == 128).all() and (rgb[4:, 4:] == 0).all()
    assert preprocess([path]).shape == (1, 224, 224, 3)


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 4, 8))
    image.save(path, transparency=0)
    rgb = np.asarray(load_rgb(path))
    assert (rgb[:, :4] == 255).all(), "transparent pixels are white"
    assert (rgb[:, 4:] == [255, 0, 0]).all()


def test_animated_gif_uses_the_first_frame_and_says_so(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(UserWarning, match="only its first frame is used") as record:
        rgb = np.asarray(load_rgb(path))
    assert "anim.gif" in str(record[0].message)
    assert (rgb == [255, 0, 0]).all()


def test_extreme_aspect_ratio_is_cropped_without_a_huge_resize(tmp_path, monkeypatch):
    """A 1 x 20000 strip would be resized to 224 x 4.5M (3 GB) before the crop: only
    the crop is computed, with the pixels of the full resize up to rounding."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 20000), (10, 20, 30)).save(strip)
    pixels = preprocess([strip])
    assert pixels.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(pixels[0, 0, 0], (np.array([10, 20, 30]) / 255 - images_lib.CLIP_MEAN)
                               / images_lib.CLIP_STD, atol=1e-5)
    rng = np.random.default_rng(0)
    for (h, w) in [(300, 7), (17, 4000)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        new_w, new_h = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
        left, top = (new_w - 224) // 2, (new_h - 224) // 2
        box = (left, top, left + 224, top + 224)
        full = np.asarray(image.resize((new_w, new_h), Image.BICUBIC).crop(box)).astype(int)
        monkeypatch.setattr(images_lib, "MAX_RESIZE_PIXELS", 1000)
        cropped = np.asarray(images_lib.resize_crop(image, (new_w, new_h), box, Image.BICUBIC)).astype(int)
        monkeypatch.undo()
        assert np.abs(cropped - full).max() <= 2 and (cropped != full).mean() < 0.01


# --------------------------------------------------------------------------- embeddings

def _npy_header_only(path: Path, shape) -> None:
    from numpy.lib import format as npy

    with open(path, "wb") as f:
        npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(b"\0" * 64)


EMBEDS = {   # name -> (file name, writer, error class, words in the message)
    "random_bytes": ("e.npy", lambda p: p.write_bytes(np.random.default_rng(3).bytes(200)), BadFile, (".npy",)),
    "object_array": ("e.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), BadFile,
                     ()),
    "header_claims_256_GiB": ("e.npy", lambda p: _npy_header_only(p, (2 ** 36,)), BadFile, ()),
    "strings": ("e.npy", lambda p: np.save(p, np.array(["a", "b"])), BadFile, ("<U1",)),
    "empty_file": ("e.npy", lambda p: p.write_bytes(b""), BadFile, ()),
    "nan_values": ("e.npy", lambda p: np.save(p, np.array([1.0, np.nan], np.float32)), BadArgument, ("NaN",)),
    "nan_safetensors": ("e.safetensors", lambda p: save_file({"e": np.array([np.inf], np.float32)}, p),
                        BadArgument, ("e.safetensors:e",)),
    "a_folder": ("e.npy", lambda p: p.mkdir(), BadFile, ("folder",)),
    "missing": ("e.npy", lambda p: None, MissingFile, ()),
}


@pytest.mark.parametrize("case", EMBEDS)
def test_bad_embeddings_file(case, tmp_path):
    name, write, kind, mentions = EMBEDS[case]
    path = tmp_path / name
    write(path)
    refused(kind, lambda: load_embeds(path), path.name, *mentions)


# --------------------------------------------------------------------------- training data

def _records(*records) -> str:
    return json.dumps(list(records))


JSON_DATA = {   # name -> (data.json text, error class, words in the message)
    "not_a_list": ('{"image_file": "a.png", "text": "x"}', BadFile, ("non-empty list", "JSON dict")),
    "empty_list": ("[]", BadFile, ("non-empty list", "empty list")),
    "invalid_json": ("[{", BadFile, ("not valid JSON",)),
    "record_without_image_file": (_records({"text": "x"}), BadFile, ("record 0", "image_file")),
    "record_without_text": (_records({"image_file": "a.png"}, ), BadFile, ("record 0", "text")),
    "record_a_string": (_records({"image_file": "a.png", "text": "x"}, "b.png"), BadFile, ("record 1",)),
    "image_file_a_number": (_records({"image_file": 5, "text": "x"}), BadFile, ("record 0", "image_file")),
    "text_null": (_records({"image_file": "a.png", "text": None}), BadFile, ("record 0", "text")),
}


@pytest.mark.parametrize("case", JSON_DATA)
def test_bad_training_json(case, tmp_path):
    text, kind, mentions = JSON_DATA[case]
    (tmp_path / "data.json").write_text(text)
    refused(kind, lambda: JsonImageTextSource(tmp_path / "data.json", tmp_path, None, 16), "data.json", *mentions)


def test_training_json_or_image_root_missing(tmp_path):
    (tmp_path / "data.json").write_text(_records({"image_file": "a.png", "text": "x"}))
    refused(MissingFile, lambda: JsonImageTextSource(tmp_path / "nope.json", tmp_path, None, 16), "nope.json")
    refused(MissingFile, lambda: JsonImageTextSource(tmp_path / "data.json", tmp_path / "imgs", None, 16), "imgs")


@pytest.mark.parametrize("n", [3, 40])
def test_entirely_unreadable_dataset_is_an_error_not_a_loop(n, tmp_path):
    """Unreadable images are skipped by design; a dataset with none readable (smaller
    or larger than max_retries) ends in a clear error, also through the loader."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0.png").write_text("not an image")    # one unreadable, the rest missing
    (tmp_path / "data.json").write_text(_records(*({"image_file": f"{i}.png", "text": "x"} for i in range(n))))
    source = JsonImageTextSource(tmp_path / "data.json", tmp_path / "imgs", None, 16)
    mention = f"none of its {n} records" if n < source.max_retries else f"{source.max_retries} records in a row"
    refused(BadFile, lambda: source[0], "data.json", mention, "image root")
    loader = make_loader(source, batch_size=2, seed=0)
    refused(BadFile, lambda: next(iter(loader)), mention)


@pytest.mark.parametrize("batch_size", [4, 0, -1])
def test_batch_size_the_dataset_cannot_fill(batch_size, tmp_path):
    (tmp_path / "data.json").write_text(_records(*({"image_file": f"{i}.png", "text": "x"} for i in range(3))))
    source = JsonImageTextSource(tmp_path / "data.json", tmp_path, None, 16)
    refused(BadArgument, lambda: make_loader(source, batch_size=batch_size, seed=0), "batch", str(batch_size))


def test_tfds_name_that_does_not_exist(tmp_path):
    refused(BadArgument, lambda: TFDSImageTextSource("no_such_dataset_xyz", tmp_path, None, 16),
            "'no_such_dataset_xyz'")
    refused(BadArgument, lambda: TFDSImageTextSource("mnistt", tmp_path, None, 16), "'mnistt'", "mnist")


def test_tfds_dataset_not_prepared_or_no_folder(tmp_path):
    refused(MissingFile, lambda: TFDSImageTextSource("mnist", tmp_path, None, 16), "'mnist'", "not prepared")
    refused(MissingFile, lambda: TFDSImageTextSource("mnist", tmp_path / "nope", None, 16), "nope")


def _cache(folder: Path, **arrays) -> Path:
    folder.mkdir()
    for name, value in arrays.items():
        if isinstance(value, bytes):
            (folder / f"{name}.npy").write_bytes(value)
        else:
            np.save(folder / f"{name}.npy", value)
    return folder


def test_bad_feature_caches(tmp_path):
    ones = np.ones((2, 3), np.float32)
    refused(MissingFile, lambda: CachedSource(tmp_path / "nope"), "nope")
    lacking = _cache(tmp_path / "lacking", latents=ones, text_embeds=ones)
    refused(BadFile, lambda: CachedSource(lacking), "image_embeds")
    corrupt = _cache(tmp_path / "corrupt", latents=ones, text_embeds=ones, image_embeds=b"garbage")
    refused(BadFile, lambda: CachedSource(corrupt), "image_embeds.npy")
    uneven = _cache(tmp_path / "uneven", latents=ones, text_embeds=ones, image_embeds=np.ones((3, 3), np.float32))
    refused(BadFile, lambda: CachedSource(uneven), "lengths")


# --------------------------------------------------------------------------- eval cases

EVAL_CASES = {   # name -> (cases.json text, error class, words in the message)
    "a_dict": ('{"image": "a.png", "caption": "x"}', BadFile, ("non-empty list",)),
    "empty_list": ("[]", BadFile, ("non-empty list",)),
    "invalid_json": ("[{", BadFile, ("not valid JSON",)),
    "record_without_caption": ('[{"image": "a.png"}]', BadFile, ("record 0", "caption")),
    "record_a_string": ('["a.png"]', BadFile, ("record 0",)),
    "image_a_number": ('[{"image": 5, "caption": "x"}]', BadFile, ("record 0", "image")),
    "caption_a_list": ('[{"image": "a.png", "caption": ["x"]}]', BadFile, ("record 0", "caption")),
    "image_missing": ('[{"image": "gone.png", "caption": "x"}]', MissingFile, ("gone.png",)),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_bad_eval_cases(case, models, tmp_path):
    text, kind, mentions = EVAL_CASES[case]
    shutil.copy(models["image"], tmp_path / "a.png")
    (tmp_path / "cases.json").write_text(text)
    refused(kind, lambda: load_cases(tmp_path / "cases.json"), "cases.json", *mentions)


def test_eval_cases_file_missing_or_a_folder(tmp_path):
    refused(MissingFile, lambda: load_cases(tmp_path / "nope.json"), "nope.json")
    refused(BadFile, lambda: load_cases(tmp_path), str(tmp_path))


# --------------------------------------------------------------------------- command lines

def run_cli(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("IPADAPTER_JAX_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, prog: str, *mentions) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error:"), result.stderr[-2000:]
    for mention in mentions:
        assert str(mention) in last, (mention, last)
    return last


def model_args(models) -> list[str]:
    return ["--model", str(models["sd"]), "--image-encoder", str(models["image_encoder"]), "--height", "16",
            "--width", "16", "--steps", "2", "--no-progress", "--cache-dir", ""]


def _sdxl_folder(models, tmp: Path) -> Path:
    folder = tmp / "sdxl"
    folder.mkdir()
    for sub in models["sd"].iterdir():
        if sub.is_dir():
            (folder / sub.name).symlink_to(sub)
    index = json.loads((models["sd"] / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    return folder


def _broken_unet_folder(models, tmp: Path) -> Path:
    folder = tmp / "broken"
    folder.mkdir()
    for sub in models["sd"].iterdir():
        if sub.name != "unet":
            (folder / sub.name).symlink_to(sub)
    (folder / "unet").mkdir()
    weights = "diffusion_pytorch_model.safetensors"
    (folder / "unet" / weights).symlink_to(models["sd"] / "unet" / weights)
    config = json.loads((models["sd"] / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "norm_num_groups": 0}))
    return folder


def _file(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


# name -> (args(models, tmp), words the error line must hold)
SAMPLE_PY = {
    "scale_nan": (lambda m, t: ["--scale", "nan"], ("--scale", "nan")),
    "guidance_inf": (lambda m, t: ["--guidance", "inf"], ("--guidance", "inf")),
    "strength_nan": (lambda m, t: ["--strength", "nan"], ("--strength", "nan")),
    "steps_0": (lambda m, t: ["--steps", "0"], ("--steps",)),
    "model_nonexistent": (lambda m, t: ["--model", "/nonexistent", "--cache-dir", ""], ("/nonexistent",)),
    "sdxl_model_folder": (lambda m, t: [*model_args(m), "--model", str(_sdxl_folder(m, t))],
                          ("StableDiffusionXLPipeline",)),
    "unet_config_norm_groups_0": (lambda m, t: [*model_args(m), "--model", str(_broken_unet_folder(m, t))],
                                  ("config.json", "norm_num_groups")),
    "ip_adapter_random_bytes": (lambda m, t: [*model_args(m), "--image", str(m["image"]), "--ip-adapter",
                                              str(_file(t, "rand.safetensors", np.random.default_rng(4).bytes(999)))],
                                ("rand.safetensors",)),
    "image_a_text_file": (lambda m, t: [*model_args(m), "--ip-adapter", str(m["adapter"]), "--image",
                                        str(_file(t, "words.png", b"hello\n"))], ("words.png",)),
    "init_latents_not_npy": (lambda m, t: [*model_args(m), "--init-latents", str(_file(t, "l.npy", b"hello\n"))],
                             ("--init-latents", "l.npy")),
}


@pytest.mark.parametrize("case", SAMPLE_PY)
def test_sample_py_bad_input(case, models, tmp_path):
    args, mentions = SAMPLE_PY[case]
    out = tmp_path / "out" / "x.png"
    result = run_cli(["sample.py", *args(models, tmp_path), "--out", str(out)])
    assert_one_line_error(result, "sample.py", *mentions)
    assert not out.exists()


def test_sample_py_debug_shows_the_traceback():
    result = run_cli(["sample.py", "--model", "/nonexistent", "--cache-dir", "", "--debug"])
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "MissingFile" in result.stderr, result.stderr[-2000:]


def test_sample_py_refuses_a_nan_result_unless_allowed(models, tmp_path):
    """An adapter with a NaN weight: the result is NaN; an error naming NaN and no image,
    unless --allow-nonfinite (then the image is written)."""
    state = load_file(models["adapter"])
    key = next(k for k in sorted(state) if k.endswith("to_k_ip.weight"))
    state[key] = state[key].copy()
    state[key][0, 0] = np.nan
    adapter = tmp_path / "nan-adapter.safetensors"
    save_file(state, adapter)
    args = ["sample.py", *model_args(models), "--ip-adapter", str(adapter), "--image", str(models["image"]),
            "--seed", "1"]
    out = tmp_path / "nan.png"
    assert_one_line_error(run_cli([*args, "--out", str(out)], timeout=300), "sample.py", "NaN")
    assert not out.exists() and not list(tmp_path.glob("*.png"))
    allowed = run_cli([*args, "--out", str(out), "--allow-nonfinite"], timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert out.is_file()


EVAL_CLI = {   # name -> (cases file content or None for a missing file, words the error line must hold)
    "cases_missing": (None, ("cases.json", "not found")),
    "cases_invalid_json": ("[{", ("cases.json", "not valid JSON")),
    "cases_a_dict": ('{"image": "a.png"}', ("cases.json", "non-empty list")),
}


def test_eval_cli_modes_are_the_libraries():
    """ipadapter_jax.cli.eval keeps its own copy of the modes (its parser loads no JAX)."""
    from ipadapter_jax.cli.eval import MODES as CLI_MODES
    from ipadapter_jax.eval import MODES

    assert CLI_MODES == MODES


@pytest.mark.parametrize("case", EVAL_CLI)
def test_eval_cli_bad_cases(case, tmp_path):
    content, mentions = EVAL_CLI[case]
    cases = tmp_path / "cases.json"
    if content is not None:
        cases.write_text(content)
    unused = str(tmp_path / "unused")     # the cases are read before any model
    result = run_cli(["-m", "ipadapter_jax.eval", "--model", unused, "--image-encoder", unused, "--ip-adapter",
                      unused, "--clip", unused, "--cases", str(cases), "--out", str(tmp_path / "eval.json")])
    last = assert_one_line_error(result, "python -m ipadapter_jax.eval", *mentions)
    assert sum("error:" in line for line in result.stderr.splitlines()) == 1, result.stderr[-2000:]
    assert last


# --------------------------------------------------------------------------- the command line a newcomer meets
# Each bad input: exit 2, at most two lines on stderr (the error, and at most one warning before it), the
# culprit named, nothing written, and nothing of JAX loaded: a `jax` package that refuses to import is put
# first on the path, so a command that reached for JAX before its checks would fail differently.

def run_without_jax(args: list[str], tmp: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    fake = tmp / "no_jax" / "jax"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('JAX was imported before the argument checks')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    env.pop("IPADAPTER_JAX_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=timeout)


SAMPLE = str(ROOT / "sample.py")
# name -> (argv after the script (tmp: the test's folder), words the error line must hold)
NEWCOMER = {
    "height_0": ([SAMPLE, "--height", "0"], ("--height", "0")),
    "height_negative": ([SAMPLE, "--height", "-8"], ("--height", "-8")),
    "width_huge": ([SAMPLE, "--width", "100000"], ("--width", "100000", "8192")),
    "seed_huge": ([SAMPLE, "--seed", "1180591620717411303424"], ("--seed", "1180591620717411303424")),
    "seed_minus_1": ([SAMPLE, "--seed", "-1"], ("--seed", "-1", "random")),
    "steps_fraction": ([SAMPLE, "--steps", "2.5"], ("--steps", "2.5")),
    "scale_inf": ([SAMPLE, "--scale", "inf"], ("--scale", "inf")),
    "unknown_scheduler": ([SAMPLE, "--scheduler", "ddpm"], ("ddpm", "ddim")),
    "lora_bad_scale": ([SAMPLE, "--lora", "x.safetensors:abc"], ("--lora", "abc")),
    "control_start_after_end": ([SAMPLE, "--controlnet", "{tmp}", "--control-image", "{tmp}/c.png",
                                 "--control-start", "0.9", "--control-end", "0.1"], ("--control-start", "0.9")),
    "strength_without_init_image": ([SAMPLE, "--strength", "0.5"], ("--strength", "--init-image")),
    "out_unwritable": ([SAMPLE, "--out", "/proc/x.png"], ("--out", "/proc")),
    "save_latents_unwritable": ([SAMPLE, "--save-latents", "/proc/l.npy"], ("--save-latents", "/proc")),
    "image_missing": ([SAMPLE, "--image", "{tmp}/nope.png"], ("nope.png", "not found")),
    "model_hub_id_not_cached": ([SAMPLE, "--model", "org/not-cached"], ("--model", "org/not-cached")),
    "convert_unwritable": (["-m", "ipadapter_jax.convert", "to-single-file", str(ROOT / "ipadapter_jax/demo/model/sd"),
                            "/proc/x.safetensors"], ("/proc",)),
    "eval_num_cases_0": (["-m", "ipadapter_jax.cli.eval", "--num-cases", "0"], ("--num-cases", "0")),
    "eval_scales_nan": (["-m", "ipadapter_jax.cli.eval", "--scales", "nan"], ("--scales", "nan")),
    "parity_unknown_component": (["-m", "ipadapter_jax.parity", "--demo", "--components", "unet,vea"],
                                 ("--components", "vea")),
    "parity_bound_negative": (["-m", "ipadapter_jax.parity", "--demo", "--bound", "-1"], ("--bound", "-1")),
    "parity_json_unwritable": (["-m", "ipadapter_jax.parity", "--demo", "--json", "/proc/p.json"], ("--json", "/proc")),
}


@pytest.mark.parametrize("case", NEWCOMER)
def test_bad_input_is_one_line_before_jax(case, tmp_path):
    argv, mentions = NEWCOMER[case]
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    result = run_without_jax([a.replace("{tmp}", str(tmp_path)) for a in argv], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and 1 <= len(lines) <= 2, (result.returncode, result.stderr[-2000:])
    assert ": error: " in lines[-1] and "JAX was imported" not in result.stderr, result.stderr[-2000:]
    for mention in mentions:
        assert mention in lines[-1], (mention, lines[-1])
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob("*.png"))[1:], list(tmp_path.iterdir())


def test_unusual_values_are_a_warning(tmp_path):
    """A negative guidance or a huge scale works but nobody means it: one warning line each, then the run
    goes on (here to the next check, a missing model)."""
    result = run_without_jax([SAMPLE, "--scale", "1e30", "--guidance", "-5", "--model", "/nonexistent"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 3, result.stderr
    assert lines[0].startswith("sample.py: warning: --scale 1e+30") and "--guidance -5" in lines[1]


def test_concurrent_runs_of_one_output_are_refused(tmp_path):
    """While one run holds --out, a second is refused by name; once it ends the output is free."""
    from ipadapter_jax.cli.checks import claim_output, release_outputs

    out = tmp_path / "x.png"
    claim_output("--out", out)
    try:
        result = run_without_jax([SAMPLE, "--out", str(out)], tmp_path)
        assert result.returncode == 2 and "another run" in result.stderr and str(out) in result.stderr, \
            result.stderr
    finally:
        release_outputs()
    assert not (tmp_path / ".x.png.lock").exists()


@pytest.mark.parametrize("delay", [5.0, "sampling"])   # 5 s: loading or compiling, before the first step
def test_ctrl_c_exits_130_with_one_line_and_no_partial_file(delay, tmp_path):
    """SIGINT while the demo run loads or compiles, and while it samples: exit 130, one line
    ('interrupted'), no image and no temporary or lock file left."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, SAMPLE, "--cache-dir", "", "--steps", "400", "--out",
                             str(tmp_path / "x.png")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if delay == "sampling":    # the progress bar's first update: the loop is running
        seen = ""
        while "denoising:" not in seen or "1/400" not in seen:
            chunk = proc.stderr.read(64)
            assert chunk, "the run ended before sampling"
            seen = seen[-4000:] + chunk
    else:
        time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "sample.py: interrupted" and "Traceback" not in err, err[-2000:]
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_every_thread_leaves_the_signals_to_the_waiter():
    """Once a command installs its handling, every thread (numpy's and JAX's, started later) blocks SIGINT
    and SIGTERM, so the kernel hands them to the waiting thread even during a compilation. Importing the
    command lines starts no thread before that: a thread started earlier would keep the signals."""
    code = (
        "import os, sys, threading\n"
        "import ipadapter_jax.cli.sample, ipadapter_jax.cli.convert, ipadapter_jax.cli.eval, ipadapter_jax.cli.parity\n"
        "assert threading.active_count() == 1 and len(os.listdir('/proc/self/task')) == 1, 'a thread started early'\n"
        "from ipadapter_jax.cli import interrupts\n"
        "interrupts.exit_on_signals('x')\n"
        "import numpy, jax, jax.numpy as jnp\n"
        "jax.jit(lambda a: a @ a)(jnp.ones((64, 64))).block_until_ready()\n"
        "masks = {int(t): int(open(f'/proc/self/task/{t}/status').read().split('SigBlk:')[1].split()[0], 16)\n"
        "         for t in os.listdir('/proc/self/task')}\n"
        "bits = (1 << 1) | (1 << 14)   # SIGINT 2, SIGTERM 15\n"
        "waiter = interrupts._waiter.native_id   # in sigwait: the signals it waits for show as unblocked\n"
        "print(len(masks), all(m & bits == bits for t, m in masks.items() if t != waiter))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    threads, blocked = result.stdout.split()
    assert int(threads) > 2 and blocked == "True", result.stdout
