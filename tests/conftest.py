"""Shared test setup: float32 with "highest" matmul precision, and the fixtures
every test gets. Helpers the test modules import live in ``helpers.py``."""

from __future__ import annotations

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
