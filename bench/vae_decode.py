"""VAE decode (latents -> images), JAX vs diffusers' AutoencoderKL, same weights, same machine, one run.

    python bench/vae_decode.py                     # SD1.5's VAE, 64x64 latents -> 512 px, batch 1, fp32, CPU
    python bench/vae_decode.py --batch 4 --device cuda --dtype bfloat16 --torch-dtype float16

The last step of every ``sample.py`` run. Compile time (first call) is reported apart from the median of
``--runs`` timed calls; ratio = JAX time / PyTorch time (< 1: JAX faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import jax_vs_torch, report, torch_inference  # noqa: E402

# diffusers' AutoencoderKL config of runwayml/stable-diffusion-v1-5 (vae/config.json).
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
DTYPES = ("float32", "bfloat16", "float16")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="latent height/width (64 -> 512 px images)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per framework (median reported)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="JAX compute dtype")
    parser.add_argument("--torch-dtype", choices=DTYPES, default=None, help="torch dtype (default: --dtype)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    parser.add_argument("--skip-torch", action="store_true", help="time JAX only")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from flax import nnx

    from ipadapter_jax.io import load_state_dict_into
    from ipadapter_jax.models import AutoencoderKL

    torch.manual_seed(0)
    torch_vae = TorchVAE(**SD15_VAE).eval()
    state = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    jdtype = getattr(jnp, args.dtype)
    vae, _ = load_state_dict_into(lambda: AutoencoderKL(SD15_VAE, dtype=jdtype, rngs=nnx.Rngs(0)), state,
                                  rename=AutoencoderKL.rename_key)
    graphdef, params = nnx.split(vae)
    decode = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))
    latents = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 4), dtype=np.float32)
    z = jnp.asarray(latents)

    tdtype = getattr(torch, args.torch_dtype or args.dtype)
    torch_vae = torch_vae.to(args.device, tdtype)
    tz = torch.from_numpy(latents).permute(0, 3, 1, 2).to(args.device, tdtype)

    torch_decode = torch_inference(lambda: torch_vae.decode(tz).sample, args.device)
    fields, jax_out, torch_out = jax_vs_torch(lambda: decode(params, z).block_until_ready(), torch_decode,
                                              args.runs, skip_torch=args.skip_torch)
    record = dict(model="sd15-vae", batch=args.batch, latent=args.size, image=args.size * 8, dtype=args.dtype,
                  **fields)
    if torch_out is not None:
        t = torch_out.float().permute(0, 2, 3, 1).cpu().numpy()
        record.update(torch_device=args.device, torch_dtype=str(tdtype).replace("torch.", ""),
                      rel_diff=float(np.linalg.norm(np.asarray(jax_out, np.float32) - t) / np.linalg.norm(t)))
    report("vae_decode", record)


if __name__ == "__main__":
    main()
