"""Diffusion schedulers as pure JAX functions, numerically matching diffusers.

Each scheduler is a plain Python object holding static configuration; all that
changes during sampling lives in a ``SchedulerState`` pytree, so a whole
denoising loop runs inside one ``jax.lax.fori_loop`` under ``jax.jit``::

    sched = make_scheduler("dpm++2m-karras", load_scheduler_config(folder))
    state = sched.set_timesteps(25, sample_shape=x.shape)
    x = noise * sched.init_noise_sigma(state)

    def body(i, carry):
        x, state = carry
        eps = unet(sched.scale_model_input(state, x, i), state.timesteps[i], conditioning)
        return sched.step(state, eps, i, x)

    x, state = jax.lax.fori_loop(0, sched.num_steps(state), body, (x, state))

Matching diffusers to float32 rounding: everything that only depends on the
step index (timesteps, sigmas, the scalar coefficients each ``step`` uses) is
computed on the host with numpy in set_timesteps, following the dtype flow of
diffusers (float32 tensors, float64 numpy). ``step`` then only applies those
coefficients to arrays, in the same order of operations as diffusers.
torch-side details that matter at the last ulp: ``torch.cumprod`` accumulates
float32 in float64, and float32 ``torch.linspace`` (the betas) rounds each
entry once from a float32 step; both are reproduced on the host bit for bit.
torch's float32 sqrt/log/exp (MKL/SLEEF kernels) are not correctly rounded, so
coefficients here (correctly rounded) may differ from diffusers' by an ulp.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ipadapter_jax.schedulers import NAMES
from ipadapter_jax.io.errors import BadArgument, MissingFile, Unsupported
from ipadapter_jax.io.files import load_config

F32 = np.float32


@struct.dataclass
class SchedulerState:
    """What changes while sampling, as a pytree.

    timesteps: [N] float32, the value passed to the UNet at loop index i.
    tables: per-step float32 coefficient tables (each [N] or [N+1]) precomputed
      on the host; which ones exist depends on the scheduler.
    counter: int32 scalar, number of ``step`` calls since ``set_timesteps``
      (diffusers' PNDM ``counter`` / DPM-Solver ``lower_order_nums``).
    history: model outputs kept by multistep solvers ([4, ...] for PNDM, [1, ...]
      for DPM-Solver++), newest last; None for one-step schedulers.
    cur_sample: the sample PNDM keeps between its first two steps; else None.
    init_sigma: what the initial noise is multiplied by (static).
    """

    timesteps: jax.Array
    tables: dict[str, jax.Array]
    counter: jax.Array
    history: jax.Array | None = None
    cur_sample: jax.Array | None = None
    init_sigma: float = struct.field(pytree_node=False, default=1.0)


# --------------------------------------------------------------------------- config

def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _one_of(*values):
    return (lambda v: any(v is x or (type(v) is type(x) and v == x) for x in values),
            "one of " + ", ".join(repr(x) for x in values))


_IS_BOOL = (lambda v: isinstance(v, (bool, np.bool_)), "a bool")
_OPT_POS = (lambda v: v is None or (_is_num(v) and v > 0), "None or a positive number")
_UNSUPPORTED_FALSE = _one_of(False, None)

# Keys every scheduler here reads, with the checks their values must pass.
_BASE_CHECKS = {
    "num_train_timesteps": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "beta_start": (lambda v: _is_num(v) and v >= 0, "a non-negative number"),
    "beta_end": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "beta_schedule": _one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "trained_betas": (lambda v: v is None or (np.ndim(v) == 1 and len(v) > 0), "None or a list of betas"),
    "prediction_type": _one_of("epsilon", "v_prediction"),
    "timestep_spacing": _one_of("leading", "trailing", "linspace"),
    "steps_offset": (lambda v: _is_int(v) and v >= 0, "a non-negative int"),
    "rescale_betas_zero_snr": _UNSUPPORTED_FALSE,
}
_BASE_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      trained_betas=None, prediction_type="epsilon", steps_offset=0, rescale_betas_zero_snr=False)


def load_scheduler_config(model_folder) -> dict:
    """Read ``<model_folder>/scheduler/scheduler_config.json`` (a diffusers model folder)."""
    path = Path(model_folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise MissingFile(f"scheduler config not found: {path} (expected a diffusers model folder "
                          "with scheduler/scheduler_config.json)")
    return load_config(path.parent, path.name)


# --------------------------------------------------------------------------- host-side schedule math

def _torch_linspace(start, end, n):
    """float32 ``torch.linspace`` bit for bit: a float32 step, each entry
    start + k*step (first half) or end - k*step (second half) rounded once (FMA)."""
    start, end = F32(start), F32(end)
    step = np.float64((end - start) / F32(max(n - 1, 1)))
    k = np.arange(n)
    return np.where(k < n // 2, np.float64(start) + step * k, np.float64(end) - step * (n - 1 - k)).astype(F32)


def _betas(cfg) -> np.ndarray:
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=F32)
        if betas.shape != (n,):
            raise BadArgument(f"scheduler config 'trained_betas' has {betas.size} entries, "
                             f"'num_train_timesteps' is {n}")
        return betas
    if cfg["beta_schedule"] == "linear":
        return _torch_linspace(cfg["beta_start"], cfg["beta_end"], n)
    if cfg["beta_schedule"] == "scaled_linear":
        root = _torch_linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
        return root * root
    # squaredcos_cap_v2: the cosine alpha-bar of Nichol & Dhariwal, in float64 like diffusers.
    abar = [math.cos((k / n + 0.008) / 1.008 * math.pi / 2) ** 2 for k in range(n + 1)]
    return np.array([min(1 - abar[k + 1] / abar[k], 0.999) for k in range(n)], dtype=F32)


def _alphas_cumprod_from(cfg) -> np.ndarray:
    alphas = F32(1.0) - _betas(cfg)
    # torch.cumprod accumulates float32 in double precision on CPU.
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def ddpm_alphas_cumprod(config: dict | None = None, **overrides) -> np.ndarray:
    """alphas_cumprod ([num_train_timesteps] float32) of a training config, as diffusers' DDPMScheduler builds it.

    Reads num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
    (DDPMScheduler defaults for missing keys); other keys are ignored.
    """
    cfg = dict(_BASE_DEFAULTS)
    cfg.update({k: v for k, v in (config or {}).items() if k in cfg})
    cfg.update(overrides)
    _validate(cfg, {k: _BASE_CHECKS[k] for k in
                    ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")}, "ddpm")
    return _alphas_cumprod_from(cfg)


def _validate(cfg, checks, name):
    for key, (ok, expected) in checks.items():
        if not ok(cfg[key]):
            raise BadArgument(f"scheduler config key {key!r} = {cfg[key]!r} is not supported by scheduler "
                             f"{name!r} (expected {expected})")


def _spaced(T, n, spacing, offset):
    """Integer timesteps of diffusers' three spacings (DDIM/PNDM/Euler flavour), as float64, descending."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + offset
    return np.round(np.arange(T, 0, -T / n)) - 1.0


def _sigma_to_t(sigmas, log_sigmas):
    """Fractional timestep whose log-sigma interpolates to each sigma (k-diffusion's inverse)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    low = np.clip((log_sigmas[:, None] <= log_sigma[None, :]).sum(0) - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras(sigma_max, sigma_min, n):
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _f32(fn, x):
    """A float32 transcendental as libm does it: evaluated in double, rounded once."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return fn(np.asarray(x, np.float64)).astype(F32)


# --------------------------------------------------------------------------- base class

class Scheduler:
    """Common interface; see the module docstring for the sampling loop it serves.

    Built from a diffusers ``scheduler_config.json`` dict (any scheduler class:
    keys this scheduler does not read are ignored, missing ones take this
    scheduler's diffusers defaults) plus keyword overrides, which must be keys
    it reads. Unsupported values raise ``BadArgument`` (a ValueError) naming the key.
    """

    name = ""
    order = 1  # diffusers' `order`; every scheduler here has 1 in diffusers >= 0.27
    _defaults: dict[str, Any] = {}
    _checks: dict[str, tuple] = {}
    _history = 0  # model outputs kept in the state
    _keeps_sample = False  # PNDM's cur_sample

    def __init__(self, config: dict | None = None, **overrides):
        config = dict(config or {})
        # Keys a saved config lists in _use_default_values were never set by the
        # user, so (as in diffusers' from_config) this scheduler's defaults apply.
        for key in config.pop("_use_default_values", None) or []:
            config.pop(key, None)
        cfg = dict(_BASE_DEFAULTS, **self._defaults)
        cfg.update({k: v for k, v in config.items() if k in cfg})
        for k, v in overrides.items():
            if k not in cfg:
                raise BadArgument(f"unknown option {k!r} for scheduler {self.name!r}; "
                                 f"it reads: {', '.join(sorted(cfg))}")
            cfg[k] = v
        _validate(cfg, {**_BASE_CHECKS, **self._checks}, self.name)
        self.config = cfg
        self.prediction_type: str = cfg["prediction_type"]
        self.num_train_timesteps: int = int(cfg["num_train_timesteps"])
        self.alphas_cumprod: np.ndarray = _alphas_cumprod_from(cfg)

    @property
    def needs_noise(self) -> bool:
        """Whether ``step`` needs a ``noise`` array (stochastic samplers)."""
        return False

    @property
    def cache_key(self) -> tuple:
        """Hashable identity: a scheduler is its name and its resolved config,
        so two with equal keys compile to the same program."""
        return (self.name, json.dumps(self.config, sort_keys=True, default=repr))

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, prediction_type={self.prediction_type!r})"

    # ---- host side
    def set_timesteps(self, num_inference_steps: int, sample_shape=None, dtype=jnp.float32) -> SchedulerState:
        """Build the state for ``num_inference_steps`` (host-side; numpy).

        sample_shape/dtype: shape and dtype of the latents. Multistep schedulers
        (pndm, dpm++2m) keep past model outputs in the state; give the shape here
        when the loop is a ``fori_loop``/``scan`` (its carry must keep one
        structure). Without it the history is allocated on the first ``step``,
        which works in eager Python loops only (traced steps raise).
        """
        n = int(num_inference_steps)
        if n < 1:
            raise BadArgument(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if n > self.num_train_timesteps:
            raise BadArgument(f"num_inference_steps ({n}) cannot exceed num_train_timesteps "
                             f"({self.num_train_timesteps})")
        timesteps, tables, init_sigma = self._schedule(n)
        history = cur = None
        if sample_shape is not None and self._history:
            history = jnp.zeros((self._history, *sample_shape), dtype)
            if self._keeps_sample:
                cur = jnp.zeros(sample_shape, dtype)
        return SchedulerState(timesteps=jnp.asarray(np.asarray(timesteps, F32)),
                              tables={k: jnp.asarray(np.asarray(v, F32)) for k, v in tables.items()},
                              counter=jnp.zeros((), jnp.int32), history=history, cur_sample=cur,
                              init_sigma=float(init_sigma))

    def _schedule(self, n):
        raise NotImplementedError

    def _check_timesteps(self, t):
        if np.any(t < 0) or np.any(t > self.num_train_timesteps - 1):
            raise BadArgument(f"scheduler {self.name!r} produced timesteps {t.tolist()} outside "
                             f"[0, {self.num_train_timesteps - 1}]: check 'steps_offset'")

    # ---- traceable
    def num_steps(self, state: SchedulerState) -> int:
        """Number of loop iterations (= len(state.timesteps))."""
        return int(state.timesteps.shape[0])

    def init_noise_sigma(self, state: SchedulerState) -> float:
        """The factor diffusers multiplies the initial Gaussian latents by."""
        return state.init_sigma

    def scale_model_input(self, state: SchedulerState, sample, i):
        """The UNet input at loop index ``i`` (identity except for the Euler schedulers)."""
        return sample

    def add_noise(self, state: SchedulerState, original_samples, noise, i):
        """Noise clean latents to the level of ``state.timesteps[i]`` (img2img start)."""
        a, b = state.tables["add_a"][i], state.tables["add_b"][i]
        return (a * original_samples + b * noise).astype(original_samples.dtype)

    def step(self, state: SchedulerState, model_output, i, sample, noise=None):
        """One denoising step at loop index ``i`` -> ``(prev_sample, new_state)``.

        Pure and jittable; ``i`` may be a traced int. ``noise`` (same shape as the
        sample) is required when ``needs_noise``.
        """
        raise NotImplementedError

    def _ensure_history(self, state, model_output):
        if self._history and state.history is None:
            if isinstance(model_output, jax.core.Tracer):
                # Allocating here would change the state's structure inside a
                # traced loop (fori_loop/scan reject that with an obscure error).
                raise BadArgument(f"scheduler {self.name!r} keeps past model outputs in its state: under jit, "
                                 "build it with set_timesteps(n, sample_shape=latents.shape)")
            state = state.replace(history=jnp.zeros((self._history, *model_output.shape), model_output.dtype))
            if self._keeps_sample:
                state = state.replace(cur_sample=jnp.zeros(model_output.shape, model_output.dtype))
        return state


def _div(x, d):
    """x / d for a scalar d, as a true division.

    XLA rewrites division by a broadcast scalar into multiplication by its
    reciprocal (off by an ulp half the time); the barrier hides the broadcast
    from that rewrite and is gone by code generation, so it costs nothing.
    """
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape))


def _x0_from(prediction_type, sample, model_output, sqrt_alpha, sqrt_beta):
    """Predicted clean sample from the model output, in diffusers' operation order."""
    if prediction_type == "epsilon":
        return _div(sample - sqrt_beta * model_output, sqrt_alpha)
    return sqrt_alpha * sample - sqrt_beta * model_output


# --------------------------------------------------------------------------- DDIM

class DDIM(Scheduler):
    """diffusers' DDIMScheduler. ``eta`` (an option, not a config key): 0 is
    deterministic DDIM, > 0 adds noise scaled by eta (1 ~ DDPM), then ``step``
    needs ``noise``. ``clip_sample`` clips the predicted x0 to +-clip_sample_range.
    """

    name = "ddim"
    _defaults = dict(clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading", thresholding=False,
                     clip_sample_range=1.0, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, eta=0.0)
    _checks = dict(clip_sample=_IS_BOOL, set_alpha_to_one=_IS_BOOL, thresholding=_UNSUPPORTED_FALSE,
                   clip_sample_range=(lambda v: _is_num(v) and v > 0, "a positive number"),
                   eta=(lambda v: _is_num(v) and v >= 0, "a non-negative number"))

    @property
    def needs_noise(self):
        return self.config["eta"] > 0

    def _schedule(self, n):
        cfg, T, ac = self.config, self.num_train_timesteps, self.alphas_cumprod
        t = _spaced(T, n, cfg["timestep_spacing"], cfg["steps_offset"]).astype(np.int64)
        self._check_timesteps(t)
        # diffusers steps back by T // n whatever the spacing.
        prev = t - T // n
        final = F32(1.0) if cfg["set_alpha_to_one"] else ac[0]
        a_t = ac[t]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(F32)
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        variance = (b_prev / b_t) * (F32(1) - a_t / a_prev)
        std = F32(cfg["eta"]) * np.sqrt(variance)
        tables = dict(sqrt_a=np.sqrt(a_t), sqrt_b=np.sqrt(b_t), sqrt_a_prev=np.sqrt(a_prev),
                      dir=np.sqrt(F32(1) - a_prev - std * std), std=std)
        tables.update(add_a=tables["sqrt_a"], add_b=tables["sqrt_b"])
        return t, tables, 1.0

    def step(self, state, model_output, i, sample, noise=None):
        tb = state.tables
        sa, sb = tb["sqrt_a"][i], tb["sqrt_b"][i]
        x0 = _x0_from(self.prediction_type, sample, model_output, sa, sb)
        eps = model_output if self.prediction_type == "epsilon" else sa * model_output + sb * sample
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = jnp.clip(x0, -r, r)
        prev = tb["sqrt_a_prev"][i] * x0 + tb["dir"][i] * eps
        if self.needs_noise:
            if noise is None:
                raise BadArgument("ddim with eta > 0 needs a `noise` array in step()")
            prev = prev + tb["std"][i] * noise
        return prev.astype(sample.dtype), state.replace(counter=state.counter + 1)


# --------------------------------------------------------------------------- PNDM (PLMS)

class PNDM(Scheduler):
    """diffusers' PNDMScheduler with ``skip_prk_steps=True`` (pseudo linear multistep).

    With n inference steps it runs n + 1 loop iterations (diffusers repeats the
    second timestep). Past model outputs and the step counter live in the state.
    """

    name = "pndm"
    _history = 4
    _keeps_sample = True
    _defaults = dict(skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading")
    _checks = dict(set_alpha_to_one=_IS_BOOL)

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        if self.config["skip_prk_steps"] is not True:
            raise Unsupported(
                "scheduler 'pndm' supports only skip_prk_steps=True (PLMS steps, as in Stable Diffusion's "
                f"config); got 'skip_prk_steps' = {self.config['skip_prk_steps']!r}. Pass skip_prk_steps=True "
                "or use another scheduler.")

    def _schedule(self, n):
        cfg, T, ac = self.config, self.num_train_timesteps, self.alphas_cumprod
        base = _spaced(T, n, cfg["timestep_spacing"], cfg["steps_offset"])[::-1]  # ascending
        t = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
        self._check_timesteps(t)
        ratio = T // n
        final = F32(1.0) if cfg["set_alpha_to_one"] else ac[0]

        def coefs(cur, prev):
            a_t = ac[np.clip(cur, 0, T - 1)]
            a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, T - 1)], final).astype(F32)
            b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
            return dict(sqrt_a=np.sqrt(a_t), sqrt_b=np.sqrt(b_t), coef_x=np.sqrt(a_prev / a_t),
                        denom=a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev), diff=a_prev - a_t)

        tables = coefs(t, t - ratio)
        # diffusers' second PLMS call (counter == 1) redoes the first interval:
        # from t + T//n down to t, with the averaged model output.
        tables.update({k + "_1": v for k, v in coefs(t + ratio, t).items()})
        a_t = ac[t]
        tables.update(add_a=np.sqrt(a_t), add_b=np.sqrt(F32(1) - a_t))
        return t, tables, 1.0

    def step(self, state, model_output, i, sample, noise=None):
        state = self._ensure_history(state, model_output)
        c, ets, tb = state.counter, state.history, state.tables
        m = model_output.astype(ets.dtype)
        second = c == 1
        # The counter-1 output is not stored (diffusers keeps only the first one then).
        ets = jnp.where(second, ets, jnp.concatenate([ets[1:], m[None]], axis=0))
        e1, e2, e3, e4 = ets[3], ets[2], ets[1], ets[0]
        combined = jnp.select(
            [c == 0, second, c == 2, c == 3],
            [m, (m + e1) / 2, (3 * e1 - e2) / 2, _div(23 * e1 - 16 * e2 + 5 * e3, 12.0)],
            (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4))
        x = jnp.where(second, state.cur_sample, sample)
        cur_sample = jnp.where(c == 0, sample.astype(state.cur_sample.dtype), state.cur_sample)

        def pick(key):
            return jnp.where(second, tb[key + "_1"][i], tb[key][i])

        if self.prediction_type == "v_prediction":
            combined = pick("sqrt_a") * combined + pick("sqrt_b") * x
        prev = pick("coef_x") * x - _div(pick("diff") * combined, pick("denom"))
        return prev.astype(sample.dtype), state.replace(counter=c + 1, history=ets, cur_sample=cur_sample)


# --------------------------------------------------------------------------- Euler (k-diffusion sigmas)

def _train_sigmas(ac):
    return np.sqrt((F32(1) - ac) / ac)


class _EulerBase(Scheduler):
    _defaults = dict(timestep_spacing="linspace")

    def _timesteps_and_sigmas(self, n):
        cfg, T = self.config, self.num_train_timesteps
        if cfg["timestep_spacing"] == "linspace":  # not rounded, unlike DDIM's
            t = np.linspace(0, T - 1, n, dtype=F32)[::-1].copy()
        else:
            t = _spaced(T, n, cfg["timestep_spacing"], cfg["steps_offset"]).astype(F32)
        self._check_timesteps(t)
        train = _train_sigmas(self.alphas_cumprod)
        return t, train, np.interp(t, np.arange(T), train)

    def _tables(self, t, sigmas):
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        s, s_next = sigmas[:-1], sigmas[1:]
        s2p1 = s * s + F32(1)
        scale = np.sqrt(s2p1)
        smax = sigmas.max()
        init = smax if self.config["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(smax * smax + F32(1))
        return dict(sigma=s, sigma_next=s_next, scale=scale, v_a=-s / scale, v_b=s2p1,
                    add_a=np.ones_like(s), add_b=s), init

    def scale_model_input(self, state, sample, i):
        return _div(sample, state.tables["scale"][i]).astype(sample.dtype)

    def _x0(self, tb, model_output, i, sample):
        if self.prediction_type == "epsilon":
            return sample - tb["sigma"][i] * model_output
        return model_output * tb["v_a"][i] + _div(sample, tb["v_b"][i])


class EulerDiscrete(_EulerBase):
    """diffusers' EulerDiscreteScheduler (s_churn = 0). Honors ``use_karras_sigmas``
    (with ``sigma_min``/``sigma_max``) when the config sets it."""

    name = "euler"
    _defaults = dict(_EulerBase._defaults, interpolation_type="linear", use_karras_sigmas=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
                     timestep_type="discrete", final_sigmas_type="zero")
    _checks = dict(interpolation_type=_one_of("linear"), use_karras_sigmas=_IS_BOOL,
                   use_exponential_sigmas=_UNSUPPORTED_FALSE, use_beta_sigmas=_UNSUPPORTED_FALSE,
                   sigma_min=_OPT_POS, sigma_max=_OPT_POS, timestep_type=_one_of("discrete"),
                   final_sigmas_type=_one_of("zero"))

    def _schedule(self, n):
        t, train, sigmas = self._timesteps_and_sigmas(n)
        if self.config["use_karras_sigmas"]:
            lo = self.config["sigma_min"] if self.config["sigma_min"] is not None else sigmas[-1].item()
            hi = self.config["sigma_max"] if self.config["sigma_max"] is not None else sigmas[0].item()
            sigmas = _karras(hi, lo, n)
            t = _sigma_to_t(sigmas, np.log(train))
        tables, init = self._tables(t, sigmas)
        return t, tables, init

    def step(self, state, model_output, i, sample, noise=None):
        tb = state.tables
        x = sample.astype(jnp.float32)
        x0 = self._x0(tb, model_output, i, x)
        sigma = tb["sigma"][i]
        prev = x + _div(x - x0, sigma) * (tb["sigma_next"][i] - sigma)
        return prev.astype(sample.dtype), state.replace(counter=state.counter + 1)


class EulerAncestral(_EulerBase):
    """diffusers' EulerAncestralDiscreteScheduler; ``step`` needs ``noise``."""

    name = "euler-a"

    @property
    def needs_noise(self):
        return True

    def _schedule(self, n):
        t, _, sigmas = self._timesteps_and_sigmas(n)
        tables, init = self._tables(t, sigmas)
        s, s_to = tables["sigma"], tables["sigma_next"]
        up = np.sqrt(s_to * s_to * (s * s - s_to * s_to) / (s * s))
        down = np.sqrt(s_to * s_to - up * up)
        tables.update(sigma_up=up, dt=down - s)
        return t, tables, init

    def step(self, state, model_output, i, sample, noise=None):
        if noise is None:
            raise BadArgument("euler-a needs a `noise` array in step()")
        tb = state.tables
        x = sample.astype(jnp.float32)
        x0 = self._x0(tb, model_output, i, x)
        prev = x + _div(x - x0, tb["sigma"][i]) * tb["dt"][i]
        prev = prev + noise * tb["sigma_up"][i]
        return prev.astype(sample.dtype), state.replace(counter=state.counter + 1)


# --------------------------------------------------------------------------- DPM-Solver++ (2M)

class DPMSolverPP2M(Scheduler):
    """diffusers' DPMSolverMultistepScheduler: dpmsolver++, order 2, midpoint,
    final step first order. The previous data prediction and the number of
    steps taken live in the state."""

    name = "dpm++2m"
    karras = False
    _history = 1
    _defaults = dict(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                     euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                     use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0,
                     final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None,
                     timestep_spacing="linspace", thresholding=False, dynamic_thresholding_ratio=0.995,
                     sample_max_value=1.0, use_dynamic_shifting=False, time_shift_type="exponential",
                     sigma_min=None, sigma_max=None)
    # lower_order_final / euler_at_final cannot change a 2nd-order solver ending at sigma 0.
    _checks = dict(solver_order=_one_of(2), algorithm_type=_one_of("dpmsolver++", "deis"),
                   solver_type=_one_of("midpoint", "logrho", "bh1", "bh2"), lower_order_final=_IS_BOOL,
                   euler_at_final=_IS_BOOL, use_karras_sigmas=_IS_BOOL, use_exponential_sigmas=_UNSUPPORTED_FALSE,
                   use_beta_sigmas=_UNSUPPORTED_FALSE, use_lu_lambdas=_UNSUPPORTED_FALSE,
                   use_flow_sigmas=_UNSUPPORTED_FALSE, final_sigmas_type=_one_of("zero"),
                   lambda_min_clipped=(lambda v: _is_num(v) and v == -math.inf, "-inf"),
                   variance_type=_one_of(None), thresholding=_UNSUPPORTED_FALSE,
                   use_dynamic_shifting=_UNSUPPORTED_FALSE, sigma_min=_OPT_POS, sigma_max=_OPT_POS)

    def __init__(self, config=None, **overrides):
        if overrides.get("use_karras_sigmas", self.karras) != self.karras:
            raise BadArgument(f"scheduler {self.name!r} fixes 'use_karras_sigmas' = {self.karras}; "
                             "pick 'dpm++2m' or 'dpm++2m-karras' instead")
        # The name decides Karras sigmas, whatever the config says.
        super().__init__(config, **{**overrides, "use_karras_sigmas": self.karras})

    def _schedule(self, n):
        cfg, T = self.config, self.num_train_timesteps
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
        else:
            t = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
        train = _train_sigmas(self.alphas_cumprod)
        if self.karras:
            flipped = train[::-1]
            lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else flipped[-1].item()
            hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else flipped[0].item()
            sigmas = _karras(hi, lo, n)
            t = _sigma_to_t(sigmas, np.log(train))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                t = t.round()
            t = t.astype(np.int64)
        else:
            self._check_timesteps(t)
            sigmas = np.interp(t, np.arange(T), train)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        # alpha_t, sigma_t, lambda_t per sigma, as diffusers' 0-d float32 tensor math.
        alpha = F32(1) / np.sqrt(sigmas * sigmas + F32(1))
        sig = sigmas * alpha
        lam = _f32(np.log, alpha) - _f32(np.log, sig)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            h = lam[1:] - lam[:-1]  # step i: from sigmas[i] to sigmas[i + 1]; inf on the last step
            coef_d = alpha[1:] * (_f32(np.exp, -h) - F32(1))
            coef_x = sig[1:] / sig[:-1]
            r0 = np.concatenate([[np.nan], h[:-1]]).astype(F32) / h
            inv_r0 = F32(1) / r0
        inv_r0 = np.where(np.isfinite(inv_r0), inv_r0, 0).astype(F32)  # unused where not finite
        tables = dict(alpha=alpha[:-1], sig=sig[:-1], coef_x=coef_x, coef_d=coef_d, coef_d1=F32(0.5) * coef_d,
                      inv_r0=inv_r0, add_a=alpha[:-1], add_b=sig[:-1])
        return t, tables, 1.0

    def step(self, state, model_output, i, sample, noise=None):
        state = self._ensure_history(state, model_output)
        tb, c = state.tables, state.counter
        x = sample.astype(jnp.float32)
        x0 = _x0_from(self.prediction_type, x, model_output, tb["alpha"][i], tb["sig"][i])
        first = (c < 1) | (i == state.timesteps.shape[0] - 1)
        prev = tb["coef_x"][i] * x - tb["coef_d"][i] * x0
        d1 = tb["inv_r0"][i] * (x0 - state.history[0])
        prev = jnp.where(first, prev, prev - tb["coef_d1"][i] * d1)
        history = x0[None].astype(state.history.dtype)
        return prev.astype(sample.dtype), state.replace(counter=c + 1, history=history)


class DPMSolverPP2MKarras(DPMSolverPP2M):
    """DPM-Solver++ 2M with Karras sigmas (``use_karras_sigmas=True``)."""

    name = "dpm++2m-karras"
    karras = True


# --------------------------------------------------------------------------- registry and helpers

# Keyed by ``schedulers.NAMES``, in that order.
SCHEDULERS: dict[str, type] = dict(zip(NAMES, (DDIM, PNDM, EulerDiscrete, EulerAncestral, DPMSolverPP2M,
                                               DPMSolverPP2MKarras)))


def make_scheduler(name: str, config: dict | None = None, **overrides) -> Scheduler:
    """Scheduler ``name`` built from a diffusers scheduler config dict (None: defaults) and overrides.

    The config may come from any diffusers scheduler class, as with diffusers'
    ``XScheduler.from_config(pipe.scheduler.config)``. DDIM also takes ``eta``.
    """
    if name not in SCHEDULERS:
        raise BadArgument(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config, **overrides)


def begin_index(scheduler: Scheduler, state: SchedulerState, strength: float, num_inference_steps: int) -> int:
    """img2img: the loop index to start from (diffusers' ``get_timesteps``: t_start * order)."""
    n = int(num_inference_steps)
    init_timestep = min(int(n * strength), n)
    start = max(n - init_timestep, 0) * scheduler.order
    if start >= scheduler.num_steps(state):
        raise BadArgument(f"strength {strength} with {n} steps leaves no denoising step; raise strength or steps")
    return start


def _per_sample(values, ndim):
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def ddpm_add_noise(alphas_cumprod, x0, noise, timesteps):
    """Training forward process: sqrt(a_t) x0 + sqrt(1 - a_t) noise, one timestep per batch item."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(timesteps)].astype(x0.dtype)
    return _per_sample(jnp.sqrt(a), x0.ndim) * x0 + _per_sample(jnp.sqrt(1 - a), x0.ndim) * noise


def ddpm_velocity(alphas_cumprod, x0, noise, timesteps):
    """v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(timesteps)].astype(x0.dtype)
    return _per_sample(jnp.sqrt(a), x0.ndim) * noise - _per_sample(jnp.sqrt(1 - a), x0.ndim) * x0
