"""UNet forward, Flax (jit) vs diffusers (PyTorch), same weights, same machine, one run.

    python bench/unet_forward.py                      # SD1.5 architecture, batch 2, 64x64, fp32, CPU
    python bench/unet_forward.py --runs 5 --batch 1
    python bench/unet_forward.py --device cuda --dtype bfloat16   # on a GPU machine
    python bench/unet_forward.py --config sdxl --size 128        # SDXL base, batch 2, 1024 px

SDXL's UNet (2.6B parameters) does not fit twice in a 24 GB machine's memory in float32, so
with ``--config sdxl`` PyTorch runs first, is freed, and the JAX UNet gets its own random init
(same architecture and inputs, independent weights: timing does not depend on the values).

Compile time (first call) is reported apart from the median of ``--runs`` timed
calls. The printed ratio is JAX time / PyTorch time (< 1 means JAX is faster).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import median, report, time_runs  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the keys that differ from the defaults).
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
SMALL = dict(SD15, block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32,
             attention_head_dim=4)


def time_torch(torch_model, x, t, c, added, args, record) -> float:
    """Time diffusers' forward on the same inputs; fills ``record``, returns the median."""
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}[args.torch_dtype or args.dtype]
    torch_model = torch_model.to(args.device, tdtype)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(args.device, tdtype)
    ct = torch.from_numpy(c).to(args.device, tdtype)
    tt = torch.from_numpy(t).to(args.device)
    kwargs = {}
    if added is not None:
        kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v).to(args.device, tdtype) for k, v in added.items()}

    def torch_forward():
        with torch.no_grad():
            torch_model(xt, tt, ct, **kwargs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    warm = time_runs(torch_forward, 1)[0]
    torch_times = time_runs(torch_forward, args.runs)
    record.update(torch_device=args.device, torch_dtype=str(tdtype).replace("torch.", ""),
                  torch_threads=torch.get_num_threads(), torch_warmup_s=round(warm, 3),
                  torch_median_s=round(median(torch_times), 4), torch_times=[round(v, 4) for v in torch_times])
    return median(torch_times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["sd15", "small", "sdxl"], default="sd15",
                        help="UNet architecture (sdxl: SDXL base; use --size 128 for 1024 px)")
    parser.add_argument("--batch", type=int, default=2, help="batch (2 = one CFG step at batch 1)")
    parser.add_argument("--size", type=int, default=64, help="latent height/width (64 = 512 px)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per framework (median reported)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="compute dtype (JAX params stay float32; torch casts the model)")
    parser.add_argument("--torch-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="torch compute dtype (default: --dtype); float16 is diffusers' usual GPU setting")
    parser.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "blocked", "jax", "cudnn", "pallas"], help="JAX attention backend")
    parser.add_argument("--skip-torch", action="store_true", help="time JAX only")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from flax import nnx

    from ipadapter_jax.io import load_state_dict_into
    from ipadapter_jax.models import UNet2DConditionModel
    from ipadapter_jax.models.conditioning import UNetConditioning

    config = {"sd15": SD15, "small": SMALL, "sdxl": SDXL}[args.config]
    separate = args.config == "sdxl"     # too big to hold both frameworks' copies (see the docstring)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 4), dtype=np.float32)
    c = rng.standard_normal((args.batch, 77, config["cross_attention_dim"]), dtype=np.float32)
    t = np.full((args.batch,), 500)
    added = None
    if config.get("addition_embed_type") == "text_time":
        px = 8 * args.size
        added = {"text_embeds": rng.standard_normal((args.batch, 1280), dtype=np.float32),
                 "time_ids": np.tile(np.array([[px, px, 0, 0, px, px]], np.float32), (args.batch, 1))}
    record = dict(config=args.config, batch=args.batch, latent=args.size, dtype=args.dtype,
                  attention=args.attention, runs=args.runs, same_weights=not separate)

    torch.manual_seed(0)
    torch_model = TorchUNet(**config).eval()
    state = None if separate else {k: v.numpy() for k, v in torch_model.state_dict().items()}
    torch_median = None
    if not args.skip_torch:
        torch_median = time_torch(torch_model, x, t, c, added, args, record)
    del torch_model
    gc.collect()

    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    build = lambda: UNet2DConditionModel(config, dtype=jdtype, attention_backend=args.attention,  # noqa: E731
                                         rngs=nnx.Rngs(0))
    model = build() if separate else load_state_dict_into(build, state)[0]
    del state
    graphdef, params = nnx.split(model)
    del model
    forward = jax.jit(lambda p, x, t, cond: nnx.merge(graphdef, p)(x, t, cond))
    cond = UNetConditioning(jax.device_put(c), added_cond=None if added is None else jax.device_put(added))
    xj, tj = jax.device_put(x), jax.device_put(t)

    compile_s = time_runs(lambda: forward(params, xj, tj, cond).block_until_ready(), 1)[0]
    jax_times = time_runs(lambda: forward(params, xj, tj, cond).block_until_ready(), args.runs)
    record.update(jax_first_call_s=round(compile_s, 3), jax_median_s=round(median(jax_times), 4),
                  jax_times=[round(v, 4) for v in jax_times])
    if torch_median is not None:
        record["ratio_jax_over_torch"] = round(median(jax_times) / torch_median, 3)
    report("unet_forward", record)


if __name__ == "__main__":
    main()
