"""The command line of ``ipadapter_jax.eval`` (its docstring is the ``--help`` text):

    python -m ipadapter_jax.eval --demo --num-cases 64 --out outputs/eval_demo.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ipadapter_jax.eval as eval_lib
from ipadapter_jax.cli import run
from ipadapter_jax import demo
from ipadapter_jax.eval import (MODES, ClipScorer, Generator, demo_cases, evaluate, load_cases,
                                markdown_table)
from ipadapter_jax.pipeline import StableDiffusionPipeline


def parse_args(argv=None):
    # prog: run as ``-m``, argparse would name this file ("__main__.py").
    p = argparse.ArgumentParser(prog="python -m ipadapter_jax.eval", description=eval_lib.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="the embedded demo model, adapter, CLIP and held-out "
                                                       "shapes (the default without --model)")
    p.add_argument("--model", help="diffusers Stable Diffusion folder")
    p.add_argument("--image-encoder", help="the adapter's CLIP image encoder folder")
    p.add_argument("--ip-adapter", help="IP-Adapter file (official layout)")
    p.add_argument("--clip", help="CLIPModel folder used to score (the paper: ViT-L/14)")
    p.add_argument("--cases", help="JSON list of {image, caption}")
    p.add_argument("--num-cases", type=int, default=64, help="demo: held-out shapes to use (default 64)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--scales", default="1.0", help="comma-separated adapter scales (default 1.0)")
    p.add_argument("--conditioning", default="decoupled", choices=["decoupled", "concat"],
                   help="decoupled (IP-Adapter) or concat (the paper's simple-adapter ablation)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 25 demo, 50 otherwise)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 5 demo, 7.5 otherwise)")
    p.add_argument("--size", type=int, default=None, help="image size (default 64 demo, 512 otherwise)")
    p.add_argument("--num-images", type=int, default=2, help="images per case and mode (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/eval.json", help="results JSON (a Markdown table is printed)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    args = p.parse_args(argv)
    args.demo = args.demo or not args.model
    if args.demo:
        try:
            paths = demo.demo_paths()
        except FileNotFoundError as e:
            p.error(str(e))
        args.model = str(paths["sd"])
        args.image_encoder = args.image_encoder or str(paths["image_encoder"])
        args.ip_adapter = args.ip_adapter or str(paths["adapter"])
        args.clip = args.clip or str(paths["clip"])
        defaults = dict(steps=25, guidance=5.0, size=64)
    else:
        missing = [f for f in ("image_encoder", "ip_adapter", "clip", "cases") if not getattr(args, f)]
        if missing:
            p.error("with --model also give " + ", ".join("--" + m.replace("_", "-") for m in missing))
        defaults = dict(steps=50, guidance=7.5, size=512)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; valid: {', '.join(MODES)}")
    try:
        args.scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        p.error(f"--scales must be comma-separated numbers, got {args.scales!r}")
    return args


def _main(argv) -> int:
    args = parse_args(argv)
    cases = demo_cases(args.num_cases) if args.demo and not args.cases else load_cases(args.cases)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, image_encoder=args.image_encoder)
    generator = Generator(pipe, args.ip_adapter, conditioning=args.conditioning, steps=args.steps,
                          guidance=args.guidance, height=args.size, width=args.size, num_images=args.num_images)
    scorer = ClipScorer(args.clip)
    result = evaluate(generator, scorer, cases, modes=args.modes, scales=args.scales, seed=args.seed)
    result["settings"] = {k: v for k, v in vars(args).items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown_table(result["rows"], label=args.conditioning))
    print(f"wrote {out.resolve()}")
    return 0


def main(argv=None) -> int:
    """The command with user errors as one line (``--debug`` for tracebacks)."""
    return run("python -m ipadapter_jax.eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
