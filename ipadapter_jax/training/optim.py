"""The optimizer of every training run: AdamW with an optional schedule,
clipping, gradient accumulation and a parameter EMA kept in its state."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ipadapter_jax.io.errors import BadArgument


class EmaState(NamedTuple):
    """Exponential moving average of the parameters, kept in the optimizer
    state so that it is sharded, donated and checkpointed with it."""

    ema: Any


def ema_tracker(decay: float) -> optax.GradientTransformation:
    """Passes updates through unchanged; tracks ``ema = decay * ema + (1 - decay) * new_params``."""

    def init(params):
        return EmaState(jax.tree.map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        return updates, EmaState(jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, new))

    return optax.GradientTransformation(init, update)


def find_ema(opt_state):
    """The EMA parameters inside an optimizer state, or None."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
             if isinstance(s, EmaState)]
    return found[0].ema if found else None


def _lr_schedule(o, warmup: int, total: int) -> optax.Schedule:
    if o.schedule == "constant":
        lr = optax.constant_schedule(o.lr)
        if warmup:
            lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), lr], [warmup])
        return lr
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, max(warmup, 1), total)
    raise BadArgument(f"optimizer.schedule must be 'constant' or 'cosine', got {o.schedule!r}")


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, lr_schedule)`` from ``cfg.optimizer``: AdamW (paper: lr
    1e-4, weight decay 0.01, no clipping) with optional warmup/cosine schedule,
    global-norm clipping, gradient accumulation and a parameter EMA
    (``optimizer.ema_decay`` > 0; exported instead of the raw weights).

    ``lr_schedule`` counts optimizer updates, not micro-steps: under gradient
    accumulation (``optimizer.accumulate`` = k) it advances once per k steps;
    ``step_lr`` gives the rate of a training step."""
    o = cfg.optimizer
    # Express warmup and decay in optimizer updates so they span the run as configured.
    k = max(o.accumulate, 1)
    lr = _lr_schedule(o, o.warmup_steps // k, max(cfg.train.steps // k, 1))
    chain = []
    if o.clip_norm:
        chain.append(optax.clip_by_global_norm(o.clip_norm))
    chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    if o.ema_decay:
        chain.append(ema_tracker(o.ema_decay))
    opt = optax.chain(*chain) if len(chain) > 1 else chain[0]
    if o.accumulate > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=o.accumulate)
    return opt, lr


def step_lr(cfg, lr_schedule: optax.Schedule) -> Callable[[int], float]:
    """The learning rate in effect at training step ``step`` (what metrics.csv logs)."""
    k = max(cfg.optimizer.accumulate, 1)
    return lambda step: float(lr_schedule(step // k))
