"""The training data path on one CPU core: images/s for the json and webdataset sources.

    python bench/data.py                       # 512 and 1024 px, both sources, 48 images each
    python bench/data.py --sizes 512 --images 96 --kinds webdataset

What one record costs the host, as the training loop's grain workers pay it: read the file (json: one file per
image; webdataset: ``os.pread`` of the member in its tar shard), decode the JPEG, resize the shortest side and
center-crop (``train_pixels``), prepare the CLIP input (224 px), tokenize the caption; then the whole record
(``source[i]``) end to end. The process is pinned to one core (``os.sched_setaffinity``), so the figures are
per core; grain's workers scale them with the cores given (``data.workers``).

The images are made here: smooth random colour fields (upsampled noise, plus a little pixel noise) saved as
JPEG quality 95 at 1.25 x the resolution on the long side (a 512-px run reads 512 x 640 images, as
img2dataset's ``resize_mode=keep_ratio`` at 512 would store them), so file sizes and decode times are those
of photos, not of flat colours. The tokenizer is the demo model's (a byte-level CLIP BPE); a full CLIP
vocabulary tokenizes at a similar rate (a small part of the total either way).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import report  # noqa: E402


def photo_like(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A JPEG (quality 95) of a smooth random colour field with fine noise."""
    from PIL import Image

    small = Image.fromarray(rng.integers(0, 256, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8))
    field = np.asarray(small.resize((w, h), Image.BICUBIC), np.float32)
    field += rng.normal(0, 6, field.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_data(root: Path, size: int, n: int, per_shard: int = 16) -> tuple[Path, Path]:
    """n images as a tutorial json + image folder and as tar shards (same bytes)."""
    from ipadapter_jax.training.shards import write_shard

    rng = np.random.default_rng(size)
    images = root / "images"
    images.mkdir(parents=True)
    records, shard = [], []
    for i in range(n):
        h, w = (size * 5 // 4, size) if i % 2 else (size, size * 5 // 4)
        data = photo_like(rng, h, w)
        caption = f"a photo number {i} of a red car parked beside a house, with trees and a blue sky"
        (images / f"{i}.jpg").write_bytes(data)
        records.append({"image_file": f"{i}.jpg", "text": caption})
        meta = {"width": w, "height": h, "original_width": w * 2, "original_height": h * 2}
        shard.append((f"{i:09d}", {"jpg": data, "txt": caption.encode(), "json": json.dumps(meta).encode()}))
    (root / "data.json").write_text(json.dumps(records))
    shards = root / "shards"
    shards.mkdir()
    for s in range(0, n, per_shard):
        write_shard(shards / f"{s // per_shard:05d}.tar", shard[s:s + per_shard])
    return root / "data.json", shards


def per_image(fn, items, repeat: int) -> float:
    """Median over ``repeat`` passes of the seconds per item of ``fn`` over ``items``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - start) / len(items))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="training resolutions")
    parser.add_argument("--images", type=int, default=48, help="images per size")
    parser.add_argument("--kinds", nargs="+", default=["json", "webdataset"], choices=["json", "webdataset"])
    parser.add_argument("--repeat", type=int, default=3, help="passes over the images (median)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to one core")
    args = parser.parse_args()

    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from PIL import Image
    from transformers import CLIPTokenizer

    from ipadapter_jax.demo import demo_paths
    from ipadapter_jax.families.text import token_ids
    from ipadapter_jax.io.images import load_rgb, preprocess
    from ipadapter_jax.training.data import JsonImageTextSource, train_pixels
    from ipadapter_jax.training.webdataset import WebDatasetSource

    tokenizer = CLIPTokenizer.from_pretrained(str(demo_paths()["sd"] / "tokenizer"))
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            json_file, shards = make_data(Path(tmp), size, args.images)
            sources = {"json": JsonImageTextSource(json_file, Path(tmp) / "images", tokenizer, size),
                       "webdataset": WebDatasetSource(str(shards / "*.tar"), tokenizer, size, process_index=0,
                                                      process_count=1)}
            files = [Path(tmp) / "images" / f"{i}.jpg" for i in range(args.images)]
            raw = [f.read_bytes() for f in files]
            decoded = [load_rgb(Image.open(io.BytesIO(b))) for b in raw]
            captions = [r["text"] for r in json.loads(json_file.read_text())]
            stages = {   # seconds per image of each part of a record
                "decode": per_image(lambda b: load_rgb(Image.open(io.BytesIO(b))), raw, args.repeat),
                "resize_crop": per_image(lambda im: train_pixels(im, size), decoded, args.repeat),
                "clip_preprocess": per_image(lambda im: preprocess([im], 224, 224), decoded, args.repeat),
                "tokenize": per_image(lambda t: token_ids(tokenizer, t, warn=False), captions, args.repeat),
            }
            mean_kib = round(float(np.mean([len(b) for b in raw])) / 1024, 1)
            for kind in args.kinds:
                source = sources[kind]
                if kind == "json":
                    read = per_image(lambda f: f.read_bytes(), files, args.repeat)
                else:
                    read = per_image(lambda i: source._raw(i), range(len(source)), args.repeat)
                total = per_image(lambda i: source[i], range(len(source)), args.repeat)
                record = {"kind": kind, "resolution": size, "images": args.images,
                          "stored_image": f"{size} x {size * 5 // 4} JPEG q95, {mean_kib} KiB mean",
                          "images_per_s_per_core": round(1 / total, 1), "record_ms": round(total * 1e3, 2),
                          "stages_ms": {"read": round(read * 1e3, 3),
                                        **{k: round(v * 1e3, 3) for k, v in stages.items()}},
                          "pinned_to_one_core": not args.no_pin}
                report("data", record)


if __name__ == "__main__":
    main()
