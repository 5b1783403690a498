"""Every benchmark of the project in one command, JAX vs PyTorch side by side, as one table.

    python bench/suite.py                 # the CPU set (about 15 min on a 2-core machine)
    python bench/suite.py --set gpu       # the GPU set: SD1.5 512 px, bf16 vs diffusers fp16 (< 5 min on an H100/H200)
    python bench/suite.py --set gpu-extra # more GPU figures (remat policies, larger batches, encoders)
    python bench/suite.py --list          # what each set runs
    python bench/suite.py --render bench/results/suite-gpu.json   # rewrite BENCHMARKS.md's table from a results file

Each benchmark runs in its own process (bench/<name>.py, see its --help): same random weights in both
frameworks, median of several runs in one process, JAX's compile (its first call) timed apart. The set's
records go to bench/results/suite-<set>.json (and each benchmark's bench/results/<name>.jsonl); the table
replaces the set's section of BENCHMARKS.md (between its ``suite:<set>`` markers) unless --no-docs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "BENCHMARKS.md"

# (benchmark script, arguments[, extra environment]): the figures the performance goals are stated in.
SETS = {
    "cpu": [
        ("unet_forward", ["--config", "sd15", "--batch", "2", "--runs", "3"]),
        ("unet_forward", ["--config", "small", "--batch", "2", "--runs", "5"]),
        ("sampling", ["--config", "small", "--size", "8", "--steps", "20", "--runs", "5"]),
        ("sampling", ["--config", "sd15", "--size", "64", "--steps", "3", "--runs", "1"]),
        # The loop's cost per step without its fixed costs: (30-step time - 10-step time) / 20, per side.
        ("sampling", ["--config", "sd15", "--size", "64", "--steps", "10", "--runs", "1", "--compare-hoist"]),
        ("sampling", ["--config", "sd15", "--size", "64", "--steps", "30", "--runs", "1"]),
        ("train_step", ["--config", "small", "--size", "32", "--batch", "1", "--runs", "5"]),
        ("train_step", ["--config", "sd15", "--size", "32", "--batch", "1", "--runs", "2"]),
        ("vae_decode", ["--size", "64", "--batch", "1", "--runs", "3"]),
        ("clip_vision", ["--batch", "1", "--runs", "5"]),
        # One SD 1.5 denoising step (CFG) with a ControlNet + IP-Adapter at 512 px (issue: ControlNet).
        ("sampling", ["--config", "sd15", "--controlnets", "1", "--size", "64", "--steps", "1", "--runs", "3",
                      "--compare-hoist"]),
    ],
    # The denoising loop against the bare forward (issue: hoisting), the cpu set's rows for it.
    "cpu-loop": [
        ("unet_forward", ["--config", "sd15", "--batch", "2", "--runs", "3"]),
        ("sampling", ["--config", "sd15", "--size", "64", "--steps", "10", "--runs", "1", "--compare-hoist"]),
        ("sampling", ["--config", "sd15", "--size", "64", "--steps", "30", "--runs", "1"]),
        ("sampling", ["--config", "sd15", "--controlnets", "1", "--size", "64", "--steps", "1", "--runs", "3",
                      "--compare-hoist"]),
    ],
    "gpu": [
        ("unet_forward", ["--config", "sd15", "--batch", "2", "--dtype", "bfloat16", "--torch-dtype", "float16",
                          "--device", "cuda", "--runs", "10"]),
        ("sampling", ["--config", "sd15", "--steps", "50", "--batch", "1", "--batch", "8", "--dtype", "bfloat16",
                      "--device", "cuda", "--runs", "3", "--compare-hoist"]),
        ("train_step", ["--config", "sd15", "--size", "64", "--batch", "8", "--dtype", "bfloat16",
                        "--device", "cuda", "--runs", "5"]),
    ],
    # SDXL base at 1024 px: the UNet alone, the 30-step loop with CFG and a Plus adapter (bf16 vs diffusers
    # fp16 SDPA), the training step at batch 8 (bf16 vs PyTorch autocast bf16).
    "gpu-sdxl": [
        ("unet_forward", ["--config", "sdxl", "--size", "128", "--batch", "2", "--dtype", "bfloat16",
                          "--torch-dtype", "float16", "--device", "cuda", "--runs", "10"]),
        ("sampling", ["--config", "sdxl", "--adapter", "plus", "--size", "128", "--steps", "30", "--batch", "1",
                      "--batch", "4", "--dtype", "bfloat16", "--device", "cuda", "--runs", "3"]),
        ("train_step", ["--config", "sdxl", "--size", "128", "--batch", "8", "--dtype", "bfloat16",
                        "--device", "cuda", "--runs", "5"]),
        # ControlNet + IP-Adapter, batch 1: SD 1.5 at 512 px and SDXL at 1024 px (issue: ControlNet).
        ("sampling", ["--config", "sd15", "--controlnets", "1", "--steps", "30", "--batch", "1", "--dtype",
                      "bfloat16", "--device", "cuda", "--runs", "3"]),
        ("sampling", ["--config", "sdxl", "--controlnets", "1", "--size", "128", "--steps", "30", "--batch", "1",
                      "--dtype", "bfloat16", "--device", "cuda", "--runs", "3"]),
    ],
    # SDXL base on CPU: batch 2 (one CFG step) at 1024 px; independent weights per framework (see unet_forward).
    "cpu-sdxl": [
        ("unet_forward", ["--config", "sdxl", "--size", "128", "--batch", "2", "--runs", "2"]),
        # The 2-step loop with CFG + a base adapter at 1024 px (PyTorch first, then JAX: see sampling.py).
        ("sampling", ["--config", "sdxl", "--size", "128", "--steps", "2", "--runs", "1"]),
    ],
    "gpu-extra": [
        # sample.py's progress bar: the loop one jitted step per call (no host callback), its cost per step.
        ("sampling", ["--config", "sd15", "--steps", "50", "--batch", "1", "--dtype", "bfloat16", "--skip-torch",
                      "--runs", "3", "--progress"]),
        ("train_step", ["--config", "sd15", "--size", "64", "--batch", "8", "--dtype", "bfloat16", "--remat",
                        "full", "--skip-torch", "--runs", "5"]),
        ("train_step", ["--config", "sd15", "--size", "64", "--batch", "16", "--dtype", "bfloat16",
                        "--skip-torch", "--runs", "5"]),
        ("vae_decode", ["--batch", "1", "--dtype", "bfloat16", "--torch-dtype", "float16", "--device", "cuda",
                        "--runs", "10"]),
        ("clip_vision", ["--batch", "1", "--dtype", "bfloat16", "--torch-dtype", "float16", "--device", "cuda",
                         "--runs", "10"]),
        # XLA's CUDA-graph command buffers extended to while loops (the sampling loop is one).
        ("sampling", ["--config", "sd15", "--steps", "50", "--batch", "1", "--dtype", "bfloat16", "--skip-torch",
                      "--runs", "3"], {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,"
                                                    "CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"}),
    ],
}


# How each set is run (the GPU sets through bench/gpu.sh, which installs carried wheels first).
COMMANDS = {"cpu": "python bench/suite.py", "gpu": "bash bench/gpu.sh",
            "gpu-sdxl": "bash bench/gpu.sh (after the gpu set)", "cpu-sdxl": "python bench/suite.py --set cpu-sdxl",
            "cpu-loop": "python bench/suite.py --set cpu-loop",
            "gpu-extra": "bash bench/gpu.sh (after the gpu set)"}


def run_set(name: str) -> dict:
    records, started = [], time.time()
    for i, (bench, args, *env) in enumerate(SETS[name]):
        env = env[0] if env else {}
        command = [*(f"{k}={v}" for k, v in env.items()), "python", f"bench/{bench}.py", *args]
        print(f"[{i + 1}/{len(SETS[name])}] {' '.join(command)}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as tmp:
            sink = tmp.name
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(HERE / f"{bench}.py"), *args], cwd=ROOT,
                              env={**os.environ, **env, "BENCH_RECORDS": sink}, stdout=subprocess.DEVNULL)
        lines = Path(sink).read_text().splitlines()
        os.unlink(sink)
        if proc.returncode != 0:
            print(f"    FAILED (exit {proc.returncode}); the set goes on", flush=True)
            records.append({"benchmark": bench, "command": " ".join(command), "failed": proc.returncode})
            continue
        for line in lines:
            records.append({**json.loads(line), "command": " ".join(command)})
        print(f"    done in {time.time() - t0:.0f} s", flush=True)
    return {"set": name, "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(time.time() - started),
            "records": records}


def _fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _setting(r: dict) -> str:
    b = r["benchmark"]
    dtype = r.get("dtype", "float32")
    if r.get("torch_dtype") and r["torch_dtype"] != dtype:
        dtype = f"{dtype} / torch {r['torch_dtype']}"
    if b in ("unet_forward", "train_step", "sampling"):
        size = f"{r['latent']}x{r['latent']} latents ({r['latent'] * 8} px)"
        extra = f", {r['steps']} steps, CFG" if b == "sampling" else ""
        if b == "sampling" and r.get("adapter", "base") != "base":
            extra += f" + {r['adapter']} adapter"
        if b == "sampling" and r.get("controlnets"):
            extra += f" + {r['controlnets']} ControlNet"
        remat = f", remat {r['remat']}" if r.get("remat") not in (None, "none", False) else ""
        return f"{r['config']}, batch {r['batch']}, {size}{extra}{remat}, {dtype}"
    if b == "vae_decode":
        return f"SD1.5 VAE, batch {r['batch']}, {r['latent']}x{r['latent']} -> {r['image']} px, {dtype}"
    if b == "clip_vision":
        return f"ViT-H/14, batch {r['batch']}, 224 px, {dtype}"
    return ""


def _extra(r: dict) -> str:
    parts = []
    if "jax_it_per_s" in r:
        parts.append(f"{r['jax_it_per_s']:.3g} it/s" + (f" vs {r['torch_it_per_s']:.3g}" if "torch_it_per_s" in r
                                                          else ""))
    if "jax_samples_per_s" in r:
        parts.append(f"{r['jax_samples_per_s']:.3g} samples/s" + (
            f" vs {r['torch_samples_per_s']:.3g}" if "torch_samples_per_s" in r else ""))
    if "jax_mfu" in r:
        parts.append(f"MFU {r['jax_mfu'] * 100:.0f}%")
    if r.get("memory_gib"):
        m = r["memory_gib"]
        parts.append(f"XLA estimate {sum(m.values()):.2f} GiB (args {m['argument']}, temp {m['temp']})")
    env = [w for w in r.get("command", "").split() if "=" in w and not w.startswith("-")]
    if env:
        parts.append("env " + " ".join(f"`{w}`" for w in env))
    if "jax_nohoist_median_s" in r:
        parts.append(f"JAX without hoisting {_fmt_s(r['jax_nohoist_median_s'])}")
    if r.get("separate_weights"):
        parts.append("each framework its own random weights (no latents comparison)")
    if "jax_peak_memory_gib" in r:
        parts.append(f"peak {r['jax_peak_memory_gib']} GiB")
    for key in ("latents_rel_diff", "rel_diff"):
        if key in r:
            parts.append(f"rel. diff {r[key]:.1e}")
    return "; ".join(parts)


def markdown(result: dict) -> str:
    records = result["records"]
    machines = sorted({r["machine"] for r in records if "machine" in r})
    versions = sorted({f"jax {r['jax']}, torch {r['torch']}" for r in records if "jax" in r})
    lines = [f"Set `{result['set']}`, run {result['date']} ({result['wall_s']} s in all) on "
             f"{'; '.join(machines)} ({'; '.join(versions)}). Command: `{COMMANDS.get(result['set'], 'python bench/suite.py --set ' + result['set'])}`.",
             "", "| benchmark | setting | JAX first call | JAX median | PyTorch median | JAX/PyTorch | notes |",
             "|---|---|---|---|---|---|---|"]
    if result.get("note"):
        lines[0] += f" Note: {result['note']}."
    for r in records:
        if r.get("failed") is not None:
            lines.append(f"| {r['benchmark']} | `{r['command']}` | failed (exit {r['failed']}) | | | | |")
            continue
        ratio = r.get("ratio_jax_over_torch")
        if ratio is None and "speedup_jax_over_torch" in r:
            ratio = round(1 / r["speedup_jax_over_torch"], 3)
        lines.append(f"| {r['benchmark']} | {_setting(r)} | {_fmt_s(r.get('jax_first_call_s'))} | "
                     f"{_fmt_s(r.get('jax_median_s'))} | {_fmt_s(r.get('torch_median_s'))} | "
                     f"{'-' if ratio is None else f'**{ratio:.2f}**'} | {_extra(r)} |")
    return "\n".join(lines)


def update_doc(result: dict, doc: Path = DOC) -> None:
    begin, end = f"<!-- suite:{result['set']}:begin -->", f"<!-- suite:{result['set']}:end -->"
    text = doc.read_text()
    block = f"{begin}\n{markdown(result)}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## Suite: {result['set']}\n\n{block}\n"
    doc.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default="cpu", help="which benchmarks to run (default cpu)")
    parser.add_argument("--list", action="store_true", help="print the commands of every set and exit")
    parser.add_argument("--render", metavar="JSON", help="only rewrite BENCHMARKS.md from a suite results file")
    parser.add_argument("--out", help="results file (default bench/results/suite-<set>.json)")
    parser.add_argument("--no-docs", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    if args.list:
        for name, items in SETS.items():
            print(f"{name}:")
            for bench, bench_args, *env in items:
                prefix = "".join(f"{k}={v} " for k, v in (env[0] if env else {}).items())
                print(f"  {prefix}python bench/{bench}.py {' '.join(bench_args)}")
        return
    if args.render:
        result = json.loads(Path(args.render).read_text())
    else:
        result = run_set(args.set)
        out = Path(args.out or HERE / "results" / f"suite-{args.set}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {out}")
    print(markdown(result))
    if not args.no_docs:
        update_doc(result)
        print(f"updated {DOC}")
    if any(r.get("failed") is not None for r in result["records"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
