"""Timing helpers shared by the benchmarks: warm-up/compile timed apart,
median of several runs, results appended as JSON lines with the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"


def time_runs(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall-clock seconds of ``runs`` calls; ``fn`` must block until done."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return f"{dev.device_kind} ({dev.platform})"


def report(name: str, record: dict) -> dict:
    """Print a one-line summary and append the record to bench/results/<name>.jsonl."""
    import jax
    import torch

    record = {"benchmark": name, "machine": machine(), "jax": jax.__version__, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), **record}
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))
    return record


def median(xs: list[float]) -> float:
    return statistics.median(xs)
