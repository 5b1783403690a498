"""Schedulers: whole trajectories against diffusers' schedulers of the same name.

Both sides get the same model outputs: at each step the "model" is a fixed
numpy function of (sample, timestep) applied to each framework's own current
sample, so every per-step latent is compared (relative error <= 1e-6).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")

import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)

from helpers import rel_err  # noqa: E402
from sd_fixtures import SD15_SCHEDULER  # noqa: E402
from ipadapter_jax import schedulers as S  # noqa: E402

# diffusers' own numpy-2 deprecation noise (np.array over torch tensors)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 1e-6
SHAPE = (2, 8, 8, 4)
NAMES = list(S.SCHEDULERS)
SD15 = SD15_SCHEDULER  # SD 1.5's scheduler_config.json (less "_diffusers_version", which nothing reads)
TORCH_CLASSES = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
                 "euler-a": EulerAncestralDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler,
                 "dpm++2m-karras": DPMSolverMultistepScheduler}
WORST: dict[str, float] = {}  # worst relative error per scheduler, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nworst relative error per scheduler:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})


def _record(name, err):
    WORST[name] = max(WORST.get(name, 0.0), err)
    return err


def torch_scheduler(name, config, **overrides):
    if name.startswith("dpm"):
        overrides["use_karras_sigmas"] = name.endswith("karras")
    if name == "pndm":
        overrides.setdefault("skip_prk_steps", True)
    overrides.pop("eta", None)
    return TORCH_CLASSES[name].from_config(config or {}, **overrides)


def model_bias(t, shape=SHAPE):
    return (0.1 * np.sin(np.float64(t) / 100 + np.arange(np.prod(shape)).reshape(shape) * 0.37)).astype(np.float32)


def fake_unet(x, t):
    """The same deterministic 'model' for both frameworks, evaluated in numpy."""
    return np.float32(0.5) * np.asarray(x, np.float32) + model_bias(t, np.shape(x))


def reference_trajectory(name, config, n, *, strength=None, eta=0.0, seed=0, begin_zero=False, **overrides):
    """diffusers' loop as StableDiffusion(Img2Img)Pipeline runs it: latents after each step, plus inputs.

    begin_zero: call set_begin_index(0) in text-to-image too (for schedules whose
    first timestep repeats, where diffusers' lookup would otherwise start at index 1).
    """
    rng = np.random.default_rng(seed)
    ref = torch_scheduler(name, config, **overrides)
    ref.set_timesteps(n)
    if begin_zero:
        ref.set_begin_index(0)
    steps = len(ref.timesteps)
    noise0 = rng.standard_normal(SHAPE).astype(np.float32)
    clean = rng.standard_normal(SHAPE).astype(np.float32)
    step_noise = rng.standard_normal((steps, *SHAPE)).astype(np.float32)
    if strength is None:
        start = 0
        x = torch.from_numpy(noise0) * ref.init_noise_sigma
    else:
        t_start = max(n - min(int(n * strength), n), 0)
        start = t_start * ref.order
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(start)
        x = ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise0), ref.timesteps[start:start + 1])
    out = dict(start=start, init=x.numpy().copy(), steps=[], inputs=[], noise0=noise0, clean=clean,
               step_noise=step_noise, timesteps=ref.timesteps.numpy().astype(np.float32),
               init_noise_sigma=float(ref.init_noise_sigma))
    current = {}
    original_randn = euler_a_module.randn_tensor
    euler_a_module.randn_tensor = lambda shape, **kw: torch.from_numpy(step_noise[current["i"]])
    try:
        for i in range(start, steps):
            current["i"] = i
            t = ref.timesteps[i]
            model_in = ref.scale_model_input(x, t)
            out["inputs"].append(model_in.numpy().copy())
            eps = torch.from_numpy(fake_unet(model_in.numpy(), float(t)))
            kwargs = {}
            if name == "ddim" and eta > 0:
                kwargs = dict(eta=eta, variance_noise=torch.from_numpy(step_noise[i]))
            x = ref.step(eps, t, x, **kwargs).prev_sample
            out["steps"].append(x.numpy().copy())
    finally:
        euler_a_module.randn_tensor = original_randn
    return out


def check_trajectory(name, config, n, *, strength=None, eta=0.0, begin_zero=False, **overrides):
    """Run ours step by step (eager) next to diffusers; assert every latent matches."""
    ref = reference_trajectory(name, config, n, strength=strength, eta=eta, begin_zero=begin_zero, **overrides)
    sched = S.make_scheduler(name, config, eta=eta, **overrides) if name == "ddim" else \
        S.make_scheduler(name, config, **overrides)
    state = sched.set_timesteps(n)
    assert sched.num_steps(state) == len(ref["timesteps"])
    # exact for integer timesteps; fractional (Euler + Karras) ones inherit torch's sqrt ulps
    np.testing.assert_allclose(np.asarray(state.timesteps), ref["timesteps"], rtol=1e-6, atol=0)
    if strength is None:
        assert rel_err(sched.init_noise_sigma(state), ref["init_noise_sigma"]) <= TOL
        x = jnp.asarray(ref["noise0"]) * sched.init_noise_sigma(state)
    else:
        start = S.begin_index(sched, state, strength, n)
        assert start == ref["start"]
        x = sched.add_noise(state, jnp.asarray(ref["clean"]), jnp.asarray(ref["noise0"]), start)
    worst = _record(name, rel_err(x, ref["init"]))
    assert worst <= TOL
    for k, i in enumerate(range(ref["start"], sched.num_steps(state))):
        model_in = sched.scale_model_input(state, x, i)
        assert rel_err(model_in, ref["inputs"][k]) <= TOL, f"scale_model_input at step {i}"
        eps = jnp.asarray(fake_unet(model_in, float(state.timesteps[i])))
        x, state = sched.step(state, eps, i, x, jnp.asarray(ref["step_noise"][i]))
        err = _record(name, rel_err(x, ref["steps"][k]))
        assert err <= TOL, f"{name}: step {i} of {sched.num_steps(state)}: rel err {err:.3e}"
        worst = max(worst, err)
    return worst


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_sd15_config_both_prediction_types(name, prediction_type):
    check_trajectory(name, SD15, 25, prediction_type=prediction_type)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", NAMES)
def test_timestep_spacing_and_offset(name, spacing, steps_offset):
    check_trajectory(name, SD15, 10, timestep_spacing=spacing, steps_offset=steps_offset)


@pytest.mark.parametrize("n", [1, 4, 7, 50])
@pytest.mark.parametrize("name", NAMES)
def test_step_counts(name, n):
    check_trajectory(name, SD15, n)


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_defaults_linear_betas(name):
    # config None: each class' diffusers defaults (DDIM clips x0 by default; PNDM needs PLMS)
    overrides = {"skip_prk_steps": True} if name == "pndm" else {}
    check_trajectory(name, None, 10, **overrides)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", NAMES)
def test_v_prediction_trailing_leading(name, spacing):
    check_trajectory(name, SD15, 13, prediction_type="v_prediction", timestep_spacing=spacing)


@pytest.mark.parametrize("n,prediction_type", [(10, "epsilon"), (25, "v_prediction"), (7, "epsilon")])
@pytest.mark.parametrize("name", NAMES)
def test_img2img_begin_index(name, n, prediction_type):
    check_trajectory(name, SD15, n, strength=0.6, prediction_type=prediction_type)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta(eta):
    check_trajectory("ddim", SD15, 20, eta=eta)
    assert S.make_scheduler("ddim", SD15, eta=eta).needs_noise
    assert not S.make_scheduler("ddim", SD15).needs_noise


def test_ddim_clip_sample():
    check_trajectory("ddim", SD15, 10, clip_sample=True, clip_sample_range=0.5)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m-karras", "pndm"])
def test_other_beta_tables(name):
    # cosine betas + Karras give repeated 998s, so diffusers needs its begin index set
    check_trajectory(name, dict(SD15, beta_schedule="squaredcos_cap_v2"), 10, begin_zero=name.endswith("karras"))
    # SD1.5's own betas as an explicit table (read instead of beta_schedule)
    betas = (np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2).tolist()
    check_trajectory(name, dict(SD15, beta_schedule="linear", trained_betas=betas), 10)


@pytest.mark.parametrize("sigma_range", [{}, {"sigma_min": 0.1, "sigma_max": 10.0}])
def test_euler_karras_sigmas(sigma_range):
    check_trajectory("euler", dict(SD15, use_karras_sigmas=True, **sigma_range), 12)


def test_dpm_karras_hidden_sigma_range():
    # diffusers keeps sigma_min/max from another class' config and uses them for Karras sigmas.
    check_trajectory("dpm++2m-karras", dict(SD15, sigma_min=0.5, sigma_max=8.0), 9)


@pytest.mark.parametrize("name", NAMES)
def test_config_from_another_scheduler(name):
    # A saved DPM-Solver config lists keys the user never set in _use_default_values:
    # from_config gives those the new class' defaults (e.g. DDIM keeps "leading").
    cfg = json.loads(json.dumps(dict(DPMSolverMultistepScheduler.from_config(SD15).config)))
    cfg["_use_default_values"] = ["timestep_spacing", "lambda_min_clipped"]
    cfg.pop("lambda_min_clipped")
    overrides = {"skip_prk_steps": True} if name == "pndm" else {}
    check_trajectory(name, cfg, 8, **overrides)
    if name == "ddim":
        assert S.make_scheduler(name, cfg).config["timestep_spacing"] == "leading"


# --------------------------------------------------------------------------- jit + fori_loop

def jitted_trajectory(sched, state, x, start, step_noise):
    timesteps = np.asarray(state.timesteps)
    bias = jnp.asarray(np.stack([model_bias(t) for t in timesteps]))
    steps = sched.num_steps(state)

    @jax.jit
    def run(state, x, bias, step_noise):
        def body(i, carry):
            x, state, traj = carry
            eps = 0.5 * sched.scale_model_input(state, x, i) + bias[i]
            x, state = sched.step(state, eps, i, x, step_noise[i])
            return x, state, traj.at[i].set(x)

        traj = jnp.zeros((steps, *x.shape), x.dtype)
        return jax.lax.fori_loop(start, steps, body, (x, state, traj))

    x, state, traj = run(state, x, bias, jnp.asarray(step_noise))
    return np.asarray(traj)[start:], state


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("name", NAMES)
def test_jit_fori_loop_trajectory(name, strength):
    n = 15
    for prediction_type in ("epsilon", "v_prediction"):
        ref = reference_trajectory(name, SD15, n, strength=strength, prediction_type=prediction_type)
        sched = S.make_scheduler(name, SD15, prediction_type=prediction_type)
        state = sched.set_timesteps(n, sample_shape=SHAPE)
        if strength is None:
            x = jnp.asarray(ref["noise0"]) * sched.init_noise_sigma(state)
            start = 0
        else:
            start = S.begin_index(sched, state, strength, n)
            x = sched.add_noise(state, jnp.asarray(ref["clean"]), jnp.asarray(ref["noise0"]), start)
        traj, final_state = jitted_trajectory(sched, state, x, start, ref["step_noise"])
        assert int(final_state.counter) == sched.num_steps(state) - start
        for k, (ours, theirs) in enumerate(zip(traj, ref["steps"], strict=True)):
            err = _record(name, rel_err(ours, theirs))
            assert err <= TOL, f"{name} {prediction_type}: jitted step {start + k}: {err:.3e}"


def test_history_allocated_lazily_in_python_loop():
    sched = S.make_scheduler("dpm++2m", SD15)
    state = sched.set_timesteps(5)
    assert state.history is None
    x = jnp.ones(SHAPE)
    x, state = sched.step(state, x, 0, x)
    assert state.history.shape == (1, *SHAPE)
    for name in ("pndm", "dpm++2m"):  # traced without a shape: a clear error, not a carry mismatch
        sched = S.make_scheduler(name, SD15)
        state = sched.set_timesteps(5)
        with pytest.raises(ValueError, match="sample_shape"):
            jax.jit(lambda st, x: sched.step(st, x, 0, x))(state, jnp.ones(SHAPE))


# --------------------------------------------------------------------------- pieces

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", NAMES)
def test_init_noise_sigma_and_scale_model_input(name, spacing):
    cfg = dict(SD15, timestep_spacing=spacing)
    ref = torch_scheduler(name, cfg)
    ref.set_timesteps(20)
    sched = S.make_scheduler(name, cfg)
    state = sched.set_timesteps(20)
    assert rel_err(sched.init_noise_sigma(state), float(ref.init_noise_sigma)) <= TOL
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    for i in (0, 7, 19):
        if hasattr(ref, "_step_index"):
            ref._step_index = i
        expected = ref.scale_model_input(torch.from_numpy(x), ref.timesteps[i]).numpy()
        assert rel_err(sched.scale_model_input(state, jnp.asarray(x), i), expected) <= TOL


@pytest.mark.parametrize("config", [None, SD15])
def test_ddpm_add_noise_and_velocity(config):
    ref = DDPMScheduler.from_config(config or {})
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])
    ac = S.ddpm_alphas_cumprod(config)
    np.testing.assert_array_equal(ac, ref.alphas_cumprod.numpy())
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert rel_err(S.ddpm_add_noise(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), expected) <= TOL
    expected = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert rel_err(S.ddpm_velocity(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), expected) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_alphas_cumprod_bitwise(name):
    ref = torch_scheduler(name, SD15)
    np.testing.assert_array_equal(S.make_scheduler(name, SD15).alphas_cumprod, ref.alphas_cumprod.numpy())


def test_orders_match_diffusers():
    for name in NAMES:
        assert S.make_scheduler(name, SD15).order == torch_scheduler(name, SD15).order


def test_pndm_runs_n_plus_one_steps():
    sched = S.make_scheduler("pndm", SD15)
    assert sched.num_steps(sched.set_timesteps(10)) == 11


def test_begin_index_strength():
    sched = S.make_scheduler("euler", SD15)
    state = sched.set_timesteps(10)
    assert S.begin_index(sched, state, 0.6, 10) == 4
    assert S.begin_index(sched, state, 1.0, 10) == 0
    with pytest.raises(ValueError, match="strength"):
        S.begin_index(sched, state, 0.05, 10)


# --------------------------------------------------------------------------- errors

def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        S.make_scheduler("lms", SD15)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name,key,value", [
    ("ddim", "prediction_type", "sample"),
    ("euler", "timestep_spacing", "even"),
    ("pndm", "beta_schedule", "cosine"),
    ("dpm++2m", "solver_order", 3),
    ("dpm++2m", "algorithm_type", "sde-dpmsolver++"),
    ("euler", "interpolation_type", "log_linear"),
    ("euler-a", "rescale_betas_zero_snr", True),
    ("ddim", "thresholding", True),
    ("ddim", "steps_offset", -1),
    ("dpm++2m-karras", "final_sigmas_type", "sigma_min"),
    ("euler", "num_train_timesteps", "1000"),
])
def test_bad_config_value_names_the_key(name, key, value):
    with pytest.raises(ValueError, match=repr(key)):
        S.make_scheduler(name, dict(SD15, **{key: value}))


def test_unknown_override_names_the_key():
    with pytest.raises(ValueError, match="'eta'"):
        S.make_scheduler("euler", SD15, eta=0.5)


def test_config_keys_of_other_classes_are_ignored():
    # skip_prk_steps / clip_sample mean nothing to Euler, as in diffusers' from_config.
    assert S.make_scheduler("euler", dict(SD15, skip_prk_steps=False, clip_sample=True)).config["timestep_spacing"] \
        == "linspace"


def test_pndm_prk_steps_unsupported():
    with pytest.raises(NotImplementedError, match="skip_prk_steps"):
        S.make_scheduler("pndm", dict(SD15, skip_prk_steps=False))
    with pytest.raises(NotImplementedError, match="skip_prk_steps"):
        S.make_scheduler("pndm")


def test_dpm_name_fixes_karras():
    assert S.make_scheduler("dpm++2m", dict(SD15, use_karras_sigmas=True)).config["use_karras_sigmas"] is False
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        S.make_scheduler("dpm++2m", SD15, use_karras_sigmas=True)


def test_noise_required():
    for name, kw in (("euler-a", {}), ("ddim", {"eta": 0.5})):
        sched = S.make_scheduler(name, SD15, **kw)
        state = sched.set_timesteps(4)
        x = jnp.ones(SHAPE)
        with pytest.raises(ValueError, match="noise"):
            sched.step(state, x, 0, x)


def test_too_many_steps():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        S.make_scheduler("ddim", SD15).set_timesteps(1001)


def test_load_scheduler_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        S.load_scheduler_config(tmp_path)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15))
    assert S.load_scheduler_config(tmp_path) == SD15
