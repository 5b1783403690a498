"""Preemption: SIGTERM stops ``train.py`` after the current step with a
checkpoint of that step (every process agreeing on it), one line saying where
and exit status 0; a second SIGTERM during the save does not cut it short; the
same command then resumes with exactly the losses of an uninterrupted run. Here
as two processes (jax.distributed on localhost, JAX's preemption service), and
in process, through the demo recipe's ``fit`` (the runner every stage shares),
which restores the previous SIGTERM handler after. The one-process case is in
tests/test_train.py (it shares that module's uninterrupted run), with the
helpers that start, signal and check the runs of both."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from helpers import cpu_env
from test_train import (NO_REGULAR_SAVES, STEPS, check_preempted, command, finish, losses,  # noqa: F401
                        saved_steps, setup, sigterm_after, start)   # setup: the tiny model and dataset
from test_train_multiprocess import free_port


def preemption_env() -> dict:
    """The processes' environment: CPU, one device each (no forced device count),
    with the test run's persistent compilation cache and XLA settings
    (tests/conftest.py)."""
    return cpu_env()


@pytest.fixture
def env() -> dict:
    return preemption_env()


def two_processes(setup, workdir: Path, port: int) -> list[list[str]]:
    return [command(setup, workdir, steps=STEPS, extra=[*NO_REGULAR_SAVES, f"--coordinator=127.0.0.1:{port}",
                                                       "--num_processes=2", f"--process_id={i}"]) for i in range(2)]


def test_two_processes_agree_on_the_step_and_resume_exactly(setup, env, tmp_path):
    port = free_port()     # one for the three runs: the compilation cache's keys depend on it
    reference = tmp_path / "reference"
    finish(start(two_processes(setup, reference, port), tmp_path / "logs0", env))

    workdir = tmp_path / "preempted"
    procs = start(two_processes(setup, workdir, port), tmp_path / "logs1", env)
    sigterm_after(procs, workdir)
    step = check_preempted(finish(procs), workdir)

    outputs = finish(start(two_processes(setup, workdir, port), tmp_path / "logs2", env))
    assert f"'resumed_from': {step}" in outputs[0][0]
    np.testing.assert_array_equal(losses(workdir), losses(reference))
    assert (workdir / "ip_adapter.safetensors").is_file()
    assert saved_steps(workdir)[-1] == STEPS


def test_fit_stops_on_sigterm_and_restores_the_handler(tmp_path):
    """In process: a SIGTERM during a step of the demo's ``fit`` (the shared
    runner) ends that step with a checkpoint of it and ``Preempted``; the
    SIGTERM handler in place before is back; the rerun ends where an
    uninterrupted run ends."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from ipadapter_jax.demo import recipe
    from ipadapter_jax.training import runner

    data = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    cfg = ml_collections.ConfigDict({
        "seed": 0,
        "optimizer": {"lr": 0.1, "schedule": "constant", "warmup_steps": 0, "accumulate": 1, "clip_norm": 0.0,
                      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "ema_decay": 0.0},
        "train": {"steps": 8, "save_every": 100, "log_every": 1}})

    def loss_fn(params, frozen, batch, key):
        return jnp.mean((batch["x"] + jax.random.normal(key, batch["x"].shape) * 0.01 - params["w"]) ** 2), {}

    def batch_fn(step, preempt_at=None):
        if step == preempt_at:
            os.kill(os.getpid(), signal.SIGTERM)    # arrives while this step runs
        return {"x": data[recipe.batch_indices(0, step, len(data), 4)]}

    def fit(workdir, preempt_at=None):
        return recipe.fit(cfg, workdir, {"w": jnp.zeros(4)}, {}, loss_fn, lambda i: batch_fn(i, preempt_at),
                          desc="fit")

    straight = fit(tmp_path / "a")
    previous = signal.getsignal(signal.SIGTERM)
    received = []

    def handler(signum, frame):
        received.append(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(runner.Preempted) as stopped:
            fit(tmp_path / "b", preempt_at=2)
        assert signal.getsignal(signal.SIGTERM) is handler and not received   # restored, and not called
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.step == 3 and saved_steps(tmp_path / "b") == [3]
    assert str(stopped.value) == (f"preempted at step 3; saved a checkpoint in {tmp_path / 'b' / 'checkpoints'}; "
                                  "rerun the same command to resume")
    resumed = fit(tmp_path / "b")
    np.testing.assert_array_equal(np.asarray(resumed["w"]), np.asarray(straight["w"]))
    np.testing.assert_array_equal(losses(tmp_path / "b"), losses(tmp_path / "a"))
