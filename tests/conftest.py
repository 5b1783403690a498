"""Shared test setup: float32 with "highest" matmul precision, and helpers that
build small random reference models with diffusers/transformers and save them
the way users' folders look."""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


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


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
