"""The whole sampling loop (UNet + IP-Adapter + CFG + DDIM), JAX vs diffusers, same machine, one run.

    python bench/sampling.py --config small --steps 20 --runs 5     # Python overhead dominates (CPU)
    python bench/sampling.py --config sd15 --steps 3 --runs 1       # SD1.5 architecture, 512 px (CPU)
    python bench/sampling.py --config sd15 --steps 50 --batch 1 --batch 8 --dtype bfloat16 --device cuda

Both frameworks get the same random weights (UNet and a base IP-Adapter in the official format), the same
text/image embeddings and the same initial noise. diffusers runs the loop StableDiffusionPipeline runs
(scale_model_input, UNet with IP-Adapter processors, CFG, DDIM step) in float32 on CPU, or float16 with SDPA on
CUDA; JAX runs its single jitted ``fori_loop`` (compile time reported apart). it/s counts denoising steps
(each is one UNet call on the CFG-doubled batch). MFU uses 0.8 TFLOP per 64x64 sample forward (SD1.5, 512 px)
and the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import median, report, time_runs  # noqa: E402
from unet_forward import SD15, SMALL  # noqa: E402

SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def random_ip_adapter(torch_unet, clip_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A base IP-Adapter in the official flat layout for ``torch_unet``."""
    rng = np.random.default_rng(seed)
    c = torch_unet.config.cross_attention_dim
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    state = {"image_proj.proj.weight": w(4 * c, clip_dim), "image_proj.proj.bias": np.zeros(4 * c, np.float32),
             "image_proj.norm.weight": np.ones(c, np.float32), "image_proj.norm.bias": np.zeros(c, np.float32)}
    for p, name in enumerate(torch_unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = torch_unet.get_submodule(name.rsplit(".processor", 1)[0]).to_q.out_features
            state[f"ip_adapter.{p}.to_k_ip.weight"] = w(hidden, c)
            state[f"ip_adapter.{p}.to_v_ip.weight"] = w(hidden, c)
    return state


def paired_models(config: dict, clip_dim: int, dtype, attention: str):
    """The same random SD UNet in diffusers and in JAX, and a random base
    IP-Adapter attached to the JAX one; returns (torch_unet, ip_state, unet, adapter)."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from flax import nnx
    from safetensors.numpy import save_file

    from ipadapter_jax.convert import load_state_dict_into
    from ipadapter_jax.ip_adapter import load_ip_adapter
    from ipadapter_jax.models import UNet2DConditionModel

    torch.manual_seed(0)
    torch_unet = TorchUNet(**config).eval()
    ip_state = random_ip_adapter(torch_unet, clip_dim)
    unet, _ = load_state_dict_into(
        lambda: UNet2DConditionModel(config, dtype=dtype, attention_backend=attention, rngs=nnx.Rngs(0)),
        {k: v.numpy() for k, v in torch_unet.state_dict().items()})
    with tempfile.TemporaryDirectory() as tmp:
        save_file(ip_state, f"{tmp}/ip.safetensors")
        adapter = load_ip_adapter(f"{tmp}/ip.safetensors", unet)
    return torch_unet, ip_state, unet, adapter


def torch_ip_state(ip_state: dict) -> dict:
    """Official flat layout -> the nested dict diffusers' ``_load_ip_adapter_weights`` takes."""
    import torch

    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in ip_state.items():
        group, name = key.split(".", 1)
        nested[group][name] = torch.from_numpy(value)
    return nested


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["sd15", "small"], default="small")
    parser.add_argument("--batch", type=int, action="append", help="images per prompt (repeatable; default 1)")
    parser.add_argument("--size", type=int, default=64, help="latent height/width (64 = 512 px)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per framework (median reported)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="JAX compute dtype (torch uses float16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--attention", default="auto", help="JAX attention backend (auto, xla, blocked, jax, cudnn)")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    batches = args.batch or [1]

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel as TorchUNet
    from flax import nnx

    from ipadapter_jax import ip_adapter as adapters, schedulers
    from ipadapter_jax.models.conditioning import UNetConditioning
    from ipadapter_jax.pipeline import make_denoise_loop

    config = SD15 if args.config == "sd15" else SMALL
    clip_dim = 1024 if args.config == "sd15" else 32
    jdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    torch_unet, ip_state, unet, adapter = paired_models(config, clip_dim, jdtype, args.attention)
    scales = adapters.layer_scales(unet, 0.7)

    sched = schedulers.make_scheduler("ddim", SCHEDULER)
    graphdef, params = nnx.split(unet)
    loop = make_denoise_loop(graphdef, sched, cfg=True)
    c = config["cross_attention_dim"]

    for batch in batches:
        sched_state = sched.set_timesteps(args.steps, sample_shape=(batch, args.size, args.size, 4))
        rng = np.random.default_rng(batch)
        noise = rng.standard_normal((batch, args.size, args.size, 4), dtype=np.float32)
        text = rng.standard_normal((2 * batch, 77, c), dtype=np.float32)
        image_embeds = rng.standard_normal((batch, clip_dim), dtype=np.float32)
        tokens = np.asarray(adapter.project(np.concatenate([np.zeros_like(image_embeds), image_embeds])))
        prompt = adapters.image_prompt(adapter, tokens, scales)
        jargs = (params, sched_state, jnp.asarray(noise) * sched.init_noise_sigma(sched_state),
                 UNetConditioning(jnp.asarray(text), (prompt,)), jnp.ones((1, args.steps), jnp.float32),
                 jnp.float32(7.5), jnp.float32(0.0),
                 jax.random.key(0), jnp.int32(0))
        last = {}

        def jax_loop():
            last["jax"] = loop(*jargs).block_until_ready()

        compile_s = time_runs(jax_loop, 1)[0]
        jax_times = time_runs(jax_loop, args.runs)
        jax_latents = np.asarray(last["jax"], np.float32)
        record = dict(config=args.config, attention=args.attention, batch=batch, latent=args.size, steps=args.steps, dtype=args.dtype,
                      runs=args.runs, jax_first_call_s=round(compile_s, 3), jax_median_s=round(median(jax_times), 4),
                      jax_times_s=[round(t, 4) for t in jax_times], jax_it_per_s=round(args.steps / median(jax_times), 3))
        dev = jax.devices()[0]
        if args.config == "sd15" and dev.platform == "gpu":
            flops = 0.8e12 * 2 * batch * args.steps
            peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None)
            record["jax_tflops"] = round(flops / median(jax_times) / 1e12, 1)
            if peak:
                record["jax_mfu"] = round(flops / median(jax_times) / peak, 3)

        if not args.skip_torch:
            tdtype = torch.float16 if args.device.startswith("cuda") else torch.float32
            tu = TorchUNet(**config).eval()
            tu.load_state_dict(torch_unet.state_dict())
            tu._load_ip_adapter_weights([torch_ip_state(ip_state)], low_cpu_mem_usage=False)
            for proc in tu.attn_processors.values():
                if hasattr(proc, "scale"):
                    proc.scale = [0.7]
            tu = tu.to(args.device, tdtype)
            tsched = DDIMScheduler.from_config(SCHEDULER)
            t_text = torch.from_numpy(text).to(args.device, tdtype)
            # The CFG batch [uncond x B; cond x B], one image per row: [2B, 1, D].
            t_img = torch.from_numpy(np.concatenate([np.zeros_like(image_embeds), image_embeds])[:, None]).to(
                args.device, tdtype)
            t_noise = torch.from_numpy(noise).permute(0, 3, 1, 2).to(args.device, tdtype)

            def torch_loop():
                tsched.set_timesteps(args.steps)
                latents = t_noise * tsched.init_noise_sigma
                with torch.no_grad():
                    for t in tsched.timesteps:
                        model_in = tsched.scale_model_input(torch.cat([latents] * 2), t)
                        eps = tu(model_in, t, encoder_hidden_states=t_text,
                                 added_cond_kwargs={"image_embeds": [t_img]}).sample
                        u, cnd = eps.chunk(2)
                        latents = tsched.step(u + 7.5 * (cnd - u), t, latents).prev_sample
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                last["torch"] = latents

            warm = time_runs(torch_loop, 1)[0]
            torch_times = time_runs(torch_loop, args.runs)
            torch_latents = last["torch"].float().permute(0, 2, 3, 1).cpu().numpy()
            record.update(torch_device=args.device, torch_dtype=str(tdtype).replace("torch.", ""),
                          torch_warmup_s=round(warm, 3), torch_median_s=round(median(torch_times), 4),
                          torch_times_s=[round(t, 4) for t in torch_times],
                          torch_it_per_s=round(args.steps / median(torch_times), 3),
                          speedup_jax_over_torch=round(median(torch_times) / median(jax_times), 3),
                          latents_rel_diff=float(np.linalg.norm(jax_latents - torch_latents)
                                                 / np.linalg.norm(torch_latents)))
        report("sampling", record)


if __name__ == "__main__":
    main()
