"""img2dataset / webdataset tar shards: which files, and where each record lies in them.

A shard is a plain tar whose members are grouped into records by key: the
member name up to the first dot of its base name (``00042/000420017.jpg`` and
``00042/000420017.txt`` are the ``.jpg`` and ``.txt`` of record
``00042/000420017``), as webdataset groups them. img2dataset writes
``KEY.jpg|png|webp`` (the image), ``KEY.txt`` (the caption) and ``KEY.json``
(``width``, ``height``, ``original_width``, ``original_height``, ``url``, ...).

Each shard is indexed once: its tar headers are read and every record's
members located by byte offset and size. The index is saved per shard in an
index folder (``.npz``, reused while the shard's size and modification time
are unchanged), so a restarted run does not read the headers again. Records
without an image or a caption, the rest of a shard cut short and a file that
is not a tar are skipped, with one warning per shard. No JAX here: the
command line checks shard lists before JAX loads.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import socket
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from ipadapter_jax.io.errors import BadArgument, MissingFile

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSION = "txt"
FACE_EXTENSIONS = ("face.jpg", "face.jpeg", "face.png", "face.webp")   # KEY.face.jpg: a face crop (face variants)
_KEY = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")   # (key, extension) of a member name
_BRACES = re.compile(r"\{([^{}]*)\}")
INDEX_VERSION = 1


# --------------------------------------------------------------------------- shard lists

def expand_braces(pattern: str) -> list[str]:
    """``dir/{00000..00099}.tar`` -> 100 names (zero padding kept from the
    bounds), ``{a,b}`` -> two; several groups multiply, left to right."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match[1], pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        low, high = numeric[1], numeric[2]
        if int(high) < int(low):
            raise BadArgument(f"data.shards: the range {{{body}}} in {pattern!r} runs backwards")
        width = len(low) if low.startswith("0") or len(low) == len(high) else 0
        choices = [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def shard_paths(spec: str | Sequence[str]) -> list[Path]:
    """The shard files ``spec`` names: a glob (``dir/*.tar``), a brace range
    (``dir/{00000..00099}.tar``), several of either separated by spaces, or a
    list of them. Sorted, without duplicates; an empty match or a named file
    that does not exist is an error naming it."""
    patterns = spec.split() if isinstance(spec, str) else [p for part in spec for p in str(part).split()]
    if not patterns:
        raise BadArgument("data.shards is required with data.kind='webdataset': a glob or a brace range of tar "
                          "shards, e.g. --config.data.shards='shards/{00000..00099}.tar'")
    found: set[Path] = set()
    for pattern in patterns:
        for name in expand_braces(os.path.expanduser(pattern)):
            if glob.has_magic(name):
                matches = [Path(p) for p in glob.glob(name) if os.path.isfile(p)]
                if not matches:
                    raise MissingFile(f"data.shards: no file matches {name!r}")
                found.update(matches)
            elif os.path.isfile(name):
                found.add(Path(name))
            else:
                raise MissingFile(f"data.shards: no such shard file: {name}")
    return sorted(p.absolute() for p in found)


# --------------------------------------------------------------------------- the index of one shard

class ShardIndex:
    """Where each record's members lie in one shard: ``keys`` [n], and per
    extension the byte ``offsets`` / ``sizes`` [n] (-1: the record has none)."""

    def __init__(self, keys: np.ndarray, offsets: dict[str, np.ndarray], sizes: dict[str, np.ndarray],
                 incomplete: int = 0):
        self.keys, self.offsets, self.sizes = keys, offsets, sizes
        self.incomplete = incomplete     # records skipped for lack of an image or a caption

    def __len__(self) -> int:
        return len(self.keys)

    def member(self, row: int, extension: str) -> tuple[int, int] | None:
        """(offset, size) of the record's member with ``extension``, or None."""
        offsets = self.offsets.get(extension)
        if offsets is None or offsets[row] < 0:
            return None
        return int(offsets[row]), int(self.sizes[extension][row])

    def image_member(self, row: int) -> tuple[str, int, int]:
        """(extension, offset, size) of the record's image (the first of ``IMAGE_EXTENSIONS`` it has)."""
        for ext in IMAGE_EXTENSIONS:
            found = self.member(row, ext)
            if found is not None:
                return (ext, *found)
        raise KeyError(row)     # indexing keeps only records with an image

    def save(self, path: Path, stamp: tuple[int, int]) -> None:
        arrays = {"keys": self.keys, "stamp": np.asarray(stamp, np.int64), "version": np.int64(INDEX_VERSION),
                  "incomplete": np.int64(self.incomplete)}
        for ext in self.offsets:
            arrays[f"offset.{ext}"], arrays[f"size.{ext}"] = self.offsets[ext], self.sizes[ext]
        # Hosts may share the index folder: a temporary name of this host and process.
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)      # never a half-written index under the real name

    @classmethod
    def load(cls, path: Path, stamp: tuple[int, int]) -> "ShardIndex | None":
        """The saved index, or None when it is missing, unreadable or of another version of the shard."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != INDEX_VERSION or tuple(z["stamp"].tolist()) != tuple(stamp):
                    return None
                exts = [k.split(".", 1)[1] for k in z.files if k.startswith("offset.")]
                return cls(z["keys"], {e: z[f"offset.{e}"] for e in exts}, {e: z[f"size.{e}"] for e in exts},
                           int(z["incomplete"]))
        except Exception:  # noqa: BLE001 - a damaged index (empty, cut short, not a zip) is rebuilt
            return None


def index_shard(path: Path) -> tuple[ShardIndex, list[str]]:
    """Read ``path``'s tar headers: ``(index of its complete records, problems)``.
    A record is complete with an image and a caption (the index counts the
    others in ``incomplete``); a shard cut short or not a tar is a problem, and
    the records read before it broke are kept."""
    members: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    problems = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                match = _KEY.match(info.name)
                if match is None:
                    continue
                members.setdefault(match[1], {})[match[2].lower()] = (info.offset_data, info.size)
            end = tar.offset
        # tarfile ends quietly where the file does: a complete tar ends in a zero block.
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(tarfile.BLOCKSIZE)
        if len(marker) < tarfile.BLOCKSIZE or marker.count(0) != tarfile.BLOCKSIZE:
            problems.append(f"{path}: cut short (no end-of-archive block); the records before the cut are used")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{path}: not a readable tar after {len(members)} records ({e})")
    # A member whose data runs past the end of a shard cut short goes with its record.
    size = path.stat().st_size
    cut = [key for key, found in members.items() if any(o + n > size for o, n in found.values())]
    for key in cut:
        del members[key]
    keys, rows = [], []
    incomplete = 0
    for key, found in members.items():
        if TEXT_EXTENSION in found and any(ext in found for ext in IMAGE_EXTENSIONS):
            keys.append(key)
            rows.append(found)
        else:
            incomplete += 1
    extensions = sorted({ext for found in rows for ext in found})
    offsets = {e: np.array([r.get(e, (-1, -1))[0] for r in rows], np.int64) for e in extensions}
    sizes = {e: np.array([r.get(e, (-1, -1))[1] for r in rows], np.int64) for e in extensions}
    return ShardIndex(np.array(keys, dtype=np.str_), offsets, sizes, incomplete), problems


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def load_indexes(paths: Sequence[Path], index_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> list[ShardIndex]:
    """The index of every shard in ``paths``: read from ``index_dir`` when saved
    there for the shard as it is now, else built (a progress bar) and saved."""
    from tqdm.auto import tqdm

    folder = Path(index_dir) if index_dir else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    indexes, problems = [], []
    for path in tqdm(paths, desc="indexing shards", disable=not progress or len(paths) < 2, leave=False):
        stamp = _stamp(path)
        cached = folder / f"{path.stem}.{hashlib.sha1(str(path).encode()).hexdigest()[:16]}.npz" if folder else None
        index = ShardIndex.load(cached, stamp) if cached is not None and cached.exists() else None
        if index is None:
            index, found = index_shard(path)
            problems += found
            if cached is not None and not found:    # a broken shard (or one being written) is read again
                index.save(cached, stamp)
        if index.incomplete:
            problems.append(f"{path}: {index.incomplete} records without an image ({'/'.join(IMAGE_EXTENSIONS)}) "
                            "or a caption (txt) skipped")
        indexes.append(index)
    for problem in problems:
        log.warning("webdataset: %s", problem)
    return indexes


def write_shard(path: str | os.PathLike, records: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar shard as img2dataset writes one: for each ``(key, {extension: bytes})``
    the members ``KEY.EXTENSION`` in that order (e.g. ``{"jpg": ..., "txt": b"a dog",
    "json": b'{"original_width": 640, ...}'}``). Written to a temporary name and
    renamed. Tests, benchmarks and small datasets use it; at scale, img2dataset."""
    import io
    import time

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for key, members in records:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path
