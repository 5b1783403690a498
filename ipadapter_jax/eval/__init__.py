"""CLIP-I / CLIP-T evaluation of image prompting (paper section 4.2).

* CLIP-I: cosine similarity of the CLIP image embeddings of a generated image
  and of its image prompt (the reference).
* CLIP-T: cosine similarity of the CLIP image embedding of a generated image
  and the CLIP text embedding of the reference's caption (CLIPScore without
  its 2.5 rescaling, as the paper reports it).

Cases are (reference image, caption) pairs: a JSON list of
``{"image": "ref.png", "caption": "..."}`` or, with ``--demo``, held-out
images of the procedural shapes test split. Each case is generated in the
modes asked for: ``text`` (caption only: adapter scale 0), ``image`` (empty
prompt + reference) and ``image+text`` (caption + reference), at each scale.
``--conditioning concat`` evaluates the paper's "simple adapter" ablation
(image tokens appended to the text tokens, no separate K/V).

    python -m ipadapter_jax.eval --demo --num-cases 64 --out outputs/eval_demo.json
    python -m ipadapter_jax.eval --model SD15 --image-encoder IP-Adapter/models/image_encoder \\
        --ip-adapter ip-adapter_sd15.safetensors --clip clip-vit-large-patch14 --cases cases.json
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ipadapter_jax.demo import shapes
from ipadapter_jax.io.errors import BadArgument, BadFile, MissingFile
from ipadapter_jax.io.files import read_json
from ipadapter_jax.io.images import preprocess
from ipadapter_jax.models import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from ipadapter_jax.pipeline import ImagePromptSpec, JittedModule

__all__ = ["MODES", "Case", "ClipScorer", "Generator", "demo_cases", "evaluate", "load_cases", "markdown_table",
           "to_uint8"]

MODES = ("text", "image", "image+text")


@dataclasses.dataclass
class Case:
    """One image prompt: a reference (path or uint8 HWC array) and its caption."""

    reference: Any
    caption: str
    name: str = ""


def load_cases(path: str | os.PathLike) -> list[Case]:
    """``[{"image": path, "caption": text}, ...]``; image paths are relative to the JSON file."""
    path = Path(path)
    if path.is_dir():
        raise BadFile(f"{path} is a folder; expected a JSON cases file")
    if not path.is_file():
        raise MissingFile(f"cases file not found: {path}")
    records = read_json(path)
    if not isinstance(records, list) or not records:
        got = "an empty list" if records == [] else f"a JSON {type(records).__name__}"
        raise BadFile(f"{path}: expected a non-empty list of {{'image', 'caption'}} records, got {got}")
    cases = []
    for i, r in enumerate(records):
        shown = repr(r) if len(repr(r)) <= 120 else repr(r)[:120] + "..."
        if not isinstance(r, dict) or "image" not in r or "caption" not in r:
            raise BadFile(f"{path}: record {i} lacks 'image' or 'caption': {shown}")
        if not isinstance(r["image"], str) or not r["image"] or not isinstance(r["caption"], str):
            raise BadFile(f"{path}: record {i}: 'image' must be a file name and 'caption' a string, got {shown}")
        image = path.parent / r["image"]
        if not image.is_file():
            raise MissingFile(f"{path}: record {i}: image not found: {image}")
        cases.append(Case(image, r["caption"], name=str(r["image"])))
    return cases


def demo_cases(n: int, *, start: int = 0) -> list[Case]:
    """``n`` held-out shapes (test split: never seen in training) with their captions."""
    source = shapes.ShapesSource(start + n, split="test")
    return [Case(source[i]["image"], source[i]["text"], name=f"test/{i}") for i in range(start, start + n)]


class ClipScorer:
    """Unit-norm CLIP image and text embeddings from a transformers ``CLIPModel``
    folder (e.g. openai/clip-vit-large-patch14, or the demo's ``clip/``)."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import CLIPTokenizer   # heavy: only when scoring

        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFile(f"CLIP model folder not found: {folder}")
        self.vision = CLIPVisionModelWithProjection.from_pretrained(folder)
        self.text = CLIPTextModelWithProjection.from_pretrained(folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self._vision, self._text = JittedModule(self.vision), JittedModule(self.text)
        self.size = self.vision.config.image_size

    def image_embeds(self, images: Sequence[Any]) -> np.ndarray:
        """Paths, PIL images or uint8 arrays -> [N, D] unit vectors."""
        out = np.asarray(self._vision(preprocess(list(images), self.size, self.size)).image_embeds, np.float64)
        return out / np.linalg.norm(out, axis=-1, keepdims=True)

    def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids.astype(np.int32)
        out = np.asarray(self._text(ids).text_embeds, np.float64)
        return out / np.linalg.norm(out, axis=-1, keepdims=True)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline images in [0, 1] -> uint8, as they would be saved."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


class Generator:
    """Generates one case in one mode, with the decoupled adapter (attached) or
    the concatenating "simple adapter" (its projection only). ``adapter``: an
    official-format file, or an ``IPAdapter`` already attached to ``pipe``."""

    def __init__(self, pipe, adapter, *, conditioning: str = "decoupled",
                 steps: int = 25, guidance: float = 5.0, height: int = 512, width: int = 512,
                 num_images: int = 1):
        if conditioning not in ("decoupled", "concat"):
            raise BadArgument(f"conditioning must be 'decoupled' or 'concat', got {conditioning!r}")
        self.pipe, self.conditioning = pipe, conditioning
        self.kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width)
        self.num_images = num_images
        # A file is loaded and attached; an IPAdapter object is used as it is (attached already
        # for "decoupled").
        self.adapter = pipe.load_ip_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
        if conditioning == "concat":
            pipe.detach_ip_adapters()   # the UNet sees the tokens only through its text context

    def __call__(self, case: Case, mode: str, scale: float, seed: int) -> np.ndarray:
        if mode not in MODES:
            raise BadArgument(f"mode must be one of {MODES}, got {mode!r}")
        prompt = "" if mode == "image" else case.caption
        n = self.num_images
        if self.conditioning == "decoupled":
            spec = ImagePromptSpec(images=[case.reference], scale=0.0 if mode == "text" else scale)
            return self.pipe(prompt, ip_adapter_prompts=[spec], num_images=n, seed=seed, **self.kwargs).images
        text = self.pipe.encode_prompt([prompt] * n)
        empty = self.pipe.encode_prompt([""] * n)
        if mode == "text":
            return self.pipe(prompt_embeds=text, negative_prompt_embeds=empty, seed=seed, **self.kwargs).images
        cond, uncond = self.pipe.prompt_tokens(self.adapter, images=[case.reference])
        tokens = np.repeat(cond[:, 0], n, axis=0) * scale
        neg_tokens = np.repeat(uncond[:, 0], n, axis=0)
        return self.pipe(prompt_embeds=np.concatenate([text, tokens], axis=1),
                         negative_prompt_embeds=np.concatenate([empty, neg_tokens], axis=1), seed=seed,
                         **self.kwargs).images


def evaluate(generator: Generator, scorer: ClipScorer, cases: Sequence[Case], *, modes: Sequence[str] = MODES,
             scales: Sequence[float] = (1.0,), seed: int = 0, progress: bool = True,
             keep_images: bool = False) -> dict:
    """Returns ``{"rows": [{mode, scale, clip_i, clip_t, clip_i_std, clip_t_std, n}], "per_case": ...}``
    (and ``"images"`` per (mode, scale) when ``keep_images``)."""
    ref_embeds = scorer.image_embeds([c.reference for c in cases])
    text_embeds = scorer.text_embeds([c.caption for c in cases])
    runs = [(m, s) for m in modes for s in (scales if m != "text" else scales[:1])]
    rows, per_case, kept = [], {}, {}
    bar = tqdm(total=len(runs) * len(cases), desc="evaluating", disable=not progress)
    for mode, scale in runs:
        clip_i, clip_t, images_kept = [], [], []
        for k, case in enumerate(cases):
            images = to_uint8(generator(case, mode, scale, seed + k))
            gen = scorer.image_embeds(list(images))
            clip_i.append(float(np.mean(gen @ ref_embeds[k])))
            clip_t.append(float(np.mean(gen @ text_embeds[k])))
            if keep_images:
                images_kept.append(images)
            bar.update(1)
        key = f"{mode}@{scale:g}"
        per_case[key] = {"clip_i": clip_i, "clip_t": clip_t}
        if keep_images:
            kept[key] = np.stack(images_kept)
        rows.append({"mode": mode, "scale": scale if mode != "text" else 0.0, "clip_i": float(np.mean(clip_i)),
                     "clip_t": float(np.mean(clip_t)), "clip_i_std": float(np.std(clip_i)),
                     "clip_t_std": float(np.std(clip_t)), "n": len(cases)})
    bar.close()
    result = {"rows": rows, "per_case": per_case, "cases": [c.name or c.caption for c in cases]}
    if keep_images:
        result["images"] = kept
    return result


def markdown_table(rows: Sequence[dict], label: str = "") -> str:
    head = "| " + ("arm | " if label else "") + "prompt | scale | CLIP-I | CLIP-T | n |\n"
    head += "|" + "---|" * (6 if label else 5) + "\n"
    lines = []
    for r in rows:
        scale = "-" if r["mode"] == "text" else f"{r['scale']:g}"
        lines.append("| " + (f"{label} | " if label else "") +
                     f"{r['mode']} | {scale} | {r['clip_i']:.3f} ± {r['clip_i_std']:.3f} | "
                     f"{r['clip_t']:.3f} ± {r['clip_t_std']:.3f} | {r['n']} |")
    return head + "\n".join(lines) + "\n"
