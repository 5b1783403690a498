"""One SDXL training step against a PyTorch reference written here after the
official ``tutorial_train_sdxl.py``: diffusers' SDXL UNet with IP-Adapter
processors (``_load_ip_adapter_weights``), context = both text encoders'
``hidden_states[-2]`` concatenated, pooled = encoder 2's ``text_embeds``, a
dropped caption = "" through both encoders (pooled included), a dropped image
= zero embedding, per-image ``time_ids`` (original size + crop + target size).
Same latents, noise, timesteps and dropout draws on both sides: loss <= 1e-5,
adapter gradients <= 1e-4, AdamW-updated parameters <= 1e-5. Also: the jitted
step lowers the loss, ``noise_offset`` adds a per-sample, per-channel constant
(and 0 leaves the draws bit-identical), and mismatched encoders are refused."""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import load_file

import ipadapter_fixtures as fx
from helpers import nchw, rel_err
from ipadapter_jax.ip_adapter import load_ip_adapter
from ipadapter_jax.io.errors import BadArgument, Incompatible
from ipadapter_jax.models import CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel
from ipadapter_jax.training.step import StepConfig, TextConditioning, Trainer
from test_sdxl_pipeline import SDXL_SCHEDULER, build_sdxl_folder
from test_train_step import as_official, torch_trainable

B = 3
CAPTIONS = ["a red circle", "a blue square on green", "stripes"]
DROP_TEXT = np.array([True, False, True])     # sample 0: caption dropped; 2: both dropped
DROP_IMAGE = np.array([False, True, True])    # sample 1: image dropped


def ids(tokenizer, texts) -> np.ndarray:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np").input_ids.astype(np.int32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextModel as TorchText
    from transformers import CLIPTextModelWithProjection as TorchTextProj
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("train_sdxl")
    paths = build_sdxl_folder(root, seed=3)
    folder = paths["sdxl"]
    tu = TorchUNet.from_pretrained(folder / "unet")
    flat = load_file(paths["adapter"])
    nested = {"image_proj": {k[len("image_proj."):]: torch.from_numpy(v) for k, v in flat.items()
                             if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: torch.from_numpy(v) for k, v in flat.items()
                             if k.startswith("ip_adapter.")}}
    tu._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    torch_text = (TorchText.from_pretrained(folder / "text_encoder").eval(),
                  TorchTextProj.from_pretrained(folder / "text_encoder_2").eval())

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    load_ip_adapter(paths["adapter"], unet)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")

    tok1 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((B, 8, 8, 4), dtype=np.float32),
             "input_ids": ids(tok1, CAPTIONS), "input_ids_2": ids(tok2, CAPTIONS),
             "empty_text": np.stack([ids(tok1, [""])[0], ids(tok2, [""])[0]]),
             "image_embeds": rng.standard_normal((B, fx.CLIP_DIM), dtype=np.float32),
             "time_ids": fx.sdxl_time_ids(B, seed=2)}
    assert not np.array_equal(batch["empty_text"][0], batch["empty_text"][1])   # tokenizer 2 pads with "!"
    draws = {"timesteps": np.array([17, 402, 802]), "noise": rng.standard_normal((B, 8, 8, 4), dtype=np.float32),
             "drop_text": DROP_TEXT, "drop_image": DROP_IMAGE, "vae_key": None}
    return dict(tu=tu, torch_text=torch_text, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                batch=batch, draws=draws)


def torch_step(s):
    """The official SDXL tutorial's step on the reference models."""
    from diffusers import DDPMScheduler

    tu, (te1, te2), batch, draws = s["tu"], s["torch_text"], s["batch"], s["draws"]
    sched = DDPMScheduler.from_config({k: SDXL_SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule",
                                                                     "num_train_timesteps")})
    # The dataset's dropout: text = "" for dropped captions (both tokenizers), zero image embedding.
    ids1 = np.where(DROP_TEXT[:, None], batch["empty_text"][0][None], batch["input_ids"])
    ids2 = np.where(DROP_TEXT[:, None], batch["empty_text"][1][None], batch["input_ids_2"])
    with torch.no_grad():
        out1 = te1(torch.from_numpy(ids1).long(), output_hidden_states=True)
        out2 = te2(torch.from_numpy(ids2).long(), output_hidden_states=True)
        pooled = out2[0]
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    embeds = torch.from_numpy(np.where(DROP_IMAGE[:, None], 0.0, batch["image_embeds"]).astype(np.float32))
    latents, noise = nchw(batch["latents"]), nchw(draws["noise"])
    t = torch.from_numpy(draws["timesteps"])
    noisy = sched.add_noise(latents, noise, t)
    params = torch_trainable(tu)
    added = {"text_embeds": pooled, "time_ids": torch.from_numpy(batch["time_ids"]),
             "image_embeds": [embeds[:, None]]}
    pred = tu(noisy, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt.step()
    return loss.item(), grads, {k: p.detach().numpy().copy() for k, p in params.items()}


def make_trainer(s, **kwargs):
    return Trainer.create(s["unet"], text_encoder=s["text_encoder"], text_encoder_2=s["text_encoder_2"],
                          scheduler_config=SDXL_SCHEDULER, **kwargs)


def test_one_sdxl_step_matches_pytorch(setup):
    import jax

    s = setup
    trainer, trainable, frozen = make_trainer(s)
    latents, text, embeds = trainer.encode(frozen, s["batch"], s["draws"])
    assert isinstance(text, TextConditioning)
    assert text.context.shape == (B, 77, sum(fx.SDXL_TEXT_WIDTHS))
    assert text.added_cond["text_embeds"].shape == (B, fx.SDXL_POOLED)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss))(trainable, frozen, latents, text, embeds, s["draws"]["noise"],
                                                   s["draws"]["timesteps"])
    opt_state = trainer.init_optimizer(trainable)
    updates, _ = trainer.optimizer.update(grads, opt_state, trainable)
    updated = optax.apply_updates(trainable, updates)

    ref_loss, ref_grads, ref_updated = torch_step(s)
    err = abs(float(loss) - ref_loss) / abs(ref_loss)
    print(f"loss {float(loss):.6f} vs {ref_loss:.6f}: rel err {err:.2e}")
    assert err <= 1e-5
    mine = as_official(trainer, grads, frozen)
    assert mine.keys() == ref_grads.keys()
    assert len([k for k in mine if k.endswith("to_k_ip.weight")]) == 11   # down 1 + 2, up 2 x (2 + 1), mid 2
    worst = max(rel_err(mine[k], ref_grads[k]) for k in ref_grads)
    print(f"worst adapter gradient rel err {worst:.2e}")
    for key in ref_grads:
        assert rel_err(mine[key], ref_grads[key]) <= 1e-4, key
    mine_updated = as_official(trainer, updated, frozen)
    for key in ref_updated:
        assert rel_err(mine_updated[key], ref_updated[key]) <= 1e-5, key


def test_conditioning_reaches_the_loss(setup):
    """The time ids and the caption dropout each change the loss."""
    import jax

    s = setup
    trainer, trainable, frozen = make_trainer(s)

    @jax.jit   # one program for the three calls (op by op, each would be slower)
    def loss_of(batch, draws):
        latents, text, embeds = trainer.encode(frozen, batch, draws)
        return trainer.loss(trainable, frozen, latents, text, embeds, draws["noise"], draws["timesteps"])

    base = float(loss_of(s["batch"], s["draws"]))
    other_ids = {**s["batch"], "time_ids": s["batch"]["time_ids"] + np.float32(64)}
    assert abs(float(loss_of(other_ids, s["draws"])) - base) > 1e-6 * abs(base)
    no_drop = {**s["draws"], "drop_text": np.zeros(B, bool)}
    assert abs(float(loss_of(s["batch"], no_drop)) - base) > 1e-6 * abs(base)


def test_sdxl_train_step_jits_and_lowers_the_loss(setup):
    import jax

    s = setup
    trainer, trainable, frozen = make_trainer(s, optimizer=optax.adam(1e-3))
    opt_state = trainer.init_optimizer(trainable)
    batch = dict(s["batch"])
    step = jax.jit(trainer.train_step)
    losses = []
    for _ in range(12):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, jax.random.key(1), np.int32(0))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.95 * losses[0], losses


def test_noise_offset(setup):
    import jax

    s = setup
    plain, _, _ = make_trainer(s)
    zero, _, _ = make_trainer(s, config=StepConfig(noise_offset=0.0))
    offset, _, _ = make_trainer(s, config=StepConfig(noise_offset=0.1))
    shape = (64, 8, 8, 4)
    a = plain.draw(jax.random.key(3), 64, shape)
    b = zero.draw(jax.random.key(3), 64, shape)
    c = offset.draw(jax.random.key(3), 64, shape)
    np.testing.assert_array_equal(np.asarray(a["noise"]), np.asarray(b["noise"]))
    diff = np.asarray(c["noise"]) - np.asarray(a["noise"])
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1, :1, :], shape), atol=1e-6)  # per (sample, channel)
    assert 0.07 < diff[:, 0, 0, :].std() < 0.13
    for key in ("timesteps", "drop_text", "drop_image"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(c[key]))
    with pytest.raises(BadArgument, match="noise_offset"):
        make_trainer(s, config=StepConfig(noise_offset=-0.1))


def test_encoders_are_checked(setup):
    s = setup
    with pytest.raises(BadArgument, match="text_encoder_2"):
        Trainer.create(s["unet"], text_encoder=s["text_encoder"], scheduler_config=SDXL_SCHEDULER)
    with pytest.raises(BadArgument, match="CLIPTextModelWithProjection"):
        Trainer.create(s["unet"], text_encoder=s["text_encoder"], text_encoder_2=s["text_encoder"],
                       scheduler_config=SDXL_SCHEDULER)
    with pytest.raises(Incompatible, match="do not fit"):    # widths 48 + 48 for a UNet of 32 + 48
        Trainer.create(s["unet"], text_encoder=s["text_encoder_2"], text_encoder_2=s["text_encoder_2"],
                       scheduler_config=SDXL_SCHEDULER)


# --------------------------------------------------------------------------- the loop and the data


def test_records_carry_size_and_crop(tmp_path):
    """Sources record each image's original (h, w) and its crop (top, left), and
    a second tokenizer's ids; SDXL time ids are built from them."""
    import json

    from PIL import Image

    from ipadapter_jax.families.text import time_ids
    from ipadapter_jax.training.data import JsonImageTextSource
    from sd_fixtures import write_tokenizer
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path / "tok")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(tmp_path / "tall.png")    # h 30, w 20
    Image.fromarray(np.zeros((20, 50, 3), np.uint8)).save(tmp_path / "wide.png")    # h 20, w 50
    (tmp_path / "data.json").write_text(json.dumps([{"image_file": "tall.png", "text": "a"},
                                                    {"image_file": "wide.png", "text": "b"}]))
    source = JsonImageTextSource(tmp_path / "data.json", tmp_path, tok, 16, tokenizer_2=tok)
    tall, wide = source[0], source[1]
    assert tall["original_size"].tolist() == [30, 20] and tall["crop_top_left"].tolist() == [4, 0]   # 16 x 24
    assert wide["original_size"].tolist() == [20, 50] and wide["crop_top_left"].tolist() == [0, 12]  # 40 x 16
    np.testing.assert_array_equal(tall["input_ids_2"], tall["input_ids"])
    ids = time_ids(np.stack([tall["original_size"], wide["original_size"]]),
                   np.stack([tall["crop_top_left"], wide["crop_top_left"]]), (16, 16))
    assert ids.dtype == np.float32 and ids.tolist() == [[30, 20, 4, 0, 16, 16], [20, 50, 0, 12, 16, 16]]
    assert "input_ids_2" not in JsonImageTextSource(tmp_path / "data.json", tmp_path, tok, 16)[0]


@pytest.mark.parametrize("config", ["sdxl_ip_adapter", "sdxl_ip_adapter_plus", "sdxl_ip_adapter_plus_face"])
def test_sdxl_config_trains_and_exports(config, tmp_path):
    """The SDXL configs train a few steps on a small SDXL folder from a json
    dataset (per-image time ids), and the exported adapter loads into the UNet."""
    import importlib
    import json
    import sys
    from pathlib import Path

    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter_jax.ip_adapter.official import read_ip_adapter
    from ipadapter_jax.training import ip_adapter_task as loop

    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    paths = build_sdxl_folder(tmp_path, seed=4)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=fx.CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=112, projection_dim=fx.CLIP_DIM)).save_pretrained(tmp_path / "image_encoder")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16 + 4 * i, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (10, 8, 3), dtype=np.uint8)).save(images / f"{i}_face.png")
        records.append({"image_file": f"{i}.png", "face_image_file": f"{i}_face.png", "text": f"a colour {i}"})
    (tmp_path / "data.json").write_text(json.dumps(records))

    cfg = importlib.import_module(f"configs.{config}").get_config()
    assert cfg.data.resolution == 1024 and cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.01
    cfg.model.pretrained, cfg.model.image_encoder = str(paths["sdxl"]), str(tmp_path / "image_encoder")
    if cfg.model.variant == "plus":
        assert cfg.model.resampler_dim == 1280 and cfg.model.num_tokens == 16
        cfg.model.resampler_dim = 64
    cfg.data.json_file, cfg.data.image_root = str(tmp_path / "data.json"), str(images)
    cfg.data.resolution, cfg.data.batch_size, cfg.data.workers = 16, 2, 0
    cfg.step.noise_offset = 0.05
    cfg.workdir = str(tmp_path / "run")
    cfg.train.steps, cfg.train.log_every, cfg.train.save_every = 3, 1, 100
    if config.endswith("plus"):      # the plus run trains from a feature cache (the others from pixels)
        cfg.data.cache_dir = str(tmp_path / "cache")
    assert cfg.data.condition == ("face" if config.endswith("face") else "image")
    summary = loop.train(cfg)
    assert np.isfinite(summary["final_loss"])
    if config.endswith("plus"):
        check_sdxl_cache(cfg, tmp_path / "cache")
    state = read_ip_adapter(summary["export"])
    width = fx.SDXL_UNET["cross_attention_dim"]
    if "plus" in config:
        assert state["image_proj.proj_in.weight"].shape == (64, fx.CLIP_HIDDEN)
        assert state["image_proj.proj_out.weight"].shape == (width, 64)
        assert state["image_proj.latents"].shape == (1, 16, 64)
    else:
        assert state["image_proj.proj.weight"].shape == (4 * width, fx.CLIP_DIM)
    assert len([k for k in state if k.endswith("to_k_ip.weight")]) == 11
    unet = UNet2DConditionModel.from_pretrained(paths["sdxl"] / "unet")
    load_ip_adapter(summary["export"], unet)
    if config == "sdxl_ip_adapter":
        # The export is an official-format file: diffusers' SDXL pipeline loads it and samples what ours does.
        from diffusers import StableDiffusionXLPipeline as TorchXL

        from ipadapter_jax.pipeline import ImagePromptSpec, StableDiffusionXLPipeline
        from test_sdxl_pipeline import diffusers_run, jax_run

        export = Path(summary["export"])
        theirs = TorchXL.from_pretrained(paths["sdxl"])
        theirs.load_ip_adapter(str(export.parent), subfolder="", weight_name=export.name, image_encoder_folder=None)
        run_paths = {**paths, "latents": tmp_path / "noise.npy"}
        np.save(run_paths["latents"], rng.standard_normal((1, 8, 12, 4)).astype(np.float32))
        embeds = rng.standard_normal((1, fx.CLIP_DIM)).astype(np.float32)
        expected = diffusers_run(theirs, run_paths, embeds=embeds)
        ours = StableDiffusionXLPipeline.from_pretrained(paths["sdxl"])
        ours.load_ip_adapter(export)
        actual = jax_run(ours, run_paths, ip_adapter_prompts=[ImagePromptSpec(embeds=embeds, scale=1.0)])
        assert rel_err(actual, expected) <= 1e-4


def check_sdxl_cache(cfg, cache):
    """The SDXL feature cache holds what the step computes from pixels: both encoders'
    context, the pooled embedding, each record's time ids (original size, crop, target),
    the image encoder's hidden states and the latents' posterior mean; and the constants
    of a dropped caption / image are the encoders' outputs for "" and zero pixels."""
    from ipadapter_jax.convert.components import load_components
    from ipadapter_jax.families.text import penultimate_pair_pooled, time_ids, token_ids
    from ipadapter_jax.models import CLIPVisionModelWithProjection as JaxVision
    from ipadapter_jax.training import data as data_lib
    from ipadapter_jax.training import ip_adapter_task as loop

    components = load_components(cfg.model.pretrained)
    encoder = JaxVision.from_pretrained(cfg.model.image_encoder)
    source = loop.build_source(cfg, components.tokenizers[0], 224, components.tokenizers[1])
    cached = data_lib.CachedSource(cache)
    assert len(cached) == len(source) == 4
    for i in range(len(source)):
        record, features = source[i], cached[i]
        assert set(features) == {"latents", "text_embeds", "image_embeds", "pooled_text_embeds", "time_ids",
                                 "skipped"}
        text = penultimate_pair_pooled(components.text_encoders, [record["input_ids"][None],
                                                                   record["input_ids_2"][None]])
        np.testing.assert_allclose(features["text_embeds"], text.context[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(features["pooled_text_embeds"], text.pooled[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(features["time_ids"], time_ids(record["original_size"],
                                                                     record["crop_top_left"], (16, 16))[0])
        np.testing.assert_allclose(features["image_embeds"],
                                   encoder(record["clip_pixels"][None]).hidden_states[-2][0], rtol=1e-5, atol=1e-5)
        latents = components.vae.encode(record["pixels"][None]).mean * components.vae.scaling_factor
        np.testing.assert_allclose(features["latents"], latents[0], rtol=1e-5, atol=1e-5)
    # image 2 is 24 x 20 (h, w): resized to 19 x 16, cropped from row (19 - 16) // 2 = 1
    assert cached[2]["time_ids"].tolist() == [24, 20, 1, 0, 16, 16]
    constants = loop._constants(components, encoder, cached=True, plus=True)
    empty = [token_ids(tok, "", warn=False) for tok in components.tokenizers]
    text = penultimate_pair_pooled(components.text_encoders, empty)
    np.testing.assert_allclose(constants["empty_text"], text.context[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(constants["empty_pooled"], text.pooled[0], rtol=1e-5, atol=1e-5)
    zero = np.zeros((1, 224, 224, 3), np.float32)
    np.testing.assert_allclose(constants["uncond_image"], encoder(zero).hidden_states[-2][0], rtol=1e-5, atol=1e-5)
