"""``ipadapter-train sweep``: ablations as configs. One training run per set of
overrides, one after another (or one command per set for a cluster scheduler),
then one Markdown table of every run's final loss and evaluation.

    ipadapter-train sweep --config configs/demo/ip_adapter.py --grid "model.num_tokens=1,4,16" \\
        --workdir runs/tokens -- --config.train.eval_every=1300 --config.eval.cases=demo
    ipadapter-train sweep --config C --grid "step.snr_gamma=0,5" --grid "optimizer.lr=1e-4,3e-4" --print

Each --grid "FIELD=V1,V2,..." is one axis (values holding commas: separate
them with ";"); the runs are every combination (the product, in the order given). Run k of a sweep trains in ``WORKDIR/<name>``
(``num_tokens=1``, ``snr_gamma=5,lr=3e-4``: the fields' last names and values)
with ``--config.workdir`` set there and ``--config.train.export`` beside it;
arguments after ``--`` (``--config.FIELD=VALUE`` overrides, train's flags) go
to every run. Runs resume like any training run: rerunning a sweep continues
the unfinished ones and re-exports the finished. The table (``WORKDIR/sweep.md``,
also printed) has, per run, its overrides, final loss (``metrics.csv``),
evaluation (``eval.json``: CLIP-I / CLIP-T when ``train.eval_every`` and
``eval.clip_model`` are set) and folder. A run that fails is marked in the
table and the sweep goes on (the exit status is then 1); a run preempted
(SIGTERM: it saved a checkpoint) is marked so, and rerunning the sweep resumes it.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

PROG = "ipadapter-train sweep"


class _Parser(argparse.ArgumentParser):
    def error(self, message):      # one line, no usage block
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training config file every run starts from")
    p.add_argument("--grid", action="append", required=True, metavar="FIELD=V1,V2,...",
                   help="one axis of the sweep (repeat for more: the runs are the product)")
    p.add_argument("--workdir", default="", help="the sweep's folder (default: runs/sweep_<config name>)")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="print one command per run (for a scheduler) instead of running them")
    p.add_argument("--table-only", action="store_true", help="only gather the runs' results into the table")
    return p


def parse_axis(spec: str) -> tuple[str, list[str]]:
    """``"model.num_tokens=1,4,16"`` -> ("model.num_tokens", ["1", "4", "16"]); values that
    hold commas are separated by ";" (``"model.image_layers=up;down,mid"``)."""
    field, sep, values = spec.partition("=")
    field = field.strip().removeprefix("--config.").removeprefix("config.")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", field) or not values.strip():
        raise ValueError(f"--grid {spec!r}: expected FIELD=V1,V2,... with a config field, e.g. "
                         "model.num_tokens=1,4,16")
    parts = [v.strip() for v in values.split(";" if ";" in values else ",")]
    if any(not v for v in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"--grid {spec!r}: values must be non-empty and distinct")
    return field, parts


def runs(axes: list[tuple[str, list[str]]]) -> list[tuple[str, dict[str, str]]]:
    """``(name, {field: value})`` for every combination of the axes."""
    fields = [f for f, _ in axes]
    if len(set(fields)) != len(fields):
        raise ValueError(f"--grid names a field twice: {fields}")
    out = []
    for values in itertools.product(*(v for _, v in axes)):
        overrides = dict(zip(fields, values))
        name = ",".join(f"{f.rsplit('.', 1)[1]}={v}" for f, v in overrides.items())
        out.append((re.sub(r"[^\w.,=+-]", "_", name), overrides))
    return out


def command(config: str, workdir: Path, overrides: dict[str, str], extra: list[str], prog: list[str]) -> list[str]:
    return [*prog, "--config", config, *(f"--config.{f}={v}" for f, v in overrides.items()),
            f"--config.workdir={workdir}", f"--config.train.export={workdir / 'ip_adapter.safetensors'}", *extra]


def result_row(name: str, overrides: dict[str, str], workdir: Path, status: str) -> dict:
    """What a run left: its final loss (metrics.csv's last row) and last evaluation (eval.json)."""
    row = {"run": name, **overrides, "status": status, "folder": str(workdir)}
    try:
        with open(workdir / "metrics.csv") as f:
            last = list(csv.DictReader(f))[-1]
        row["step"], row["final loss"] = last["step"], f"{float(last['loss']):.4f}"
    except (OSError, IndexError, KeyError, ValueError):
        pass
    try:
        evaluation = json.loads((workdir / "eval.json").read_text())
        for key, column in (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T")):
            if key in evaluation:
                row[column] = f"{evaluation[key]:.3f}"
    except (OSError, ValueError):
        pass
    return row


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``argv``: the arguments after ``sweep``."""
    argv = list(sys.argv[2:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    bad = [a for a in extra if not a.startswith("--")]
    if bad:
        parser().error(f"unexpected argument {bad[0]!r} after --: runs take --config.FIELD=VALUE and train's flags")
    if not os.path.isfile(args.config.split(":", 1)[0]):
        parser().error(f"--config {args.config}: no such file")
    try:
        plan = runs([parse_axis(spec) for spec in args.grid])
    except ValueError as e:
        parser().error(str(e))
    root = Path(args.workdir or f"runs/sweep_{Path(args.config.split(':', 1)[0]).stem}")
    if args.print_only:
        for name, overrides in plan:
            print(shlex.join(command(args.config, root / name, overrides, extra, ["ipadapter-train"])))
        return 0
    rows, failed = [], 0
    for k, (name, overrides) in enumerate(plan):
        workdir = root / name
        export = workdir / "ip_adapter.safetensors"
        if args.table_only:
            status = "exported" if export.is_file() else "not finished"
        else:
            print(f"{PROG}: run {k + 1} of {len(plan)}: {name} -> {workdir}", file=sys.stderr, flush=True)
            started = time.time()
            cmd = command(args.config, workdir, overrides, extra, [sys.executable, "-m", "ipadapter_jax.cli.train"])
            code = subprocess.run(cmd).returncode
            if code:
                status, failed = f"failed (exit {code})", failed + 1
            elif not export.is_file() or export.stat().st_mtime < started:
                status = "preempted (rerun the sweep)"     # it saved a checkpoint and stopped
            else:
                status = "done"
        rows.append(result_row(name, overrides, workdir, status))
    table = markdown(rows)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.md").write_text(table)
    print(table)
    return 1 if failed else 0
