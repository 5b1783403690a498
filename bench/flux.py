"""FLUX.1 benchmarks: a full-size block forward against diffusers, and the JAX
sampling loop / adapter training step on random weights.

    python bench/flux.py block                    # one double + one single block, 1024 px, fp32, CPU, vs PyTorch
    python bench/flux.py block --size 512 --runs 3
    python bench/flux.py sample --batch 1         # 28-step dev loop + XLabs adapter, full size (a GPU's memory)
    python bench/flux.py train --batch 1          # one adapter training step, full size, frozen transformer bf16
    python bench/flux.py sample --tiny            # the same code on a tiny random transformer (a CPU check)

``block``: random full-size weights (3072 wide, 24 heads of 128) of one
double-stream and one single-stream block, the same weights and inputs on
both sides (4096 image tokens + 512 T5 tokens at 1024 px); the ratio is JAX /
PyTorch (< 1: JAX faster), first JAX call (compile) apart. ``sample`` /
``train`` time JAX alone (diffusers' FLUX with the same random 12B weights
does not fit beside it): steps/s after the compile.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import jax_vs_torch, median, report, time_runs, torch_inference  # noqa: E402

DIM, HEADS, HEAD_DIM = 3072, 24, 128
FULL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56])
TINY = dict(FULL, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])


def bench_block(args) -> None:
    import jax
    import torch
    from diffusers.models.transformers.transformer_flux import (FluxPosEmbed, FluxSingleTransformerBlock,
                                                                 FluxTransformerBlock)
    from flax import nnx

    from ipadapter_jax.io.params import load_state_dict_into
    from ipadapter_jax.models import flux
    from ipadapter_jax.pipeline.flux import latent_image_ids

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    side = args.size // 16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, side * side, DIM)).astype(np.float32)
    ctx = rng.standard_normal((1, args.text, DIM)).astype(np.float32)
    temb = rng.standard_normal((1, DIM)).astype(np.float32)
    ids = np.concatenate([np.zeros((args.text, 3), np.float32), latent_image_ids(2 * side, 2 * side)])
    rope = tuple(jax.numpy.asarray(r) for r in flux.rope_tables(ids, (16, 56, 56)))
    with torch.no_grad():
        ref_rope = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(torch.from_numpy(ids))
    record = {"size_px": args.size, "image_tokens": side * side, "text_tokens": args.text}
    for kind, torch_cls, ours_cls in (("double", FluxTransformerBlock, flux.FluxTransformerBlock),
                                      ("single", FluxSingleTransformerBlock, flux.FluxSingleTransformerBlock)):
        torch.manual_seed(0)
        ref = torch_cls(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM).eval()
        state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
        block, _ = load_state_dict_into(lambda: ours_cls(DIM, HEADS, HEAD_DIM, dtype=jax.numpy.float32,
                                                         backend=args.backend, rngs=nnx.Rngs(0)), state,
                                        source="random block")
        graphdef, params = nnx.split(block)
        if kind == "double":
            fn = jax.jit(lambda p, x, c, t, r: nnx.merge(graphdef, p)(x, c, t, r))
            jax_call = lambda: jax.block_until_ready(fn(params, x, ctx, temb, rope))  # noqa: E731
            tx, tc, tt = (torch.from_numpy(a) for a in (x, ctx, temb))
            torch_call = torch_inference(lambda: ref(tx, tc, tt, ref_rope), "cpu")
        else:
            joint = np.concatenate([ctx, x], axis=1)
            fn = jax.jit(lambda p, h, t, r: nnx.merge(graphdef, p)(h, t, r))
            jax_call = lambda: jax.block_until_ready(fn(params, joint, temb, rope))  # noqa: E731
            tx, tc, tt = (torch.from_numpy(a) for a in (x, ctx, temb))
            torch_call = torch_inference(lambda: ref(tx, tc, tt, ref_rope), "cpu")
        fields, _, _ = jax_vs_torch(jax_call, torch_call, args.runs)
        record[kind] = fields
        del ref, block, params, state
        gc.collect()
    total_jax = record["double"]["jax_median_s"] + record["single"]["jax_median_s"]
    total_torch = record["double"]["torch_median_s"] + record["single"]["torch_median_s"]
    record["ratio_jax_over_torch"] = round(total_jax / total_torch, 3)
    report("flux_block", record)


def _random_pipeline(args):
    """A FluxPipeline around a random transformer of the chosen size (no files: components built in memory)."""
    import jax.numpy as jnp
    from flax import nnx

    from ipadapter_jax.ip_adapter.flux import new_flux_ip_adapter
    from ipadapter_jax.models.flux import FluxTransformer2DModel

    import jax

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    cfg = TINY if args.tiny else FULL
    # Built abstractly, then materialised in the compute dtype: 12B float32 parameters would not fit beside
    # the activations on an 80 GB accelerator (a bf16 checkpoint is what users run there).
    abstract = nnx.eval_shape(lambda: FluxTransformer2DModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: (jax.random.normal(next(keys), a.shape, dtype) * 0.02).astype(dtype), state)
    transformer = nnx.merge(graphdef, state)
    adapter = new_flux_ip_adapter(transformer, 768, 16, rngs=nnx.Rngs(1))
    return transformer, adapter, cfg


def bench_sample(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ipadapter_jax.ip_adapter.flux import flux_image_prompt
    from ipadapter_jax.pipeline.flux import FluxModels, latent_image_ids, make_flux_loop
    from ipadapter_jax.schedulers.flow_match import FlowMatchEuler

    transformer, adapter, cfg = _random_pipeline(args)
    size = 64 if args.tiny else args.size
    lh = size // 8
    seq = (lh // 2) ** 2
    sched = FlowMatchEuler({"use_dynamic_shifting": True})
    state = sched.set_timesteps(args.steps, seq)
    models = FluxModels(transformer, [adapter])
    graphdef, params = nnx.split(models)
    b = args.batch
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((b, seq, cfg["in_channels"])), jnp.float32)
    context = jnp.asarray(rng.standard_normal((b, args.text, cfg["joint_attention_dim"])), transformer.dtype)
    pooled = jnp.asarray(rng.standard_normal((b, cfg["pooled_projection_dim"])), jnp.float32)
    rope = tuple(jnp.asarray(r) for r in transformer.rope(np.zeros((args.text, 3), np.float32),
                                                          latent_image_ids(lh, lh)))
    tokens = adapter.project(rng.standard_normal((b, 768)).astype(np.float32))[:, None]
    prompts = (flux_image_prompt(adapter, tokens, 1.0),)
    loop = make_flux_loop(graphdef, sched, true_cfg=False)
    args_ = (params, state, latents, context, pooled, rope, jnp.full((b,), 3.5, jnp.float32), prompts,
             jnp.ones((1, args.steps), jnp.float32), jnp.float32(1.0), jnp.int32(0), jnp.int32(args.steps))
    t0 = time.perf_counter()
    compiled = loop.lower(*args_).compile()
    compile_s = time.perf_counter() - t0
    times = time_runs(lambda: jax.block_until_ready(compiled(*args_)), args.runs)
    report("flux_sample", {"size_px": size, "batch": b, "steps": args.steps, "dtype": args.dtype,
                           "tiny": args.tiny, "compile_s": round(compile_s, 2), "median_s": round(median(times), 3),
                           "steps_per_s": round(args.steps / median(times), 3), "runs": args.runs})


def bench_train(args) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ipadapter_jax.pipeline.flux import latent_image_ids
    from ipadapter_jax.training.flux_step import ADAPTER, FlowStepConfig, FluxTrainModels, make_flux_train_step

    transformer, adapter, cfg = _random_pipeline(args)
    size = 64 if args.tiny else args.size
    lh = size // 8
    seq = (lh // 2) ** 2
    graphdef, trainable, frozen = nnx.split(FluxTrainModels(transformer, adapter), ADAPTER, ...)
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(trainable)
    step = jax.jit(make_flux_train_step(graphdef, optimizer, FlowStepConfig()), donate_argnums=(0, 1))
    b = args.batch
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.standard_normal((b, seq, cfg["in_channels"])), jnp.float32),
             "context": jnp.asarray(rng.standard_normal((b, args.text, cfg["joint_attention_dim"])), jnp.float32),
             "pooled": jnp.asarray(rng.standard_normal((b, cfg["pooled_projection_dim"])), jnp.float32),
             "empty_context": jnp.zeros((1, args.text, cfg["joint_attention_dim"]), jnp.float32),
             "empty_pooled": jnp.zeros((1, cfg["pooled_projection_dim"]), jnp.float32),
             "image_embeds": jnp.asarray(rng.standard_normal((b, 768)), jnp.float32)}
    rope = tuple(jnp.asarray(r) for r in transformer.rope(np.zeros((args.text, 3), np.float32),
                                                          latent_image_ids(lh, lh)))
    state = {"t": trainable, "o": opt_state}

    def call():
        state["t"], state["o"], metrics = step(state["t"], state["o"], frozen, batch, rope, jax.random.key(0))
        jax.block_until_ready(metrics["loss"])

    compile_s = time_runs(call, 1)[0]
    times = time_runs(call, args.runs)
    report("flux_train_step", {"size_px": size, "batch": b, "dtype": args.dtype, "tiny": args.tiny,
                               "first_call_s": round(compile_s, 2), "median_s": round(median(times), 3),
                               "images_per_s": round(b / median(times), 3), "runs": args.runs})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["block", "sample", "train"])
    p.add_argument("--size", type=int, default=1024, help="pixels (default 1024)")
    p.add_argument("--text", type=int, default=512, help="T5 tokens (default 512)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--backend", default="auto", help="JAX attention backend (block; default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="sample / train: a tiny random transformer (CPU check)")
    args = p.parse_args()
    {"block": bench_block, "sample": bench_sample, "train": bench_train}[args.what](args)


if __name__ == "__main__":
    main()
