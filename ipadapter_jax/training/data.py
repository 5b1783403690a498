"""Training data: random-access sources and a grain loader.

Sources (each ``__len__`` / ``__getitem__`` -> dict of numpy arrays):
* ``JsonImageTextSource``: the official tutorial format, a json list of
  ``{"image_file": "1.png", "text": "A dog"}`` plus an image root;
* ``TFDSImageTextSource``: any TFDS dataset with an image and a text feature,
  read through TFDS' TF-free ``as_data_source`` API;
* ``webdataset.WebDatasetSource``: img2dataset tar shards, indexed once for
  random access (its own module);
* ``CachedSource``: latents / text embeddings / image embeddings precomputed
  by ``cache_features`` (skips the VAE and encoders in every step).

Every image is resized on its shortest side and center-cropped to the
resolution, normalised to [-1, 1] (``pixels``), and also prepared for CLIP
(``clip_pixels``, the ``CLIPImageProcessor`` recipe). Each record also says
what was done to its image, for SDXL's micro-conditioning (``time_ids``, see
``families.text.time_ids``): ``original_size`` (h, w) of the file and ``crop_top_left``
(top, left) of the crop in the resized image, as the official
``tutorial_train_sdxl.py`` records them. With a second tokenizer (SDXL) the
caption's ids of it are ``input_ids_2``. A corrupt or unreadable
image is skipped (the next record is used) and counted in the record's
``skipped`` field, which the training loop sums into its logs; a run of
unreadable images as long as ``max_retries`` (or the whole dataset) is an error.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ipadapter_jax.families.text import token_ids
from ipadapter_jax.io.errors import BadArgument, BadFile, MissingFile, Unsupported, UserError
from ipadapter_jax.io.files import read_json, read_npy
from ipadapter_jax.io.images import load_rgb, preprocess, preprocess_siglip, resize_crop

log = logging.getLogger(__name__)


def _short(value, n: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def train_crop(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """The training transform's geometry for a ``width`` x ``height`` image:
    ``(new_w, new_h, left, top)``: the shortest side resized to ``resolution``,
    then a center crop at (top, left) of the resized image. The sizes are
    torchvision ``Resize``'s (the long side ``int(resolution * long / short)``,
    truncated), so images come out as the official scripts' do; the crop offsets
    floor, as ``tutorial_train_sdxl.py`` (``CenterCrop`` in ``tutorial_train.py``
    rounds half to even: one pixel apart for margins of 4k + 3)."""
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)
    new_w, new_h = (resolution, new_long) if width <= height else (new_long, resolution)
    return new_w, new_h, (new_w - resolution) // 2, (new_h - resolution) // 2


def train_pixels(image, resolution: int) -> np.ndarray:
    """Shortest side -> ``resolution`` (bilinear, as the official transforms),
    center crop, [-1, 1], HWC float32."""
    from PIL import Image

    rgb = load_rgb(image)
    new_w, new_h, left, top = train_crop(*rgb.size, resolution)
    rgb = resize_crop(rgb, (new_w, new_h), (left, top, left + resolution, top + resolution), Image.BILINEAR)
    pixels = np.asarray(rgb, np.float32)
    return pixels / 127.5 - 1.0


CONDITIONS = ("image", "face")


_TORCH_LOAD_LOCK = threading.Lock()


def read_id_embed(source) -> np.ndarray:
    """A face ID embedding as float32 [D]: a ``.npy`` file (or its bytes), or a
    PyTorch tensor file (``.bin`` / ``.pt`` / ``.pth``, what the official
    ``tutorial_train_faceid.py`` reads; through ``torch.load(weights_only=True)``).
    Shapes [D] and [1, D] are taken; anything else, or a non-finite value, is a ``BadFile``."""
    import io

    name = str(source) if isinstance(source, (str, os.PathLike)) else "the record's npy"
    if isinstance(source, bytes):
        array = np.load(io.BytesIO(source), allow_pickle=False)
    elif Path(source).suffix in (".bin", ".pt", ".pth"):
        try:
            import torch
        except ImportError:
            raise Unsupported(f"{source}: a PyTorch file needs torch (pip install -e '.[torch]'), or save the "
                              "embedding as .npy") from None
        # The official scripts torch.save InsightFace's numpy array (a pickle of an ndarray): allow exactly
        # the numpy reconstruction globals besides tensors, nothing else.
        numpy_globals = [np.ndarray, np.dtype, *(type(np.dtype(t)) for t in ("float16", "float32", "float64"))]
        if np.lib.NumpyVersion(np.__version__) < "2.0.0":   # the module path pickles name differs
            from numpy.core.multiarray import _reconstruct
        else:
            from numpy._core.multiarray import _reconstruct
        numpy_globals.append(_reconstruct)
        try:
            # safe_globals sets and restores one process-wide list: grain's reader threads take turns.
            with _TORCH_LOAD_LOCK, torch.serialization.safe_globals(numpy_globals):
                array = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise MissingFile(f"{source} not found") from None
        except Exception as e:  # noqa: BLE001 - torch raises many kinds on a bad file; each is this file's fault
            raise BadFile(f"{source}: not a readable ID embedding file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]})") from None
        if hasattr(array, "float"):
            array = array.float().numpy()
        elif not isinstance(array, np.ndarray):
            raise BadFile(f"{source}: expected one tensor or array (the ID embedding), got a {type(array).__name__}")
    else:
        array = read_npy(source)
    array = np.asarray(array, np.float32)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or not np.isfinite(array).all():
        raise BadFile(f"{name}: expected a finite ID embedding of shape [D] (InsightFace: [512]), got shape "
                      f"{tuple(array.shape)}")
    return array


class _ImageTextBase:
    """Shared record building: image -> pixels + clip_pixels, text -> input_ids.

    condition: what the image prompt (``clip_pixels``) is made from: the image
    itself ("image"), or the record's face crop ("face": the Plus-face /
    full-face recipe, as the official ``tutorial_train_plus`` face data: the crop
    is the condition, the whole image the target)."""

    def __init__(self, tokenizer, resolution: int, clip_size: int = 224, max_retries: int = 16, tokenizer_2=None,
                 condition: str = "image", id_embeds: bool = False, pixels: str = "clip"):
        if condition not in CONDITIONS:
            raise BadArgument(f"data.condition must be one of {list(CONDITIONS)}, got {condition!r}")
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.resolution = resolution
        self.clip_size = clip_size          # 0: no clip_pixels (an adapter without CLIP input: FaceID)
        self.max_retries = max_retries
        self.condition = condition
        self.id_embeds = id_embeds
        # How the image prompt's pixels are prepared: "clip" (CLIPImageProcessor: resize, centre crop, CLIP's
        # mean / std) or "siglip" (SiglipImageProcessor: a square resize, [-1, 1]; InstantX's FLUX adapter).
        if pixels not in ("clip", "siglip"):
            raise BadArgument(f"image-prompt pixels must be 'clip' or 'siglip', got {pixels!r}")
        self.pixels = pixels

    def _raw(self, index: int) -> tuple[Any, str]:
        raise NotImplementedError

    def _face(self, index: int):
        """The record's face crop (a path, PIL image or array), for ``condition="face"``."""
        raise Unsupported(f"{type(self).__name__} has no face crops (data.condition='face')")

    def _id_embed(self, index: int) -> np.ndarray:
        """The record's face ID embedding (InsightFace, [512]), for FaceID variants."""
        raise Unsupported(f"{type(self).__name__} has no ID embeddings (FaceID)")

    def _describe(self, index: int) -> str:
        return f"record {index}"

    def _original_size(self, index: int, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the image before any resizing (SDXL's ``original_size``): the file's."""
        return height, width

    def __getitem__(self, index: int) -> dict:
        skipped, last = 0, None
        # Each record at most once: a dataset smaller than max_retries that is all unreadable
        # ends here too.
        attempts = max(1, min(self.max_retries, len(self)))
        for attempt in range(attempts):
            i = (index + attempt) % len(self)
            try:
                with warnings.catch_warnings():     # an image past Pillow's pixel limit is a bad record
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    image, text = self._raw(i)
                    rgb = load_rgb(image)
                    pixels = train_pixels(rgb, self.resolution)
                    extra = {}
                    if self.clip_size:
                        condition = rgb if self.condition == "image" else load_rgb(self._face(i))
                        extra["clip_pixels"] = (preprocess_siglip([condition], self.clip_size)[0]
                                                if self.pixels == "siglip" else
                                                preprocess([condition], self.clip_size, self.clip_size)[0])
                    if self.id_embeds:
                        extra["id_embeds"] = self._id_embed(i)
                    width, height = rgb.size
                    original = np.array(self._original_size(i, width, height), np.int32)
            except (UserError, OSError, ValueError, SyntaxError, OverflowError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as e:   # PIL raises all of these on bad files
                log.debug("skipping unreadable record (%s): %s", self._describe(i), e)
                skipped, last = skipped + 1, e
                continue
            _, _, left, top = train_crop(width, height, self.resolution)
            record = {"pixels": pixels, **extra, "input_ids": token_ids(self.tokenizer, text, warn=False)[0],
                      "original_size": original,
                      "crop_top_left": np.array([top, left], np.int32), "skipped": np.int32(skipped)}
            if self.tokenizer_2 is not None:
                record["input_ids_2"] = token_ids(self.tokenizer_2, text, warn=False)[0]
            return record
        scope = (f"none of its {len(self)} records has a readable image" if attempts == len(self) else
                 f"{attempts} records in a row, from {self._describe(index)}, have no readable image")
        raise BadFile(f"{self!r}: {scope} (the last error: {last}); is the image root right?")


class JsonImageTextSource(_ImageTextBase):
    """The official tutorial's data: ``[{"image_file": ..., "text": ...}, ...]``."""

    def __init__(self, json_file: str | os.PathLike, image_root: str | os.PathLike, tokenizer, resolution: int,
                 **kwargs):
        super().__init__(tokenizer, resolution, **kwargs)
        json_file, self.image_root = Path(json_file), Path(image_root)
        self.json_file = json_file
        if not json_file.is_file():
            raise MissingFile(f"data json not found: {json_file}")
        if not self.image_root.is_dir():
            raise MissingFile(f"image root folder not found: {self.image_root}")
        records = read_json(json_file)
        if not isinstance(records, list) or not records:
            got = "an empty list" if records == [] else f"a JSON {type(records).__name__}"
            raise BadFile(f"{json_file}: expected a non-empty list of {{'image_file', 'text'}} records, got {got}")
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "image_file" not in r or "text" not in r:
                raise BadFile(f"{json_file}: record {i} lacks 'image_file' or 'text': {_short(r)}")
            if not isinstance(r["image_file"], str) or not r["image_file"] or not isinstance(r["text"], str):
                raise BadFile(f"{json_file}: record {i}: 'image_file' must be a file name and 'text' a string, "
                              f"got {_short(r)}")
            if self.condition == "face" and not (isinstance(r.get("face_image_file"), str) and r["face_image_file"]):
                raise BadFile(f"{json_file}: record {i} has no 'face_image_file' (the face crop that "
                              f"data.condition='face' conditions on): {_short(r)}")
            if self.id_embeds and not (isinstance(r.get("id_embed_file"), str) and r["id_embed_file"]):
                raise BadFile(f"{json_file}: record {i} has no 'id_embed_file' (the face ID embedding a FaceID "
                              f"adapter is trained on): {_short(r)}")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        # grain checks the data source on restore by its repr: it must be stable across processes.
        condition = "" if self.condition == "image" else f", condition={self.condition}"
        return (f"JsonImageTextSource(json_file={self.json_file}, image_root={self.image_root}, "
                f"resolution={self.resolution}, records={len(self)}{condition})")

    def _raw(self, index):
        r = self.records[index]
        return self.image_root / r["image_file"], r["text"]

    def _face(self, index):
        return self.image_root / self.records[index]["face_image_file"]

    def _id_embed(self, index):
        # Relative to the image root; as given (the official script's reading) when it is not there.
        name = self.records[index]["id_embed_file"]
        path = self.image_root / name
        return read_id_embed(path if path.exists() or not Path(name).exists() else Path(name))

    def _describe(self, index):
        return str(self.image_root / self.records[index]["image_file"])


class TFDSImageTextSource(_ImageTextBase):
    """A TFDS dataset (prepared in ``data_dir``) with an image and a text feature,
    read with ``builder.as_data_source`` (no TensorFlow needed)."""

    def __init__(self, name: str, data_dir: str | os.PathLike, tokenizer, resolution: int, *, split: str = "train",
                 image_key: str = "image", text_key: str = "text", **kwargs):
        super().__init__(tokenizer, resolution, **kwargs)
        import tensorflow_datasets as tfds

        if not Path(data_dir).is_dir():
            raise MissingFile(f"TFDS data_dir not found: {data_dir}")
        try:
            builder = tfds.builder(name, data_dir=str(data_dir))
        except tfds.core.registered.DatasetNotFoundError:
            import difflib

            try:   # the installed datasets only: community ones would need the network
                known = tfds.list_builders(with_community_datasets=False)
            except Exception:  # noqa: BLE001 - a hint only
                known = []
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (tfds.list_builders() lists them)"
            raise BadArgument(f"no TFDS dataset named {name!r}{hint}") from None
        if not builder.is_prepared():
            raise MissingFile(f"TFDS dataset {name!r} is not prepared in {data_dir} (no {builder.data_dir}); "
                              "prepare it there first, e.g. builder.download_and_prepare(file_format="
                              "'array_record'), which random access needs")
        features = getattr(builder.info, "features", None) or {}
        missing = [k for k in (image_key, text_key) if features and k not in features]
        if missing:
            raise BadArgument(f"TFDS dataset {name!r} has no feature {missing[0]!r}; its features: "
                              f"{sorted(features.keys())} (set image_key / text_key)")
        unknown = [part for part in (p.split("[")[0].strip() for p in split.split("+"))
                   if part not in builder.info.splits]     # "train[:90%]+test" names train and test
        if unknown:
            raise BadArgument(f"TFDS dataset {name!r} has no split {unknown[0]!r} (in split={split!r}); its "
                              f"splits: {sorted(builder.info.splits.keys())}")
        try:
            self.source = builder.as_data_source(split=split)
        except NotImplementedError as e:   # e.g. prepared as TFRecord, which has no random access
            raise Unsupported(f"TFDS dataset {name!r} in {data_dir} cannot be read by index: {e}") from None
        if len(self.source) == 0:
            raise BadFile(f"TFDS dataset {name!r} split {split!r} in {data_dir} is empty")
        self.image_key, self.text_key = image_key, text_key
        self.description = f"TFDSImageTextSource({name}, data_dir={data_dir}, split={split}, resolution={resolution})"

    def __len__(self):
        return len(self.source)

    def __repr__(self):
        return self.description

    def _raw(self, index):
        ex = self.source[index]
        text = ex[self.text_key]
        return np.asarray(ex[self.image_key]), text.decode() if isinstance(text, bytes) else str(text)


class CachedSource:
    """Precomputed features (``cache_features``): ``latents``, ``text_embeds``,
    ``image_embeds`` per record, and for a family with added conditioning
    (SDXL) ``pooled_text_embeds`` and ``time_ids``, memory-mapped from one
    folder of ``.npy`` files."""

    FEATURES = ("latents", "text_embeds", "image_embeds", "pooled_text_embeds", "time_ids")

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        self.folder = folder
        if not folder.is_dir():
            raise MissingFile(f"feature cache not found: {folder}")
        try:
            self.arrays = {p.stem: read_npy(p, mmap=True) for p in sorted(folder.glob("*.npy"))}
        except BadFile as e:
            raise BadFile(f"{e} (a corrupt feature cache? delete {folder} to rebuild it)") from None
        needed = {"latents", "text_embeds", "image_embeds"}
        if not needed <= self.arrays.keys():
            raise BadFile(f"{folder} lacks {sorted(needed - self.arrays.keys())}.npy (see cache_features)")
        n = {len(a) if a.ndim else 0 for k, a in self.arrays.items() if k in self.FEATURES}
        if len(n) != 1 or 0 in n:
            raise BadFile(f"{folder}: feature arrays have different or zero lengths {n}")

    def __len__(self):
        return len(self.arrays["latents"])

    def __repr__(self):
        return f"CachedSource({self.folder}, records={len(self)})"

    # grain pickles sources for its worker processes: send the folder, not the
    # memory-mapped arrays (pickling a memmap copies the whole file).
    def __getstate__(self):
        return {"folder": str(self.folder)}

    def __setstate__(self, state):
        self.__init__(state["folder"])

    def __getitem__(self, index):
        out = {k: np.asarray(self.arrays[k][index]) for k in self.FEATURES if k in self.arrays}
        out["skipped"] = np.int32(0)
        return out


def make_loader(source, *, batch_size: int, seed: int, workers: int = 0, shard_by_process: bool = True):
    """A grain DataLoader: deterministic shuffling by seed, endless epochs,
    per-process shards, batches of ``batch_size`` (per process)."""
    import grain.python as grain

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise BadArgument(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(source) < batch_size:
        raise BadArgument(f"the dataset has {len(source)} records, fewer than one batch of {batch_size} "
                          f"(batches drop the remainder, so there would be none): {source!r}")
    if shard_by_process:
        import jax

        if len(source) // jax.process_count() < batch_size:
            raise BadArgument(f"the dataset has {len(source)} records: {len(source) // jax.process_count()} per "
                              f"process for {jax.process_count()} processes, fewer than one batch of {batch_size}")
    sampler = grain.IndexSampler(num_records=len(source), shuffle=True, seed=seed, num_epochs=None,
                                 shard_options=grain.ShardByJaxProcess(drop_remainder=True) if shard_by_process
                                 else grain.NoSharding())
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[grain.Batch(batch_size, drop_remainder=True)], worker_count=workers)


def cache_features(source, folder: str | os.PathLike, encode_fn, *, batch_size: int = 16,
                   manifest: dict | None = None) -> Path:
    """Run ``encode_fn(batch) -> {"latents", "text_embeds", "image_embeds"}``
    (the frozen encoders, jitted) over ``source`` once and write the arrays.
    Written to a temporary folder and renamed, with ``manifest.json`` last, so
    an interrupted run never leaves a cache that looks complete."""
    import shutil
    import tempfile

    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        chunks: dict[str, list] = {}
        for start in tqdm(range(0, len(source), batch_size), desc="caching features"):
            items = [source[i] for i in range(start, min(start + batch_size, len(source)))]
            batch = {k: np.stack([it[k] for it in items]) for k in items[0]}
            for k, v in encode_fn(batch).items():
                chunks.setdefault(k, []).append(np.asarray(v, np.float32))
        for k, parts in chunks.items():
            np.save(tmp / f"{k}.npy", np.concatenate(parts))
        (tmp / "manifest.json").write_text(json.dumps(manifest or {"records": len(source)}))
        if folder.exists():
            shutil.rmtree(folder)   # an earlier, incomplete cache (no manifest)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
