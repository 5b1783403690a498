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


# --------------------------------------------------------------------------- FaceID

def lora_hooks(tu, ip) -> dict:
    """The FaceID LoRA on the reference UNet as the official ``LoRAAttnProcessor`` adds it
    (``to_q(x) + up(down(x))``, likewise k / v on the text context and the output
    projection), trainable: official key -> torch Parameter."""
    import torch

    params = {}
    for p, (name, _) in enumerate(tu.attn_processors.items()):
        attn = tu.get_submodule(name.rsplit(".processor", 1)[0])
        for proj, module in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v),
                             ("to_out", attn.to_out[0])):
            down, up = (torch.nn.Parameter(torch.from_numpy(ip[f"{p}.{proj}_lora.{w}.weight"]).clone())
                        for w in ("down", "up"))
            params[f"ip_adapter.{p}.{proj}_lora.down.weight"] = down
            params[f"ip_adapter.{p}.{proj}_lora.up.weight"] = up
            module.register_forward_hook(lambda m, inputs, out, d=down, u=up: out + (inputs[0] @ d.T) @ u.T)
    return params


def test_faceid_one_step_with_lora_matches_pytorch(tmp_path):
    """One FaceID training step (ID projection, to_k_ip / to_v_ip and the LoRA of every attention
    layer trained together) against a PyTorch reference: diffusers' UNet with the FaceID projection
    and IP processors, the LoRA as the official processor adds it, the official loss: loss <= 1e-5
    relative, every gradient <= 1e-4."""
    import jax
    import torch
    from diffusers import DDPMScheduler
    from diffusers import UNet2DConditionModel as TorchUNet
    from safetensors.numpy import save_file

    import ipadapter_fixtures as fx
    from helpers import nchw, rel_err
    from ipadapter_jax.ip_adapter import load_ip_adapter
    from ipadapter_jax.models import UNet2DConditionModel
    from ipadapter_jax.training.step import StepConfig, Trainer
    from sd_fixtures import SD15_SCHEDULER
    from test_train_step import as_official

    torch.manual_seed(0)
    tu = TorchUNet(**fx.UNET)
    tu.save_pretrained(tmp_path / "unet")
    proj, ip = fx.image_proj("faceid", fx.UNET["cross_attention_dim"]), fx.ip_layers(tu, lora_rank=8)
    save_file(fx.flat(proj, ip), tmp_path / "faceid.safetensors")
    tu._load_ip_adapter_weights([fx.torch_nested(proj, ip)], low_cpu_mem_usage=False)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    load_ip_adapter(tmp_path / "faceid.safetensors", unet)

    rng = np.random.default_rng(0)
    b = 2
    latents, noise = (rng.standard_normal((b, 8, 8, 4), dtype=np.float32) for _ in range(2))
    text = rng.standard_normal((b, 5, fx.UNET["cross_attention_dim"]), dtype=np.float32)
    ids = rng.standard_normal((b, fx.ID_DIM), dtype=np.float32)
    ids[1] = 0.0        # sample 1's image dropped: a zero ID embedding, as tutorial_train_faceid.py
    timesteps = np.array([17, 802])

    trainer, trainable, frozen = Trainer.create(unet, config=StepConfig(image_input="face_id"),
                                                scheduler_config=SD15_SCHEDULER)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss))(trainable, frozen, latents, text, ids, noise, timesteps)

    # The reference: every parameter frozen but the adapter's.
    for p in tu.parameters():
        p.requires_grad_(False)
    params = lora_hooks(tu, ip)
    projection = tu.encoder_hid_proj.image_projection_layers[0]
    for name, p in projection.named_parameters():
        params["image_proj." + name.replace("ff.net.0.proj", "proj.0").replace("ff.net.2", "proj.2")] = p
    for p, processor in enumerate(tu.attn_processors.values()):
        if hasattr(processor, "to_k_ip"):
            params[f"ip_adapter.{p}.to_k_ip.weight"] = processor.to_k_ip[0].weight
            params[f"ip_adapter.{p}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    for p in params.values():
        p.requires_grad_(True)
    sched = DDPMScheduler.from_config(SD15_SCHEDULER)
    t = torch.from_numpy(timesteps)
    noisy = sched.add_noise(nchw(latents), nchw(noise), t)
    pred = tu(noisy, t, encoder_hidden_states=torch.from_numpy(text),
              added_cond_kwargs={"image_embeds": [torch.from_numpy(ids)[:, None]]}).sample
    ref = torch.nn.functional.mse_loss(pred.float(), nchw(noise).float())
    ref.backward()

    assert abs(float(loss) - ref.item()) / abs(ref.item()) <= 1e-5
    mine = as_official(trainer, grads, frozen)
    assert mine.keys() == params.keys()
    assert any(".to_q_lora.down." in k for k in mine)
    for key, p in params.items():
        assert rel_err(mine[key], p.grad.numpy()) <= 1e-4, key


def write_id(path: Path, vector: np.ndarray) -> str:
    """An ID embedding file: .npy, or ``torch.save`` of InsightFace's numpy array, as the official
    FaceID data is written (``tutorial_train_faceid.py`` reads it back with ``torch.load``)."""
    if path.suffix == ".npy":
        np.save(path, vector)
    else:
        import torch

        torch.save(vector, path)
    return path.name


@pytest.mark.parametrize("config, kind", [("sd15_ip_adapter_faceid", "json"),
                                          ("sd15_ip_adapter_faceid_plus", "webdataset")])
def test_faceid_configs_train_and_export(data, tmp_path, config, kind):
    """FaceID (json: id_embed_file as .npy and official torch-saved files; no image encoder) and FaceID-PlusV2
    (webdataset: KEY.npy + KEY.face.png) train a few steps; the export, LoRA included, loads in
    diffusers' pipeline (its load_ip_adapter applies the FaceID LoRA through peft)."""
    from diffusers import StableDiffusionPipeline as TorchSD

    from ipadapter_jax.ip_adapter.official import read_ip_adapter
    from ipadapter_jax.training import ip_adapter_task as loop
    from ipadapter_jax.training.shards import write_shard

    rng = np.random.default_rng(1)
    records = json.loads(data["json"].read_text())
    vectors = [rng.standard_normal(512).astype(np.float32) for _ in records]
    for i, (r, v) in enumerate(zip(records, vectors)):
        r["id_embed_file"] = write_id(data["images"] / f"{i}_id{'.npy' if i % 2 == 0 else '.bin'}", v)
    (tmp_path / "faces.json").write_text(json.dumps(records))
    shard = [(f"{i:06d}", {"png": (data["images"] / r["image_file"]).read_bytes(), "txt": r["text"].encode(),
                           "face.png": (data["images"] / r["face_image_file"]).read_bytes(),
                           "npy": _npy_bytes(v)}) for i, (r, v) in enumerate(zip(records, vectors))]
    write_shard(tmp_path / "00000.tar", shard)

    cfg = importlib.import_module(f"configs.{config}").get_config()
    cfg.model.pretrained = str(data["sd"])
    cfg.model.image_encoder = "" if config.endswith("faceid") else str(data["image_encoder"])
    cfg.model.lora_rank = 4
    cfg.data.kind = kind
    cfg.data.json_file, cfg.data.image_root = str(tmp_path / "faces.json"), str(data["images"])
    cfg.data.shards = str(tmp_path / "00000.tar")
    cfg.data.resolution, cfg.data.batch_size, cfg.data.workers = 16, 2, 0
    cfg.workdir = str(tmp_path / "run")
    cfg.train.steps, cfg.train.log_every, cfg.train.save_every = 2, 1, 100
    summary = loop.train(cfg)
    assert np.isfinite(summary["final_loss"]) and summary["skipped_images"] == 0
    state = read_ip_adapter(summary["export"])
    assert state["image_proj.proj.0.weight"].shape == (1024, 512)
    lora = [k for k in state if "_lora." in k]
    assert lora and all(state[k].shape[0] == 4 for k in lora if ".down." in k)
    assert any(np.abs(state[k]).max() > 0 for k in lora if ".up." in k)     # the LoRA was trained
    if config.endswith("plus"):
        assert "image_proj.perceiver_resampler.proj_in.weight" in state
        from ipadapter_jax.ip_adapter import load_ip_adapter
        from ipadapter_jax.models import UNet2DConditionModel

        # the file says PlusV2 (its metadata): reloaded, the shortcut is on whatever the file's name
        assert load_ip_adapter(summary["export"], UNet2DConditionModel.from_pretrained(data["sd"] / "unet")).shortcut

    export = Path(summary["export"])
    pipe = TorchSD.from_pretrained(data["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(export.parent), subfolder="", weight_name=export.name, image_encoder_folder=None)
    assert "faceid_0" in pipe.unet.peft_config


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("config", ["sdxl_ip_adapter_faceid", "sdxl_ip_adapter_faceid_plus"])
def test_sdxl_faceid_configs_train_and_export(data, tmp_path, config):
    """The SDXL FaceID and FaceID-PlusV2 configs (both text encoders, time ids, the ID embedding,
    the face crop for Plus, LoRA) train two steps on a small SDXL folder; diffusers' SDXL pipeline
    loads the export with its LoRA."""
    from diffusers import StableDiffusionXLPipeline as TorchXL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    import ipadapter_fixtures as fx
    from ipadapter_jax.ip_adapter.official import read_ip_adapter
    from ipadapter_jax.training import ip_adapter_task as loop
    from test_sdxl_pipeline import build_sdxl_folder

    paths = build_sdxl_folder(tmp_path, seed=4)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=fx.CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=112, projection_dim=fx.CLIP_DIM)).save_pretrained(tmp_path / "image_encoder")
    rng = np.random.default_rng(2)
    records = json.loads(data["json"].read_text())
    for i, r in enumerate(records):
        r["id_embed_file"] = write_id(tmp_path / f"{i}_id.npy", rng.standard_normal(512).astype(np.float32))
        r["image_file"], r["face_image_file"] = (str(data["images"] / r[k]) for k in ("image_file",
                                                                                      "face_image_file"))
    (tmp_path / "faces.json").write_text(json.dumps(records))

    cfg = importlib.import_module(f"configs.{config}").get_config()
    plus = config.endswith("plus")
    assert (cfg.model.variant, cfg.model.shortcut, cfg.model.lora_rank, cfg.data.condition) == (
        ("faceid-plus", True, 128, "face") if plus else ("faceid", False, 128, "image"))
    cfg.model.pretrained = str(paths["sdxl"])
    cfg.model.image_encoder = str(tmp_path / "image_encoder") if plus else ""
    cfg.model.lora_rank = 4
    cfg.data.json_file, cfg.data.image_root = str(tmp_path / "faces.json"), str(tmp_path)
    cfg.data.resolution, cfg.data.batch_size, cfg.data.workers = 16, 2, 0
    cfg.workdir = str(tmp_path / "run")
    cfg.train.steps, cfg.train.log_every, cfg.train.save_every = 2, 1, 100
    summary = loop.train(cfg)
    assert np.isfinite(summary["final_loss"])
    state = read_ip_adapter(summary["export"])
    assert ("image_proj.perceiver_resampler.proj_in.weight" in state) == plus and any("_lora." in k for k in state)
    export = Path(summary["export"])
    pipe = TorchXL.from_pretrained(paths["sdxl"])
    pipe.load_ip_adapter(str(export.parent), subfolder="", weight_name=export.name, image_encoder_folder=None)
    assert "faceid_0" in pipe.unet.peft_config


def test_id_embedding_files(tmp_path):
    """ID embeddings: .npy, the official torch.save of a numpy array, a torch tensor, [1, D]; a
    pickle of anything else, a wrong shape or a non-finite value is a BadFile naming the file."""
    import pickle

    import torch

    from ipadapter_jax.io.errors import BadFile
    from ipadapter_jax.training.data import read_id_embed

    v = np.arange(512, dtype=np.float32) / 512
    np.save(tmp_path / "a.npy", v[None])
    torch.save(v.astype(np.float64), tmp_path / "b.bin")
    torch.save(torch.from_numpy(v), tmp_path / "c.pt")
    for name in ("a.npy", "b.bin", "c.pt"):
        np.testing.assert_allclose(read_id_embed(tmp_path / name), v, rtol=1e-7)
    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"x": print}))
    np.save(tmp_path / "square.npy", np.zeros((4, 4), np.float32))
    np.save(tmp_path / "nan.npy", np.full(512, np.nan, np.float32))
    for name, message in (("evil.bin", "not a readable ID embedding file"), ("square.npy", r"shape \(4, 4\)"),
                          ("nan.npy", "finite")):
        with pytest.raises(BadFile, match=message):
            read_id_embed(tmp_path / name)
    # grain reads records from several threads: torch's allow-list of globals is process-wide
    # (a race refused official files at random before the reads took turns).
    import threading

    errors = []

    def read_many():
        for _ in range(25):
            try:
                read_id_embed(tmp_path / "b.bin")
            except BadFile as e:
                errors.append(e)

    threads = [threading.Thread(target=read_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
