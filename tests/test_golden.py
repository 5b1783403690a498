"""Golden output: ``python sample.py --no-progress`` on the embedded demo model.

``data/golden_demo_latents.npy`` holds the final latents ([4, 16, 16, 4]
float32, NHWC, before the VAE) that ``python sample.py --no-progress
--save-latents ...`` wrote on CPU in float32. Written before the package was
restructured; rewritten once since, when the CPU convolutions moved to the
Winograd paths (1.1e-5 of rounding; against diffusers that generation is
rel 3.0e-6, the earlier one 4.1e-6). The same command must reproduce them to
1e-6: a refactor that changes any number (defaults, prompt handling, seeding,
scheduler, guidance, adapter, encoders) fails here even where it stays within
the parity tests' relative bounds.

It runs with XLA's default compiler settings, as users run sample.py: the
test run's settings (helpers.TEST_XLA_FLAGS) round the generated loops
differently, 1.1e-5 over the 25 steps, which is within every parity bound but
not within this one.

To regenerate after an intended change of the numbers (on CPU):
    python sample.py --no-progress --cache-dir '' --save-latents tests/data/golden_demo_latents.npy
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers import cpu_env

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "data" / "golden_demo_latents.npy"


def test_sample_py_reproduces_the_golden_latents(tmp_path):
    out = tmp_path / "latents.npy"
    env = cpu_env(xla_defaults=True)
    env.pop("IPADAPTER_JAX_DEBUG", None)
    result = subprocess.run([sys.executable, "sample.py", "--no-progress", "--cache-dir", "", "--save-latents",
                             str(out), "--out", str(tmp_path / "demo.png")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    golden = np.load(GOLDEN, allow_pickle=False)
    latents = np.load(out, allow_pickle=False)
    assert latents.shape == golden.shape == (4, 16, 16, 4), (latents.shape, golden.shape)
    print(f"max abs diff to golden: {np.abs(latents - golden).max():.3e}")
    np.testing.assert_allclose(latents, golden, rtol=0, atol=1e-6)
