"""The paper's ablation on the miniature (section 4.4): the decoupled
IP-Adapter against the "simple adapter" (image tokens appended to the text
tokens of the frozen cross-attention), both trained with the same budget
(configs/demo/ip_adapter.py and ip_adapter_simple.py differ only in that),
scored with CLIP-I / CLIP-T on held-out shapes; plus text-only generation,
image-only vs image+text prompts, and the effect of the adapter scale.

    python -m ipadapter_jax.eval.ablation --simple runs/demo/ip_adapter_simple/ip-adapter_simple.safetensors

Writes ``<out>.json`` and ``<out>.md`` (the README's table) and a grid of
examples ``<out>-examples.png`` (rows: reference, text only, decoupled
image+text, simple image+text).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.cli import run
from ipadapter_jax import demo
from ipadapter_jax import eval as eval_lib
from ipadapter_jax.demo import shapes
from ipadapter_jax.io.errors import BadArgument
from ipadapter_jax.pipeline import StableDiffusionPipeline


def colour_transfer(generator, n: int, modes: list[tuple[str, float]], *, seed: int = 0,
                    prompt: str | None = None, colour: str | None = None) -> list[dict]:
    """Does the image prompt carry colour? For ``n`` held-out references, prompt
    with the shape name alone ("a star") plus the reference image, and count the
    generations whose shape colour (``shapes.classify_colours``) is the
    reference's. With ``colour`` (e.g. "red"), the references are the first
    ``n`` held-out records of that colour and ``prompt`` (e.g. "a circle") is
    the caption of every case. ``modes``: (mode, scale) pairs; ("text", 0) is
    the baseline (the colour is then whatever the model picks, about 1 in 8)."""
    if colour is not None and colour not in shapes.COLOURS:
        raise BadArgument(f"colour must be one of {tuple(shapes.COLOURS)}, got {colour!r}")
    if (prompt is None) != (colour is None):
        raise BadArgument("give both prompt and colour (a fixed prompt for references of one colour), or neither")
    source = shapes.ShapesSource(shapes.SPLIT_RECORDS["test"] if colour else n, split="test")
    records = []
    for i in range(len(source)):
        record = source[i]
        if colour is None or record["colour"] == colour:
            records.append((i, record))
        if len(records) == n:
            break
    if len(records) < n:
        raise BadArgument(f"only {len(records)} held-out references are {colour}, asked for {n}")
    rows = []
    for mode, scale in modes:
        hits = total = 0
        for k, (i, record) in enumerate(records):
            case = eval_lib.Case(record["image"], prompt or f"a {record['shape']}", name=f"test/{i}")
            for image in eval_lib.to_uint8(generator(case, mode, scale, seed=seed + k)):
                hits += shapes.classify_colours(image)[0] == record["colour"]
                total += 1
        rows.append({"mode": mode, "scale": scale, "colour_match": round(hits / total, 4), "n": total})
    return rows


def _main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--simple", required=True, help="the simple adapter trained by configs/demo/ip_adapter_simple.py")
    p.add_argument("--decoupled", default=None, help="the decoupled adapter (default: the shipped demo adapter)")
    p.add_argument("--num-cases", type=int, default=64, help="held-out shapes (default 64)")
    p.add_argument("--scales", default="0.25,0.5,0.75,1.0", help="adapter scales for the decoupled arm")
    p.add_argument("--out", default="outputs/ablation", help="output path stem (default outputs/ablation)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    args = p.parse_args(argv)
    paths = demo.demo_paths()
    if not Path(args.simple).is_file():
        p.error(f"--simple: file not found: {args.simple} (train it with configs/demo/ip_adapter_simple.py)")
    scales = [float(s) for s in args.scales.split(",")]
    cases = eval_lib.demo_cases(args.num_cases)
    scorer = eval_lib.ClipScorer(paths["clip"])
    settings = dict(steps=25, guidance=5.0, height=64, width=64, num_images=2)
    results, images = {}, {}
    for arm, adapter, arm_scales in (("decoupled", args.decoupled or paths["adapter"], scales),
                                     ("simple", args.simple, [1.0])):
        pipe = StableDiffusionPipeline.from_pretrained(paths["sd"], image_encoder=paths["image_encoder"])
        generator = eval_lib.Generator(pipe, adapter, conditioning="decoupled" if arm == "decoupled" else "concat",
                                       **settings)
        out = eval_lib.evaluate(generator, scorer, cases, scales=arm_scales, keep_images=True)
        images[arm] = out.pop("images")
        colour_modes = [("text", 0.0)] + [("image+text", s) for s in (0.5, 1.0) if s in arm_scales]
        out["colour"] = colour_transfer(generator, args.num_cases // 2, colour_modes)
        out["red_circle"] = colour_transfer(generator, args.num_cases // 2, colour_modes, prompt="a circle",
                                            colour="red")
        results[arm] = out
    table = eval_lib.markdown_table(results["decoupled"]["rows"], "decoupled")
    table += "\n".join(eval_lib.markdown_table(results["simple"]["rows"], "simple").splitlines()[2:]) + "\n"
    for key, title in (("colour", "Colour carried by the image prompt (prompt: the shape name alone, e.g. \"a star\"; "
                                  "share of generations whose shape has the reference's colour)"),
                       ("red_circle", "\"a circle\" with a red reference (held-out red shapes of any kind; share "
                                      "of generations whose shape is predominantly red; chance is about 1 in 8)")):
        table += f"\n{title}:\n\n| arm | prompt | scale | colour match | n |\n|---|---|---|---|---|\n"
        for arm in ("decoupled", "simple"):
            for row in results[arm][key]:
                scale = "-" if row["mode"] == "text" else f"{row['scale']:g}"
                table += f"| {arm} | {row['mode']} | {scale} | {row['colour_match']:.2f} | {row['n']} |\n"
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps({"settings": {**settings, "num_cases": args.num_cases,
                                                             "scales": scales}, **results}, indent=1))
    Path(f"{stem}.md").write_text(table)
    # Examples: 8 cases, first sample of each.
    refs = np.stack([np.asarray(c.reference) for c in cases[:8]])
    rows = [refs, images["decoupled"][f"text@{scales[0]:g}"][:8, 0],   # text mode runs at the first scale only
            images["decoupled"]["image+text@1"][:8, 0], images["simple"]["image+text@1"][:8, 0]]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).save(f"{stem}-examples.png")
    print(table)
    print(f"wrote {stem}.json, {stem}.md, {stem}-examples.png")
    return 0


def main(argv=None) -> int:
    """The command with user errors as one line (``--debug`` for tracebacks)."""
    return run("python -m ipadapter_jax.eval.ablation", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
