"""What is constant across the steps of a denoising loop is computed once before it
(``ipadapter_jax.models.hoisting``): the same latents as recomputing it at every step,
every expected value actually hoisted, and a wrong mark failing loudly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import rel_err
from ipadapter_jax import ip_adapter, schedulers
from ipadapter_jax.ip_adapter.image_proj import ImageProjModel
from ipadapter_jax.models import ControlNetModel, UNet2DConditionModel, hoisting
from ipadapter_jax.models.conditioning import UNetConditioning
from ipadapter_jax.pipeline import make_denoise_loop
from ipadapter_jax.pipeline.control import ControlInputs
from ipadapter_jax.pipeline.denoise import run_stepwise

STEPS = 3
# Both loops compute the same float32 function, compiled differently (the tests compile at XLA
# optimisation level 0, where fusion changes rounding); guidance 7.5 amplifies it over the steps.
# Ten times under the loops' parity bound against diffusers (1e-4, tests/test_pipeline.py).
SAME = 1e-5
# 32 x 32 latents under CFG: 2 x 32 x 32 rows at 32 channels take the Winograd F(4x4) path on CPU.
SIZE = 32
SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}


def _randomize_zeros(module, seed: int):
    """Zero-initialised parameters (ControlNet zero convs, LoRA up) made random, so that every
    hoisted value changes the output."""
    state = nnx.state(module, nnx.Param)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.05, p.shape), p.dtype) if not np.any(np.asarray(p))
                         else p, state)
    nnx.update(module, state)


def _models(dtype=jnp.float32):
    rngs = nnx.Rngs(0)
    unet = UNet2DConditionModel(dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                                     norm_num_groups=8, cross_attention_dim=16, sample_size=SIZE,
                                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]), dtype=dtype, rngs=rngs)
    # LoRA on every attention layer (as FaceID files carry) beside the image branches.
    adapter = ip_adapter.IPAdapter.for_unet(unet, ImageProjModel(8, 16, 4, rngs=rngs), variant="base",
                                            lora_rank=4, rngs=rngs)
    ip_adapter.attach(unet, adapter)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    _randomize_zeros(unet, 1)
    _randomize_zeros(net, 2)
    return unet, adapter, net


@pytest.fixture(autouse=True)
def small_models_hoist(monkeypatch):
    """These models are far under hoisting's MIN_MODEL_BYTES: hoist anyway."""
    monkeypatch.setattr(hoisting, "MIN_MODEL_BYTES", 0)


@pytest.fixture(scope="module")
def models():
    return _models()


def _args(unet, adapter, net, *, masks: bool = False):
    sched = schedulers.make_scheduler("ddim", SCHEDULER)
    state = sched.set_timesteps(STEPS, sample_shape=(1, SIZE, SIZE, 4))
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.standard_normal((2, 7, 16), dtype=np.float32))
    n = 2 if masks else 1
    embeds = rng.standard_normal((n, 8), dtype=np.float32)
    tokens = np.asarray(adapter.project(np.concatenate([np.zeros_like(embeds), embeds])))    # [2n, 4, 16]
    tokens = tokens.reshape(2, n, *tokens.shape[1:])
    pyramid = None
    if masks:
        halves = np.zeros((2, SIZE * 8, SIZE * 8), np.float32)
        halves[0, :, : SIZE * 4], halves[1, :, SIZE * 4:] = 1, 1
        pyramid = ip_adapter.mask_pyramid(halves, unet, SIZE, SIZE)
    prompt = ip_adapter.image_prompt(adapter, tokens, ip_adapter.layer_scales(unet, 0.7), masks=pyramid,
                                     lora_scale=0.8)
    cond = UNetConditioning(text, (prompt,))
    hint = jnp.asarray(rng.uniform(0, 1, (1, 8 * SIZE, 8 * SIZE, 3)).astype(np.float32))
    control = ControlInputs(params=(nnx.state(net),), images=(hint,),
                            scales=jnp.full((1, STEPS), 0.9, jnp.float32))
    noise = jnp.asarray(rng.standard_normal((1, SIZE, SIZE, 4), dtype=np.float32))
    args = (nnx.state(unet), state, noise, cond, jnp.ones((1, STEPS)), jnp.float32(7.5), jnp.float32(0.0),
            jax.random.key(0), jnp.int32(0), control)
    return sched, args


def _run(unet, net, sched, args, *, hoist: bool, guess_mode: bool = False):
    loop = make_denoise_loop(nnx.graphdef(unet), sched, cfg=True, control_graphdefs=(nnx.graphdef(net),),
                             guess_mode=guess_mode, hoist=hoist)
    return np.asarray(loop(*args))


@pytest.fixture
def short_loops_hoist_winograd(monkeypatch):
    """These loops are shorter than hoisting's MIN_STEPS for Winograd transforms: hoist them anyway."""
    monkeypatch.setitem(hoisting.MIN_STEPS, "winograd", STEPS)


def test_hoisted_loop_is_the_per_step_loop_and_hoists_every_constant(models, short_loops_hoist_winograd):
    unet, adapter, net = models
    sched, args = _args(unet, adapter, net)
    hoisted = _run(unet, net, sched, args, hoist=True)
    plain = _run(unet, net, sched, args, hoist=False)
    assert np.all(np.isfinite(hoisted))
    assert rel_err(hoisted, plain) <= SAME

    # Step by step (the progress bar): the constants computed in one call, then passed to each step.
    stepwise = make_denoise_loop(nnx.graphdef(unet), sched, cfg=True, control_graphdefs=(nnx.graphdef(net),),
                                 partial=True)
    constants = stepwise.constants(*args, jnp.int32(1))
    stepped = run_stepwise(stepwise, args + (jnp.int32(1),), 0, STEPS, lambda _: None)
    np.testing.assert_array_equal(np.asarray(stepped), hoisted)

    # Every value that is the same at every step was hoisted (none silently left in the loop).
    keys = set(constants)
    cross = [layer.name.rsplit(".processor", 1)[0].replace(".", "/") for layer in unet.cross_attention_layers()]
    expected = {f"unet/{name}:kv" for name in cross}
    expected |= {f"unet/ip_adapters/0/layers/{i}:kv" for i in range(len(cross))}
    expected |= {f"controlnet0/{path}:kv" for path in _cross_attention_paths(net)}
    expected |= {"unet:context", "controlnet0:context", "controlnet0:inputs", "controlnet0:control_embedding"}
    assert expected <= keys, sorted(expected - keys)
    winograd = {k for k in keys if ":winograd" in k}
    assert any(k.startswith("unet/") for k in winograd) and any(k.startswith("controlnet0/") for k in winograd)
    # Convolutions inside the control embedding are hoisted with it, not on their own.
    assert not any(k.startswith("controlnet0/controlnet_cond_embedding/") for k in keys)
    assert len(keys) == len(expected) + len(winograd)


def _cross_attention_paths(net) -> list[str]:
    return ["/".join(map(str, path)) for path, node in nnx.iter_graph(net)
            if path and path[-1] == "attn2"]


def test_guess_mode_and_masks_hoist_too(models, short_loops_hoist_winograd):
    unet, adapter, net = models
    sched, args = _args(unet, adapter, net, masks=True)
    for guess_mode in (False, True):
        hoisted = _run(unet, net, sched, args, hoist=True, guess_mode=guess_mode)
        plain = _run(unet, net, sched, args, hoist=False, guess_mode=guess_mode)
        assert rel_err(hoisted, plain) <= SAME


def test_bfloat16_loop_hoists_its_casts(short_loops_hoist_winograd):
    """Under a bfloat16 UNet the text context is cast before its K/V: a chain of hoisted values."""
    unet, adapter, net = _models(jnp.bfloat16)
    sched, args = _args(unet, adapter, net)
    hoisted = _run(unet, net, sched, args, hoist=True)
    plain = _run(unet, net, sched, args, hoist=False)
    assert np.all(np.isfinite(hoisted)) and rel_err(hoisted, plain) <= 2e-2


class _Scaler(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.full((3,), 2.0))

    def __call__(self, x, context):
        y = hoisting.constant(self, "context", lambda c: self.w[...] * c, context)
        return x + y


def _toy_loop(body_of):
    model = _Scaler()

    @jax.jit
    def loop(x, context):
        body = body_of(model, context)
        values = hoisting.collect({"toy": model}, body, 0, x)
        with hoisting.use({"toy": model}, values):
            return jax.lax.fori_loop(0, 3, body, x), len(values)

    return loop


def test_a_step_dependent_mark_fails_loudly():
    """Marking a value computed from the step's own input can never freeze it silently."""
    loop = _toy_loop(lambda model, context: lambda i, x: model(x, x * context))
    with pytest.raises(jax.errors.UnexpectedTracerError):
        loop(jnp.ones(3), jnp.ones(3))


def test_a_key_met_twice_with_other_arguments_is_computed_in_place():
    def body_of(model, context):
        return lambda i, x: model(model(x, context), 2 * context)

    out, hoisted = _toy_loop(body_of)(jnp.zeros(3), jnp.ones(3))
    np.testing.assert_allclose(np.asarray(out), 3 * (2.0 + 4.0))
    assert int(hoisted) == 0

    out, hoisted = _toy_loop(lambda model, context: lambda i, x: model(x, context))(jnp.zeros(3), jnp.ones(3))
    np.testing.assert_allclose(np.asarray(out), 3 * 2.0)
    assert int(hoisted) == 1


@pytest.mark.parametrize("limit", ["memory", "steps"])
def test_winograd_kernels_beyond_the_budget_or_in_short_loops_stay_in_the_step(models, monkeypatch, limit):
    unet, adapter, net = models
    sched, args = _args(unet, adapter, net)

    def constants():   # a new jitted function each time: the limits are read when it is traced
        stepwise = make_denoise_loop(nnx.graphdef(unet), sched, cfg=True, control_graphdefs=(nnx.graphdef(net),),
                                     partial=True)
        return set(stepwise.constants(*args, jnp.int32(1)))

    monkeypatch.setitem(hoisting.MIN_STEPS, "winograd", STEPS)
    assert any(":winograd" in k for k in constants())   # the test can fail
    if limit == "memory":
        monkeypatch.setitem(hoisting.BUDGETS, "winograd", 0)
    else:
        monkeypatch.setitem(hoisting.MIN_STEPS, "winograd", STEPS + 1)
    keys = constants()
    assert not any(":winograd" in k for k in keys) and "unet:context" in keys
    if limit == "memory":
        assert rel_err(_run(unet, net, sched, args, hoist=True), _run(unet, net, sched, args, hoist=False)) <= SAME


def test_a_unet_built_for_training_with_remat_samples_the_same(models, monkeypatch):
    """Rematerialisation is for gradients: inside a denoising loop it is off (its checkpoint
    trace would otherwise hold the hoisted values' inputs)."""
    unet, adapter, net = models
    sched, args = _args(unet, adapter, net)
    expected = _run(unet, net, sched, args, hoist=True)
    monkeypatch.setattr(unet, "remat", "full")
    assert rel_err(_run(unet, net, sched, args, hoist=True), expected) <= SAME


def test_small_models_hoist_nothing(models, monkeypatch):
    unet, adapter, net = models
    sched, args = _args(unet, adapter, net)
    monkeypatch.setattr(hoisting, "MIN_MODEL_BYTES", 1 << 40)
    stepwise = make_denoise_loop(nnx.graphdef(unet), sched, cfg=True, control_graphdefs=(nnx.graphdef(net),),
                                 partial=True)
    assert stepwise.constants(*args, jnp.int32(1)) == {}
    stepped = run_stepwise(stepwise, args + (jnp.int32(1),), 0, STEPS, lambda _: None)
    np.testing.assert_array_equal(np.asarray(stepped), _run(unet, net, sched, args, hoist=True))
