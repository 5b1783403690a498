"""UNet forward, Flax (jit) vs diffusers (PyTorch), same weights, same machine, one run.

    python bench/unet_forward.py                      # SD1.5 architecture, batch 2, 64x64, fp32, CPU
    python bench/unet_forward.py --runs 5 --batch 1
    python bench/unet_forward.py --device cuda --dtype bfloat16   # on a GPU machine

Compile time (first call) is reported apart from the median of ``--runs`` timed
calls. The printed ratio is JAX time / PyTorch time (< 1 means JAX is faster).
"""

from __future__ import annotations

import argparse
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
SMALL = dict(SD15, block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32,
             attention_head_dim=4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["sd15", "small"], default="sd15", help="UNet architecture")
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

    from ipadapter_jax.convert import load_state_dict_into
    from ipadapter_jax.models import UNet2DConditionModel

    config = SD15 if args.config == "sd15" else SMALL
    torch.manual_seed(0)
    torch_model = TorchUNet(**config).eval()
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    model, _ = load_state_dict_into(lambda: UNet2DConditionModel(config, dtype=jdtype,
                                                                 attention_backend=args.attention,
                                                                 rngs=nnx.Rngs(0)), state)
    del state
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 4), dtype=np.float32)
    c = rng.standard_normal((args.batch, 77, config["cross_attention_dim"]), dtype=np.float32)
    t = np.full((args.batch,), 500)
    xj, cj, tj = jax.device_put(x), jax.device_put(c), jax.device_put(t)

    compile_s = time_runs(lambda: forward(params, xj, tj, cj).block_until_ready(), 1)[0]
    jax_times = time_runs(lambda: forward(params, xj, tj, cj).block_until_ready(), args.runs)
    record = dict(config=args.config, batch=args.batch, latent=args.size, dtype=args.dtype,
                  attention=args.attention, runs=args.runs, jax_first_call_s=round(compile_s, 3),
                  jax_median_s=round(median(jax_times), 4), jax_times=[round(v, 4) for v in jax_times])

    if not args.skip_torch:
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}[args.torch_dtype or args.dtype]
        torch_model = torch_model.to(args.device, tdtype)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(args.device, tdtype)
        ct = torch.from_numpy(c).to(args.device, tdtype)
        tt = torch.from_numpy(t).to(args.device)

        def torch_forward():
            with torch.no_grad():
                torch_model(xt, tt, ct)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        warm = time_runs(torch_forward, 1)[0]
        torch_times = time_runs(torch_forward, args.runs)
        record.update(torch_device=args.device, torch_dtype=str(tdtype).replace("torch.", ""),
                      torch_threads=torch.get_num_threads(),
                      torch_warmup_s=round(warm, 3), torch_median_s=round(median(torch_times), 4),
                      torch_times=[round(v, 4) for v in torch_times],
                      ratio_jax_over_torch=round(median(jax_times) / median(torch_times), 3))
    report("unet_forward", record)


if __name__ == "__main__":
    main()
