"""The training loop: build models and data from a config, shard, step,
log, checkpoint (orbax, async, resumable), export the adapter.

Read top to bottom: ``train(config)`` is the whole recipe in sections.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from ipadapter_jax import adapters as adapters_lib
from ipadapter_jax.training import data as data_lib
from ipadapter_jax.training import sharding as sharding_lib
from ipadapter_jax.training.step import StepConfig, Trainer, path_filter

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped on purpose (e.g. a non-finite loss); the last good checkpoint is kept."""


# --------------------------------------------------------------------------- building blocks

class EmaState(NamedTuple):
    """Exponential moving average of the parameters, kept in the optimizer
    state so that it is sharded, donated and checkpointed with it."""

    ema: Any


def ema_tracker(decay: float) -> optax.GradientTransformation:
    """Passes updates through unchanged; tracks ``ema = decay * ema + (1 - decay) * new_params``."""

    def init(params):
        return EmaState(jax.tree.map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        return updates, EmaState(jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, new))

    return optax.GradientTransformation(init, update)


def find_ema(opt_state):
    """The EMA parameters inside an optimizer state, or None."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
             if isinstance(s, EmaState)]
    return found[0].ema if found else None


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (paper: lr 1e-4, weight decay 0.01, no clipping) with optional
    warmup/cosine schedule, global-norm clipping, gradient accumulation and a
    parameter EMA (``optimizer.ema_decay`` > 0; exported instead of the raw
    weights)."""
    o = cfg.optimizer
    # Under gradient accumulation the schedule advances once per k micro-steps: express
    # warmup and decay in optimizer updates so they span the run as configured.
    k = max(o.accumulate, 1)
    warmup, total = o.warmup_steps // k, max(cfg.train.steps // k, 1)
    if o.schedule == "constant":
        lr = optax.constant_schedule(o.lr)
        if warmup:
            lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), lr], [warmup])
    elif o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(warmup, 1), total)
    else:
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {o.schedule!r}")
    chain = []
    if o.clip_norm:
        chain.append(optax.clip_by_global_norm(o.clip_norm))
    chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    if o.ema_decay:
        chain.append(ema_tracker(o.ema_decay))
    opt = optax.chain(*chain) if len(chain) > 1 else chain[0]
    if o.accumulate > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=o.accumulate)
    return opt, lr


def build_models(cfg):
    """UNet (+ a new or loaded IP-Adapter), VAE, text encoder, tokenizer, image
    encoder and scheduler config from ``cfg.model``."""
    from transformers import CLIPTokenizer

    from ipadapter_jax import schedulers
    from ipadapter_jax.convert.ip_adapter import load_ip_adapter
    from ipadapter_jax.models import (AutoencoderKL, CLIPTextModel, CLIPVisionModelWithProjection,
                                      UNet2DConditionModel)
    from ipadapter_jax.models.image_proj import ImageProjModel, Resampler

    m = cfg.model
    root = Path(m.pretrained)
    if not m.pretrained or not root.is_dir():
        raise FileNotFoundError(f"model.pretrained must be a diffusers SD folder, got {m.pretrained!r}")
    dtype = jnp.bfloat16 if cfg.step.compute_dtype == "bfloat16" else jnp.float32
    unet = UNet2DConditionModel.from_pretrained(root / "unet", dtype=dtype, remat=cfg.train.remat)
    vae = AutoencoderKL.from_pretrained(root / "vae")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    if not m.image_encoder:
        raise FileNotFoundError("model.image_encoder must be a CLIP vision folder (transformers layout)")
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(m.image_encoder, dtype=dtype)
    if m.adapter_init:
        adapter = load_ip_adapter(m.adapter_init, unet)
    else:
        rngs = nnx.Rngs(cfg.seed)
        c = unet.cross_attention_layers()[0].token_dim
        enc = image_encoder.config
        if m.variant == "base":
            proj = ImageProjModel(enc.projection_dim, c, m.num_tokens, rngs=rngs)
        elif m.variant == "plus":
            proj = Resampler(dim=c, depth=4, dim_head=64, heads=max(c // 64, 1), num_queries=m.num_tokens,
                             embedding_dim=enc.hidden_size, output_dim=c, rngs=rngs)
        else:
            raise ValueError(f"model.variant must be 'base' or 'plus' to train a new adapter, got {m.variant!r}")
        adapter = adapters_lib.IPAdapter.for_unet(unet, proj, variant=m.variant, rngs=rngs)
        adapter.init_from_unet(unet)
        adapters_lib.attach(unet, adapter)
    return unet, vae, text_encoder, tokenizer, image_encoder, schedulers.load_scheduler_config(root)


def build_source(cfg, tokenizer, clip_size: int = 224):
    d = cfg.data
    if d.kind == "json":
        return data_lib.JsonImageTextSource(d.json_file, d.image_root, tokenizer, d.resolution, clip_size=clip_size)
    if d.kind == "tfds":
        return data_lib.TFDSImageTextSource(d.tfds_name, d.tfds_dir, tokenizer, d.resolution, split=d.split,
                                            image_key=d.image_key, text_key=d.text_key, clip_size=clip_size)
    if d.kind == "cached":
        return data_lib.CachedSource(d.cache_dir)
    raise ValueError(f"data.kind must be 'json', 'tfds' or 'cached', got {d.kind!r}")


def _cached_source(cfg, source, vae, text_encoder, image_encoder, plus: bool) -> data_lib.CachedSource:
    """Encode the dataset once with the frozen VAE / text / image encoders into
    ``data.cache_dir`` (reused when it exists) and train from the cache. The
    cache holds the posterior mean of each latent (one fixed draw instead of a
    fresh sample per step: the usual trade of feature caching)."""
    folder = Path(cfg.data.cache_dir)
    manifest = {"variant": "plus" if plus else "base", "resolution": cfg.data.resolution, "records": len(source),
                "source": repr(source)}
    if (folder / "manifest.json").exists():
        found = json.loads((folder / "manifest.json").read_text())
        if found != manifest:
            raise ValueError(f"feature cache {folder} was made for {found}, not {manifest}; use another "
                             "data.cache_dir or delete it")
        log.info("using cached features in %s", folder)
        return data_lib.CachedSource(folder)
    graphs = {name: nnx.split(m) for name, m in
              (("vae", vae), ("text", text_encoder), ("image", image_encoder))}

    @jax.jit
    def encode(states, pixels, ids, clip):
        vae_m = nnx.merge(graphs["vae"][0], states["vae"])
        text_m = nnx.merge(graphs["text"][0], states["text"])
        image_m = nnx.merge(graphs["image"][0], states["image"])
        image_out = image_m(clip)
        return {"latents": vae_m.encode(pixels).mean * vae_m.scaling_factor,
                "text_embeds": text_m(ids).last_hidden_state,
                "image_embeds": image_out.hidden_states[-2] if plus else image_out.image_embeds}

    states = {name: g[1] for name, g in graphs.items()}
    if jax.process_index() == 0:
        data_lib.cache_features(source, folder, lambda b: encode(states, b["pixels"], b["input_ids"],
                                                                  b["clip_pixels"]), manifest=manifest)
    if jax.process_count() > 1:  # the other processes wait for process 0's cache
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("feature cache written")
    return data_lib.CachedSource(folder)


def _metrics_writer(path: Path, resume_step: int):
    """CSV of per-step metrics; on resume, rows past the restored step are dropped
    and the skipped-image count continues from the last kept row."""
    fields = ["step", "loss", "grad_norm", "lr", "steps_per_s", "samples_per_s", "skipped_images"]
    rows = []
    if path.exists() and resume_step:
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    skipped = int(rows[-1]["skipped_images"]) if rows else 0
    return f, writer, skipped


# --------------------------------------------------------------------------- the loop

def train(cfg) -> dict:
    """Train an IP-Adapter as ``cfg`` says; returns a summary. Resumes from the
    latest checkpoint in ``cfg.workdir`` when there is one."""
    import grain.python as grain
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from ipadapter_jax.convert.ip_adapter import save_ip_adapter

    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # --- models and data (errors here come before any compilation)
    unet, vae, text_encoder, tokenizer, image_encoder, sched_cfg = build_models(cfg)
    source = build_source(cfg, tokenizer, image_encoder.config.image_size)
    kind = unet.ip_adapters[0].input_kind          # from the adapter itself (adapter_init may be any variant)
    if kind.startswith("face_id"):
        raise ValueError("training FaceID adapters needs InsightFace embeddings in the data; not supported")
    plus = kind == "hidden_states"
    if cfg.data.kind != "cached" and cfg.data.cache_dir:
        source = _cached_source(cfg, source, vae, text_encoder, image_encoder, plus)
    mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    if cfg.data.batch_size % mesh.size or cfg.data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by the mesh size "
                         f"({mesh.size} devices) and the process count ({jax.process_count()})")
    per_process_batch = cfg.data.batch_size // jax.process_count()
    loader = data_lib.make_loader(source, batch_size=per_process_batch, seed=cfg.seed, workers=cfg.data.workers)
    data_iter = iter(loader)
    cached = isinstance(source, data_lib.CachedSource)
    constants = {"empty_text": (np.asarray(tokenizer("", padding="max_length",
                                                     max_length=tokenizer.model_max_length,
                                                     return_tensors="np").input_ids[0], np.int32))}

    # --- the step
    optimizer, lr_schedule = make_optimizer(cfg)
    step_cfg = StepConfig(prediction_type=cfg.step.prediction_type,
                          image_input="hidden_states" if plus else "image_embeds",
                          scaling_factor=vae.scaling_factor, image_conditioning=cfg.step.image_conditioning)
    trainer, trainable, frozen = Trainer.create(
        unet, vae=None if cached else vae, text_encoder=None if cached else text_encoder,
        image_encoder=None if cached else image_encoder, optimizer=optimizer, trainable=cfg.train.trainable,
        config=step_cfg, scheduler_config=sched_cfg)
    if cached:
        # Dropped captions / images become these constants (the encoders are not in the step).
        constants["empty_text"] = np.asarray(text_encoder(constants["empty_text"][None]).last_hidden_state[0],
                                             np.float32)
        if plus:
            size = image_encoder.config.image_size
            zero = np.zeros((1, size, size, 3), np.float32)
            constants["uncond_image"] = np.asarray(image_encoder(zero).hidden_states[-2][0], np.float32)
    opt_state = trainer.init_optimizer(trainable)

    # --- sharding: params by rules, batch over (data, fsdp)
    rules = [(pattern, P(*spec)) for pattern, spec in cfg.sharding_rules]
    put = lambda tree: jax.device_put(tree, sharding_lib.param_shardings(tree, mesh, rules))
    trainable, opt_state, frozen = put(trainable), put(opt_state), put(frozen)
    step_fn = jax.jit(trainer.train_step, donate_argnums=(0, 1))
    base_rng = jax.random.key(cfg.seed)

    # --- checkpoints: resume from the latest in workdir, else an explicit resume path
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep, enable_async_checkpointing=True)
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                    item_names=("state", "data", "config"))
    start = 0
    restore_from = manager.latest_step()
    if restore_from is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"trainable": trainable, "opt_state": opt_state})
        restored = manager.restore(restore_from, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.PyGrainCheckpointRestore(data_iter)))
        trainable, opt_state = restored.state["trainable"], restored.state["opt_state"]
        start = restore_from
        log.info("resumed from %s at step %d", manager.directory, start)
    metrics_file, writer, skipped_total = (_metrics_writer(workdir / "metrics.csv", start)
                                           if jax.process_index() == 0 else (None, None, 0))

    # --- loop
    last = time.perf_counter()
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="training",
               disable=jax.process_index() != 0)
    loss_value = math.nan
    try:
        for step in bar:
            host_batch = next(data_iter)
            skipped_total += int(np.sum(host_batch.pop("skipped")))
            if cached:
                host_batch = {"latents": host_batch["latents"], "text_embeds": host_batch["text_embeds"],
                              "image_embeds": host_batch["image_embeds"]}
            batch = sharding_lib.put_batch({**host_batch, **constants}, mesh)
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch, base_rng,
                                                    jnp.int32(step))
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                loss_value = float(metrics["loss"])
                if not math.isfinite(loss_value):
                    raise TrainingError(f"loss is {loss_value} at step {step + 1}; stopping. The last good "
                                        f"checkpoint (step {manager.latest_step()}) is kept in {manager.directory}")
                now = time.perf_counter()
                sps = cfg.train.log_every / max(now - last, 1e-9)
                last = now
                row = {"step": step + 1, "loss": loss_value, "grad_norm": float(metrics["grad_norm"]),
                       "lr": float(lr_schedule(step // max(cfg.optimizer.accumulate, 1))), "steps_per_s": sps,
                       "samples_per_s": sps * cfg.data.batch_size, "skipped_images": skipped_total}
                if writer is not None:
                    writer.writerow(row)
                    metrics_file.flush()
                bar.set_postfix(loss=f"{loss_value:.4f}", skipped=skipped_total)
            if (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.steps:
                # Never checkpoint a broken state: the loss and the gradient norm of this step
                # must be finite (finite gradients keep the AdamW update finite).
                if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))):
                    raise TrainingError(f"loss or gradient norm is not finite at step {step + 1}; stopping. "
                                        f"The last good checkpoint (step {manager.latest_step()}) is kept in "
                                        f"{manager.directory}")
                manager.save(step + 1, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
                    data=grain.PyGrainCheckpointSave(data_iter), config=ocp.args.JsonSave(cfg.to_dict())))
    finally:
        manager.wait_until_finished()
        if metrics_file is not None:
            metrics_file.close()

    # --- export the adapter in the official format (the EMA weights when tracked)
    ema = find_ema(opt_state)
    adapter = nnx.merge(trainer.unet_graphdef, ema if ema is not None else trainable, frozen["unet"]).ip_adapters[0]
    export = Path(cfg.train.export or workdir / "ip_adapter.safetensors")
    if jax.process_index() == 0:
        save_ip_adapter(adapter, export)
    return {"steps": cfg.train.steps, "final_loss": loss_value, "export": str(export),
            "skipped_images": skipped_total, "resumed_from": start}


def export_checkpoint(cfg, step: int | None = None, out: str | os.PathLike | None = None) -> Path:
    """Export the adapter of any saved checkpoint (default: the latest) to the
    official ``.safetensors`` format."""
    import orbax.checkpoint as ocp

    from ipadapter_jax.convert.ip_adapter import save_ip_adapter

    unet, *_ = build_models(cfg)
    graphdef, trainable, rest = nnx.split(unet, path_filter(cfg.train.trainable), ...)
    optimizer, _ = make_optimizer(cfg)
    target = {"trainable": trainable, "opt_state": optimizer.init(trainable)}
    manager = ocp.CheckpointManager((Path(cfg.workdir) / "checkpoints").absolute(),
                                    item_names=("state", "data", "config"))
    step = step if step is not None else manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {cfg.workdir}/checkpoints")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    ema = find_ema(restored.state["opt_state"])
    adapter = nnx.merge(graphdef, ema if ema is not None else restored.state["trainable"], rest).ip_adapters[0]
    return save_ip_adapter(adapter, out or Path(cfg.workdir) / f"ip_adapter_step{step}.safetensors")
