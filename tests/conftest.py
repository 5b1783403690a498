"""Shared test setup: float32 with "highest" matmul precision, and the fixtures
every test gets. Helpers the test modules import live in ``helpers.py``."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

from helpers import TEST_XLA_FLAGS

jax.config.update("jax_default_matmul_precision", "highest")

_CACHE_VARS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def pytest_configure(config):
    """The test run's XLA compiler settings (helpers.TEST_XLA_FLAGS) and one
    persistent XLA compilation cache for the whole run, made by the main
    process and inherited through the environment by the xdist workers and by
    every train.py / sample.py subprocess. Many tests compile the same programs
    (the same tiny models in several modules, the runs of a resume test): the
    first compiles, the others load. Executables are keyed by their HLO, flags
    and backend, so a hit runs the same code as a compile would. A fresh folder
    per run, removed at the end: nothing carries over between runs."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    # Set before any backend starts (XLA reads the flags once).
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in TEST_XLA_FLAGS.split() if f not in flags])
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    folder = tempfile.mkdtemp(prefix="ipadapter_jax_test_xla_cache_")
    config._ipadapter_jax_cache = folder
    os.environ.update(_CACHE_VARS, JAX_COMPILATION_CACHE_DIR=folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Modules in the order the two xdist workers are handed them: each module runs
# whole on one worker (``--dist loadscope`` in pyproject.toml, so its
# module-scoped reference models are built once, not once per worker). xdist
# gives a worker its next module while it still has a test or two of the last
# one to run, so this is a rough longest-first order, not a schedule. Sorted by
# the module totals measured on 2026-12-01 (BENCHMARKS.md, "Test suite time");
# modules not listed (each under a minute) follow in collection order.
LONGEST_FIRST = (
    "test_train.py", "test_preemption.py", "test_controlnet_pipeline.py", "test_train_step_sdxl.py",
    "test_demo_model.py", "test_unet.py", "test_train_step.py", "test_sdxl_variants.py", "test_pipeline.py",
    "test_unet_sdxl_full.py", "test_train_sharding.py", "test_train_multiprocess.py",
    "test_train_sharding_sdxl.py", "test_unet_sd15_full.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: collection order within a module


def pytest_unconfigure(config):
    folder = getattr(config, "_ipadapter_jax_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
