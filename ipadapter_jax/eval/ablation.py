"""The paper's ablation on the miniature (section 4.4): the decoupled
IP-Adapter against the "simple adapter" (image tokens appended to the text
tokens of the frozen cross-attention), both trained with the same budget
(configs/demo/ip_adapter.py and ip_adapter_simple.py differ only in that),
scored with CLIP-I / CLIP-T on held-out shapes; plus text-only generation,
image-only vs image+text prompts, and the effect of the adapter scale.

    python -m ipadapter_jax.eval.ablation --simple runs/demo/ip_adapter_simple/ip-adapter_simple.safetensors

Writes ``<out>.json`` and ``<out>.md`` (the README's table) and a grid of
examples ``<out>-examples.png`` (rows: reference, text only, decoupled
image+text, simple image+text). The command line is ipadapter_jax/cli/ablation.py.
"""

from __future__ import annotations

from ipadapter_jax import eval as eval_lib
from ipadapter_jax.demo import shapes
from ipadapter_jax.io.errors import BadArgument


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


if __name__ == "__main__":     # the command: ipadapter_jax/cli/ablation.py
    import sys

    from ipadapter_jax.cli.ablation import main

    sys.exit(main())
