"""One attention shape on CPU, forward and forward + backward: the JAX backends against torch's SDPA.

    python bench/attention.py --batch 1 --tokens 1024 --heads 4 --dim 8      # small config, 32x32 latents
    python bench/attention.py --batch 1 --tokens 1024 --heads 8 --dim 40     # SD1.5 top level at 256 px
    python bench/attention.py --batch 1 --tokens 1024 --heads 8 --dim 40 --block-bytes 8388608 --min-rows 256

Backends: ``blocked`` (the CPU default: query blocks in the forward pass, flash attention's backward from the
saved logsumexp, models/attention.py) and ``xla`` (the plain path, autodiff gradient). Forward + backward is
``jax.grad`` of sum(w * attention(q, k, v)) for q, k and v, jitted; torch runs the same with
``scaled_dot_product_attention`` and ``backward``. ``--block-bytes`` / ``--min-rows`` set the backward
pass's block size (attention.BACKWARD_BLOCK_BYTES / BACKWARD_MIN_ROWS) for this run, to measure other
choices. Median of ``--runs``; the first JAX call (compile) is timed apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import median, report, time_runs  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1024, help="query length")
    p.add_argument("--keys", type=int, default=None, help="key length (default: --tokens, self-attention)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=8, help="head dim")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--block-bytes", type=int, default=None, help="attention.BACKWARD_BLOCK_BYTES for this run")
    p.add_argument("--min-rows", type=int, default=None, help="attention.BACKWARD_MIN_ROWS for this run")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from ipadapter_jax.models import attention

    if args.block_bytes is not None:
        attention.BACKWARD_BLOCK_BYTES = args.block_bytes
    if args.min_rows is not None:
        attention.BACKWARD_MIN_ROWS = args.min_rows
    torch.set_num_threads(2)
    b, lq, lk, h, d = args.batch, args.tokens, args.keys or args.tokens, args.heads, args.dim
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.standard_normal(s, dtype=np.float32) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d),
                                                                     (b, lq, h, d)))
    scale = d ** -0.5
    record = {"shape": {"batch": b, "tokens": lq, "keys": lk, "heads": h, "dim": d},
              "backward_blocks": attention.backward_blocks(b * h, lq, lk),
              "block_bytes": attention.BACKWARD_BLOCK_BYTES, "min_rows": attention.BACKWARD_MIN_ROWS}
    grads = {}
    for backend in ("blocked", "xla"):
        attend = lambda q, k, v, backend=backend: attention.dot_product_attention(q, k, v, scale=scale,
                                                                                  backend=backend)
        forward = jax.jit(attend)
        both = jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * attend(q, k, v)), argnums=(0, 1, 2)))
        record[f"{backend}_compile_s"] = round(time_runs(lambda: jax.block_until_ready(both(q, k, v)), 1)[0], 3)
        forward(q, k, v).block_until_ready()
        record[f"{backend}_forward_ms"] = round(1e3 * median(time_runs(
            lambda: forward(q, k, v).block_until_ready(), args.runs)), 2)
        record[f"{backend}_fwd_bwd_ms"] = round(1e3 * median(time_runs(
            lambda: jax.block_until_ready(both(q, k, v)), args.runs)), 2)
        grads[backend] = both(q, k, v)
    record["blocked_vs_xla_grad_rel_err"] = float(max(
        jnp.linalg.norm(a - r) / jnp.linalg.norm(r) for a, r in zip(grads["blocked"], grads["xla"])))

    tq, tk, tv = (torch.from_numpy(x).permute(0, 2, 1, 3).contiguous().requires_grad_(True) for x in (q, k, v))
    tw = torch.from_numpy(w).permute(0, 2, 1, 3)

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=scale)

    def torch_both():
        (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=scale) * tw).sum().backward()

    time_runs(torch_both, 2)
    record["torch_forward_ms"] = round(1e3 * median(time_runs(torch_forward, args.runs)), 2)
    record["torch_fwd_bwd_ms"] = round(1e3 * median(time_runs(torch_both, args.runs)), 2)
    record["ratio_blocked_fwd_bwd_over_torch"] = round(record["blocked_fwd_bwd_ms"] / record["torch_fwd_bwd_ms"], 3)
    return report("attention", record)


if __name__ == "__main__":
    main()
