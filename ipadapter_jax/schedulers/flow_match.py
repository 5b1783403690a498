"""diffusers' ``FlowMatchEulerDiscreteScheduler`` as pure functions (FLUX, SD3).

Rectified flow: x_sigma = (1 - sigma) x0 + sigma noise and the model predicts
the velocity noise - x0, so an Euler step is x + (sigma_next - sigma) v. The
sigmas go linearly from 1 to 1/n, then through a shift: a fixed one
(``shift``; schnell: 1) or, with ``use_dynamic_shifting`` (dev), one that grows
with the image's token count: mu interpolates ``base_shift`` ->
``max_shift`` over ``base_image_seq_len`` -> ``max_image_seq_len`` and
sigma -> e^mu / (e^mu + (1/sigma - 1)). Everything is computed on the host in
diffusers' dtypes (float32 sigmas), so ``step`` is one multiply-add.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.io.errors import BadArgument, Unsupported
from ipadapter_jax.schedulers.core import SchedulerState

F32 = np.float32

DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
            "time_shift_type": "exponential", "invert_sigmas": False, "shift_terminal": None,
            "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "stochastic_sampling": False}
# Options diffusers has that change the schedule and are not implemented here: refused, not ignored.
_UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "stochastic_sampling")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's mu: linear in the number of image tokens (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


class FlowMatchEuler:
    """Built from a diffusers ``scheduler_config.json`` dict (keys it does not
    read are ignored) plus keyword overrides. ``set_timesteps(n, image_seq_len)``
    gives the ``SchedulerState``: ``timesteps`` [n] (sigma x 1000, what
    diffusers passes on) and ``tables["sigmas"]`` [n + 1] (ending at 0)."""

    name = "flow-match-euler"
    needs_noise = False

    def __init__(self, config: dict | None = None, **overrides):
        cfg = dict(DEFAULTS)
        cfg.update({k: v for k, v in (config or {}).items() if k in DEFAULTS})
        for key, value in overrides.items():
            if key not in DEFAULTS:
                raise BadArgument(f"unknown option {key!r} for scheduler {self.name!r}; it reads: "
                                  f"{', '.join(sorted(DEFAULTS))}")
            cfg[key] = value
        for key in _UNSUPPORTED:
            if cfg[key]:
                raise Unsupported(f"scheduler config {key}={cfg[key]!r}: not supported by this package's "
                                  f"flow-matching Euler scheduler")
        if cfg["time_shift_type"] not in ("exponential", "linear"):
            raise BadArgument(f"scheduler config time_shift_type {cfg['time_shift_type']!r}: expected "
                              "'exponential' or 'linear'")
        self.config = cfg

    @property
    def cache_key(self) -> tuple:
        return (self.name, json.dumps(self.config, sort_keys=True, default=repr))

    def mu(self, image_seq_len: int) -> float:
        c = self.config
        return calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                               c["max_shift"])

    def sigmas(self, num_inference_steps: int, image_seq_len: int | None = None,
               sigmas: np.ndarray | None = None) -> np.ndarray:
        """The n shifted sigmas (float32) of a schedule; ``sigmas`` replaces the
        linear 1 -> 1/n start as diffusers' ``sigmas=`` argument does."""
        n = int(num_inference_steps)
        if n < 1:
            raise BadArgument(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        base = np.linspace(1.0, 1 / n, n) if sigmas is None else np.asarray(sigmas, np.float64)
        s = base.astype(F32)
        c = self.config
        if c["use_dynamic_shifting"]:
            if image_seq_len is None:
                raise BadArgument("this scheduler shifts by resolution (use_dynamic_shifting): give image_seq_len")
            mu = self.mu(image_seq_len)
            with np.errstate(divide="ignore"):
                if c["time_shift_type"] == "exponential":
                    s = (math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)).astype(F32)
                else:
                    s = (mu / (mu + (1 / s - 1) ** 1.0)).astype(F32)
        else:
            shift = c["shift"]
            s = (shift * s / (1 + (shift - 1) * s)).astype(F32)
        return s

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None,
                      sigmas: np.ndarray | None = None) -> SchedulerState:
        s = self.sigmas(num_inference_steps, image_seq_len, sigmas)
        timesteps = (s * F32(self.config["num_train_timesteps"])).astype(F32)
        return SchedulerState(timesteps=jnp.asarray(timesteps),
                              tables={"sigmas": jnp.asarray(np.append(s, F32(0)))},
                              counter=jnp.zeros((), jnp.int32))

    def num_steps(self, state: SchedulerState) -> int:
        return int(state.timesteps.shape[0])

    def sigma(self, state: SchedulerState, i):
        return state.tables["sigmas"][i]

    def add_noise(self, state: SchedulerState, original_samples, noise, i):
        """x at the noise level of step ``i``: sigma noise + (1 - sigma) x0 (img2img start)."""
        sigma = state.tables["sigmas"][i]
        return (sigma * noise + (1.0 - sigma) * original_samples).astype(original_samples.dtype)

    def step(self, state: SchedulerState, model_output, i, sample, noise=None):
        """x + (sigma_{i+1} - sigma_i) v, in float32 -> (prev_sample, state)."""
        del noise
        sig = state.tables["sigmas"]
        dt = sig[i + 1] - sig[i]
        prev = sample.astype(jnp.float32) + dt * model_output.astype(jnp.float32)
        return prev, state.replace(counter=state.counter + 1)
