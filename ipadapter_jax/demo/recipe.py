"""The demo recipe: every stage of the miniature SD + IP-Adapter, trained
from scratch on the procedural shapes with this package's own code.

    python train.py --config configs/demo/clip.py        # 1. CLIP (text + vision), contrastive
    python train.py --config configs/demo/vae.py         # 2. AutoencoderKL, L1 + L2 + KL
    python train.py --config configs/demo/unet.py        # 3. text-to-image UNet (-> a diffusers SD folder)
    python train.py --config configs/demo/ip_adapter.py  # 4. IP-Adapter on the frozen stack (training.loop)

Stages 1-3 run through ``fit``: batches drawn from the prepared TFDS split
by ``(seed, step)`` on the training runner the IP-Adapter trainer uses
(``training.runner``: orbax checkpoints, metrics.csv), so a killed stage
resumes exactly where it stopped. Stage 4 is the project's regular
IP-Adapter trainer reading the same TFDS dataset by name. Every stage writes
its result in the standard layouts under ``demo.root``: ``tokenizer/``,
``clip/`` (a transformers ``CLIPModel``), ``image_encoder/`` (a
``CLIPVisionModelWithProjection``), ``vae/`` and ``sd/`` (a diffusers
``StableDiffusionPipeline`` folder).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from ipadapter_jax.demo import shapes
from ipadapter_jax.families import SD1
from ipadapter_jax.families.text import token_ids
from ipadapter_jax.io.errors import BadArgument, MissingFile
from ipadapter_jax.io.files import save_safetensors
from ipadapter_jax.io.params import module_state_dict
from ipadapter_jax.models import (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection,
                                  CLIPVisionModelWithProjection, UNet2DConditionModel)
from ipadapter_jax.training import objectives, optim, runner
from ipadapter_jax.training.step import StepConfig, Trainer

log = logging.getLogger(__name__)

TFDS_NAME = "shapes_dataset"
# The sd/ folder's scheduler (and the UNet stage's noise schedule): SD 1.5's, as DDIM.
_SCHEDULER = {**{k: v for k, v in SD1.config("scheduler").items() if k not in ("skip_prk_steps", "trained_betas")},
              "_class_name": "DDIMScheduler", "prediction_type": "epsilon"}


# --------------------------------------------------------------------------- data

def prepare_dataset(data_dir: str | Path) -> Path:
    """Build the TFDS shapes dataset in ``data_dir`` (array_record, no TF) unless it is there."""
    import tensorflow_datasets as tfds

    data_dir = Path(data_dir)
    builder = shapes.ShapesDataset(data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
        log.info("rendering the shapes dataset into %s", data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return data_dir


def load_split(data_dir: str | Path, split: str = "train", *, text_keys: tuple[str, ...] = ("text",)):
    """All images (uint8 [N, 64, 64, 3]) and captions of a prepared split, in
    memory: ``(images, texts)``, or ``(images, texts, short_texts, ...)`` for
    more ``text_keys``."""
    import tensorflow_datasets as tfds

    source = tfds.builder(TFDS_NAME, data_dir=str(data_dir)).as_data_source(split=split)
    records = [source[i] for i in tqdm(range(len(source)), desc=f"reading {split}", leave=False)]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    texts = [[r[k].decode() if isinstance(r[k], bytes) else str(r[k]) for r in records] for k in text_keys]
    return (images, *texts)


def batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The records of one step: a pure function of ``(seed, step)`` (what makes resuming exact)."""
    return np.random.default_rng([seed, step]).integers(0, n, batch)


# --------------------------------------------------------------------------- tokenizer

def byte_alphabet() -> list[str]:
    """CLIP's byte-level BPE alphabet: each of the 256 bytes as a unicode char, in vocabulary order."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return [chr(c) for c in bs] + [chr(256 + i) for i in range(256 - len(bs))]


def write_tokenizer(folder: str | Path):
    """A CLIP byte-level BPE tokenizer whose merges spell every caption word as
    one token (other text still tokenizes, byte by byte). Returns the loaded
    ``CLIPTokenizer``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []

    def add_merge(a, b):
        if (a, b) not in merges:
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))

    for word in shapes.vocabulary():   # left-to-right merges spell each word
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            add_merge(pieces[0], pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]

    def save():
        specials = {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
        (folder / "vocab.json").write_text(json.dumps({**vocab, **specials}, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                           encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
        (folder / "special_tokens_map.json").write_text(json.dumps({
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>"}))
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)

    # Merges of one word can pre-empt another's (ranks are global): repair until
    # every word is a single token.
    for _ in range(20):
        tok = save()
        split_words = [(w, tok.tokenize(w)) for w in shapes.vocabulary() if len(tok.tokenize(w)) > 1]
        if not split_words:
            return tok
        for _, pieces in split_words:
            while len(pieces) > 1:
                add_merge(pieces[0], pieces[1])
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
    raise RuntimeError(f"could not build single-token merges for {split_words}")


# --------------------------------------------------------------------------- the loop of stages 1-3

def fit(cfg, workdir: Path, trainable, frozen, loss_fn: Callable, batch_fn: Callable, *, desc: str):
    """Minimise ``loss_fn(trainable, frozen, batch, key) -> (loss, metrics)``
    for ``cfg.train.steps`` steps with ``cfg.optimizer`` (see
    ``training.optim.make_optimizer``); ``batch_fn(step)`` gives the host batch.
    Runs on the shared training runner (``training.runner``): orbax checkpoints
    every ``cfg.train.save_every`` steps, resumes from the latest, writes
    ``metrics.csv``, stops on a non-finite loss. Returns the trained state (the
    EMA when tracked)."""
    optimizer, lr = optim.make_optimizer(cfg)

    def train_step(trainable, opt_state, frozen, batch, step):
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, {**metrics, "loss": loss,
                                                                   "grad_norm": optax.global_norm(grads)}

    step_fn = jax.jit(train_step, donate_argnums=(0, 1))

    def step(state, batch, i):
        trainable, opt_state, metrics = step_fn(state["trainable"], state["opt"], frozen, batch, jnp.int32(i))
        return {"trainable": trainable, "opt": opt_state}, metrics

    task = runner.Task(state={"trainable": trainable, "opt": optimizer.init(trainable)}, step=step,
                       batch=lambda i: (jax.tree.map(jnp.asarray, batch_fn(i)), {}), lr=optim.step_lr(cfg, lr),
                       desc=desc)
    state = runner.run(task, workdir, cfg.train).state
    ema = optim.find_ema(state["opt"])
    return ema if ema is not None else state["trainable"]


# --------------------------------------------------------------------------- stage 1: CLIP

def _clip_configs(cfg, tokenizer) -> tuple[dict, dict]:
    m = cfg.model
    text = dict(vocab_size=len(tokenizer), hidden_size=m.text_hidden, intermediate_size=4 * m.text_hidden,
                num_hidden_layers=m.text_layers, num_attention_heads=m.heads, projection_dim=m.projection_dim,
                max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu")
    vision = dict(hidden_size=m.vision_hidden, intermediate_size=4 * m.vision_hidden,
                  num_hidden_layers=m.vision_layers, num_attention_heads=m.heads, projection_dim=m.projection_dim,
                  image_size=m.image_size, patch_size=m.patch_size, hidden_act="quick_gelu")
    return text, vision


def save_clip(text_model, vision_model, logit_scale: float, text_cfg: dict, vision_cfg: dict, root: Path):
    """Write ``root/clip`` (transformers ``CLIPModel``: both towers, both
    projections, logit_scale) and ``root/image_encoder`` (the vision tower with
    projection, as IP-Adapter ships its image encoder)."""
    clip_dir = root / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    weights = {**module_state_dict(text_model), **module_state_dict(vision_model),
               "logit_scale": np.asarray(logit_scale, np.float32)}
    save_safetensors(weights, clip_dir / "model.safetensors")
    (clip_dir / "config.json").write_text(json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": text_cfg["projection_dim"],
        "logit_scale_init_value": 2.6592, "text_config": {**text_cfg, "model_type": "clip_text_model"},
        "vision_config": {**vision_cfg, "model_type": "clip_vision_model"}}, indent=2))
    vision_model.save_pretrained(root / "image_encoder")
    size = vision_cfg["image_size"]
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
                 "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(objectives.CLIP_MEAN),
                 "image_std": list(objectives.CLIP_STD), "do_convert_rgb": True}
    for folder in (clip_dir, root / "image_encoder"):
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)


def train_clip(cfg) -> dict:
    root, workdir = Path(cfg.demo.root), Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_dataset(cfg.demo.data_dir)
    tokenizer = write_tokenizer(root / "tokenizer")
    images, texts = load_split(data_dir, "train")
    ids = token_ids(tokenizer, texts, warn=False)
    text_cfg, vision_cfg = _clip_configs(cfg, tokenizer)
    rngs = nnx.Rngs(cfg.seed)
    text = CLIPTextModelWithProjection(text_cfg, rngs=rngs)
    vision = CLIPVisionModelWithProjection(vision_cfg, rngs=rngs)
    graphs = (nnx.graphdef(text), nnx.graphdef(vision))
    trainable = {"text": nnx.state(text, nnx.Param), "vision": nnx.state(vision, nnx.Param),
                 "logit_scale": jnp.asarray(math.log(1 / 0.07), jnp.float32)}

    def loss_fn(params, frozen, batch, key):
        t = nnx.merge(graphs[0], params["text"])(batch["ids"]).text_embeds
        v = nnx.merge(graphs[1], params["vision"])(objectives.clip_normalize(batch["images"])).image_embeds
        same = jnp.all(batch["ids"][:, None] == batch["ids"][None], axis=-1)
        return objectives.clip_contrastive_loss(t, v, params["logit_scale"], same)

    def batch_fn(step):
        idx = batch_indices(cfg.seed, step, len(images), cfg.data.batch_size)
        return {"ids": ids[idx], "images": images[idx]}

    params = fit(cfg, workdir, trainable, {}, loss_fn, batch_fn, desc="clip")
    nnx.update(text, params["text"])
    nnx.update(vision, params["vision"])
    save_clip(text, vision, float(params["logit_scale"]), text_cfg, vision_cfg, root)
    copy_tokenizer(root / "tokenizer", root / "clip")   # a CLIPModel folder carries its tokenizer
    return {"clip": str(root / "clip"), "image_encoder": str(root / "image_encoder")}


# --------------------------------------------------------------------------- stage 2: VAE

def vae_config(cfg) -> dict:
    m = cfg.model
    n = len(m.block_out_channels)
    return dict(block_out_channels=list(m.block_out_channels), down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, latent_channels=4, norm_num_groups=m.norm_num_groups,
                layers_per_block=m.layers_per_block, sample_size=cfg.data.resolution, scaling_factor=1.0)


def train_vae(cfg) -> dict:
    root, workdir = Path(cfg.demo.root), Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    images, _ = load_split(prepare_dataset(cfg.demo.data_dir), "train")
    config = vae_config(cfg)
    vae = AutoencoderKL(config, rngs=nnx.Rngs(cfg.seed))
    graph, trainable = nnx.split(vae, nnx.Param)

    def loss_fn(params, frozen, batch, key):
        pixels = batch["images"].astype(jnp.float32) / 127.5 - 1.0
        return objectives.vae_loss(nnx.merge(graph, params), pixels, key, cfg.model.kl_weight)

    def batch_fn(step):
        return {"images": images[batch_indices(cfg.seed, step, len(images), cfg.data.batch_size)]}

    params = fit(cfg, workdir, trainable, {}, loss_fn, batch_fn, desc="vae")
    nnx.update(vae, params)
    # As for SD: scale latents to unit variance for the UNet (1 / std of posterior samples).
    encode = jax.jit(lambda p, x, k: nnx.merge(graph, p).encode(x).sample(k))
    sample = np.concatenate([np.asarray(encode(params, jnp.asarray(images[i:i + 64], jnp.float32) / 127.5 - 1,
                                               jax.random.key(i))) for i in range(0, 2048, 64)])
    config["scaling_factor"] = float(1.0 / sample.std())
    final = AutoencoderKL(config, rngs=nnx.Rngs(0))
    nnx.update(final, params)
    final.save_pretrained(root / "vae")
    log.info("vae scaling_factor %.5f", config["scaling_factor"])
    return {"vae": str(root / "vae"), "scaling_factor": config["scaling_factor"]}


# --------------------------------------------------------------------------- stage 3: UNet

def unet_config(cfg, cross_attention_dim: int, latent_size: int) -> dict:
    m = cfg.model
    return dict(block_out_channels=list(m.block_out_channels), layers_per_block=m.layers_per_block,
                attention_head_dim=m.attention_head_dim, norm_num_groups=m.norm_num_groups,
                cross_attention_dim=cross_attention_dim, sample_size=latent_size,
                down_block_types=list(m.down_block_types), up_block_types=list(m.up_block_types))


def write_sd_folder(sd: Path, unet, vae_dir: Path, text_encoder, tokenizer_dir: Path):
    """A diffusers ``StableDiffusionPipeline`` folder (loads in PyTorch too)."""
    unet.save_pretrained(sd / "unet")
    text_encoder.save_pretrained(sd / "text_encoder")
    for name, src in (("vae", vae_dir), ("tokenizer", tokenizer_dir)):
        if (sd / name).exists():
            shutil.rmtree(sd / name)
        shutil.copytree(src, sd / name)
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SCHEDULER, indent=2))
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False},
        indent=2))


def encode_latents(vae, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The frozen VAE's posterior (mean, std) of every image, computed once: the
    UNet stage then draws a fresh latent sample per step from these, the same
    distribution as encoding in the step, without running the encoder each time."""
    graph, params = nnx.split(vae)
    encode = jax.jit(lambda p, x: (lambda d: (d.mean, d.std))(nnx.merge(graph, p).encode(x)))
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encoding latents", leave=False):
        mean, std = encode(params, jnp.asarray(images[i:i + batch], jnp.float32) / 127.5 - 1.0)
        means.append(np.asarray(mean))
        stds.append(np.asarray(std))
    return np.concatenate(means), np.concatenate(stds)


def caption_ids(ids: np.ndarray, short_ids: np.ndarray, rate: float, seed: int, step: int,
                idx: np.ndarray) -> np.ndarray:
    """The captions of one batch: each record's partial caption with probability
    ``rate``, else its full one (a pure function of ``(seed, step)``)."""
    use_short = np.random.default_rng([seed, step, 1]).random(len(idx)) < rate
    return np.where(use_short[:, None], short_ids[idx], ids[idx])


def train_unet(cfg) -> dict:
    root, workdir = Path(cfg.demo.root), Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for needed in ("clip", "vae", "tokenizer"):
        if not (root / needed).is_dir():
            raise MissingFile(f"{root / needed} is missing: run the earlier demo stages first "
                              "(configs/demo/clip.py, configs/demo/vae.py)")
    rate = float(cfg.data.get("partial_caption_rate", 0.0))
    if not 0.0 <= rate <= 1.0:
        raise BadArgument(f"data.partial_caption_rate must be in [0, 1], got {rate}")
    images, texts, short_texts = load_split(prepare_dataset(cfg.demo.data_dir), "train",
                                            text_keys=("text", "short_text"))
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    ids, short_ids = token_ids(tokenizer, texts, warn=False), token_ids(tokenizer, short_texts, warn=False)
    text_encoder = CLIPTextModel.from_pretrained(root / "clip")
    vae = AutoencoderKL.from_pretrained(root / "vae")
    mean, std = encode_latents(vae, images)
    unet = UNet2DConditionModel(unet_config(cfg, text_encoder.config.hidden_size, mean.shape[1]),
                                rngs=nnx.Rngs(cfg.seed))
    step_cfg = StepConfig(prediction_type=cfg.step.prediction_type, image_drop_rate=0.0,
                          text_drop_rate=cfg.step.text_drop_rate, both_drop_rate=0.0, scaling_factor=vae.scaling_factor)
    trainer, trainable, frozen = Trainer.create(unet, text_encoder=text_encoder, optimizer=optim.make_optimizer(cfg)[0],
                                                trainable=".*", config=step_cfg, scheduler_config=_SCHEDULER)
    empty = token_ids(tokenizer, [""])[0]

    def loss_fn(params, frozen, batch, key):
        k_latent, k_draws = jax.random.split(key)
        eps = jax.random.normal(k_latent, batch["mean"].shape, jnp.float32)
        step_batch = {"latents": (batch["mean"] + batch["std"] * eps) * vae.scaling_factor,
                      "input_ids": batch["input_ids"], "empty_text": batch["empty_text"]}
        draws = trainer.draw(k_draws, eps.shape[0], eps.shape)
        latents, text, _ = jax.lax.stop_gradient(trainer.encode(frozen, step_batch, draws))
        return trainer.loss(params, frozen, latents, text, None, draws["noise"], draws["timesteps"]), {}

    def batch_fn(step):
        idx = batch_indices(cfg.seed, step, len(images), cfg.data.batch_size)
        return {"mean": mean[idx], "std": std[idx], "empty_text": empty,
                "input_ids": caption_ids(ids, short_ids, rate, cfg.seed, step, idx)}

    params = fit(cfg, workdir, trainable, frozen, loss_fn, batch_fn, desc="unet")
    final = nnx.merge(trainer.unet_graphdef, params, frozen["unet"])
    write_sd_folder(root / "sd", final, root / "vae", text_encoder, root / "tokenizer")
    return {"sd": str(root / "sd")}


STAGES = {"clip": train_clip, "vae": train_vae, "unet": train_unet}


def run_stage(cfg) -> dict:
    """Run the stage named by ``cfg.task`` (clip | vae | unet)."""
    if cfg.task not in STAGES:
        raise BadArgument(f"task must be one of {sorted(STAGES)} for the demo stages, got {cfg.task!r}")
    return STAGES[cfg.task](cfg)
