"""One IP-Adapter training step from raw images against a PyTorch reference of
the official recipe, for base and Plus on SD 1.5 and for SDXL.

Ours: the records of ``JsonImageTextSource`` (resize + center crop to
``pixels``, the CLIP preprocessing to ``clip_pixels``, token ids, original size
and crop), batched by the training task (``ip_adapter_task._task``: the SDXL
time ids, the ids of "" that dropped captions become) and ``Trainer.train_step``
built as ``train()`` builds it (``build_trainer``): VAE posterior sample x the
VAE's scaling factor, DDPM noise, the dropout, the text and image encoders, the
UNet with the adapter, the MSE and its gradients (taken out of the step by an
optimizer whose state is the gradient).

The reference, written here after the official ``tutorial_train.py`` /
``tutorial_train_plus.py`` / ``tutorial_train_sdxl.py``: their dataset
(torchvision's ``Resize`` + ``CenterCrop`` / SDXL's crop, re-done without
torchvision; ``CLIPImageProcessor`` on the raw image; one ``random.random()``
per sample deciding the drops; the tokenizers), then diffusers'
``AutoencoderKL.encode(...).latent_dist.sample()`` x ``scaling_factor``,
``DDPMScheduler.add_noise``, the frozen encoders (base: zero embedding for a
dropped image; Plus: a zero CLIP image through the encoder), and diffusers'
UNet with the adapter's processors (``_load_ip_adapter_weights``).

The random draws are the same on both sides: the per-sample uniform r of the
dropout (rows: kept, image dropped, caption dropped, both dropped), the VAE
posterior's noise, the diffusion noise and the timesteps. Bounds: loss <= 1e-5
relative, gradients <= 1e-4 (over all trainable tensors and per tensor). The
feature cache is checked by value against the reference encoders (<= 1e-5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

import ipadapter_fixtures as fx
import sd_fixtures
from helpers import nchw, rel_err

B = 4
# The official datasets' bands (0.05 each): r < 0.05 image dropped, < 0.10 caption, < 0.15 both.
R = np.array([0.5, 0.02, 0.07, 0.12])
DROP_IMAGE, DROP_TEXT = [False, True, False, True], [False, False, True, True]
CAPTIONS = ["the red circle", "a blue square on green", "stripes", "the dots"]
RESOLUTION = 16
# (w, h), none square: the long side scales to a fraction (truncated, as torchvision does) and
# the crop margins are odd. Margins of 4k + 3 are left out: there torchvision's CenterCrop
# (tutorial_train.py) rounds half to even and tutorial_train_sdxl.py floors; we floor for both.
SIZES = [(37, 20), (20, 27), (43, 30), (25, 34)]


# --------------------------------------------------------------------------- the official data path

def official_resize(image, size: int):
    """``transforms.Resize(size, BILINEAR)`` on a PIL image (torchvision's output size: the
    short side to ``size``, the long side ``int(size * long / short)``)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return image.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BILINEAR)


def to_normalized_tensor(image) -> torch.Tensor:
    """``ToTensor()`` then ``Normalize([0.5], [0.5])``: CHW float in [-1, 1]."""
    x = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
    return x.sub(0.5).div(0.5)


def official_item(path: Path, text: str, r: float, tokenizers, sdxl: bool) -> dict:
    """One record of the official ``MyDataset.__getitem__``, with ``random.random()`` = r."""
    from transformers import CLIPImageProcessor

    raw = Image.open(path)
    resized = official_resize(raw.convert("RGB"), RESOLUTION)
    w, h = resized.size
    if sdxl:     # tutorial_train_sdxl.py: crop of the resized tensor, top / left = delta // 2
        top, left = (h - RESOLUTION) // 2, (w - RESOLUTION) // 2
    else:        # tutorial_train.py: transforms.CenterCrop
        top, left = int(round((h - RESOLUTION) / 2.0)), int(round((w - RESOLUTION) / 2.0))
    image = to_normalized_tensor(resized.crop((left, top, left + RESOLUTION, top + RESOLUTION)))
    clip = CLIPImageProcessor()(images=raw, return_tensors="pt").pixel_values
    drop_image = 0
    if r < 0.05:
        drop_image = 1
    elif r < 0.10:
        text = ""
    elif r < 0.15:
        text = ""
        drop_image = 1
    ids = [tok(text, max_length=tok.model_max_length, padding="max_length", truncation=True,
               return_tensors="pt").input_ids for tok in tokenizers]
    return {"image": image, "ids": ids, "clip_image": clip, "drop_image_embed": drop_image,
            "original_size": torch.tensor([raw.size[1], raw.size[0]]), "crop": torch.tensor([top, left]),
            "target_size": torch.tensor([RESOLUTION, RESOLUTION])}


def official_batch(data: dict, tokenizers, sdxl: bool) -> dict:
    items = [official_item(data["images"] / f"{i}.png", CAPTIONS[i], R[i], tokenizers, sdxl) for i in range(B)]
    return {"images": torch.stack([it["image"] for it in items]),
            "ids": [torch.cat([it["ids"][k] for it in items]) for k in range(len(tokenizers))],
            "clip_images": torch.cat([it["clip_image"] for it in items]),
            "drop_image_embeds": [it["drop_image_embed"] for it in items],
            "time_ids": torch.cat([torch.stack([it[k] for it in items]) for k in ("original_size", "crop",
                                                                                  "target_size")], dim=1)}


# --------------------------------------------------------------------------- the official step

def torch_unet(folder: Path, adapter: Path):
    from diffusers import UNet2DConditionModel

    tu = UNet2DConditionModel.from_pretrained(folder / "unet")
    flat = load_file(adapter)
    nested = {part: {k[len(part) + 1:]: torch.from_numpy(v) for k, v in flat.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    tu._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    return tu


# diffusers' names of the adapter's image projection -> the official file's (the inverse of
# diffusers' _convert_ip_adapter_image_proj_to_diffusers); Plus' to_k / to_v are the halves of to_kv.
OFFICIAL_NAMES = [(r"^image_embeds\.", "proj."), (r"^layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
                  (r"^layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
                  (r"^layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
                  (r"^layers\.(\d+)\.attn\.to_(k|v)\.", r"layers.\1.0.to_kv_\2."),
                  (r"^layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
                  (r"^layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
                  (r"^layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
                  (r"^layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3.")]


def trainable_params(tu) -> dict[str, torch.nn.Parameter]:
    """The tensors the official scripts train (the image projection, every to_k_ip / to_v_ip),
    by official key (Plus' to_kv as its two halves ``to_kv_k`` / ``to_kv_v``), gradients on."""
    out = {}
    for name, p in tu.encoder_hid_proj.image_projection_layers[0].named_parameters():
        for pattern, repl in OFFICIAL_NAMES:
            name = re.sub(pattern, repl, name)
        out["image_proj." + name] = p
    for i, processor in enumerate(tu.attn_processors.values()):
        if hasattr(processor, "to_k_ip"):
            out[f"ip_adapter.{i}.to_k_ip.weight"] = processor.to_k_ip[0].weight
            out[f"ip_adapter.{i}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    for p in tu.parameters():
        p.requires_grad_(False)
    for p in out.values():
        p.requires_grad_(True)
        p.grad = None
    return out


def official_grads(params: dict) -> dict[str, np.ndarray]:
    grads = {k: p.grad.detach().numpy().copy() for k, p in params.items()}
    for key in [k for k in grads if k.endswith("to_kv_k.weight")]:
        grads[key.replace("to_kv_k", "to_kv")] = np.concatenate([grads.pop(key),
                                                                 grads.pop(key.replace("to_kv_k", "to_kv_v"))])
    return grads


def official_step(models: dict, batch: dict, draws: dict, plus: bool, sdxl: bool) -> tuple[float, dict]:
    """The official training loop's body on ``batch`` -> (loss, gradients by official key)."""
    import diffusers.models.autoencoders.vae as vae_module
    from diffusers import DDPMScheduler

    vae, text_encoders, image_encoder, tu = models["vae"], models["text"], models["image"], models["unet"]
    scheduler = DDPMScheduler.from_pretrained(models["folder"], subfolder="scheduler")
    vae_noise = nchw(draws["vae_noise"])

    def posterior_noise(shape, generator=None, device=None, dtype=None):
        assert tuple(shape) == tuple(vae_noise.shape)
        return vae_noise.to(dtype)

    with torch.no_grad():
        with mock.patch.object(vae_module, "randn_tensor", posterior_noise):
            latents = vae.encode(batch["images"]).latent_dist.sample() * vae.config.scaling_factor
    noise, timesteps = nchw(draws["noise"]), torch.from_numpy(draws["timesteps"]).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        if plus:
            clip = torch.stack([torch.zeros_like(c) if d else c
                                for c, d in zip(batch["clip_images"], batch["drop_image_embeds"])])
            embeds = image_encoder(clip, output_hidden_states=True).hidden_states[-2]
        else:
            out = image_encoder(batch["clip_images"]).image_embeds
            embeds = torch.stack([torch.zeros_like(e) if d else e for e, d in zip(out, batch["drop_image_embeds"])])
        added = {"image_embeds": [embeds[:, None]]}
        if sdxl:
            out1 = text_encoders[0](batch["ids"][0], output_hidden_states=True)
            out2 = text_encoders[1](batch["ids"][1], output_hidden_states=True)
            context = torch.concat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
            added.update(text_embeds=out2[0], time_ids=batch["time_ids"].float())
        else:
            context = text_encoders[0](batch["ids"][0])[0]
    params = trainable_params(tu)
    pred = tu(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    return loss.item(), official_grads(params)


# --------------------------------------------------------------------------- ours

def grad_capture():
    """An optimizer whose state after ``update`` is the gradient it got (params unchanged)."""
    import jax
    import jax.numpy as jnp
    import optax

    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def config(name: str, data: dict, model: Path, adapter: Path, workdir: Path):
    import importlib
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    cfg = importlib.import_module(f"configs.{name}").get_config()
    cfg.model.pretrained, cfg.model.image_encoder = str(model), str(data["encoder"])
    cfg.model.adapter_init = str(adapter)
    cfg.data.json_file, cfg.data.image_root = str(data["json"]), str(data["images"])
    cfg.data.resolution, cfg.data.batch_size, cfg.data.workers = RESOLUTION, B, 0
    cfg.workdir = str(workdir)
    return cfg


def our_step(cfg, draws: dict):
    """-> (loss, gradients by official key, the batch as the step got it, drop flags)."""
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.training import ip_adapter_task as task_lib
    from ipadapter_jax.training.optim import make_optimizer
    from test_train_step import as_official

    components, image_encoder = task_lib.build_models(cfg)
    tokenizers = components.tokenizers
    source = task_lib.build_source(cfg, tokenizers[0], image_encoder.config.image_size, *tokenizers[1:])
    plus = components.unet.ip_adapters[0].spec.encoder_output == "hidden_states"
    trainer, trainable, frozen = task_lib.build_trainer(cfg, components, image_encoder, grad_capture(), False)
    constants = task_lib._constants(components, image_encoder, False, plus)
    records = [source[i] for i in range(B)]
    host = {k: np.stack([r[k] for r in records]) for k in records[0]}   # as grain.Batch stacks them
    opt_state = trainer.init_optimizer(trainable)
    task = task_lib._task(cfg, trainer, {"trainable": trainable, "opt_state": opt_state}, frozen,
                          task_lib._mesh(cfg), iter([host]), constants, False, make_optimizer(cfg)[1],
                          components.family.added_conditioning is not None)
    batch, _ = task.batch(0)
    drop_image, drop_text = trainer.dropout(jnp.asarray(R, jnp.float32))
    ours = {**{k: jnp.asarray(v) for k, v in draws.items()}, "drop_image": drop_image, "drop_text": drop_text}
    _, grads, metrics = jax.jit(trainer.train_step)(trainable, opt_state, frozen, batch, jax.random.key(0),
                                                    jnp.int32(0), ours)
    return (float(metrics["loss"]), as_official(trainer, grads, frozen), jax.device_get(batch),
            (np.asarray(drop_image).tolist(), np.asarray(drop_text).tolist()))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Raw images of odd sizes, a json dataset of them, and a CLIP vision encoder."""
    root = tmp_path_factory.mktemp("from_pixels")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(7)
    for i, (w, h) in enumerate(SIZES):
        # Smooth colour ramps plus noise: content that the resizes and the VAE do not flatten.
        y, x = np.mgrid[0:h, 0:w]
        ramp = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        Image.fromarray(np.clip(ramp + rng.normal(0, 40, ramp.shape), 0, 255).astype(np.uint8)).save(
            images / f"{i}.png")
    (root / "data.json").write_text(json.dumps([{"image_file": f"{i}.png", "text": c} for i, c in enumerate(CAPTIONS)]))
    sd = sd_fixtures.build_pipeline_folder(root / "sd15")
    return {"root": root, "images": images, "json": root / "data.json", "encoder": sd["image_encoder"], "sd15": sd}


def draws_for(latent_hw: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shape = (B, latent_hw, latent_hw, 4)
    return {"vae_noise": rng.standard_normal(shape, dtype=np.float32),
            "noise": rng.standard_normal(shape, dtype=np.float32), "timesteps": np.array([17, 402, 650, 981])}


def reference_models(folder: Path, encoder: Path, adapter: Path, sdxl: bool) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    text = [CLIPTextModel.from_pretrained(folder / "text_encoder").eval()]
    tokenizers = [CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)]
    if sdxl:
        text.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval())
        tokenizers.append(CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True))
    return {"folder": folder, "vae": AutoencoderKL.from_pretrained(folder / "vae").eval(), "text": text,
            "tokenizers": tokenizers, "image": CLIPVisionModelWithProjection.from_pretrained(encoder).eval(),
            "unet": torch_unet(folder, adapter)}


@pytest.fixture(scope="module")
def reference():
    """``reference_models``, built once per (model folder, adapter) in this module."""
    built = {}

    def get(folder: Path, encoder: Path, adapter: Path, sdxl: bool) -> dict:
        if (folder, adapter) not in built:
            built[folder, adapter] = reference_models(folder, encoder, adapter, sdxl)
        return built[folder, adapter]

    return get


CASES = {"sd15-base": ("sd15_ip_adapter", "adapter"), "sd15-plus": ("sd15_ip_adapter_plus", "plus"),
         "sdxl-base": ("sdxl_ip_adapter", "adapter")}


@pytest.fixture(scope="module")
def sdxl_folder(data):
    from test_sdxl_pipeline import build_sdxl_folder

    return build_sdxl_folder(data["root"] / "sdxl", seed=3)


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("case", list(CASES))
def test_one_step_from_pixels_matches_the_official_recipe(case, data, sdxl_folder, reference, tmp_path):
    config_name, adapter_key = CASES[case]
    sdxl, plus = case.startswith("sdxl"), case.endswith("plus")
    folder, adapter = ((sdxl_folder["sdxl"], sdxl_folder["adapter"]) if sdxl
                       else (data["sd15"]["sd"], data["sd15"][adapter_key]))
    cfg = config(config_name, data, folder, adapter, tmp_path / "run")
    draws = draws_for(RESOLUTION // 2, seed=list(CASES).index(case))   # the fixtures' VAEs downsample 2x
    loss, grads, batch, (drop_image, drop_text) = our_step(cfg, draws)

    models = reference(folder, data["encoder"], adapter, sdxl)
    official = official_batch(data, models["tokenizers"], sdxl)
    # The data path first (clearer failures than the loss): pixels, CLIP pixels, time ids, drops.
    np.testing.assert_allclose(batch["pixels"], official["images"].permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(batch["clip_pixels"], official["clip_images"].permute(0, 2, 3, 1).numpy(),
                               atol=1e-5)
    assert (drop_image, drop_text) == (DROP_IMAGE, DROP_TEXT)
    assert [bool(d) for d in official["drop_image_embeds"]] == DROP_IMAGE
    if sdxl:
        np.testing.assert_array_equal(batch["time_ids"], official["time_ids"].numpy())
    ref_loss, ref_grads = official_step(models, official, draws, plus, sdxl)

    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    keys = sorted(ref_grads)
    total = rel_err(np.concatenate([grads[k].ravel() for k in keys]),
                    np.concatenate([ref_grads[k].ravel() for k in keys]))
    worst = max((rel_err(grads[k], ref_grads[k]), k) for k in keys)
    print(f"{case}: loss {loss:.6f} vs {ref_loss:.6f} (rel {loss_err:.1e}); gradients rel {total:.1e} over "
          f"{len(keys)} tensors, worst {worst[0]:.1e} ({worst[1]})")
    assert loss_err <= 1e-5
    assert total <= 1e-4
    assert worst[0] <= 1e-4, worst


@pytest.mark.parametrize("variant", ["adapter", "plus"])
def test_feature_cache_from_pixels_matches_the_reference_encoders(variant, data, reference, tmp_path):
    """``data.cache_dir``: each record's posterior mean x scaling factor, caption embedding
    and image embedding (Plus: penultimate hidden states), and the constants that stand in
    for "" and a dropped image, against the reference encoders on the official data path."""
    from ipadapter_jax.training import data as data_lib
    from ipadapter_jax.training import ip_adapter_task as task_lib

    folder = data["sd15"]["sd"]
    plus = variant == "plus"
    cfg = config("sd15_ip_adapter_plus" if plus else "sd15_ip_adapter", data, folder, data["sd15"][variant],
                 tmp_path / "run")
    cfg.data.cache_dir = str(tmp_path / "cache")
    components, image_encoder = task_lib.build_models(cfg)
    text_encoder, tokenizer = components.text_encoders[0], components.tokenizers[0]
    source = task_lib.build_source(cfg, tokenizer, image_encoder.config.image_size)
    cached = task_lib._cached_source(cfg, source, components, image_encoder, plus)
    assert isinstance(cached, data_lib.CachedSource) and len(cached) == B
    constants = task_lib._constants(components, image_encoder, True, plus)

    models = reference(folder, data["encoder"], data["sd15"][variant], sdxl=False)
    with torch.no_grad():   # no dropout: every item's r = 1
        items = [official_item(data["images"] / f"{i}.png", CAPTIONS[i], 1.0, models["tokenizers"], False)
                 for i in range(B)]
        images = torch.stack([it["image"] for it in items])
        latents = models["vae"].encode(images).latent_dist.mean * models["vae"].config.scaling_factor
        text = models["text"][0](torch.cat([it["ids"][0] for it in items]))[0]
        clip = torch.cat([it["clip_image"] for it in items])
        out = models["image"](clip, output_hidden_states=True)
        embeds = out.hidden_states[-2] if plus else out.image_embeds
        empty_ids = models["tokenizers"][0]("", max_length=77, padding="max_length", return_tensors="pt").input_ids
        empty = models["text"][0](empty_ids)[0][0]
        uncond = models["image"](torch.zeros_like(clip[:1]), output_hidden_states=True).hidden_states[-2][0]

    mine = {k: np.stack([cached[i][k] for i in range(B)]) for k in ("latents", "text_embeds", "image_embeds")}
    errors = {"latents": rel_err(mine["latents"], latents.permute(0, 2, 3, 1).numpy()),
              "text_embeds": rel_err(mine["text_embeds"], text.numpy()),
              "image_embeds": rel_err(mine["image_embeds"], embeds.numpy()),
              "empty_text": rel_err(constants["empty_text"], empty.numpy())}
    if plus:
        errors["uncond_image"] = rel_err(constants["uncond_image"], uncond.numpy())
    print(f"{variant} cache: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    for key, err in errors.items():
        assert err <= 1e-5, (key, err)
