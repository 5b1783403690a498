"""The denoising loop: one ``lax.fori_loop`` in one ``jax.jit``, and the one
cache of its compiled executables."""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.models import hoisting
from ipadapter_jax.models.conditioning import UNetConditioning
from ipadapter_jax.pipeline.control import controlled


def guide(eps: jax.Array, guidance: jax.Array, rescale: jax.Array) -> jax.Array:
    """Classifier-free guidance over an [uncond; cond] batch, with guidance
    rescale (Lin et al. 2023, sec. 3.4)."""
    eps_uncond, eps_text = jnp.split(eps, 2)
    guided = eps_uncond + guidance * (eps_text - eps_uncond)
    axes = tuple(range(1, guided.ndim))
    std_text = jnp.std(eps_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = rescale * guided * (std_text / std_cfg) + (1 - rescale) * guided
    # `where` keeps rescale=0 exact (and NaN-free when std_cfg is 0).
    return jnp.where(rescale > 0, rescaled, guided)


def gated(cond: UNetConditioning, gates: jax.Array, i) -> UNetConditioning:
    """The conditioning of step ``i``: each adapter's scales times its gate."""
    prompts = tuple(p.replace(scale=p.scale * g[i]) for p, g in zip(cond.image_prompts, gates))
    return cond.replace(image_prompts=prompts)


class Stepwise(NamedTuple):
    """A loop run a step per call (``make_denoise_loop(partial=True)``):
    ``constants(*args)`` once per sampling call (what every step shares, see
    ``ipadapter_jax.models.hoisting``), then ``step(*args, constants)`` per step."""

    constants: Callable
    step: Callable


def make_denoise_loop(unet_graphdef, scheduler, *, cfg: bool, control_graphdefs: tuple = (),
                      guess_mode: bool = False, partial: bool = False, hoist: bool = True):
    """The jitted denoising loop for one UNet structure and scheduler.

    Returns ``denoise(params, sched_state, latents, cond, gates, guidance,
    rescale, noise_key, start, control=None) -> latents``: ``lax.fori_loop``
    from ``start`` over the scheduler's steps. ``cond`` is the UNet's
    ``UNetConditioning``; under classifier-free guidance (``cfg``) its batch is
    [uncond; cond] and the latents are doubled to match, so both halves run as
    one batch. ``gates[a, i]`` multiplies adapter a's scales at step i
    (start/end). With ControlNets (``control_graphdefs``, one per net),
    ``control`` is a ``ControlInputs`` and their residuals join each step's
    conditioning.

    ``hoist`` (default): what is the same at every step (text and image-token
    K/V, control-image embeddings, SDXL's added embedding, and Winograd kernel
    transforms within ``hoisting.BUDGETS`` / ``MIN_STEPS``) is computed once
    before the loop (models under ``hoisting.MIN_MODEL_BYTES`` hoist nothing); ``False`` recomputes it at every step, as diffusers does
    (same math; for benchmarks).

    ``partial=True``: a ``Stepwise``: ``step(..., start, control, stop,
    constants) -> (latents, sched_state)`` runs steps ``[start, stop)`` only and
    returns the state to continue from, so a progress bar is driven from
    Python between calls (a host callback inside the loop would keep JAX from
    caching the executable on disk); ``constants(...)`` (same arguments, no
    ``constants``) computes the shared values once per sampling call.
    """

    def models_and_body(params, cond, gates, guidance, rescale, noise_key, control):
        unet = nnx.merge(unet_graphdef, params)
        nets = tuple(nnx.merge(g, p) for g, p in zip(control_graphdefs, control.params)) if control_graphdefs \
            else ()

        def body(i, carry):
            x, state = carry
            model_in = jnp.concatenate([x, x]) if cfg else x
            model_in = scheduler.scale_model_input(state, model_in, i)
            step_cond = gated(cond, gates, i)
            if nets:
                step_cond = controlled(nets, control, step_cond, model_in, state.timesteps[i], i, cfg=cfg,
                                       guess_mode=guess_mode)
            eps = unet(model_in, state.timesteps[i], step_cond).astype(jnp.float32)
            if cfg:
                eps = guide(eps, guidance, rescale)
            noise = (jax.random.normal(jax.random.fold_in(noise_key, i), x.shape, jnp.float32)
                     if scheduler.needs_noise else None)
            return scheduler.step(state, eps, i, x, noise)

        models = {"unet": unet, **{f"controlnet{k}": net for k, net in enumerate(nets)}}
        return models, body

    def shared_values(models, body, params, sched_state, latents, start, control):
        """What every step shares, computed here (``hoisting.collect``); {} when nothing is hoisted."""
        if not (hoist and hoisting.worth_hoisting(params, control)):
            return {}
        return hoisting.collect(models, body, start, (latents, sched_state), steps=scheduler.num_steps(sched_state))

    def step_constants(params, sched_state, latents, cond, gates, guidance, rescale, noise_key, start,
                       control=None, stop=None):
        models, body = models_and_body(params, cond, gates, guidance, rescale, noise_key, control)
        return shared_values(models, body, params, sched_state, latents, start, control)

    def denoise(params, sched_state, latents, cond, gates, guidance, rescale, noise_key, start, control=None,
                stop=None, constants=None):
        models, body = models_and_body(params, cond, gates, guidance, rescale, noise_key, control)
        end = stop if partial else scheduler.num_steps(sched_state)
        if constants is None:
            constants = shared_values(models, body, params, sched_state, latents, start, control)
        with hoisting.use(models, constants) if hoist else contextlib.nullcontext():
            latents, state = jax.lax.fori_loop(start, end, body, (latents, sched_state))
        return (latents, state) if partial else latents

    if partial:
        return Stepwise(jax.jit(step_constants), jax.jit(denoise))
    return jax.jit(denoise)


class CompiledLoops:
    """Compiled denoising loops, keyed one way: the UNet's structure (its
    graphdef: attaching or detaching an adapter changes it), the scheduler's
    identity, CFG, whole or step by step (``partial``, for a progress bar),
    and the argument signature (tree structure, shapes, dtypes). New prompts,
    seeds, scales, masks or images are argument values and reuse an
    executable; nothing is cleared by hand."""

    def __init__(self):
        self._executables: dict = {}

    def __len__(self) -> int:
        return len(self._executables)

    def get(self, graphdef, scheduler, *, cfg: bool, partial: bool, args: tuple, control_graphdefs: tuple = (),
            guess_mode: bool = False):
        """(executable, compiled_now) for these arguments (and ControlNet structures);
        a ``Stepwise`` of executables when ``partial``."""
        leaves = jax.tree.leaves(args)
        key = (graphdef, scheduler.cache_key, cfg, partial, control_graphdefs, guess_mode, jax.tree.structure(args),
               tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves))
        if key in self._executables:
            return self._executables[key], False
        fn = make_denoise_loop(graphdef, scheduler, cfg=cfg, control_graphdefs=control_graphdefs,
                               guess_mode=guess_mode, partial=partial)
        if partial and not hoisting.worth_hoisting(args[0], args[9]):   # nothing to compute once
            self._executables[key] = Stepwise(lambda *_: {}, fn.step.lower(*args, {}).compile())
        elif partial:
            constants = fn.constants.lower(*args).compile()
            # With their shardings: on a mesh the step is compiled for the values it will be given.
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                  constants.out_info)
            self._executables[key] = Stepwise(constants, fn.step.lower(*args, shapes).compile())
        else:
            self._executables[key] = fn.lower(*args).compile()
        return self._executables[key], True


def run_stepwise(partial_loop: Stepwise, args: tuple, start: int, stop: int,
                 on_step: Callable[[jax.Array], None]) -> jax.Array:
    """Steps ``[start, stop)`` of a ``partial=True`` loop, one call each, calling
    ``on_step(latents)`` as each step finishes (a progress bar; the parity
    toolkit's trajectory). ``args`` are the
    loop's arguments: ``(params, state, latents, cond, gates, guidance,
    rescale, noise_key, start, control, stop)``. Step i + 1 is dispatched
    before waiting for step i, so the device never idles for the host."""
    params, state, latents, *rest = args
    constants = partial_loop.constants(*args)
    pending = None
    for i in range(start, stop):
        latents, state = partial_loop.step(params, state, latents, *rest[:5], jnp.int32(i), rest[6],
                                           jnp.int32(i + 1), constants)
        if pending is not None:
            pending.block_until_ready()
            on_step(pending)
        pending = latents
    if pending is not None:
        pending.block_until_ready()
        on_step(pending)
    return latents
