"""The cuDNN attention backend against a float64 softmax(q k^T) v, on a GPU (the test suite runs on CPUs,
where the cuDNN backend falls back to XLA's path and only that fallback is checked).

    python bench/attention_parity.py      # in bash bench/gpu.sh; exit 1 when a bound is passed

Shapes of SD 1.5 / SDXL self- and cross-attention (head dims 40, 64, 80; 77 text tokens), bfloat16 and
float16 inputs; bound: relative error <= 1e-2 (the test suite's bound for half-precision backends). Each
row says whether cuDNN's kernel took it (``cudnn_supports``) or XLA's path did.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

SHAPES = [(4096, 4096, 8, 40), (4096, 77, 8, 40), (1024, 1024, 10, 64), (1024, 77, 10, 64), (256, 256, 20, 80)]
BOUND = 1e-2


def reference(q, k, v, scale):
    q, k, v = (x.astype(np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = q @ k.transpose(0, 1, 3, 2) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3)


def main() -> int:
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.models import attention

    if jax.default_backend() not in ("gpu", "cuda"):
        print(f"no NVIDIA GPU ({jax.default_backend()}): the cuDNN backend is not checked here")
        return 0
    rng, worst = np.random.default_rng(0), 0.0
    for lq, lk, heads, dim in SHAPES:
        q = rng.standard_normal((2, lq, heads, dim), dtype=np.float32)
        k, v = (rng.standard_normal((2, lk, heads, dim), dtype=np.float32) for _ in range(2))
        expected = reference(q, k, v, dim ** -0.5)
        for dtype in (jnp.bfloat16, jnp.float16):
            x = [jnp.asarray(a, dtype) for a in (q, k, v)]
            out = np.asarray(attention.dot_product_attention(*x, scale=dim ** -0.5, backend="cudnn"), np.float64)
            err = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))
            worst = max(worst, err)
            kernel = "cudnn" if attention.cudnn_supports(x[0], x[2]) else "xla fallback"
            print(f"q {lq} k {lk} heads {heads} dim {dim} {jnp.dtype(dtype).name}: rel {err:.2e} ({kernel})")
    print(f"worst {worst:.2e} (bound {BOUND})")
    return int(worst > BOUND)


if __name__ == "__main__":
    sys.exit(main())
