"""A procedural image-text dataset: coloured, textured shapes on plain
backgrounds, with captions ("a red striped star on a blue background") and
partial captions that leave attributes out ("a striped star").

Deterministic by ``(seed, index)``: record ``i`` of a split is always the same
image, on any machine, with no download. Exposed as

* ``ShapesSource``: a grain random-access source of raw records
  (``image`` uint8 HWC, ``text``, attribute labels);
* ``ShapesImageText``: the same records prepared for training (``pixels``,
  ``clip_pixels``, ``input_ids``), the ``data.kind=shapes`` path of train.py;
* ``ShapesDataset``: a TFDS builder (array_record, no TensorFlow needed),
  read back through ``data.kind=tfds``.

Splits use disjoint seeds, so "test" images are never seen in training.
"""

from __future__ import annotations

import functools
import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (240, 210, 30),
           "purple": (140, 40, 180), "orange": (250, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20)}
TEXTURES = ("plain", "striped", "dotted", "checked")
SPLIT_SEEDS = {"train": 0, "test": 1}
SPLIT_RECORDS = {"train": 20_000, "test": 1_000}   # the TFDS dataset's sizes
_SUPERSAMPLE = 4


def caption(shape: str, colour: str | None, texture: str | None, background: str | None) -> str:
    """The caption of one record; plain shapes name no texture. An attribute
    given as None is left out ("a striped circle", "a circle")."""
    words = [w for w in (colour, None if texture == "plain" else texture, shape) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    where = f" on a {background} background" if background else ""
    return f"{article} {' '.join(words)}{where}"


def partial_caption(attrs: dict, rng: np.random.Generator, keep: float = 0.5) -> str:
    """A less complete caption of the same record: the shape is always named,
    the colour, texture and background each with probability ``keep``. Real
    captions leave things out; these make the image prompt carry what the text
    does not say (the demo's UNet and adapter stages train on them)."""
    kept = {k: attrs[k] if rng.random() < keep else None for k in ("colour", "texture", "background")}
    return caption(attrs["shape"], **kept)


def vocabulary() -> list[str]:
    """Every word a caption can contain (the demo tokenizer's whole-word merges)."""
    words = {"a", "an", "on", "background", *SHAPES, *COLOURS, *TEXTURES}
    return sorted(words)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n, radii, offset=0.0):
        pts = []
        for k in range(n * len(radii)):
            a = angle + offset + 2 * math.pi * k / (n * len(radii))
            rad = radii[k % len(radii)]
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [r * 1.0], math.pi / 4)
    if shape == "triangle":
        return ring(3, [r * 1.1], -math.pi / 2)
    if shape == "star":
        return ring(5, [r * 1.1, r * 0.45], -math.pi / 2)
    if shape == "diamond":  # a rhombus: narrower than tall
        return [(cx + r * 1.15 * math.cos(angle + a), cy + r * 1.15 * f * math.sin(angle + a))
                for a, f in ((0, 0.65), (math.pi / 2, 1.0), (math.pi, 0.65), (3 * math.pi / 2, 1.0))]
    if shape == "cross":
        w = r * 0.38
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
                (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(texture: str, colour: tuple, size: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 fill: the colour, with a darker or lighter second tone for patterns."""
    base = np.asarray(colour, np.float32)
    other = _second_tone(colour)
    fill = np.broadcast_to(base, (size, size, 3)).copy()
    period = size / rng.uniform(5.0, 8.0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if texture == "striped":
        theta = rng.uniform(0, math.pi)
        mask = np.mod((x * math.cos(theta) + y * math.sin(theta)) / period, 1.0) < 0.5
    elif texture == "dotted":
        mask = (np.mod(x, period) - period / 2) ** 2 + (np.mod(y, period) - period / 2) ** 2 < (period * 0.28) ** 2
    elif texture == "checked":
        mask = (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    elif texture == "plain":
        return fill
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    fill[mask] = other
    return fill


def _second_tone(colour: tuple) -> np.ndarray:
    base = np.asarray(colour, np.float32)
    return base * 0.4 if base.mean() > 110 else base + (255 - base) * 0.55


def classify_colours(image: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of a generated or rendered image (uint8
    HxWx3): the background is the commonest palette colour on the border, the
    shape the commonest palette colour (either tone of a pattern) elsewhere.
    Used to check that an image prompt carries colour (tests, evaluation)."""
    pixels = np.asarray(image, np.float32)
    names = list(COLOURS)
    base = np.asarray([COLOURS[n] for n in names], np.float32)
    tones = np.concatenate([base, np.stack([_second_tone(COLOURS[n]) for n in names])])
    nearest = lambda x, palette: np.argmin(((x[..., None, :] - palette) ** 2).sum(-1), axis=-1)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = int(np.bincount(nearest(border, base), minlength=len(names)).argmax())
    labels = nearest(pixels, tones) % len(names)
    counts = np.bincount(labels.ravel(), minlength=len(names))
    counts[background] = 0
    return names[int(counts.argmax())], names[background]


def render(shape: str, colour: str, texture: str, background: str, *, size: int = 64,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """One image (uint8 HxWx3): the shape at a random place, size and rotation
    drawn from ``rng`` (centred and upright when ``rng`` is None)."""
    from PIL import Image, ImageDraw

    for name, allowed in ((shape, SHAPES), (texture, TEXTURES)):
        if name not in allowed:
            raise ValueError(f"unknown attribute {name!r}; expected one of {allowed}")
    for name in (colour, background):
        if name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}; expected one of {tuple(COLOURS)}")
    big = size * _SUPERSAMPLE
    if rng is None:
        r, cx, cy, angle, pattern_rng = 0.32 * big, big / 2, big / 2, 0.0, np.random.default_rng(0)
    else:
        r = rng.uniform(0.24, 0.36) * big
        cx, cy = rng.uniform(r * 1.1, big - r * 1.1, size=2)
        angle = rng.uniform(-0.4, 0.4)
        pattern_rng = rng
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    fill = _texture(texture, COLOURS[colour], big, pattern_rng)
    bg = np.broadcast_to(np.asarray(COLOURS[background], np.float32), fill.shape)
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    image = Image.fromarray((fill * alpha + bg * (1 - alpha)).round().astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.LANCZOS))


def sample_attributes(rng: np.random.Generator) -> dict:
    """Uniform attributes, the background always a different colour from the shape."""
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    background = [c for c in names if c != colour][rng.integers(len(names) - 1)]
    return {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": colour,
            "texture": TEXTURES[rng.integers(len(TEXTURES))], "background": background}


def make_record(index: int, *, seed: int = 0, size: int = 64) -> dict:
    """Record ``index`` of the stream with ``seed``: image, caption, a partial
    caption (``short_text``, see ``partial_caption``) and labels."""
    rng = np.random.default_rng([seed, index])
    attrs = sample_attributes(rng)
    image = render(attrs["shape"], attrs["colour"], attrs["texture"], attrs["background"], size=size, rng=rng)
    # A stream of its own, so images and full captions are those of dataset version 1.0.0.
    short = partial_caption(attrs, np.random.default_rng([seed, index, 1]))
    return {"image": image, "text": caption(**attrs), "short_text": short, **attrs}


class ShapesSource:
    """grain random-access source of ``num_records`` procedural records."""

    def __init__(self, num_records: int = 100_000, *, split: str = "train", size: int = 64):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}")
        self.num_records, self.split, self.size = num_records, split, size
        self.seed = SPLIT_SEEDS[split]

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        return f"ShapesSource(num_records={self.num_records}, split={self.split!r}, size={self.size})"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records})")
        return make_record(int(index), seed=self.seed, size=self.size)


@functools.cache
def _tfds_builder_class():
    # Defined once per process: TFDS registers builder classes by name.
    import tensorflow_datasets as tfds

    class ShapesDataset(tfds.core.GeneratorBasedBuilder):
        """The procedural shapes as a TFDS dataset (``shapes_dataset``); build with
        ``ShapesDataset(data_dir=..., file_format="array_record").download_and_prepare()``."""

        VERSION = tfds.core.Version("1.1.0")
        RELEASE_NOTES = {"1.1.0": "short_text: a partial caption of each record (images and text unchanged).",
                         "1.0.0": "Initial release."}
        BUILDER_CONFIGS = []
        TRAIN_RECORDS = SPLIT_RECORDS["train"]
        TEST_RECORDS = SPLIT_RECORDS["test"]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description="Procedural coloured, textured shapes with captions.",
                                         features=tfds.features.FeaturesDict({
                                             "image": tfds.features.Tensor(shape=(64, 64, 3), dtype=np.uint8),
                                             "text": tfds.features.Text(),
                                             "short_text": tfds.features.Text(),
                                             "shape": tfds.features.ClassLabel(names=SHAPES),
                                             "colour": tfds.features.ClassLabel(names=list(COLOURS)),
                                             "texture": tfds.features.ClassLabel(names=TEXTURES),
                                             "background": tfds.features.ClassLabel(names=list(COLOURS))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train", self.TRAIN_RECORDS),
                    "test": self._generate_examples("test", self.TEST_RECORDS)}

        def _generate_examples(self, split, n):
            source = ShapesSource(n, split=split)
            for i in range(n):
                yield i, source[i]

    return ShapesDataset


def __getattr__(name):
    # The TFDS builder is defined lazily: importing this module must not import TFDS.
    if name == "ShapesDataset":
        return _tfds_builder_class()
    raise AttributeError(name)
