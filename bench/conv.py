"""One 3x3 stride-1 convolution shape on CPU: every JAX path of layers.CONV_PATHS, plus torch's conv2d.

    python bench/conv.py --batch 2 --size 64 --cin 320 --cout 320      # SD1.5's 320-channel resnet conv
    python bench/conv.py --preset sd15 --runs 7      # every 3x3 stride-1 shape of the SD1.5 UNet at 512 px b2
    python bench/conv.py --preset vae --grad         # forward + gradient (input and kernel) instead

Paths: ``xla`` (lax.conv_general_dilated, what nnx.Conv runs), ``im2col`` (one matmul), ``winograd2`` /
``winograd4`` (F(2x2, 3x3) / F(4x4, 3x3), models/winograd.py). Each is jitted with the kernel as an
argument, as in the pipelines, so the Winograd times include the kernel transform G g G^T; that transform
is also timed alone (``transform2`` / ``transform4``). The machine may be shared: the calls are interleaved
(one of each path per round, the order rotated every round) and the median of ``--runs`` rounds is kept,
with the load average before and after in the record. ``chosen`` is what layers.cpu_conv_path picks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import median, report  # noqa: E402

# (batch, map size, C_in, C_out) of every distinct 3x3 stride-1 convolution, by model.
PRESETS = {
    # SD1.5 UNet forward at 512 px, batch 2 (64x64 latents); 8x8 maps are im2col (rows <= 512).
    "sd15": [(2, 64, 4, 320), (2, 64, 320, 320), (2, 64, 640, 320), (2, 64, 960, 320), (2, 64, 640, 640),
             (2, 64, 320, 4), (2, 32, 320, 640), (2, 32, 640, 640), (2, 32, 960, 640), (2, 32, 1280, 640),
             (2, 32, 1920, 640), (2, 32, 1280, 1280), (2, 16, 640, 1280), (2, 16, 1280, 1280),
             (2, 16, 1920, 1280), (2, 16, 2560, 1280)],
    # SD1.5 VAE decode, 64x64 latents -> 512 px, batch 1.
    "vae": [(1, 64, 4, 512), (1, 64, 512, 512), (1, 128, 512, 512), (1, 256, 512, 512), (1, 256, 512, 256),
            (1, 256, 256, 256), (1, 512, 256, 256), (1, 512, 256, 128), (1, 512, 128, 128), (1, 512, 128, 3)],
    # SDXL UNet forward at 1024 px, batch 2 (128x128 latents).
    "sdxl": [(2, 128, 320, 320), (2, 128, 640, 320), (2, 64, 320, 640), (2, 64, 640, 640), (2, 64, 1280, 640),
             (2, 32, 640, 1280), (2, 32, 1280, 1280), (2, 32, 2560, 1280)],
    # The SD1.5 training step at 256 px, batch 1 (32x32 latents): use with --grad.
    "train": [(1, 32, 320, 320), (1, 32, 640, 320), (1, 32, 960, 320), (1, 32, 320, 640)],
}
PATHS = ("xla", "im2col", "winograd2", "winograd4")


def jax_calls(shape, grad: bool):
    """name -> zero-argument blocking call, for each JAX path and the kernel transforms."""
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.models import layers, winograd

    b, s, cin, cout = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, s, s, cin), dtype=np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), dtype=np.float32) / np.sqrt(9 * cin))
    pad = ((1, 1), (1, 1))
    calls = {}
    for name in PATHS:
        fn = layers.CONV_PATHS[name]
        if grad:
            fn = jax.grad(lambda x, k, fn=fn: jnp.sum(fn(x, k, (1, 1), pad) ** 2), argnums=(0, 1))
            f = jax.jit(fn)
        else:
            f = jax.jit(lambda x, k, fn=fn: fn(x, k, (1, 1), pad))
        calls[name] = lambda f=f: jax.block_until_ready(f(x, k))
    for tile in winograd.TILES:
        f = jax.jit(lambda k, tile=tile: winograd.transform_kernel(k, tile))
        calls[f"transform{tile}"] = lambda f=f: jax.block_until_ready(f(k))
    return calls, (x, k)


def torch_call(shape, grad: bool, x, k):
    import torch

    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(np.array(k)).permute(3, 2, 0, 1).contiguous()
    if grad:
        xt.requires_grad_(True)
        wt.requires_grad_(True)

        def call():
            (torch.nn.functional.conv2d(xt, wt, padding=1) ** 2).sum().backward()
    else:
        def call():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, wt, padding=1)
    return call


def measure(shape, runs: int, grad: bool, skip_torch: bool) -> dict:
    """Median seconds of each path on ``shape``, interleaved over ``runs`` rounds."""
    import time

    import jax.numpy as jnp

    from ipadapter_jax.models import layers

    calls, (x, k) = jax_calls(shape, grad)
    if not skip_torch:
        calls["torch"] = torch_call(shape, grad, x, k)
    first = {}
    for name, call in calls.items():                        # compile + warm up, untimed in the medians
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    times = {name: [] for name in calls}
    names = list(calls)
    load_before = os.getloadavg()[0]
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    b, s, cin, cout = shape
    chosen = layers.cpu_conv_path((3, 3, cin, cout), (1, 1), b * s * s, jnp.float32)
    medians = {name: median(v) for name, v in times.items()}
    fastest = min(PATHS, key=medians.__getitem__)
    return dict(shape=dict(batch=b, size=s, cin=cin, cout=cout), grad=grad, runs=runs, chosen=chosen,
                fastest_jax=fastest, medians_ms={n: round(1e3 * v, 2) for n, v in medians.items()},
                first_call_s={n: round(v, 3) for n, v in first.items()},
                times_ms={n: [round(1e3 * t, 2) for t in v] for n, v in times.items()},
                load_avg_before=round(load_before, 2), load_avg_after=round(os.getloadavg()[0], 2))


def row(record: dict) -> str:
    """A markdown table row: shape, each path's median, torch, chosen path, chosen/torch."""
    sh, med = record["shape"], record["medians_ms"]
    cells = [f"{sh['batch']}x{sh['size']}x{sh['size']}, {sh['cin']}->{sh['cout']}"]
    best = min(med[p] for p in PATHS)
    cells += [f"**{med[p]:.1f}**" if med[p] == best else f"{med[p]:.1f}" for p in PATHS]
    cells += [f"{med['transform2']:.2f} / {med['transform4']:.2f}", f"{med.get('torch', float('nan')):.1f}",
              record["chosen"], f"{med[record['chosen']] / med['torch']:.2f}" if "torch" in med else "-",
              f"{record['load_avg_before']:.1f}-{record['load_avg_after']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="every 3x3 stride-1 shape of a model")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="map height = width")
    parser.add_argument("--cin", type=int, default=320)
    parser.add_argument("--cout", type=int, default=320)
    parser.add_argument("--runs", type=int, default=7, help="interleaved rounds (median reported)")
    parser.add_argument("--grad", action="store_true", help="time forward + gradient w.r.t. input and kernel")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    shapes = PRESETS[args.preset] if args.preset else [(args.batch, args.size, args.cin, args.cout)]
    rows = []
    for shape in shapes:
        record = measure(shape, args.runs, args.grad, args.skip_torch)
        report("conv", dict(record, preset=args.preset))
        rows.append(row(record))
    print("| shape (b x h x w, C_in->C_out) | " + " | ".join(PATHS)
          + " | transform F2 / F4 | torch | chosen | chosen/torch | load avg |")
    print("|" + "---|" * (len(PATHS) + 6))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
