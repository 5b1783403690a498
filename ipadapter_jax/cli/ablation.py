"""``python -m ipadapter_jax.eval.ablation``: the paper's ablation on the
miniature (the library part, ``colour_transfer``, is in
ipadapter_jax/eval/ablation.py, whose docstring is this command's ``--help``).
The arguments are checked before JAX loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ipadapter_jax.cli import ArgumentParser, run
from ipadapter_jax.cli.eval import module_docstring

PROG = "python -m ipadapter_jax.eval.ablation"
SETTINGS = dict(steps=25, guidance=5.0, height=64, width=64, num_images=2)
COLOUR_TABLES = (
    ("colour", "Colour carried by the image prompt (prompt: the shape name alone, e.g. \"a star\"; "
               "share of generations whose shape has the reference's colour)"),
    ("red_circle", "\"a circle\" with a red reference (held-out red shapes of any kind; share "
                   "of generations whose shape is predominantly red; chance is about 1 in 8)"),
)


def parse_args(argv) -> argparse.Namespace:
    """The arguments, checked (the --simple file, the scales, the demo files); adds ``paths``."""
    p = ArgumentParser(prog=PROG, description=module_docstring("ipadapter_jax.eval.ablation"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--simple", required=True, help="the simple adapter trained by configs/demo/ip_adapter_simple.py")
    p.add_argument("--decoupled", default=None, help="the decoupled adapter (default: the shipped demo adapter)")
    p.add_argument("--num-cases", type=int, default=64, help="held-out shapes (default 64)")
    p.add_argument("--scales", default="0.25,0.5,0.75,1.0", help="adapter scales for the decoupled arm")
    p.add_argument("--out", default="outputs/ablation", help="output path stem (default outputs/ablation)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    args = p.parse_args(argv)
    if not Path(args.simple).is_file():
        p.error(f"--simple: file not found: {args.simple} (train it with configs/demo/ip_adapter_simple.py)")
    try:
        args.scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        p.error(f"--scales must be comma-separated numbers, got {args.scales!r}")
    from ipadapter_jax import demo

    try:
        args.paths = demo.demo_paths()
    except FileNotFoundError as e:
        p.error(str(e))
    return args


def _run_arms(args, cases) -> tuple[dict, dict]:
    """Each arm (decoupled at each scale, simple at 1) evaluated: ``(results, images)``."""
    from ipadapter_jax import eval as eval_lib
    from ipadapter_jax.eval.ablation import colour_transfer
    from ipadapter_jax.pipeline import StableDiffusionPipeline

    paths = args.paths
    scorer = eval_lib.ClipScorer(paths["clip"])
    results, images = {}, {}
    for arm, adapter, arm_scales in (("decoupled", args.decoupled or paths["adapter"], args.scales),
                                     ("simple", args.simple, [1.0])):
        pipe = StableDiffusionPipeline.from_pretrained(paths["sd"], image_encoder=paths["image_encoder"])
        generator = eval_lib.Generator(pipe, adapter, conditioning="decoupled" if arm == "decoupled" else "concat",
                                       **SETTINGS)
        out = eval_lib.evaluate(generator, scorer, cases, scales=arm_scales, keep_images=True)
        images[arm] = out.pop("images")
        colour_modes = [("text", 0.0)] + [("image+text", s) for s in (0.5, 1.0) if s in arm_scales]
        out["colour"] = colour_transfer(generator, args.num_cases // 2, colour_modes)
        out["red_circle"] = colour_transfer(generator, args.num_cases // 2, colour_modes, prompt="a circle",
                                            colour="red")
        results[arm] = out
    return results, images


def _table(results: dict) -> str:
    """The README's Markdown: the CLIP-I / CLIP-T rows of both arms, then the colour tables."""
    from ipadapter_jax.eval import markdown_table

    table = markdown_table(results["decoupled"]["rows"], "decoupled")
    table += "\n".join(markdown_table(results["simple"]["rows"], "simple").splitlines()[2:]) + "\n"
    for key, title in COLOUR_TABLES:
        table += f"\n{title}:\n\n| arm | prompt | scale | colour match | n |\n|---|---|---|---|---|\n"
        for arm in ("decoupled", "simple"):
            for row in results[arm][key]:
                scale = "-" if row["mode"] == "text" else f"{row['scale']:g}"
                table += f"| {arm} | {row['mode']} | {scale} | {row['colour_match']:.2f} | {row['n']} |\n"
    return table


def _examples(cases, images: dict, scales: list[float]):
    """8 cases, the first sample of each; rows: reference, text only, decoupled image+text, simple image+text."""
    import numpy as np

    refs = np.stack([np.asarray(c.reference) for c in cases[:8]])
    rows = [refs, images["decoupled"][f"text@{scales[0]:g}"][:8, 0],   # text mode runs at the first scale only
            images["decoupled"]["image+text@1"][:8, 0], images["simple"]["image+text@1"][:8, 0]]
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def _main(argv) -> int:
    args = parse_args(argv)
    from PIL import Image

    from ipadapter_jax.eval import demo_cases

    cases = demo_cases(args.num_cases)
    results, images = _run_arms(args, cases)
    table = _table(results)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    settings = {**SETTINGS, "num_cases": args.num_cases, "scales": args.scales}
    Path(f"{stem}.json").write_text(json.dumps({"settings": settings, **results}, indent=1))
    Path(f"{stem}.md").write_text(table)
    Image.fromarray(_examples(cases, images, args.scales)).save(f"{stem}-examples.png")
    print(table)
    print(f"wrote {stem}.json, {stem}.md, {stem}-examples.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command with user errors as one line (``--debug`` for tracebacks)."""
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
