"""The FLUX IP-Adapter training task (``configs/flux_ip_adapter.py``, ``task =
"flux_ip_adapter"``; ``configs/flux_ip_adapter_instantx.py``): a new adapter in
XLabs' layout (CLIP ViT-L) or InstantX's (SigLIP) on a frozen FLUX transformer,
trained with the rectified-flow step (``flux_step``) through the one runner
(checkpoints, exact resume, metrics, TensorBoard, NaN stop), exported in its
layout (diffusers' ``load_ip_adapter`` reads XLabs').

Each step encodes its batch with the frozen encoders inside the jitted step:
the VAE's posterior sample (shifted and scaled, 2x2-packed), T5 tokens and
CLIP pooled text of the captions, CLIP ViT-L ``image_embeds`` of the images.
The frozen models are placed by the config's sharding rules over a
``(data, fsdp)`` mesh (FSDP over the 12B transformer: ``mesh.fsdp``), the
adapter and its optimizer state replicated; the batch splits over both axes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from ipadapter_jax.io.errors import BadArgument, Incompatible, Unsupported
from ipadapter_jax.io.hub import resolve
from ipadapter_jax.ip_adapter.flux import INSTANTX, XLABS, FluxIPAdapter, load_flux_ip_adapter, \
    new_flux_ip_adapter, save_flux_ip_adapter
from ipadapter_jax.models.siglip import SiglipVisionModel
from ipadapter_jax.pipeline.flux import FluxPipeline, latent_image_ids, pack_latents
from ipadapter_jax.training import data as data_lib
from ipadapter_jax.training import runner
from ipadapter_jax.training import sharding as sharding_lib
from ipadapter_jax.training.flux_step import FlowStepConfig, FluxTrainModels, draw, flow_loss
from ipadapter_jax.training.ip_adapter_task import METRICS, build_source
from ipadapter_jax.training.optim import make_optimizer, step_lr
from ipadapter_jax.training.runner import Preempted  # noqa: F401 (train.py catches it from here)

log = logging.getLogger(__name__)


class FluxStepModels(nnx.Module):
    """Everything one training step runs: the trained pair and the frozen encoders."""

    def __init__(self, models: FluxTrainModels, vae, clip, t5, image_encoder):
        self.models, self.vae, self.clip, self.t5, self.image_encoder = models, vae, clip, t5, image_encoder


def _flow_config(cfg, scheduler_config: dict) -> FlowStepConfig:
    f = cfg.flow
    shift = f.get("shift", "resolution")
    if shift != "resolution" and not (isinstance(shift, (int, float)) and shift > 0):
        raise BadArgument(f"flow.shift must be 'resolution' or a positive number, got {shift!r}")
    if shift == "resolution" and not scheduler_config.get("use_dynamic_shifting", False):
        shift = float(scheduler_config.get("shift", 1.0))   # schnell: its schedule's fixed shift (1: none)
    return FlowStepConfig(
        logit_mean=float(f.logit_mean), logit_std=float(f.logit_std),
        shift=None if shift == "resolution" else float(shift),
        base_shift=float(scheduler_config.get("base_shift", 0.5)),
        max_shift=float(scheduler_config.get("max_shift", 1.15)),
        base_image_seq_len=int(scheduler_config.get("base_image_seq_len", 256)),
        max_image_seq_len=int(scheduler_config.get("max_image_seq_len", 4096)),
        guidance=float(f.guidance), **{k: float(cfg.step.get(k, 0.05)) for k in
                                       ("image_drop_rate", "text_drop_rate", "both_drop_rate")})


def build_pipeline(cfg) -> tuple[FluxPipeline, FluxIPAdapter]:
    """The frozen FLUX components (a diffusers folder, or a BFL file with
    ``model.model_config``) with the image encoder, and the adapter: a new one
    (``model.num_tokens`` tokens) or ``model.adapter_init``'s."""
    m = cfg.model
    if not m.pretrained or not m.image_encoder:
        raise BadArgument("model.pretrained (a FLUX folder or file) and model.image_encoder (CLIP ViT-L/14) are "
                          "required")
    dtype = jnp.bfloat16 if cfg.step.compute_dtype == "bfloat16" else jnp.float32
    source = resolve(m.pretrained, kind="any", what="FLUX model folder or file", flag="model.pretrained")
    encoder = resolve(m.image_encoder, kind="folder", what="image encoder folder", flag="model.image_encoder")
    if source.is_file():
        pipe = FluxPipeline.from_single_file(source, model_config=m.model_config, image_encoder=encoder,
                                             dtype=dtype)
    else:
        pipe = FluxPipeline.from_pretrained(source, image_encoder=encoder, dtype=dtype)
    layout = m.get("layout", XLABS)
    siglip = isinstance(pipe.image_encoder, SiglipVisionModel)
    if (layout == INSTANTX) != siglip:
        raise Incompatible(f"model.layout={layout!r} takes {'a SigLIP' if layout == INSTANTX else 'a CLIP'} image "
                           f"encoder, but model.image_encoder is {'SigLIP' if siglip else 'CLIP'}")
    # Gradient checkpointing per block (train.remat): the backward pass recomputes each block's activations.
    pipe.transformer.remat = bool(cfg.train.get("remat", False))
    if m.adapter_init:
        adapter = load_flux_ip_adapter(m.adapter_init, pipe.transformer)
    else:
        width = pipe.image_encoder.config.hidden_size if siglip else pipe.image_encoder.config.projection_dim
        adapter = new_flux_ip_adapter(pipe.transformer, width, int(m.num_tokens), rngs=nnx.Rngs(cfg.seed),
                                      layout=layout)
    return pipe, adapter


def train(cfg, evaluation=None) -> dict:
    """Train a FLUX IP-Adapter as ``cfg`` says (resuming from ``cfg.workdir``'s
    latest checkpoint); returns a summary and writes the XLabs-layout file."""
    if evaluation is not None and cfg.train.get("eval_every", 0):
        log.warning("live evaluation of FLUX adapters is not wired yet: train.eval_every is ignored")
    if cfg.data.kind == "cached" or cfg.data.get("cache_dir"):
        raise Unsupported("a feature cache (data.kind='cached' / data.cache_dir) is not supported for FLUX adapters "
                          "yet: train from the images (json, webdataset or tfds data)")
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pipe, adapter = build_pipeline(cfg)
    flow = _flow_config(cfg, pipe.scheduler_config)
    res = int(cfg.data.resolution)
    if res % (2 * pipe.vae_scale):
        raise Incompatible(f"data.resolution={res} must be a multiple of {2 * pipe.vae_scale} for FLUX")
    t5_len = int(cfg.flow.max_sequence_length)
    pipe.tokenizer_2.model_max_length = t5_len     # the data source pads T5 ids to it
    siglip = isinstance(pipe.image_encoder, SiglipVisionModel)
    source = build_source(cfg, pipe.tokenizer, pipe.image_encoder.config.image_size, pipe.tokenizer_2,
                          pixels="siglip" if siglip else "clip")
    mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    if cfg.data.batch_size % mesh.size or cfg.data.batch_size % jax.process_count():
        raise Incompatible(f"data.batch_size={cfg.data.batch_size} must be divisible by the mesh size "
                           f"({mesh.size} devices) and the process count ({jax.process_count()})")
    try:
        loader = data_lib.make_loader(source, batch_size=cfg.data.batch_size // jax.process_count(), seed=cfg.seed,
                                      workers=cfg.data.workers)
    except ValueError as e:
        raise Incompatible(f"data.batch_size={cfg.data.batch_size}: {e}") from e

    models = FluxStepModels(FluxTrainModels(pipe.transformer, adapter), pipe.vae, pipe.text_encoder,
                            pipe.text_encoder_2, pipe.image_encoder)
    adapter_filter = nnx.All(nnx.Param, lambda path, _: path[:2] == ("models", "adapter"))
    graphdef, trainable, frozen = nnx.split(models, adapter_filter, ...)
    optimizer, lr_schedule = make_optimizer(cfg)
    opt_state = optimizer.init(trainable)
    rules = [(pattern, P(*spec)) for pattern, spec in cfg.sharding_rules]
    frozen = jax.device_put(frozen, sharding_lib.param_shardings(frozen, mesh, rules))
    trainable, opt_state = (jax.device_put(t, sharding_lib.param_shardings(t, mesh, ())) for t in
                            (trainable, opt_state))

    lh = res // pipe.vae_scale
    rope = tuple(jnp.asarray(r) for r in pipe.transformer.rope(np.zeros((t5_len, 3), np.float32),
                                                              latent_image_ids(lh, lh)))
    empty_ids = [np.asarray(tok([""], padding="max_length", max_length=length, truncation=True,
                                return_tensors="np").input_ids, np.int32)
                 for tok, length in ((pipe.tokenizer, pipe.tokenizer.model_max_length), (pipe.tokenizer_2, t5_len))]
    shift_factor = pipe.vae.config.shift_factor or 0.0

    def step_fn(trainable, opt_state, frozen, batch, rng):
        m = nnx.merge(graphdef, trainable, frozen)
        k_vae, k_step = jax.random.split(rng)
        latents = m.vae.encode(batch["pixels"]).sample(k_vae)
        x0 = pack_latents((latents - shift_factor) * m.vae.scaling_factor)
        texts = {"context": m.t5(batch["input_ids_2"]), "pooled": m.clip(batch["input_ids"]).pooler_output,
                 "empty_context": m.t5(batch["empty_t5"]), "empty_pooled": m.clip(batch["empty_clip"]).pooler_output}
        image_out = m.image_encoder(batch["clip_pixels"])
        embeds = image_out.pooler_output if siglip else image_out.image_embeds
        encoded = {"latents": x0, "image_embeds": embeds,
                   **jax.tree.map(jax.lax.stop_gradient, texts)}
        draws = draw(k_step, x0.shape[0], x0.shape, flow)

        def loss_fn(params):
            step_models = nnx.merge(graphdef, params, frozen).models
            return flow_loss(step_models, encoded, draws, rope, flow)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    jitted = jax.jit(step_fn, donate_argnums=(0, 1))
    base_rng = jax.random.key(cfg.seed)
    data_iter = iter(loader)

    def step(state, batch, i):
        trainable, opt_state, metrics = jitted(state["trainable"], state["opt_state"], frozen, batch,
                                               jax.random.fold_in(base_rng, i))
        return {"trainable": trainable, "opt_state": opt_state}, metrics

    def batch(i):
        host = next(data_iter)
        skipped = int(np.sum(host.pop("skipped")))
        host = {k: host[k] for k in ("pixels", "clip_pixels", "input_ids", "input_ids_2")}
        n = host["pixels"].shape[0]
        host["empty_clip"], host["empty_t5"] = (np.repeat(ids, n, axis=0) for ids in empty_ids)
        return sharding_lib.put_batch(host, mesh), {"skipped_images": skipped}

    task = runner.Task(state={"trainable": trainable, "opt_state": opt_state}, step=step, batch=batch,
                       lr=step_lr(cfg, lr_schedule), counters=("skipped_images",), data=data_iter,
                       config=cfg.to_dict(), columns=METRICS, samples_per_step=cfg.data.batch_size,
                       desc="FLUX IP-Adapter")
    result = runner.run(task, workdir, cfg.train)
    export = Path(cfg.train.export or workdir / "ip_adapter.safetensors")
    if jax.process_index() == 0:
        trained = nnx.merge(graphdef, result.state["trainable"], frozen).models.adapter
        save_flux_ip_adapter(trained, export)
    return {"steps": cfg.train.steps, "final_loss": result.loss, "export": str(export),
            "skipped_images": result.counts["skipped_images"], "resumed_from": result.start}

