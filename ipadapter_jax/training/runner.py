"""The training runner shared by every training run (the IP-Adapter trainer in
``loop`` and the demo's base-model stages): step, log, checkpoint, resume.

A run supplies a ``Task``: the state it trains (a pytree, checkpointed as the
orbax item "state"), its step function, where its batches come from (a grain
iterator checkpointed as the item "data", or a pure function of the step)
and what its learning rate is; ``run`` does the rest:

* resumes from the latest checkpoint in ``<workdir>/checkpoints`` (restored
  against the shapes and shardings of the task's state);
* logs every ``train.log_every`` steps to ``<workdir>/metrics.csv`` and a
  progress bar (process 0 only);
* stops with ``TrainingError`` on a non-finite loss or gradient norm, never
  checkpointing a broken state, naming the last good checkpoint;
* checkpoints (orbax, async) every ``train.save_every`` steps and at the end,
  keeping the last ``train.keep``.

The caller exports whatever it trained from ``Result.state``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import grain.python as grain
import jax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped on purpose (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclasses.dataclass
class Task:
    """What one training run supplies to ``run``.

    state: the pytree trained and checkpointed (item "state").
    step: ``(state, batch, step) -> (state, metrics)``; ``metrics`` holds at
      least the scalars "loss" and "grad_norm"; every metric is logged.
    batch: ``step -> (batch, counts)``: the step's (device) batch and host
      counts added to running totals that are logged as columns (continued
      from metrics.csv on resume), e.g. ``{"skipped_images": 1}``.
    lr: ``step -> float``, the learning rate logged for a step.
    counters: the names of the counted columns.
    data: the grain iterator ``batch`` reads, checkpointed (item "data") and
      restored in place; None when batches are a function of the step.
    config: JSON saved with every checkpoint (item "config"), or None.
    columns: the metrics.csv columns; None: those of the first logged row.
    samples_per_step: > 0 adds a ``samples_per_s`` column.
    desc: the progress bar's label, and the prefix of errors.
    """

    state: Any
    step: Callable[[Any, Any, int], tuple[Any, dict]]
    batch: Callable[[int], tuple[Any, dict]]
    lr: Callable[[int], float]
    counters: Sequence[str] = ()
    data: Any = None
    config: dict | None = None
    columns: Sequence[str] | None = None
    samples_per_step: int = 0
    desc: str = "training"

    @property
    def item_names(self) -> tuple[str, ...]:
        return ("state",) + ("data",) * (self.data is not None) + ("config",) * (self.config is not None)

    def save_args(self, state) -> ocp.args.Composite:
        items = {"state": ocp.args.StandardSave(state)}
        if self.data is not None:
            items["data"] = grain.PyGrainCheckpointSave(self.data)
        if self.config is not None:
            items["config"] = ocp.args.JsonSave(self.config)
        return ocp.args.Composite(**items)


@dataclasses.dataclass
class Result:
    """state: the trained state; start: the step resumed from (0: a fresh
    run); loss: the last logged loss (nan when none was); counts: the totals
    of the task's counters."""

    state: Any
    start: int
    loss: float
    counts: dict[str, int]


# --------------------------------------------------------------------------- checkpoints

def checkpoint_manager(workdir: str | Path, item_names: Sequence[str], keep: int | None = None):
    """The orbax manager of ``<workdir>/checkpoints`` (async saves, the last ``keep`` kept)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager((Path(workdir) / "checkpoints").absolute(), options=options,
                                 item_names=tuple(item_names))


def restore_state(manager, step: int, state, data=None):
    """The "state" item saved at ``step``, restored against the shapes, dtypes
    and shardings of ``state``; the grain iterator ``data`` is restored in place."""
    items = {"state": ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))}
    if data is not None:
        items["data"] = grain.PyGrainCheckpointRestore(data)
    return manager.restore(step, args=ocp.args.Composite(**items)).state


# --------------------------------------------------------------------------- metrics.csv

class MetricsLog:
    """``metrics.csv``, one row per logged step. On resume, rows past the
    restored step are dropped (the run logs them again) and ``last`` gives a
    column's value in the last kept row (what counters continue from)."""

    def __init__(self, path: Path, resume_step: int, columns: Sequence[str] | None = None):
        self.kept, header = [], None
        if path.exists() and resume_step:
            with open(path) as f:
                reader = csv.DictReader(f)
                self.kept = [r for r in reader if int(r["step"]) <= resume_step]
                header = reader.fieldnames
        self._file = open(path, "w", newline="")
        self._writer = None
        if columns or header:
            self._start(columns or header)

    def _start(self, columns):
        self._writer = csv.DictWriter(self._file, fieldnames=list(columns))
        self._writer.writeheader()
        self._writer.writerows(self.kept)
        self._file.flush()

    def last(self, column: str) -> int:
        return int(self.kept[-1][column]) if self.kept else 0

    def write(self, row: dict) -> None:
        if self._writer is None:
            self._start(row)
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- the loop

class _Loop:
    """One run of ``task`` from ``start`` to ``train.steps``."""

    def __init__(self, task: Task, train, manager, metrics: MetricsLog | None, counts: dict):
        self.task, self.train, self.manager, self.metrics, self.counts = task, train, manager, metrics, counts
        self.loss = math.nan
        self._last = time.perf_counter()
        self._bar = None

    def run(self, state, start: int):
        steps = self.train.steps
        self._bar = tqdm(range(start, steps), initial=start, total=steps, desc=self.task.desc,
                         disable=jax.process_index() != 0)
        for step in self._bar:
            batch, counts = self.task.batch(step)
            for name, n in counts.items():
                self.counts[name] += n
            state, metrics = self.task.step(state, batch, step)
            done = step + 1 == steps
            if (step + 1) % self.train.log_every == 0 or done:
                self._log(step, metrics)
            if (step + 1) % self.train.save_every == 0 or done:
                # Never checkpoint a broken state: the loss and the gradient norm of this step
                # must be finite (finite gradients keep the AdamW update finite).
                if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))):
                    raise self._error(f"loss or gradient norm is not finite at step {step + 1}")
                self.manager.save(step + 1, args=self.task.save_args(state))
        return state

    def _log(self, step: int, metrics: dict) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.loss = values["loss"]
        if not math.isfinite(self.loss):
            raise self._error(f"loss is {self.loss} at step {step + 1}")
        now = time.perf_counter()
        steps_per_s = self.train.log_every / max(now - self._last, 1e-9)
        self._last = now
        row = {"step": step + 1, **values, "lr": self.task.lr(step), "steps_per_s": steps_per_s}
        if self.task.samples_per_step:
            row["samples_per_s"] = steps_per_s * self.task.samples_per_step
        row.update(self.counts)
        if self.metrics is not None:
            self.metrics.write(row)
        self._bar.set_postfix(loss=f"{self.loss:.4f}", **self.counts)

    def _error(self, what: str) -> TrainingError:
        return TrainingError(f"{self.task.desc}: {what}; stopping. The last good checkpoint (step "
                             f"{self.manager.latest_step()}) is kept in {self.manager.directory}")


def run(task: Task, workdir: str | Path, train) -> Result:
    """Train ``task`` for ``train.steps`` steps (``train``: a config with
    ``steps``, ``log_every``, ``save_every`` and ``keep``, default 2), resuming
    from the latest checkpoint in ``workdir``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint_manager(workdir, task.item_names, keep=train.get("keep", 2))
    state, start = task.state, manager.latest_step() or 0
    if start:
        state = restore_state(manager, start, state, task.data)
        log.info("%s: resumed from %s at step %d", task.desc, manager.directory, start)
    metrics = MetricsLog(workdir / "metrics.csv", start, task.columns) if jax.process_index() == 0 else None
    counts = {name: metrics.last(name) if metrics is not None else 0 for name in task.counters}
    loop = _Loop(task, train, manager, metrics, counts)
    try:
        state = loop.run(state, start)
    finally:
        manager.wait_until_finished()
        if metrics is not None:
            metrics.close()
    return Result(state, start, loop.loss, counts)
