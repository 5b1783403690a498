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


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo with its family / model / stepping numbers
    (many names are generic: "AMD EPYC", "Intel(R) Xeon(R) CPU @ 2.20GHz" cover several
    generations), or None where that file is missing or has no model name."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return None
    fields = {}
    for line in info:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return None
    ids = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"),
                                                        ("stepping", "stepping")) if fields.get(key)]
    return f"{name} ({', '.join(ids)})" if ids else name


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        # The CPU's model (and vendor) is part of the result: PyTorch's MKL / oneDNN and XLA's
        # kernels are not equally fast on every x86 CPU, so ratios move between machines.
        return f"{cpu_model() or platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return f"{dev.device_kind} ({dev.platform})"


def report(name: str, record: dict) -> dict:
    """Print a one-line summary and append the record to bench/results/<name>.jsonl."""
    import jax
    import torch

    record = {"benchmark": name, "machine": machine(), "jax": jax.__version__, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), **record}
    if jax.devices()[0].platform != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            record["jax_peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    # bench/suite.py collects the records of the benchmarks it runs through this file.
    if os.environ.get("BENCH_RECORDS"):
        with open(os.environ["BENCH_RECORDS"], "a") as f:
            f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))
    return record


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def jax_vs_torch(jax_fn: Callable[[], object], torch_fn: Callable[[], object], runs: int, *,
                 skip_torch: bool = False) -> tuple[dict, object, object]:
    """Time a blocking JAX call (first call = compile, reported apart) and a torch
    call (one untimed warm-up) ``runs`` times each; returns (record fields, last
    JAX output, last torch output)."""
    out = {}
    compile_s = time_runs(jax_fn, 1)[0]
    holder = {}

    def keep(fn, key):
        def call():
            holder[key] = fn()
        return call

    jax_times = time_runs(keep(jax_fn, "jax"), runs)
    out.update(runs=runs, jax_first_call_s=round(compile_s, 3), jax_median_s=round(median(jax_times), 4),
               jax_times_s=[round(t, 4) for t in jax_times])
    if not skip_torch:
        warm = time_runs(torch_fn, 1)[0]
        torch_times = time_runs(keep(torch_fn, "torch"), runs)
        out.update(torch_warmup_s=round(warm, 3), torch_median_s=round(median(torch_times), 4),
                   torch_times_s=[round(t, 4) for t in torch_times],
                   ratio_jax_over_torch=round(median(jax_times) / median(torch_times), 3))
    return out, holder.get("jax"), holder.get("torch")


def torch_inference(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` under ``torch.no_grad()``, blocking until a CUDA device is done."""
    import torch

    def call():
        with torch.no_grad():
            out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return call
