"""The IP-Adapter training task: build models and data from a config, shard,
run the shared training runner (``runner``: step, log, checkpoint, resume),
export the adapter in the official format.

The base model is read by the one component loader (``convert.components``:
a diffusers folder or a single file, of any family); its family
(``ipadapter_jax.families``) says what the text side needs: SDXL trains with
both text encoders and each image's ``time_ids`` (original size + crop
top-left + target size) built from what its source recorded. Feature caching
(``data.cache_dir``, ``data.kind="cached"``) stores the family's text
conditioning (SDXL: both encoders' context, the pooled embedding, the time ids).

Read top to bottom: ``train(config)`` is the whole recipe in sections.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from ipadapter_jax import ip_adapter
from ipadapter_jax.convert.components import Components, load_components
from ipadapter_jax.families.text import TEXT_CONDITIONING, time_ids, token_ids
from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, MissingFile, Unsupported, UserError
from ipadapter_jax.io.hub import PIPELINE_FOLDER_PATTERNS, resolve, resolve_model_folder
from ipadapter_jax.ip_adapter import variants
from ipadapter_jax.ip_adapter.official import load_ip_adapter, save_ip_adapter
from ipadapter_jax.models import CLIPVisionModelWithProjection
from ipadapter_jax.training import data as data_lib
from ipadapter_jax.training import runner
from ipadapter_jax.training import sharding as sharding_lib
from ipadapter_jax.training import webdataset
from ipadapter_jax.training.optim import EmaState, ema_tracker, find_ema, make_optimizer, step_lr
from ipadapter_jax.training.runner import Preempted, TrainingError
from ipadapter_jax.training.step import StepConfig, Trainer, path_filter

__all__ = ["EmaState", "Preempted", "TrainingError", "build_models", "build_source", "build_trainer", "check_config",
           "ema_tracker", "export_checkpoint", "find_ema", "make_optimizer", "train"]

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config")    # the orbax items of a trainer checkpoint
METRICS = ("step", "loss", "grad_norm", "lr", "steps_per_s", "samples_per_s", "data_wait_s", "skipped_images")


# --------------------------------------------------------------------------- models and data

def _new_adapter(cfg, unet, image_encoder) -> None:
    """Attach a freshly initialised adapter of ``model.variant`` to ``unet``."""
    m = cfg.model
    spec = variants.BY_NAME.get(m.variant)
    if spec is None or spec.new is None:
        trainable = [v.name for v in variants.VARIANTS if v.new is not None]
        raise BadArgument(f"model.variant must be one of {trainable} to train a new adapter, got {m.variant!r}")
    rngs = nnx.Rngs(cfg.seed)
    token_dim = unet.cross_attention_layers()[0].token_dim
    proj = spec.new(token_dim, None if image_encoder is None else image_encoder.config, m.num_tokens, rngs,
                    width=m.get("resampler_dim", 0))
    rank = m.get("lora_rank", 128) if spec.lora else None
    adapter = ip_adapter.IPAdapter.for_unet(unet, proj, variant=spec.name, lora_rank=rank,
                                            shortcut=bool(m.get("shortcut", False)), rngs=rngs)
    adapter.init_from_unet(unet)
    if adapter.lora is not None:
        # The official LoRALinearLayer's start: down ~ N(0, 1 / rank), up = 0 (so the UNet is unchanged).
        key = jax.random.key(cfg.seed + 1)
        for i, lora in enumerate(adapter.lora):
            for j, linear in enumerate((lora.to_q_lora, lora.to_k_lora, lora.to_v_lora, lora.to_out_lora)):
                kernel = linear.down.kernel
                draw = jax.random.normal(jax.random.fold_in(key, 4 * i + j), kernel.shape, jnp.float32) / rank
                kernel.set_value(draw.astype(kernel.dtype))
    ip_adapter.attach(unet, adapter)

# The paper's dropout of the condition (section 4.1.2: 0.05 each), config fields of ``step``.
DROP_RATES = ("image_drop_rate", "text_drop_rate", "both_drop_rate")


def _source(field: str, value: str, what: str, kind: str) -> Path:
    """The folder or file a config field names (a local path or a hub id); a
    ``MissingFile`` naming the field when it is empty or not found."""
    if not value:
        raise MissingFile(f"{field} is required: the {what} (--config.{field}=PATH)")
    if kind == "encoder":
        return resolve_model_folder(value, weights_name="model", what=what, flag=field)
    return resolve(value, kind=kind, what=what, flag=field, allow_patterns=PIPELINE_FOLDER_PATTERNS)


CHOICES = {"data.kind": ("json", "tfds", "webdataset", "cached"), "data.condition": data_lib.CONDITIONS, "step.compute_dtype": ("float32", "bfloat16"),
           "step.prediction_type": ("epsilon", "v_prediction"), "step.image_conditioning": ("decoupled", "concat"),
           "optimizer.schedule": ("constant", "cosine"), "train.remat": ("none", "full", "dots")}


def check_config(cfg, *, evaluation: bool = True) -> None:
    """Refuse bad config values by name before anything is loaded: the fields
    with a fixed set of values (``CHOICES``), sizes and step counts; with
    ``evaluation``, the live evaluation's (``check_eval_config``)."""
    for field, allowed in CHOICES.items():
        section, name = field.split(".")
        value = cfg[section].get(name, allowed[0])
        if value not in allowed:
            raise BadArgument(f"{field} must be one of {list(allowed)}, got {value!r}")
    for field in ("data.batch_size", "data.resolution", "optimizer.accumulate", "model.lora_rank"):
        section, name = field.split(".")
        value = cfg[section].get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadArgument(f"{field} must be an integer >= 1, got {value!r}")
    for field in ("optimizer.lr", "optimizer.ema_decay", "optimizer.clip_norm", "optimizer.weight_decay"):
        section, name = field.split(".")
        value = cfg[section][name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise BadArgument(f"{field} must be a finite number >= 0, got {value!r}")
    if not cfg.optimizer.ema_decay < 1:
        raise BadArgument(f"optimizer.ema_decay must be < 1, got {cfg.optimizer.ema_decay!r}")
    for section, name in (("step", "noise_offset"), ("step", "snr_gamma"), ("model", "resampler_dim"),
                          *(("step", rate) for rate in DROP_RATES)):   # optional fields
        value = cfg[section].get(name, 0)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise BadArgument(f"{section}.{name} must be a finite number >= 0, got {value!r}")
    layers = cfg.model.get("image_layers", "all")
    if not (isinstance(layers, str) and layers.strip()) and not (
            isinstance(layers, (list, tuple)) and layers and all(isinstance(n, str) for n in layers)):
        raise BadArgument(f"model.image_layers must be 'all', 'down', 'mid', 'up' or layer names, got {layers!r}")
    new = variants.BY_NAME.get(cfg.model.get("variant", "base"))
    if cfg.step.get("image_conditioning", "decoupled") == "concat" and not cfg.model.get("adapter_init") and (
            new is not None and new.lora):
        raise BadArgument(f"step.image_conditioning='concat' (the simple adapter) cannot train {new.name!r}: its "
                          "LoRA acts through the image prompt, which concat does not pass; use 'decoupled'")
    if layers != "all" and cfg.step.get("image_conditioning", "decoupled") == "concat":
        raise BadArgument("model.image_layers selects image branches, which step.image_conditioning='concat' (the "
                          "simple adapter) does not have: leave it 'all'")
    rates = [cfg.step.get(rate, 0.05) for rate in DROP_RATES]
    if sum(rates) > 1:
        raise BadArgument(f"step.image_drop_rate + step.text_drop_rate + step.both_drop_rate must be <= 1 (one "
                          f"uniform draw per sample picks at most one), got {' + '.join(map(str, rates))}")
    runner.check_train_config(cfg.train)
    if evaluation:
        check_eval_config(cfg)


def check_eval_config(cfg) -> None:
    """The ``eval`` fields when ``train.eval_every`` > 0: ``eval.cases`` names an existing
    file, ``eval.clip_model`` ("" or) an existing folder, sizes and counts are integers."""
    if not cfg.train.get("eval_every", 0):
        return
    e = cfg.get("eval")
    if e is None or not e.get("cases"):
        raise BadArgument("train.eval_every > 0 needs eval.cases: a JSON list of held-out {'image', 'caption'} "
                          "records (--config.eval.cases=PATH)")
    if e.cases != "demo" and not Path(e.cases).is_file():
        raise MissingFile(f"eval.cases: file not found: {e.cases}")
    if e.get("clip_model") and not Path(e.clip_model).is_dir():
        raise MissingFile(f"eval.clip_model: CLIP model folder not found: {e.clip_model}")
    for name, low in (("grid", 0), ("num_cases", 0), ("steps", 1), ("size", 0)):
        value = e.get(name, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BadArgument(f"eval.{name} must be an integer >= {low}, got {value!r}")
    if e.get("size", 0) % 8:
        raise BadArgument(f"eval.size must be a multiple of 8 (0: data.resolution), got {e.size}")


def build_models(cfg) -> tuple[Components, CLIPVisionModelWithProjection]:
    """The base model's components (a diffusers folder or a single file, with a
    new or loaded IP-Adapter attached to its UNet) and the image encoder, from
    ``cfg.model``; the frozen models compute in ``cfg.step.compute_dtype``."""
    m = cfg.model
    root = _source("model.pretrained", m.pretrained, "Stable Diffusion model (diffusers folder or single file)",
                   "any")
    new = variants.BY_NAME.get(m.variant)
    # FaceID takes ID embeddings only: a new one needs no image encoder.
    optional = not m.image_encoder and not m.adapter_init and new is not None and new.encoder_output is None
    encoder_dir = None if optional else _source("model.image_encoder", m.image_encoder,
                                                "CLIP vision model folder (transformers layout)", "encoder")
    dtype = jnp.bfloat16 if cfg.step.compute_dtype == "bfloat16" else jnp.float32
    components = load_components(root, dtype=dtype, remat=cfg.train.remat)
    image_encoder = None if optional else CLIPVisionModelWithProjection.from_pretrained(encoder_dir, dtype=dtype)
    if m.adapter_init:
        # PlusV2's shortcut: the config's when it asks for it, else what the file says.
        load_ip_adapter(m.adapter_init, components.unet, shortcut=True if m.get("shortcut") else None)
    else:
        _new_adapter(cfg, components.unet, image_encoder)
    return components, image_encoder


def build_source(cfg, tokenizer, clip_size: int = 224, tokenizer_2=None, *, id_embeds: bool = False,
                 pixels: str = "clip"):
    """The data source ``cfg.data`` names (with ``tokenizer_2``, a family with
    two text encoders, records carry ``input_ids_2`` too; ``clip_size`` 0: no
    ``clip_pixels``; ``id_embeds``: records carry their face ID embedding).
    What the sources refuse (a missing file or folder, a malformed dataset) is
    raised as ``MissingFile`` / ``BadFile``."""
    d = cfg.data
    if d.kind not in CHOICES["data.kind"]:
        raise BadArgument(f"data.kind must be one of {list(CHOICES['data.kind'])}, got {d.kind!r}")
    condition = d.get("condition", "image")
    if (condition == "face" or id_embeds) and d.kind == "tfds":
        raise Unsupported("face crops (data.condition='face') and ID embeddings (FaceID) are read from json "
                          "(face_image_file, id_embed_file) or webdataset (KEY.face.jpg, KEY.npy) data, not tfds")
    options = dict(clip_size=clip_size, tokenizer_2=tokenizer_2, condition=condition, id_embeds=id_embeds,
                   pixels=pixels)
    try:
        if d.kind == "json":
            return data_lib.JsonImageTextSource(d.json_file, d.image_root, tokenizer, d.resolution, **options)
        if d.kind == "webdataset":
            index_dir = d.get("index_dir", "") or Path(cfg.workdir) / "shard_index"
            return webdataset.WebDatasetSource(d.shards, tokenizer, d.resolution, index_dir=index_dir, **options)
        if d.kind == "tfds":
            return data_lib.TFDSImageTextSource(d.tfds_name, d.tfds_dir, tokenizer, d.resolution, split=d.split,
                                                image_key=d.image_key, text_key=d.text_key, clip_size=clip_size,
                                                tokenizer_2=tokenizer_2, pixels=pixels)
        return data_lib.CachedSource(d.cache_dir)
    except UserError:
        raise
    except FileNotFoundError as e:
        raise MissingFile(f"data ({d.kind}): {e}") from e
    except ValueError as e:
        raise BadFile(f"data ({d.kind}): {e}") from e


def _cached_source(cfg, source, components: Components, image_encoder, plus: bool) -> data_lib.CachedSource:
    """Encode the dataset once with the frozen VAE / text / image encoders into
    ``data.cache_dir`` (reused when it exists) and train from the cache. The
    cache holds the posterior mean of each latent (one fixed draw instead of a
    fresh sample per step: the usual trade of feature caching) and the family's
    text conditioning (SDXL: both encoders' context, the pooled embedding and
    each image's time ids)."""
    family = components.family
    folder = Path(cfg.data.cache_dir)
    manifest = {"variant": "plus" if plus else "base", "resolution": cfg.data.resolution, "records": len(source),
                "source": repr(source)}
    if len(family.text) > 1:
        manifest["family"] = family.name
    if (folder / "manifest.json").exists():
        found = json.loads((folder / "manifest.json").read_text())
        if found != manifest:
            raise Incompatible(f"feature cache {folder} was made for {found}, not {manifest}; use another "
                               "data.cache_dir or delete it")
        log.info("using cached features in %s", folder)
        return data_lib.CachedSource(folder)
    modules = {"vae": components.vae, "image": image_encoder,
               **{f"text{i}": m for i, m in enumerate(components.text_encoders)}}
    graphs = {name: nnx.split(m) for name, m in modules.items()}
    conditioning = TEXT_CONDITIONING[family.text_conditioning]
    size_conditioning = family.added_conditioning is not None

    @jax.jit
    def encode(states, pixels, ids, clip):
        vae_m, image_m = (nnx.merge(graphs[n][0], states[n]) for n in ("vae", "image"))
        texts = [nnx.merge(graphs[f"text{i}"][0], states[f"text{i}"]) for i in range(len(ids))]
        text = conditioning(texts, ids)
        image_out = image_m(clip)
        out = {"latents": vae_m.encode(pixels).mean * vae_m.scaling_factor, "text_embeds": text.context,
               "image_embeds": image_out.hidden_states[-2] if plus else image_out.image_embeds}
        if text.pooled is not None:
            out["pooled_text_embeds"] = text.pooled
        return out

    def encode_batch(b):
        ids = [b["input_ids"]] + [b[f"input_ids_{i + 2}"] for i in range(len(family.text) - 1)]
        out = encode(states, b["pixels"], ids, b["clip_pixels"])
        if size_conditioning:
            out["time_ids"] = time_ids(b["original_size"], b["crop_top_left"], (cfg.data.resolution,) * 2)
        return out

    states = {name: g[1] for name, g in graphs.items()}
    if jax.process_index() == 0:
        data_lib.cache_features(source, folder, encode_batch, manifest=manifest)
    if jax.process_count() > 1:  # the other processes wait for process 0's cache
        multihost_utils.sync_global_devices("feature cache written")
    return data_lib.CachedSource(folder)


def build_trainer(cfg, components: Components, image_encoder, optimizer, cached: bool):
    """``Trainer.create``'s ``(trainer, trainable, frozen)`` for the attached adapter,
    as ``cfg.step`` / ``cfg.train`` say; without the encoders when training from
    cached features."""
    spec = components.unet.ip_adapters[0].spec
    step_cfg = StepConfig(prediction_type=cfg.step.prediction_type, image_input=spec.input_kind,
                          scaling_factor=components.vae.scaling_factor,
                          image_conditioning=cfg.step.image_conditioning,
                          noise_offset=float(cfg.step.get("noise_offset", 0.0)),
                          snr_gamma=float(cfg.step.get("snr_gamma", 0.0)),
                          image_layer_scale=tuple(float(v) for v in image_layers(cfg, components.unet)),
                          **{name: float(cfg.step.get(name, 0.05)) for name in DROP_RATES})
    return Trainer.create(
        components.unet, vae=None if cached else components.vae,
        text_encoder=None if cached else components.text_encoders[0],
        image_encoder=None if cached else image_encoder, optimizer=optimizer, trainable=cfg.train.trainable,
        config=step_cfg, scheduler_config=components.scheduler_config,
        text_encoder_2=None if cached else next(iter(components.text_encoders[1:]), None))


def _mesh(cfg):
    mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    if cfg.data.batch_size % mesh.size or cfg.data.batch_size % jax.process_count():
        raise Incompatible(f"data.batch_size={cfg.data.batch_size} must be divisible by the mesh size "
                           f"({mesh.size} devices) and the process count ({jax.process_count()})")
    return mesh


def _constants(components: Components, image_encoder, cached: bool, plus: bool) -> dict:
    """What dropped captions / images become: the ids of "" (one row per
    tokenizer: [77], or [n, 77] for a family with n > 1 text encoders) or, with
    cached features, the family's text conditioning of "" (and its pooled
    embedding) and the image encoder on zero pixels, as the encoders are not
    in the step."""
    tokenizers = components.tokenizers
    empty = np.stack([token_ids(tok, "", warn=False)[0] for tok in tokenizers])
    if not cached:
        return {"empty_text": empty if len(tokenizers) > 1 else empty[0]}
    family = components.family
    text = TEXT_CONDITIONING[family.text_conditioning](components.text_encoders, [row[None] for row in empty])
    constants = {"empty_text": np.asarray(text.context[0], np.float32)}
    if text.pooled is not None:
        constants["empty_pooled"] = np.asarray(text.pooled[0], np.float32)
    if plus:
        size = image_encoder.config.image_size
        zero = np.zeros((1, size, size, 3), np.float32)
        constants["uncond_image"] = np.asarray(image_encoder(zero).hidden_states[-2][0], np.float32)
    return constants


# --------------------------------------------------------------------------- the task

def _shard(cfg, mesh, *trees):
    """Each tree placed by the sharding rules (replicated where none matches)."""
    rules = [(pattern, P(*spec)) for pattern, spec in cfg.sharding_rules]
    return [jax.device_put(tree, sharding_lib.param_shardings(tree, mesh, rules)) for tree in trees]


def _task(cfg, trainer, state: dict, frozen, mesh, data_iter, constants: dict, cached: bool,
          lr_schedule, size_conditioning: bool = False, evaluate=None) -> runner.Task:
    """The runner's task: the state ``{"trainable", "opt_state"}``, batches from
    the grain iterator (checkpointed with it) placed over (data, fsdp). With
    ``size_conditioning`` (SDXL's added conditioning) batches get ``time_ids``
    from each record's original size and crop."""
    step_fn = jax.jit(trainer.train_step, donate_argnums=(0, 1))
    base_rng = jax.random.key(cfg.seed)

    def step(state, batch, i):
        trainable, opt_state, metrics = step_fn(state["trainable"], state["opt_state"], frozen, batch, base_rng,
                                                jnp.int32(i))
        return {"trainable": trainable, "opt_state": opt_state}, metrics

    def batch(i):
        host_batch = next(data_iter)
        skipped = int(np.sum(host_batch.pop("skipped")))
        if cached:
            host_batch = {k: host_batch[k] for k in data_lib.CachedSource.FEATURES if k in host_batch}
        else:
            original, crop = host_batch.pop("original_size"), host_batch.pop("crop_top_left")
            if size_conditioning:
                host_batch["time_ids"] = time_ids(original, crop, (cfg.data.resolution,) * 2)
        return sharding_lib.put_batch({**host_batch, **constants}, mesh), {"skipped_images": skipped}

    return runner.Task(state=state, step=step, batch=batch, lr=step_lr(cfg, lr_schedule),
                       counters=("skipped_images",), data=data_iter, config=cfg.to_dict(), columns=METRICS,
                       samples_per_step=cfg.data.batch_size, evaluate=evaluate)


def image_layers(cfg, unet) -> np.ndarray:
    """``model.image_layers`` as a 1.0 / 0.0 mask over ``unet``'s cross-attention layers."""
    try:
        return ip_adapter.image_layer_mask(unet, cfg.model.get("image_layers", "all"))
    except BadArgument as e:
        raise BadArgument(f"model.image_layers: {e}") from None


def without_branches(adapter, mask: np.ndarray):
    """A copy of ``adapter`` with the image branches of the layers ``mask`` leaves out set to
    zero (an all-zero ``to_v_ip`` adds exactly nothing): the official layout has a branch on
    every cross-attention layer, so that is how a file says "no branch here". A copy: a merged
    module shares its arrays with the training state it came from."""
    adapter = nnx.clone(adapter)
    for layer, keep in zip(adapter.layers, mask, strict=True):
        if not keep:
            for proj in (layer.to_k_ip, layer.to_v_ip):
                proj.kernel[...] = jnp.zeros_like(proj.kernel[...])
    return adapter


def _trained_adapter(graphdef, state: dict, rest, mask: np.ndarray):
    """The adapter of a trained state ``{"trainable", "opt_state"}``: its EMA weights when tracked,
    without the branches ``mask`` leaves out."""
    ema = find_ema(state["opt_state"])
    return without_branches(nnx.merge(graphdef, ema if ema is not None else state["trainable"], rest).ip_adapters[0],
                            mask)


# --------------------------------------------------------------------------- train

def _on_every_process(fn, what: str):
    """``fn()``, whose user errors may differ between processes (each reads its own
    shards): every process learns whether any failed and raises, so none is left
    waiting in a collective for one that stopped."""
    error = None
    try:
        result = fn()
    except UserError as e:
        error = e
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and np.any(failed):
            raise BadFile(f"process(es) {np.flatnonzero(failed).tolist()} failed {what} (see their error); "
                          "stopping every process")
    if error is not None:
        raise error
    return result


def train(cfg, evaluation=None) -> dict:
    """Train an IP-Adapter as ``cfg`` says; returns a summary. Resumes from the
    latest checkpoint in ``cfg.workdir`` when there is one. Raises ``Preempted``
    (nothing exported) when a preemption notice stopped it after a checkpoint,
    ``TrainingError`` on a non-finite loss, and a ``UserError`` for a bad
    config, model or dataset (before anything is compiled).

    evaluation: ``(cfg, components, image_encoder, image_layer_mask, workdir) ->
    evaluate`` (``runner.Task.evaluate``), run every ``train.eval_every`` steps;
    ``train.py`` gives ``ipadapter_jax.eval.live.LiveEval`` (samples and CLIP
    scores; the evaluation layer sits above training, so it is passed in). The
    last evaluation is also written to ``<workdir>/eval.json``."""
    check_config(cfg)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # --- models and data (errors here come before any compilation)
    components, image_encoder = build_models(cfg)
    unet, family = components.unet, components.family
    image_layers(cfg, unet)   # names checked before any data is read or cached
    tokenizers = components.tokenizers
    spec = unet.ip_adapters[0].spec          # from the adapter itself (adapter_init may be any variant)
    source = _on_every_process(lambda: build_source(
        cfg, tokenizers[0], 0 if spec.encoder_output is None else image_encoder.config.image_size, *tokenizers[1:],
        id_embeds=spec.needs_face_id), "reading its data")
    if spec.needs_face_id and (cfg.data.kind == "cached" or cfg.data.cache_dir):
        raise Unsupported("feature caching (data.cache_dir / data.kind='cached') of FaceID variants is not "
                          "supported yet: train from the images and ID embeddings (data.cache_dir='')")
    if spec.needs_face_id and cfg.train.get("eval_every", 0):
        raise Unsupported("live evaluation (train.eval_every) of FaceID variants needs ID embeddings of the "
                          "held-out faces, which eval.cases does not carry yet: set train.eval_every=0")
    plus = spec.encoder_output == "hidden_states"
    if cfg.data.kind != "cached" and cfg.data.cache_dir:
        if cfg.data.kind == "webdataset" and jax.process_count() > 1:
            raise Unsupported("data.cache_dir with data.kind='webdataset' and several processes: each process "
                              "reads its own shards, and the cache is written by one; cache on one process, "
                              "or train from the shards (data.cache_dir='')")
        source = _cached_source(cfg, source, components, image_encoder, plus)
    if isinstance(source, data_lib.CachedSource) and family.added_conditioning is not None:
        lacking = [k for k in ("pooled_text_embeds", "time_ids") if k not in source.arrays]
        if lacking:
            raise Incompatible(f"feature cache {source.folder} has no {' / '.join(lacking)}, which an "
                               f"{family.title} model needs: it was made for a model without added "
                               "conditioning; use another data.cache_dir")
    mesh = _mesh(cfg)

    def loader_of(source):
        try:
            # A webdataset source holds this process's shards only: no further split, an own shuffle.
            own = isinstance(source, webdataset.WebDatasetSource)
            return data_lib.make_loader(source, batch_size=cfg.data.batch_size // jax.process_count(),
                                        seed=cfg.seed + jax.process_index() * own, workers=cfg.data.workers,
                                        shard_by_process=not own)
        except UserError:
            raise
        except ValueError as e:   # a dataset smaller than one batch
            raise Incompatible(f"data.batch_size={cfg.data.batch_size}: {e}") from e

    loader = _on_every_process(lambda: loader_of(source), "making its data loader")
    cached = isinstance(source, data_lib.CachedSource)

    # --- the step
    optimizer, lr_schedule = make_optimizer(cfg)
    trainer, trainable, frozen = build_trainer(cfg, components, image_encoder, optimizer, cached)
    constants = _constants(components, image_encoder, cached, plus)
    opt_state = trainer.init_optimizer(trainable)

    # --- sharding, the run, then the adapter in the official format (the EMA weights when tracked)
    mask = image_layers(cfg, components.unet)
    evaluate = None
    if cfg.train.get("eval_every", 0):
        if evaluation is None:
            log.warning("train.eval_every is set but no evaluation was given to train() (train.py gives "
                        "ipadapter_jax.eval.live.LiveEval): not evaluating")
        else:
            evaluate = evaluation(cfg, components, image_encoder, mask, workdir)
    trainable, opt_state, frozen = _shard(cfg, mesh, trainable, opt_state, frozen)
    task = _task(cfg, trainer, {"trainable": trainable, "opt_state": opt_state}, frozen, mesh, iter(loader),
                 constants, cached, lr_schedule, family.added_conditioning is not None, evaluate)
    result = runner.run(task, workdir, cfg.train)
    export = Path(cfg.train.export or workdir / "ip_adapter.safetensors")
    summary = {"steps": cfg.train.steps, "final_loss": result.loss, "export": str(export),
               "skipped_images": result.counts["skipped_images"], "resumed_from": result.start}
    if jax.process_index() == 0:
        save_ip_adapter(_trained_adapter(trainer.unet_graphdef, result.state, frozen["unet"], mask), export)
        if result.evaluation is not None:
            summary["evaluation"] = {k: round(float(v), 6) for k, v in result.evaluation.scalars.items()}
            (workdir / "eval.json").write_text(json.dumps({"step": cfg.train.steps, **summary["evaluation"]},
                                                          indent=1))
    return summary


def export_checkpoint(cfg, step: int | None = None, out: str | os.PathLike | None = None) -> Path:
    """Export the adapter of any saved checkpoint (default: the latest) to the
    official ``.safetensors`` format."""
    check_config(cfg, evaluation=False)     # exporting samples nothing: the eval files may be gone
    manager = runner.checkpoint_manager(cfg.workdir, ITEMS)
    saved = manager.all_steps()
    if not saved:
        raise MissingFile(f"no checkpoint in {Path(cfg.workdir) / 'checkpoints'}")
    step = step if step is not None else max(saved)
    if step not in saved:
        raise MissingFile(f"no checkpoint of step {step} in {Path(cfg.workdir) / 'checkpoints'}; "
                          f"saved steps: {sorted(saved)}")
    components, _ = build_models(cfg)
    graphdef, trainable, rest = nnx.split(components.unet, path_filter(cfg.train.trainable), ...)
    optimizer, _ = make_optimizer(cfg)
    state = runner.restore_state(manager, step, {"trainable": trainable, "opt_state": optimizer.init(trainable)})
    adapter = _trained_adapter(graphdef, state, rest, image_layers(cfg, components.unet))
    return save_ip_adapter(adapter, out or Path(cfg.workdir) / f"ip_adapter_step{step}.safetensors")
