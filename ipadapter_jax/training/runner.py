"""The training runner shared by every training run (the IP-Adapter trainer in
``loop`` and the demo's base-model stages): step, log, checkpoint, resume.

A run supplies a ``Task``: the state it trains (a pytree, checkpointed as the
orbax item "state"), its step function, where its batches come from (a grain
iterator checkpointed as the item "data", or a pure function of the step)
and what its learning rate is; ``run`` does the rest:

* resumes from the latest checkpoint in ``<workdir>/checkpoints`` (restored
  against the shapes and shardings of the task's state);
* logs every ``train.log_every`` steps to ``<workdir>/metrics.csv``, a
  progress bar and, with ``train.tensorboard``, TensorBoard event files in
  ``<workdir>/tensorboard`` (process 0 only): the task's metrics, the learning
  rate, throughput (steps/s, samples/s, the host's wait for data per step);
* evaluates every ``train.eval_every`` steps and at the end when the task has
  an ``evaluate`` (all processes call it; process 0 writes its scalars to
  ``<workdir>/eval.csv`` and TensorBoard, its images to TensorBoard);
* stops with ``TrainingError`` on a non-finite loss or gradient norm, never
  checkpointing a broken state, naming the last good checkpoint;
* checkpoints (orbax, async) every ``train.save_every`` steps and at the end,
  keeping the last ``train.keep``;
* on a preemption notice (SIGTERM, or JAX's preemption sync point in
  multi-process runs) finishes the current step, checkpoints that step on
  every process (all agree on it), waits for the save and raises
  ``Preempted``: running the same command again resumes with exactly the
  losses of an uninterrupted run. Further SIGTERMs are ignored until the run
  has returned, so they cannot cut a save short.

The caller exports whatever it trained from ``Result.state``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax._src import distributed as jax_distributed  # the preemption service has no public accessor
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ipadapter_jax.io.errors import BadArgument, UserError

log = logging.getLogger(__name__)


class TrainingError(UserError, RuntimeError):
    """Training stopped on purpose (e.g. a non-finite loss); the last good checkpoint is kept
    and named in the message. A training outcome, not a bug: CLIs print it as one line."""


class Preempted(Exception):
    """Training stopped on a preemption notice after saving a checkpoint of
    ``step`` in ``directory`` on every process; the same command resumes it."""

    def __init__(self, step: int, directory: Path):
        self.step, self.directory = step, directory
        super().__init__(f"preempted at step {step}; saved a checkpoint in {directory}; "
                         "rerun the same command to resume")


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
    evaluate: ``(step, state) -> Evaluation | None``, called on every process at
      the evaluation steps (a collective when several processes share the work);
      process 0's result is written.
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
    evaluate: Callable[[int, Any], "Evaluation | None"] | None = None

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
class Evaluation:
    """What an evaluation gives: ``scalars`` (name -> float, e.g. "clip_i") and
    ``images`` (name -> uint8 [H, W, 3], e.g. a grid of samples)."""

    scalars: dict[str, float]
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    """state: the trained state; start: the step resumed from (0: a fresh
    run); loss: the last logged loss (nan when none was); counts: the totals
    of the task's counters."""

    state: Any
    start: int
    loss: float
    counts: dict[str, int]
    evaluation: Evaluation | None = None     # the last one (process 0), None without ``evaluate``


# --------------------------------------------------------------------------- checkpoints

def checkpoint_manager(workdir: str | Path, item_names: Sequence[str], keep: int | None = None,
                       cleanup: bool = False):
    """The orbax manager of ``<workdir>/checkpoints`` (async saves, the last ``keep`` kept).
    Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
    when complete, so a save cut short (SIGKILL) never looks like a checkpoint;
    ``cleanup`` removes such leftovers (only for the run that owns the folder:
    it would also remove a running save's)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=cleanup)
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
        value = self.kept[-1].get(column) if self.kept else None
        return int(value) if value else 0

    def write(self, row: dict) -> None:
        if self._writer is None:
            self._start(row)
        elif not row.keys() <= set(self._writer.fieldnames):
            # A column the file has not had (a run resumed by a newer version): rewrite it with
            # the column added; earlier rows leave it empty.
            self._file.flush()
            with open(self._file.name, newline="") as f:
                self.kept = list(csv.DictReader(f))
            self._file.seek(0)
            self._file.truncate()
            self._start(list(self._writer.fieldnames) + [k for k in row if k not in self._writer.fieldnames])
            self.kept = []
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLog:
    """TensorBoard event files in ``<workdir>/tensorboard`` (tensorboardX): scalars
    and images by step. A resumed run purges the events after the step it resumed
    from, so the curves continue without a second copy of the steps it repeats."""

    def __init__(self, folder: Path, resume_step: int):
        from tensorboardX import SummaryWriter

        # Purge what a run that stopped without a checkpoint (or after ``resume_step``) wrote past it.
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        for name, value in values.items():
            if name != "step" and isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
                self.writer.add_scalar(f"{prefix}{name}", float(value), step)
        self.writer.flush()

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for name, image in images.items():
            self.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- preemption

def _preemption_service() -> bool:
    """Whether JAX's preemption sync manager runs (``jax.distributed`` initialised
    with ``jax_enable_preemption_service``, the default): its notifier then owns SIGTERM."""
    state = jax_distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionNotice:
    """Whether a run must stop for preemption after a step: the same answer
    at the same step on every process.

    Several processes with JAX's preemption service: its notifier receives
    SIGTERM (on any host) and ``reached_preemption_sync_point`` agrees on the
    step. Otherwise a SIGTERM handler sets a flag (installed by ``with``, in
    the main thread only, the previous handler restored after); several
    processes then agree through an all-gather of the flags at every step.
    While installed, further SIGTERMs only set the flag again: they never cut
    a checkpoint save short."""

    def __init__(self):
        self.received = False
        self._sync = jax.process_count() > 1 and _preemption_service()
        self._previous = None
        self._installed = False

    def __enter__(self):
        if not self._sync and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        self.received = True

    def reached(self, step: int) -> bool:
        """True when the run must checkpoint ``step`` (the steps done) and stop."""
        if self._sync:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() > 1:
            return bool(np.max(multihost_utils.process_allgather(np.int32(self.received))))
        return self.received


# --------------------------------------------------------------------------- the loop

class _Loop:
    """One run of ``task`` from ``start`` to ``train.steps``."""

    def __init__(self, task: Task, train, manager, metrics: MetricsLog | None, counts: dict,
                 notice: PreemptionNotice, tensorboard: TensorBoardLog | None = None,
                 evals: MetricsLog | None = None):
        self.task, self.train, self.manager, self.metrics = task, train, manager, metrics
        self.tensorboard, self.evals = tensorboard, evals
        self.evaluation: Evaluation | None = None
        self.data_wait = 0.0     # host seconds spent waiting for batches since the last log
        # Counted on each process (its own batches) since this run started; ``counts``: the
        # totals before it (metrics.csv's last kept row, on process 0) and of every process.
        self.base, self.local, self.counts = dict(counts), {name: 0 for name in counts}, dict(counts)
        self.notice = notice
        self.loss = math.nan
        self.preempted_at: int | None = None
        self._last = time.perf_counter()
        self._last_step = 0
        self._bar = None

    def run(self, state, start: int):
        steps = self.train.steps
        self._last, self._last_step = time.perf_counter(), start
        self._bar = tqdm(range(start, steps), initial=start, total=steps, desc=self.task.desc,
                         disable=jax.process_index() != 0)
        eval_every = self.train.get("eval_every", 0) if self.task.evaluate is not None else 0
        for step in self._bar:
            waited = time.perf_counter()
            batch, counts = self.task.batch(step)
            self.data_wait += time.perf_counter() - waited
            for name, n in counts.items():
                self.local[name] += n
            state, metrics = self.task.step(state, batch, step)
            done = step + 1 == steps
            if (step + 1) % self.train.log_every == 0 or done:
                self._log(step, metrics)
            if eval_every and ((step + 1) % eval_every == 0 or done):
                self._evaluate(step + 1, state)
            preempted = not done and self.notice.reached(step + 1)
            if (step + 1) % self.train.save_every == 0 or done or preempted:
                # Never checkpoint a broken state: the loss and the gradient norm of this step
                # must be finite (finite gradients keep the AdamW update finite).
                if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))):
                    raise self._error(f"loss or gradient norm is not finite at step {step + 1}")
                self.manager.save(step + 1, args=self.task.save_args(state))
            if preempted:
                log.warning("%s: preemption notice; stopping after a checkpoint of step %d", self.task.desc,
                            step + 1)
                self.preempted_at = step + 1
                break
        self._bar.close()
        return state

    def _log(self, step: int, metrics: dict) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.loss = values["loss"]
        if not math.isfinite(self.loss):
            raise self._error(f"loss is {self.loss} at step {step + 1}")
        now = time.perf_counter()
        # The steps since the last log: log_every, or fewer for the last one and the first after a resume.
        steps = step + 1 - self._last_step
        steps_per_s = steps / max(now - self._last, 1e-9)
        self._last, self._last_step = now, step + 1
        self._total_counts()
        row = {"step": step + 1, **values, "lr": self.task.lr(step), "steps_per_s": steps_per_s}
        if self.task.samples_per_step:
            row["samples_per_s"] = steps_per_s * self.task.samples_per_step
        row["data_wait_s"] = self.data_wait / steps
        self.data_wait = 0.0
        row.update(self.counts)
        if self.metrics is not None:
            self.metrics.write(row)
        if self.tensorboard is not None:
            self.tensorboard.scalars(step + 1, row, "train/")
        throughput = {"img/s": f"{row['samples_per_s']:.1f}"} if "samples_per_s" in row else {}
        self._bar.set_postfix(loss=f"{self.loss:.4f}", **throughput, wait=f"{row['data_wait_s']:.3f}s",
                              **self.counts)

    def _evaluate(self, step: int, state) -> None:
        """The task's evaluation at ``step``: written by process 0 (eval.csv, TensorBoard, a log line)."""
        start = time.perf_counter()
        evaluation = self.task.evaluate(step, state)
        self._last += time.perf_counter() - start      # evaluation time is not training throughput
        if jax.process_index() != 0 or evaluation is None:
            return
        self.evaluation = evaluation
        if self.evals is not None:
            self.evals.write({"step": step, **evaluation.scalars})
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, evaluation.scalars, "eval/")
            self.tensorboard.images(step, evaluation.images)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.scalars.items())
        log.info("%s: evaluation at step %d: %s (%.1f s)", self.task.desc, step, shown or "images only",
                 time.perf_counter() - start)

    def _total_counts(self) -> None:
        """``counts``: the totals of every process (all call this at the same steps)."""
        local = np.array([self.local[name] for name in self.base], np.int64)
        if jax.process_count() > 1 and len(local):
            local = np.sum(multihost_utils.process_allgather(local), axis=0)
        self.counts = {name: self.base[name] + int(n) for name, n in zip(self.base, local)}

    def _error(self, what: str) -> TrainingError:
        self.manager.wait_until_finished()   # the latest step is then the last complete one
        latest = self.manager.latest_step()
        kept = (f"The last good checkpoint (step {latest}) is kept in {self.manager.directory}" if latest is not None
                else f"No checkpoint was saved before (in {self.manager.directory})")
        return TrainingError(f"{self.task.desc}: {what}; stopping. {kept}")


def check_train_config(train) -> None:
    """Refuse ``train.steps`` < 0, ``log_every`` / ``save_every`` < 1,
    ``eval_every`` < 0 and ``keep`` < 1 (None: keep all), naming the field."""
    for name, low in (("steps", 0), ("log_every", 1), ("save_every", 1), ("keep", 1), ("eval_every", 0)):
        value = train.get(name, low)
        if name == "keep" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BadArgument(f"train.{name} must be an integer >= {low}, got {value!r}")


def run(task: Task, workdir: str | Path, train) -> Result:
    """Train ``task`` for ``train.steps`` steps (``train``: a config with
    ``steps``, ``log_every``, ``save_every`` and ``keep``, default 2), resuming
    from the latest checkpoint in ``workdir``. Raises ``Preempted`` after
    checkpointing the step a preemption notice stopped it at (see
    ``PreemptionNotice``)."""
    check_train_config(train)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint_manager(workdir, task.item_names, keep=train.get("keep", 2), cleanup=True)
    state, start = task.state, manager.latest_step() or 0
    if start:
        state = restore_state(manager, start, state, task.data)
        log.info("%s: resumed from %s at step %d", task.desc, manager.directory, start)
    main = jax.process_index() == 0
    metrics = MetricsLog(workdir / "metrics.csv", start, task.columns) if main else None
    evals = MetricsLog(workdir / "eval.csv", start) if main and task.evaluate is not None else None
    tensorboard = TensorBoardLog(workdir / "tensorboard", start) if main and train.get("tensorboard") else None
    counts = {name: metrics.last(name) if metrics is not None else 0 for name in task.counters}
    with PreemptionNotice() as notice:   # SIGTERM handled until every save has finished
        loop = _Loop(task, train, manager, metrics, counts, notice, tensorboard, evals)
        try:
            state = loop.run(state, start)
        finally:
            manager.wait_until_finished()
            for log_file in (metrics, evals, tensorboard):
                if log_file is not None:
                    log_file.close()
    if loop.preempted_at is not None:
        raise Preempted(loop.preempted_at, workdir / "checkpoints")
    return Result(state, start, loop.loss, loop.counts, loop.evaluation)
