"""The demo's building blocks: the procedural shapes dataset (grain source and
TFDS builder), the demo tokenizer, the CLIP / VAE objectives against their
PyTorch references, and the step's text-only and "simple adapter" modes."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import rel_err
from ipadapter_jax.demo import recipe, shapes


def test_records_are_deterministic_and_match_their_caption():
    a, b = shapes.make_record(17), shapes.make_record(17)
    assert np.array_equal(a["image"], b["image"]) and a["text"] == b["text"]
    assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8
    assert a["text"] == shapes.caption(a["shape"], a["colour"], a["texture"], a["background"])
    assert not np.array_equal(shapes.make_record(18)["image"], a["image"])
    train, test = shapes.ShapesSource(4, split="train"), shapes.ShapesSource(4, split="test")
    assert not np.array_equal(train[0]["image"], test[0]["image"])
    assert len(train) == 4 and "split='train'" in repr(train)


def test_background_and_shape_colours_are_what_the_caption_says():
    """Corners show the background colour; the centre of a centred plain shape its colour."""
    for colour, background in (("red", "blue"), ("yellow", "black"), ("white", "green")):
        image = shapes.render("square", colour, "plain", background)
        assert np.abs(image[0, 0].astype(int) - shapes.COLOURS[background]).max() <= 2
        assert np.abs(image[32, 32].astype(int) - shapes.COLOURS[colour]).max() <= 2
    assert shapes.caption("circle", "orange", "plain", "red") == "an orange circle on a red background"
    assert shapes.caption("star", "red", "dotted", "blue") == "a red dotted star on a blue background"


def test_partial_captions_name_the_shape_and_leave_out_the_rest_at_random():
    assert shapes.caption("circle", None, None, None) == "a circle"
    assert shapes.caption("star", "orange", "plain", None) == "an orange star"
    assert shapes.caption("cross", None, "dotted", "red") == "a dotted cross on a red background"
    attrs = dict(shape="circle", colour="red", texture="striped", background="blue")
    assert shapes.partial_caption(attrs, np.random.default_rng(0), keep=1.0) == shapes.caption(**attrs)
    assert shapes.partial_caption(attrs, np.random.default_rng(0), keep=0.0) == "a circle"
    complete = 0
    for i in range(64):
        r = shapes.make_record(i)
        assert r["short_text"] == shapes.make_record(i)["short_text"]
        words = r["short_text"].split()
        assert r["shape"] in words and set(words) <= set(r["text"].split()) | {"a", "an"}, r
        complete += r["short_text"] == r["text"]
    assert 0 < complete < 32      # sometimes the whole caption, mostly not


def test_bad_attributes_and_indices_are_refused():
    with pytest.raises(ValueError, match="hexagon"):
        shapes.render("hexagon", "red", "plain", "blue")
    with pytest.raises(ValueError, match="pink"):
        shapes.render("circle", "pink", "plain", "blue")
    with pytest.raises(ValueError, match="split"):
        shapes.ShapesSource(3, split="validation")
    with pytest.raises(IndexError, match="out of range"):
        shapes.ShapesSource(3)[3]


def test_tfds_builder_matches_the_grain_source(tmp_path, monkeypatch):
    """The TFDS dataset (array_record, no TensorFlow) holds exactly the source's
    records (TFDS stores them in its own deterministic shuffled order)."""
    import hashlib

    import tensorflow_datasets as tfds

    builder_cls = shapes.ShapesDataset
    monkeypatch.setattr(builder_cls, "TRAIN_RECORDS", 6)
    monkeypatch.setattr(builder_cls, "TEST_RECORDS", 3)
    builder_cls(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = tfds.builder(recipe.TFDS_NAME, data_dir=str(tmp_path)).as_data_source(split="train")

    def fingerprint(record):
        text = [t.decode() if isinstance(t, bytes) else str(t) for t in (record["text"], record["short_text"])]
        return hashlib.sha256(np.asarray(record["image"], np.uint8).tobytes()).hexdigest(), *text

    stored = sorted(fingerprint(source[i]) for i in range(len(source)))
    reference = shapes.ShapesSource(6)
    assert stored == sorted(fingerprint(reference[i]) for i in range(6))
    images, texts, short = recipe.load_split(tmp_path, "test", text_keys=("text", "short_text"))
    assert images.shape == (3, 64, 64, 3)
    test = shapes.ShapesSource(3, split="test")
    assert sorted(zip(texts, short)) == sorted((test[i]["text"], test[i]["short_text"]) for i in range(3))


def test_demo_tokenizer_spells_every_word_as_one_token(tmp_path):
    tok = recipe.write_tokenizer(tmp_path / "tok")
    for word in shapes.vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("a red dotted star on a blue background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 10
    assert len(tok.tokenize("zebra")) > 1           # unknown words still tokenize (bytes)


def test_batches_are_a_function_of_seed_and_step():
    assert np.array_equal(recipe.batch_indices(0, 5, 100, 8), recipe.batch_indices(0, 5, 100, 8))
    assert not np.array_equal(recipe.batch_indices(0, 5, 100, 8), recipe.batch_indices(0, 6, 100, 8))


def test_clip_loss_matches_transformers(tmp_path):
    """Our towers + contrastive loss give transformers CLIPModel's return_loss value."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from ipadapter_jax.models import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from ipadapter_jax.training import objectives

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=98),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
                        projection_dim=24, logit_scale_init_value=2.0)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, (6, 16)).astype(np.int64)
    ids[:, -1] = 98
    pixels = rng.standard_normal((6, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                         return_loss=True).loss.item()
    text = CLIPTextModelWithProjection.from_pretrained(tmp_path / "clip")
    vision = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip")
    loss, metrics = objectives.clip_contrastive_loss(text(ids.astype(np.int32)).text_embeds,
                                                     vision(pixels).image_embeds, np.float32(2.0))
    assert abs(float(loss) - expected) <= 1e-5 * abs(expected)
    # Repeated captions are all positives: with two identical pairs the target splits between them.
    same = np.eye(6, dtype=bool)
    same[0, 1] = same[1, 0] = True
    loss_same, _ = objectives.clip_contrastive_loss(text(ids.astype(np.int32)).text_embeds,
                                                    vision(pixels).image_embeds, np.float32(2.0), same)
    assert float(loss_same) != pytest.approx(float(loss))


def test_vae_kl_matches_diffusers(tmp_path):
    """The KL term is diffusers' DiagonalGaussianDistribution.kl() per latent element."""
    import jax
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from helpers import nchw, nhwc
    from ipadapter_jax.models import AutoencoderKL
    from ipadapter_jax.training import objectives

    torch.manual_seed(0)
    TorchVAE(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
             layers_per_block=1).save_pretrained(tmp_path / "vae")
    torch_vae = TorchVAE.from_pretrained(tmp_path / "vae").eval()
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = torch_vae.encode(nchw(pixels)).latent_dist
        kl_expected = posterior.kl().sum().item() / posterior.mean.numel()
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    _, metrics = objectives.vae_loss(vae, pixels, jax.random.key(0), kl_weight=1.0)
    assert rel_err(float(metrics["kl"]), kl_expected) <= 1e-5

    # The UNet stage's latent cache: the posterior of every image, batch by batch.
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    with torch.no_grad():
        posterior = torch_vae.encode(nchw(images.astype(np.float32) / 127.5 - 1.0)).latent_dist
    mean, std = recipe.encode_latents(vae, images, batch=2)
    assert rel_err(mean, nhwc(posterior.mean)) <= 1e-5 and rel_err(std, nhwc(posterior.std)) <= 1e-5


def test_unet_captions_mix_full_and_partial_by_seed_and_step():
    ids, short = np.arange(1, 17)[:, None].repeat(3, 1), -np.arange(1, 17)[:, None].repeat(3, 1)
    idx = np.array([3, 3, 0, 15, 7, 9, 2, 11, 4, 4, 1, 8, 13, 6, 5, 10])
    assert np.array_equal(recipe.caption_ids(ids, short, 0.0, 0, 5, idx), ids[idx])
    assert np.array_equal(recipe.caption_ids(ids, short, 1.0, 0, 5, idx), short[idx])
    mixed = recipe.caption_ids(ids, short, 0.5, 0, 5, idx)
    assert np.array_equal(mixed, recipe.caption_ids(ids, short, 0.5, 0, 5, idx))
    assert np.array_equal(np.abs(mixed), ids[idx]) and (mixed > 0).any() and (mixed < 0).any()
    assert not np.array_equal(mixed, recipe.caption_ids(ids, short, 0.5, 0, 6, idx))


def _tiny_unet(adapter: bool):
    from flax import nnx

    from ipadapter_jax import ip_adapter
    from ipadapter_jax.models import UNet2DConditionModel
    from ipadapter_jax.ip_adapter.image_proj import ImageProjModel

    rngs = nnx.Rngs(0)
    unet = UNet2DConditionModel(dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
                                     norm_num_groups=8, cross_attention_dim=16, sample_size=8,
                                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]), rngs=rngs)
    if adapter:
        ad = ip_adapter.IPAdapter.for_unet(unet, ImageProjModel(8, 16, 4, rngs=rngs), variant="base", rngs=rngs)
        ip_adapter.attach(unet, ad)
    return unet


def _step_inputs():
    rng = np.random.default_rng(0)
    return dict(latents=rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
                text=rng.standard_normal((2, 7, 16)).astype(np.float32),
                embeds=rng.standard_normal((2, 8)).astype(np.float32),
                noise=rng.standard_normal((2, 8, 8, 4)).astype(np.float32), t=np.array([10, 700]))


def test_text_only_step_is_the_plain_unet_mse():
    """With no adapter the step trains the UNet on text: loss = MSE(unet(noisy, t, text), noise)."""
    import jax.numpy as jnp

    from ipadapter_jax import schedulers
    from ipadapter_jax.training.step import Trainer

    unet = _tiny_unet(adapter=False)
    trainer, trainable, frozen = Trainer.create(unet, trainable=".*")
    x = _step_inputs()
    loss = trainer.loss(trainable, frozen, x["latents"], x["text"], None, x["noise"], x["t"])
    alphas = jnp.asarray(schedulers.ddpm_alphas_cumprod({}), jnp.float32)
    noisy = schedulers.ddpm_add_noise(alphas, x["latents"], x["noise"], x["t"])
    expected = np.mean((np.asarray(unet(noisy, x["t"], x["text"])) - x["noise"]) ** 2)
    assert rel_err(float(loss), expected) <= 1e-6
    assert {str(p[0]) for p, _ in __import__("flax").nnx.to_flat_state(trainable)} >= {"conv_in", "down_blocks"}


def test_concat_step_appends_image_tokens_to_the_text():
    """The "simple adapter": projected tokens are appended to the text; the UNet's own cross-attention sees them."""
    import jax.numpy as jnp

    from ipadapter_jax import schedulers
    from ipadapter_jax.training.step import StepConfig, Trainer

    unet = _tiny_unet(adapter=True)
    adapter = unet.ip_adapters[0]
    trainer, trainable, frozen = Trainer.create(unet, trainable=r"^ip_adapters/0/image_proj/",
                                                config=StepConfig(image_conditioning="concat"))
    x = _step_inputs()
    loss = trainer.loss(trainable, frozen, x["latents"], x["text"], x["embeds"], x["noise"], x["t"])
    alphas = jnp.asarray(schedulers.ddpm_alphas_cumprod({}), jnp.float32)
    noisy = schedulers.ddpm_add_noise(alphas, x["latents"], x["noise"], x["t"])
    context = np.concatenate([x["text"], np.asarray(adapter.project(x["embeds"]))], axis=1)
    from ipadapter_jax import ip_adapter

    ip_adapter.detach_all(unet)
    expected = np.mean((np.asarray(unet(noisy, x["t"], context)) - x["noise"]) ** 2)
    assert rel_err(float(loss), expected) <= 1e-6
    with pytest.raises(ValueError, match="image_conditioning"):
        Trainer.create(_tiny_unet(adapter=True), config=StepConfig(image_conditioning="sideways"))


def test_eval_cases_and_arguments_are_checked(tmp_path):
    import json

    from ipadapter_jax import eval as eval_lib
    from ipadapter_jax.eval.__main__ import parse_args

    with pytest.raises(FileNotFoundError, match="cases file"):
        eval_lib.load_cases(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        eval_lib.load_cases(bad)
    bad.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(ValueError, match="record 0 lacks"):
        eval_lib.load_cases(bad)
    bad.write_text(json.dumps([{"image": "a.png", "caption": "x"}]))
    with pytest.raises(FileNotFoundError, match="a.png"):
        eval_lib.load_cases(bad)
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path)])       # real weights need the other folders too
    cases = eval_lib.demo_cases(2, start=5)
    assert cases[0].caption == shapes.ShapesSource(7, split="test")[5]["text"]
    table = eval_lib.markdown_table([{"mode": "text", "scale": 0.0, "clip_i": 0.5, "clip_t": 0.25,
                                      "clip_i_std": 0.1, "clip_t_std": 0.05, "n": 2}], "decoupled")
    assert "| decoupled | text | - | 0.500 ± 0.100 | 0.250 ± 0.050 | 2 |" in table


def _fit_config(steps: int):
    import ml_collections

    return ml_collections.ConfigDict({
        "seed": 0,
        "optimizer": {"lr": 0.1, "schedule": "constant", "warmup_steps": 0, "accumulate": 1, "clip_norm": 0.0,
                      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "ema_decay": 0.0},
        "train": {"steps": steps, "save_every": 3, "log_every": 1}})


def test_fit_resumes_exactly_from_its_checkpoint(tmp_path):
    """A stage stopped after 3 steps and restarted with the full budget ends where
    the uninterrupted run ends (batches are a function of (seed, step))."""
    import csv

    import jax
    import jax.numpy as jnp

    data = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)

    def loss_fn(params, frozen, batch, key):
        noise = jax.random.normal(key, batch["x"].shape) * 0.01
        return jnp.mean((batch["x"] + noise - params["w"]) ** 2), {}

    drawn = []   # the steps a run asked batches for: where it started

    def batch_fn(step):
        drawn.append(step)
        return {"x": data[recipe.batch_indices(0, step, len(data), 4)]}

    def start():   # fit donates its input buffers: a fresh state per call
        return {"w": jnp.zeros(4)}

    def metrics(workdir):
        with open(workdir / "metrics.csv") as f:
            return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]

    straight = recipe.fit(_fit_config(6), tmp_path / "a", start(), {}, loss_fn, batch_fn, desc="a")
    recipe.fit(_fit_config(3), tmp_path / "b", start(), {}, loss_fn, batch_fn, desc="b")
    drawn.clear()
    resumed = recipe.fit(_fit_config(6), tmp_path / "b", start(), {}, loss_fn, batch_fn, desc="b")
    assert drawn == [3, 4, 5]   # started from the checkpoint of step 3, not from scratch
    np.testing.assert_array_equal(np.asarray(straight["w"]), np.asarray(resumed["w"]))
    assert [s for s, _ in metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")   # the same losses, step by step


def test_colour_classifier_reads_held_out_records():
    """shapes.classify_colours (the colour check of the demo evaluation) names the shape
    and background colours of rendered records, patterns included."""
    records = [shapes.make_record(i, seed=shapes.SPLIT_SEEDS["test"]) for i in range(120)]
    for r in records:
        assert shapes.classify_colours(r["image"]) == (r["colour"], r["background"]), r["text"]


def test_colour_check_arguments_are_checked():
    from ipadapter_jax.eval.ablation import colour_transfer

    with pytest.raises(ValueError, match="colour must be one of"):
        colour_transfer(None, 4, [("text", 0.0)], prompt="a circle", colour="pink")
    with pytest.raises(ValueError, match="give both prompt and colour"):
        colour_transfer(None, 4, [("text", 0.0)], prompt="a circle")
