"""Process start to first PNG for ``sample.py``, cold (empty compilation cache)
and warm (second run: JAX's persistent compilation cache filled by the first).

    python bench/first_image.py                  # the embedded demo model: plain `python sample.py`
    python bench/first_image.py --model SD --image-encoder ENC --ip-adapter FILE --size 512
    python bench/first_image.py --small-sdxl --size 64 --steps 30   # a small random SDXL folder, vs diffusers

With ``--small-sdxl`` the folder is built by the tests' SDXL fixture (random weights, tiny widths; text
prompt only) and the same request is timed in fresh diffusers ``StableDiffusionXLPipeline`` processes
(load, sample, save the PNG) for the ratio.

Each run is a fresh ``python sample.py`` process, timed from launch to exit (the PNG is written last),
with its progress bar as users run it (``--no-progress`` here runs without; the bar is driven from Python
and costs the compile cache nothing); the "compile" figure sample.py prints is recorded for each run. The
demo run is exactly what a user types (its defaults: 4 images, 25 steps, 64 px).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import median, report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


COMPILED = {}   # command -> the "compile N s" figures sample.py printed, one per run


def timed(cmd: list[str]) -> float:
    """Seconds from launching ``cmd`` to its exit (which must be clean)."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    found = re.search(r"compile ([0-9.]+) s", result.stdout)
    if found:
        COMPILED.setdefault(tuple(cmd), []).append(float(found[1]))
    return time.perf_counter() - start


DIFFUSERS_SDXL = """
import sys, torch
from diffusers import StableDiffusionXLPipeline
folder, steps, size, out = sys.argv[1:]
pipe = StableDiffusionXLPipeline.from_pretrained(folder)
with torch.no_grad():
    image = pipe('a photo', num_inference_steps=int(steps), height=int(size), width=int(size)).images[0]
image.save(out)
"""


def small_sdxl(tmp: Path, args) -> None:
    """First image of a small SDXL folder, ours against diffusers' (fresh processes each)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sdxl_pipeline import build_sdxl_folder

    folder = build_sdxl_folder(tmp)["sdxl"]
    size = args.size
    ours = [sys.executable, str(ROOT / "sample.py"), "--model", str(folder), "--prompt", "a photo", "--steps",
            str(args.steps), "--height", str(size), "--width", str(size), "--out", str(tmp / "out.png"),
            "--cache-dir", str(tmp / "xla_cache"), "--no-progress"]
    theirs = [sys.executable, "-c", DIFFUSERS_SDXL, str(folder), str(args.steps), str(size), str(tmp / "theirs.png")]
    cold = timed(ours)
    warm = [timed(ours) for _ in range(args.warm_runs)]
    reference = [timed(theirs) for _ in range(args.warm_runs)]
    report("first_image", dict(model="small SDXL (tests' fixture), text prompt", size=size, steps=args.steps,
                               cold_s=round(cold, 2), warm_median_s=round(median(warm), 2),
                               warm_runs=[round(w, 2) for w in warm], diffusers_median_s=round(median(reference), 2),
                               diffusers_runs=[round(r, 2) for r in reference],
                               ratio_warm_over_diffusers=round(median(warm) / median(reference), 3),
                               ratio_cold_over_diffusers=round(cold / median(reference), 3)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--image-encoder")
    parser.add_argument("--ip-adapter")
    parser.add_argument("--size", type=int, default=512, help="image height/width (with --model)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (with --model)")
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--no-progress", action="store_true", help="run sample.py without its progress bar")
    parser.add_argument("--small-sdxl", action="store_true",
                        help="build a small random SDXL folder and adapter and compare with diffusers")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.small_sdxl:
            return small_sdxl(tmp, args)
        if args.model is None:
            cmd = [sys.executable, str(ROOT / "sample.py")]
        else:
            ref = tmp / "ref.png"
            Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(ref)
            cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(args.model), "--image-encoder",
                   str(args.image_encoder), "--ip-adapter", str(args.ip_adapter), "--image", str(ref),
                   "--steps", str(args.steps), "--height", str(args.size), "--width", str(args.size)]
        cmd += ["--out", str(tmp / "out.png"), "--cache-dir", str(tmp / "xla_cache")]
        cmd += ["--no-progress"] if args.no_progress else []

        cold = timed(cmd)
        warm = [timed(cmd) for _ in range(args.warm_runs)]
    demo = args.model is None
    compiled = COMPILED.get(tuple(cmd), [])
    report("first_image", dict(model="demo (python sample.py)" if demo else str(args.model),
                               progress_bar=not args.no_progress,
                               size=64 if demo else args.size, steps=25 if demo else args.steps, cold_s=round(cold, 2),
                               warm_median_s=round(median(warm), 2), warm_runs=[round(w, 2) for w in warm],
                               cold_compile_s=compiled[0] if compiled else None,
                               warm_compile_s=compiled[1:]))


if __name__ == "__main__":
    main()
