"""Start/end of the denoising schedule during which an adapter is active."""

from __future__ import annotations

import numpy as np

from ipadapter_jax.io.errors import BadArgument


def schedule_gates(num_steps: int, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """1.0 for the denoising steps where an adapter is active, else 0.0.

    Step i (0-based) of ``num_steps`` sits at progress i / num_steps of the
    schedule; it is active when ``start <= progress < end`` (``end=1`` keeps
    the last step). Multiply the adapter's scale by the gate of each step.
    """
    if not 0.0 <= start <= end <= 1.0:
        raise BadArgument(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    progress = np.arange(num_steps) / num_steps
    return ((progress >= start) & ((progress < end) | (end >= 1.0))).astype(np.float32)
