"""``python -m ipadapter_jax.eval`` (installed: ``ipadapter-eval``): CLIP-I /
CLIP-T of image prompting. Its ``--help`` text is ``ipadapter_jax.eval``'s
docstring; the arguments are checked before JAX loads.

    python -m ipadapter_jax.eval --demo --num-cases 64 --out outputs/eval_demo.json
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

from ipadapter_jax.cli import ArgumentParser, run

PROG = "python -m ipadapter_jax.eval"
SCRIPT = "ipadapter-eval"
# ipadapter_jax.eval.MODES, here so that parsing loads no JAX (tests/test_fuzz.py checks they agree).
MODES = ("text", "image", "image+text")


def prog() -> str:
    """The name the user ran: the console script's, else ``python -m ipadapter_jax.eval``."""
    return SCRIPT if os.path.basename(sys.argv[0]) == SCRIPT else PROG


def module_docstring(name: str) -> str:
    """A package module's docstring, read without importing it or its parents
    (``ipadapter_jax.eval`` loads JAX)."""
    path = Path(__file__).resolve().parents[1].joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog(), description=module_docstring("ipadapter_jax.eval"),
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
    return p


def _model_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The demo's files (with --demo or without --model), or a check that --model has its company;
    the defaults of steps, guidance and size for either."""
    if args.demo:
        from ipadapter_jax import demo

        try:
            paths = demo.demo_paths()
        except FileNotFoundError as e:
            p.error(str(e))
        args.model = str(paths["sd"])
        args.image_encoder = args.image_encoder or str(paths["image_encoder"])
        args.ip_adapter = args.ip_adapter or str(paths["adapter"])
        args.clip = args.clip or str(paths["clip"])
        return dict(steps=demo.DEFAULT_STEPS, guidance=demo.DEFAULT_GUIDANCE, size=demo.DEFAULT_SIZE)
    missing = [f for f in ("image_encoder", "ip_adapter", "clip", "cases") if not getattr(args, f)]
    if missing:
        p.error("with --model also give " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return dict(steps=50, guidance=7.5, size=512)


def parse_args(argv=None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    args.demo = args.demo or not args.model
    for k, v in _model_defaults(p, args).items():
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
    _check_numbers(p, args)
    return args


def _check_numbers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts, sizes and scales, before anything loads (a NaN scale would otherwise surface after sampling)."""
    import math

    from ipadapter_jax.cli.checks import MAX_SIZE, check_writable
    from ipadapter_jax.io.errors import UserError

    for flag, value in (("--num-cases", args.num_cases), ("--num-images", args.num_images), ("--steps", args.steps)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if not (0 < args.size <= MAX_SIZE and args.size % 8 == 0):
        p.error(f"--size must be a positive multiple of 8 up to {MAX_SIZE}, got {args.size}")
    for flag, values in (("--scales", args.scales), ("--guidance", [args.guidance])):
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            p.error(f"{flag} must be finite numbers, got {bad[0]}")
    try:
        check_writable("--out", Path(args.out))
    except UserError as e:
        p.error(str(e))


def _main(argv) -> int:
    args = parse_args(argv)
    from ipadapter_jax.eval import ClipScorer, Generator, demo_cases, evaluate, load_cases, markdown_table
    from ipadapter_jax.cli.checks import resolve_clip, resolve_encoder, resolve_or_error
    from ipadapter_jax.io.files import atomic_write
    from ipadapter_jax.pipeline import StableDiffusionPipeline

    cases = demo_cases(args.num_cases) if args.demo and not args.cases else load_cases(args.cases)
    args.model = str(resolve_or_error("--model", args.model, "folder", None))    # paths or hub ids
    args.image_encoder = str(resolve_encoder("--image-encoder", args.image_encoder))
    args.ip_adapter = str(resolve_or_error("--ip-adapter", args.ip_adapter, "file", None))
    args.clip = str(resolve_clip("--clip", args.clip))
    pipe = StableDiffusionPipeline.from_pretrained(args.model, image_encoder=args.image_encoder)
    generator = Generator(pipe, args.ip_adapter, conditioning=args.conditioning, steps=args.steps,
                          guidance=args.guidance, height=args.size, width=args.size, num_images=args.num_images)
    scorer = ClipScorer(args.clip)
    result = evaluate(generator, scorer, cases, modes=args.modes, scales=args.scales, seed=args.seed)
    result["settings"] = {k: v for k, v in vars(args).items()}
    out = Path(args.out)
    with atomic_write(out) as tmp:       # an interrupted run leaves no half-written results
        Path(tmp).write_text(json.dumps(result, indent=1))
    print(markdown_table(result["rows"], label=args.conditioning))
    print(f"wrote {out.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command (``argv``: the arguments, default ``sys.argv[1:]``); returns
    the exit status, 2 with one line on stderr for a user error (``--debug``
    for tracebacks)."""
    return run(prog(), _main_leaving_nothing, argv)


def _main_leaving_nothing(argv: list[str]) -> int:
    """``_main``; a run that fails removes the output folder it made (if still empty)."""
    from ipadapter_jax.cli.checks import keep_created_folders, undo_created_folders

    try:
        status = _main(argv)
    except BaseException:
        undo_created_folders()
        raise
    keep_created_folders()
    return status


if __name__ == "__main__":
    sys.exit(main())
