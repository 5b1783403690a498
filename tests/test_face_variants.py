"""The face variants' recipes (issue: research at scale, item 2), on a small random SD 1.5 folder:
``data.condition="face"`` conditions on each record's face crop (json ``face_image_file``,
webdataset ``KEY.face.jpg``) while the whole image is the target; the Plus-face and full-face
configs train a few steps and export the official layout, which diffusers' ``load_ip_adapter``
loads as that variant. (The SDXL Plus-face config: tests/test_train_step_sdxl.py.)"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import sd_fixtures

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def image(rng, h, w) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The model, 4 images with face crops as a json dataset and as one webdataset shard."""
    from PIL import Image

    from ipadapter_jax.training.shards import write_shard

    root = tmp_path_factory.mktemp("faces")
    paths = sd_fixtures.build_pipeline_folder(root)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records, shard = [], []
    for i in range(4):
        full, face = image(rng, 20 + 2 * i, 24), image(rng, 10, 8 + i)
        Image.fromarray(full).save(images / f"{i}.png")
        Image.fromarray(face).save(images / f"{i}_face.png")
        records.append({"image_file": f"{i}.png", "face_image_file": f"{i}_face.png", "text": f"a face {i}"})
        shard.append((f"{i:06d}", {"png": (images / f"{i}.png").read_bytes(), "txt": f"a face {i}".encode(),
                                   "face.png": (images / f"{i}_face.png").read_bytes()}))
    (root / "faces.json").write_text(json.dumps(records))
    write_shard(root / "00000.tar", shard)
    return {**paths, "json": root / "faces.json", "images": images, "shards": str(root / "00000.tar"),
            "root": root}


def test_face_crop_is_the_condition(data, tmp_path):
    from transformers import CLIPTokenizer

    from ipadapter_jax.io.errors import BadFile
    from ipadapter_jax.io.images import preprocess
    from ipadapter_jax.training.data import JsonImageTextSource, train_pixels
    from ipadapter_jax.training.webdataset import WebDatasetSource

    tok = CLIPTokenizer.from_pretrained(data["sd"] / "tokenizer")
    sources = [JsonImageTextSource(data["json"], data["images"], tok, 16, condition="face"),
               WebDatasetSource(data["shards"], tok, 16, condition="face", process_index=0, process_count=1)]
    for source in sources:
        record = source[1]
        np.testing.assert_array_equal(record["clip_pixels"], preprocess([data["images"] / "1_face.png"])[0])
        np.testing.assert_array_equal(record["pixels"], train_pixels(data["images"] / "1.png", 16))
    plain = JsonImageTextSource(data["json"], data["images"], tok, 16)[1]
    np.testing.assert_array_equal(plain["clip_pixels"], preprocess([data["images"] / "1.png"])[0])
    records = json.loads(data["json"].read_text())
    del records[2]["face_image_file"]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(BadFile, match=r"bad.json: record 2 has no 'face_image_file'"):
        JsonImageTextSource(tmp_path / "bad.json", data["images"], tok, 16, condition="face")


@pytest.mark.parametrize("config, kind", [("sd15_ip_adapter_plus_face", "json"),
                                          ("sd15_ip_adapter_full_face", "webdataset")])
def test_face_configs_train_and_export(data, tmp_path, config, kind):
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.loaders.ip_adapter import IPAdapterMixin
    from diffusers.models.embeddings import IPAdapterFullImageProjection, IPAdapterPlusImageProjection

    from ipadapter_jax.ip_adapter.official import read_ip_adapter
    from ipadapter_jax.training import ip_adapter_task as loop

    cfg = importlib.import_module(f"configs.{config}").get_config()
    assert cfg.data.condition == "face"
    cfg.model.pretrained, cfg.model.image_encoder = str(data["sd"]), str(data["image_encoder"])
    cfg.data.kind = kind
    cfg.data.json_file, cfg.data.image_root, cfg.data.shards = str(data["json"]), str(data["images"]), data["shards"]
    cfg.data.resolution, cfg.data.batch_size, cfg.data.workers = 16, 2, 0
    cfg.workdir = str(tmp_path / "run")
    cfg.train.steps, cfg.train.log_every, cfg.train.save_every = 2, 1, 100
    summary = loop.train(cfg)
    assert np.isfinite(summary["final_loss"])
    state = read_ip_adapter(summary["export"])
    if config.endswith("full_face"):
        assert state["image_proj.proj.3.weight"].shape == (sd_fixtures.fx.UNET["cross_attention_dim"],)
    else:
        assert state["image_proj.latents"].shape[1] == 16

    class Holder(IPAdapterMixin):
        def __init__(self, unet):
            self.unet = unet

    unet = TorchUNet.from_pretrained(data["sd"] / "unet")
    export = Path(summary["export"])
    Holder(unet).load_ip_adapter(str(export.parent), subfolder="", weight_name=export.name,
                                 image_encoder_folder=None)
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(proj, IPAdapterFullImageProjection if config.endswith("full_face")
                      else IPAdapterPlusImageProjection)
    if config.endswith("full_face"):    # the exported weights are what diffusers runs
        np.testing.assert_array_equal(proj.ff.net[0].proj.weight.detach().numpy(), state["image_proj.proj.0.weight"])
