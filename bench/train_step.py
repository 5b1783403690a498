"""One IP-Adapter training step, JAX vs the PyTorch reference, same machine, one run.

    python bench/train_step.py --config small --size 32 --batch 1            # CPU
    python bench/train_step.py --config sd15 --size 32 --batch 1 --runs 2    # SD1.5 architecture at 256 px (CPU)
    python bench/train_step.py --config sd15 --size 64 --batch 8 --dtype bfloat16 --device cuda   # GPU, 512 px
    python bench/train_step.py --config sdxl --size 128 --batch 8 --dtype bfloat16 --device cuda  # GPU, SDXL 1024 px

The step: DDPM add_noise at random timesteps, UNet (frozen) with IP-Adapter branches, MSE on epsilon,
backward to the adapter (image projection + to_k_ip/to_v_ip), AdamW update. Both frameworks start from
cached latents / text / image embeddings (the VAE and encoders are outside the timed step, as with
``data.kind=cached``). PyTorch: diffusers UNet + IPAdapterAttnProcessor2_0, ``torch.optim.AdamW``; on CUDA
under ``torch.autocast(bfloat16)`` (fp32 master weights, like JAX's bf16 compute). MFU: XLA's FLOP count of
the compiled step (cost analysis) over the time, against the card's dense bf16 peak. SDXL configs add the
cached pooled text embedding and per-image time ids (the SDXL step's added conditioning) on both sides.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import median, report, time_runs  # noqa: E402
from sampling import CONFIGS, PEAK_BF16, SCHEDULER, paired_models, torch_ip_state  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small",
                        help="UNet architecture (sdxl: SDXL base, --size 128 for 1024 px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=32, help="latent size (32 = 256 px, 64 = 512 px)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attention", default="auto", help="JAX attention backend (auto, xla, blocked, jax, cudnn)")
    parser.add_argument("--remat", nargs="?", const="full", default="none", choices=["none", "full", "dots"],
                        help="UNet block rematerialisation policy in the backward pass (bare --remat: full)")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import DDPMScheduler

    from ipadapter_jax.training.step import StepConfig, Trainer

    config, clip_dim, _, pooled = CONFIGS[args.config]
    c = config["cross_attention_dim"]
    jdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    torch_unet, ip_state, unet, _ = paired_models(config, clip_dim, jdtype, args.attention)
    torch_unet.train()
    unet.remat = args.remat
    trainer, trainable, frozen = Trainer.create(unet, config=StepConfig(), scheduler_config=SCHEDULER)
    opt_state = trainer.init_optimizer(trainable)

    rng = np.random.default_rng(0)
    b = args.batch
    batch = {"latents": rng.standard_normal((b, args.size, args.size, 4), dtype=np.float32),
             "text_embeds": rng.standard_normal((b, 77, c), dtype=np.float32),
             "image_embeds": rng.standard_normal((b, clip_dim), dtype=np.float32),
             "empty_text": np.zeros((77, c), np.float32)}
    if pooled:
        px = 8 * args.size
        batch.update(pooled_text_embeds=rng.standard_normal((b, pooled), dtype=np.float32),
                     empty_pooled=np.zeros((pooled,), np.float32),
                     time_ids=np.tile(np.array([[px, px, 0, 0, px, px]], np.float32), (b, 1)))
    batch = jax.device_put(batch)
    step = jax.jit(trainer.train_step, donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, batch, jax.random.key(0), jnp.int32(0)).compile()
    compile_s = time.perf_counter() - start
    # XLA's own memory estimate of the compiled step (arguments, outputs, temporaries).
    mem = compiled.memory_analysis()
    memory = {k: round(getattr(mem, f"{k}_size_in_bytes") / 2**30, 3) for k in ("argument", "output", "temp")
              } if mem is not None else {}
    state = {"t": trainable, "o": opt_state, "i": 0}

    def jax_step():
        state["t"], state["o"], metrics = compiled(state["t"], state["o"], frozen, batch, jax.random.key(0),
                                                   jnp.int32(state["i"]))
        state["i"] += 1
        metrics["loss"].block_until_ready()

    first_s = time_runs(jax_step, 1)[0]
    jax_times = time_runs(jax_step, args.runs)
    record = dict(config=args.config, attention=args.attention, remat=args.remat, memory_gib=memory,
                  batch=b, latent=args.size, dtype=args.dtype, runs=args.runs, jax_compile_s=round(compile_s, 3),
                  jax_first_call_s=round(compile_s + first_s, 3), jax_median_s=round(median(jax_times), 4),
                  jax_times_s=[round(t, 4) for t in jax_times], jax_samples_per_s=round(b / median(jax_times), 3))
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None)
        record["jax_tflops"] = round(flops / median(jax_times) / 1e12, 1)
        if peak:
            record["jax_mfu"] = round(flops / median(jax_times) / peak, 3)

    if not args.skip_torch:
        device = args.device
        tu = torch_unet.to(device)
        tu._load_ip_adapter_weights([torch_ip_state(ip_state)], low_cpu_mem_usage=False)
        tu.to(device)
        for p in tu.parameters():
            p.requires_grad_(False)
        params = list(tu.encoder_hid_proj.parameters())
        for proc in tu.attn_processors.values():
            if hasattr(proc, "to_k_ip"):
                params += list(proc.to_k_ip.parameters()) + list(proc.to_v_ip.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        sched = DDPMScheduler.from_config(SCHEDULER)
        tb = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in batch.items()}
        latents = tb["latents"].permute(0, 3, 1, 2).contiguous()
        gen = torch.Generator(device="cpu").manual_seed(0)

        def torch_step():
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, 1000, (b,), generator=gen).to(device)
            noisy = sched.add_noise(latents, noise, t)
            added = {"image_embeds": [tb["image_embeds"][:, None]]}
            if pooled:
                added.update(text_embeds=tb["pooled_text_embeds"], time_ids=tb["time_ids"])
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                pred = tu(noisy, t, encoder_hidden_states=tb["text_embeds"], added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        warm = time_runs(torch_step, 1)[0]
        torch_times = time_runs(torch_step, args.runs)
        record.update(torch_device=device, torch_warmup_s=round(warm, 3), torch_median_s=round(median(torch_times), 4),
                      torch_times_s=[round(t, 4) for t in torch_times],
                      torch_samples_per_s=round(b / median(torch_times), 3),
                      ratio_jax_over_torch=round(median(jax_times) / median(torch_times), 3))
    report("train_step", record)


if __name__ == "__main__":
    main()
