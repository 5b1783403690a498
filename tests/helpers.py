"""Helpers the test modules import (``from helpers import rel_err, ...``):
NHWC <-> NCHW conversion, weight-file comparison, subprocess environments, and
(re-exported from the parity toolkit, ``ipadapter_jax.parity``) the error
metrics and the per-block outputs of the UNet / VAE on both sides, so that an
end-to-end parity failure names the first block where JAX and diffusers part
ways."""

from __future__ import annotations

import os

import numpy as np


# XLA:CPU compiler settings of the test run (tests/conftest.py sets them; BENCHMARKS.md, "Test suite time").
# The tests' models are tiny, so their time goes to compiling, most of it in LLVM's optimisation of the
# generated loops, not to running: at LLVM level 0 with XLA's expensive LLVM passes off the tests take less
# time (tests/test_train_step.py alone 113 -> 91 s). XLA builds the same programs (HLO, fusions, library calls
# for the matmuls and convolutions); the generated loops round differently at the last bits, and every parity
# bound holds unchanged. IPADAPTER_JAX_TEST_XLA_FLAGS="" runs the suite with XLA's defaults.
TEST_XLA_FLAGS = os.environ.get("IPADAPTER_JAX_TEST_XLA_FLAGS",
                                "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def cpu_env(devices: int | None = None, *, xla_defaults: bool = False) -> dict:
    """The environment of a subprocess test: this run's environment (its
    compilation cache and XLA settings, tests/conftest.py) on CPU, with
    ``devices`` virtual CPU devices (XLA's default of one when None) and,
    with ``xla_defaults``, XLA's default compiler settings instead of the
    test run's (``TEST_XLA_FLAGS``)."""
    drop = set(TEST_XLA_FLAGS.split()) if xla_defaults else set()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform") and f not in drop]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def saved_diffusers(tmp_path_factory, name: str, class_name: str, config: dict, *, seed: int = 0):
    """A random diffusers ``class_name(**config)`` (seeded) saved to a fresh temp folder
    ``name``, the way users' model folders look; returns the folder."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    folder = tmp_path_factory.mktemp(name)
    getattr(diffusers, class_name)(**config).save_pretrained(folder)
    return folder


def nchw(x: np.ndarray):
    """NHWC numpy -> NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t) -> np.ndarray:
    """NCHW torch tensor -> NHWC numpy."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def assert_same_weights_file(a, b) -> None:
    """Two safetensors files hold the same keys with bit-identical tensors."""
    from safetensors.numpy import load_file

    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


# --------------------------------------------------------------------------- comparisons
#
# The error metrics, block names, captured reference blocks and our blocks run on their inputs are the parity
# toolkit's (ipadapter_jax.parity): the tests and `ipadapter-parity` share one comparison code path.
from ipadapter_jax.parity.blocks import BlockInputs, block_figures  # noqa: E402,F401
from ipadapter_jax.parity.capture import capture  # noqa: E402,F401
from ipadapter_jax.parity.metrics import describe, first_over, max_abs, rel_err  # noqa: E402,F401
from ipadapter_jax.parity.names import unet_block_names, vae_block_names  # noqa: E402,F401
