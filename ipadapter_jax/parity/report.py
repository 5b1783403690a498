"""A parity run's report: the Markdown table, the JSON document and the plot."""

from __future__ import annotations

import math
import platform
from importlib import metadata
from typing import Sequence

from ipadapter_jax.parity.metrics import Figure, bounds_for, first_over
from ipadapter_jax.parity.run import Result


def _fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def _mark(fig: Figure, bound: float) -> str:
    return "ok" if not fig.over(bound) else "**over**"


def markdown(results: Sequence[Result], bound: float | None = None) -> str:
    """One table of components (the first block past the bound named), one of
    the trajectory; with two dtypes their figures side by side, each against
    its own bound (in the column header)."""
    bounds = [bounds_for(r.dtype, bound) for r in results]
    head = " | ".join(f"{r.dtype} rel (<= {b['component']:g}) | max abs" for r, b in zip(results, bounds))
    block_bounds = ", ".join(f"{r.dtype} {b['block']:g}" for r, b in zip(results, bounds))
    lines = [f"| component | {head} | first block past the bound ({block_bounds}) |",
             "|---|" + "---|" * (2 * len(results) + 1)]
    for k, (comp, _) in enumerate(results[-1].components):
        cells, firsts = [], []
        for r, b in zip(results, bounds):
            c, blocks = r.components[k]
            cells.append(f"{_fmt(c.rel)} {_mark(c, b['component'])} | {_fmt(c.max_abs)}")
            first = first_over(blocks, b["block"])
            if first:
                firsts.append(f"{first} ({r.dtype})" if len(results) > 1 else first)
        note = f" ({comp.note})" if comp.note else ""
        lines.append(f"| {comp.name}{note} | {' | '.join(cells)} | {', '.join(firsts) or '-'} |")
    out = "\n".join(lines)
    if results[-1].trajectory:
        head = " | ".join(f"{r.dtype} rel (<= {b['step']:g})" for r, b in zip(results, bounds))
        lines = [f"| step | {head} |", "|---|" + "---|" * len(results)]
        for k, step in enumerate(results[-1].trajectory):
            lines.append(f"| {step.name} | " + " | ".join(
                f"{_fmt(r.trajectory[k].rel)} {_mark(r.trajectory[k], b['step'])}" for r, b in zip(results, bounds))
                + " |")
        lines.append("| image: rel, max abs | " + " | ".join(
            f"{_fmt(r.image.rel)}, {_fmt(r.image.max_abs)} (<= {b['image_max_abs']:g})"
            for r, b in zip(results, bounds)) + " |")
        out += "\n\n" + "\n".join(lines)
    for note in results[-1].notes:
        out += f"\n\nnote: {note}"
    return out + "\n"


def _result_json(result: Result, bound: float | None) -> dict:
    bounds = bounds_for(result.dtype, bound)
    components = []
    for comp, blocks in result.components:
        entry = comp.to_json()
        entry["blocks"] = [b.to_json() for b in blocks]
        entry["first_divergent"] = first_over(blocks, bounds["block"])
        components.append(entry)
    out = {"dtype": result.dtype, "bounds": bounds, "components": components,
           "trajectory": [{"step": i + 1, "rel": f.to_json()["rel"]} for i, f in enumerate(result.trajectory)],
           "image": None if result.image is None else {k: result.image.to_json()[k] for k in ("rel", "max_abs")},
           "notes": result.notes}
    return out


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """The CPU (model name from /proc/cpuinfo where there is one), the cores, the
    platform, and JAX's backend, device and matmul precision."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:   # where our side ran (a report from a GPU says so)
        import jax

        out.update(jax_backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind,
                   jax_matmul_precision=str(jax.config.jax_default_matmul_precision))
    except Exception:   # noqa: BLE001  the report is written whatever JAX says
        pass
    return out


def to_json(results: Sequence[Result], *, bound: float | None, run: dict) -> dict:
    """The JSON document: the asked dtype's figures at the top level
    (``components``, ``trajectory``, ``image``), float32's under ``float32``
    when bfloat16 was asked, plus the versions of both stacks and the machine."""
    main = _result_json(results[-1], bound)
    if len(results) > 1:
        main["float32"] = _result_json(results[0], bound)
    main["versions"] = {name: _version(name) for name in ("ipadapter-jax", "jax", "jaxlib", "flax", "torch",
                                                          "diffusers", "transformers", "numpy")}
    main["machine"] = machine()
    main["run"] = run
    return main


def plot(results: Sequence[Result], path: str, bound: float | None = None) -> None:
    """Error per block (every component's blocks in order) and per step, on a
    log axis, one line per dtype (matplotlib: the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_steps = any(r.trajectory for r in results)
    fig, axes = plt.subplots(1, 2 if has_steps else 1, figsize=(14 if has_steps else 10, 4.5), squeeze=False)
    ax = axes[0, 0]
    for r in results:
        labels = [f"{c.name}:{b.name}" for c, blocks in r.components for b in blocks]
        values = [max(b.rel, 1e-12) if math.isfinite(b.rel) else 1.0 for _, blocks in r.components for b in blocks]
        ax.semilogy(range(len(values)), values, marker=".", label=r.dtype)
    for r, color in zip(results, ("red", "purple")):
        ax.axhline(bounds_for(r.dtype, bound)["block"], color=color, linestyle="--", label=f"{r.dtype} bound")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    ax.set_ylabel("relative error (reference inputs)")
    ax.set_title("per block")
    ax.legend()
    if has_steps:
        ax = axes[0, 1]
        for r in results:
            ax.semilogy([i + 1 for i in range(len(r.trajectory))], [max(f.rel, 1e-12) for f in r.trajectory],
                        marker="o", label=r.dtype)
        for r, color in zip(results, ("red", "purple")):
            ax.axhline(bounds_for(r.dtype, bound)["step"], color=color, linestyle="--", label=f"{r.dtype} bound")
        ax.set_xlabel("scheduler step")
        ax.set_ylabel("relative error of the latents")
        ax.set_title("sampling trajectory")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
