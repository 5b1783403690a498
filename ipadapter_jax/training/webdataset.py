"""img2dataset / webdataset tar shards as a random-access training source.

Instead of streaming the tars (whose position, with a shuffle buffer, cannot
be checkpointed exactly), every shard is indexed once (``shards``: each
record's members by byte offset) and a record is read with two ``os.pread``
calls. grain samples records by index with a global shuffle, and its iterator
position is checkpointed with the training state, so a resumed run sees
exactly the batches of an uninterrupted one. No conversion step (ArrayRecord)
is needed.

Each process reads its own shards (shard ``i`` of the sorted list goes to
process ``i % process_count``), so processes never read the same file. Images
that do not decode are skipped when read and counted (``skipped``, as for the
other sources).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

from ipadapter_jax.io.errors import BadArgument, BadFile
from ipadapter_jax.training.data import _ImageTextBase, read_id_embed
from ipadapter_jax.training.shards import FACE_EXTENSIONS, TEXT_EXTENSION, load_indexes, shard_paths

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the source

class WebDatasetSource(_ImageTextBase):
    """The records of a process's share of the shards ``shards`` (see
    ``shard_paths``), as the other image-text sources give them (``pixels``,
    ``clip_pixels``, ``input_ids``, ``original_size``, ``crop_top_left``,
    ``skipped``; with ``condition="face"`` the image prompt is the record's
    ``face.jpg|png|webp`` member). ``original_size`` is the record's json ``original_height`` /
    ``original_width`` when img2dataset wrote them (it resized the image), else
    the stored image's size.

    process_index / process_count: this process's share (default: JAX's).
    index_dir: where shard indexes are kept between runs (None: not kept).
    """

    def __init__(self, shards: str | Sequence[str], tokenizer, resolution: int, *,
                 index_dir: str | os.PathLike | None = None, process_index: int | None = None,
                 process_count: int | None = None, **kwargs):
        super().__init__(tokenizer, resolution, **kwargs)
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        paths = shard_paths(shards)
        if len(paths) < process_count:
            raise BadArgument(f"data.shards: {len(paths)} shard(s) for {process_count} processes; every process "
                              "reads its own shards, so it needs at least as many shards as processes")
        self.all_shards = len(paths)
        self.process_index, self.process_count = process_index, process_count
        self.paths = paths[process_index::process_count]
        self.index_dir = None if index_dir is None else str(index_dir)
        self.indexes = load_indexes(self.paths, self.index_dir)
        self.starts = np.cumsum([0] + [len(i) for i in self.indexes])
        if self.starts[-1] == 0:
            raise BadFile(f"data.shards: no complete record (image + txt) in the {len(self.paths)} shard(s) of "
                          f"process {process_index} ({self.paths[0]} ...)")
        self._local = threading.local()     # each reader thread its own open shards (fds)
        self._all_fds: set[int] = set()
        self._lock = threading.Lock()
        log.info("webdataset: process %d of %d reads %d of %d shards (%s ... %s), %d records", process_index,
                 process_count, len(self.paths), len(paths), self.paths[0].name, self.paths[-1].name, len(self))

    # grain pickles sources for its worker processes: file descriptors stay behind.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_local"], state["_all_fds"], state["_lock"] = None, set(), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local, self._lock = threading.local(), threading.Lock()

    def __del__(self):
        for fd in getattr(self, "_all_fds", ()):
            try:
                os.close(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        # grain checks the source on restore by its repr: stable across runs of the same data.
        condition = "" if self.condition == "image" else f", condition={self.condition}"
        # Shard names, not folders: a run resumes after its shards moved (the same data elsewhere).
        return (f"WebDatasetSource(shards={self.paths[0].name}..{self.paths[-1].name}, {len(self.paths)} of "
                f"{self.all_shards} shards for process {self.process_index} of {self.process_count}, "
                f"records={len(self)}, resolution={self.resolution}{condition})")

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a shard. Each of grain's reader threads keeps its own
        few shards open (``os.pread`` needs no lock, so threads read in parallel, which a network
        file system's latency needs)."""
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = OrderedDict()
        fd = files.pop(shard, None)
        if fd is None:
            fd = os.open(self.paths[shard], os.O_RDONLY)
            with self._lock:
                self._all_fds.add(fd)
            while len(files) >= 8:
                old = files.popitem(last=False)[1]
                with self._lock:
                    self._all_fds.discard(old)
                os.close(old)
        files[shard] = fd
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise BadFile(f"{self.paths[shard]}: cut short ({len(data)} of {size} bytes at offset {offset})")
        return data

    def member(self, index: int, extension: str) -> bytes | None:
        """The bytes of record ``index``'s member ``extension`` (e.g. "json", "npy"), or None."""
        shard, row = self._locate(index)
        found = self.indexes[shard].member(row, extension)
        return None if found is None else self._read(shard, *found)

    def _raw(self, index):
        shard, row = self._locate(index)
        shard_index = self.indexes[shard]
        from PIL import Image

        _, offset, size = shard_index.image_member(row)
        image = Image.open(io.BytesIO(self._read(shard, offset, size)))   # decoded (or refused) by load_rgb
        text = self._read(shard, *shard_index.member(row, TEXT_EXTENSION)).decode("utf-8", errors="replace")
        return image, text.strip()

    def _face(self, index):
        from PIL import Image

        shard, row = self._locate(index)
        for ext in FACE_EXTENSIONS:
            found = self.indexes[shard].member(row, ext)
            if found is not None:
                return Image.open(io.BytesIO(self._read(shard, *found)))
        raise BadFile(f"{self._describe(index)} has no face crop ({' / '.join(FACE_EXTENSIONS)}), which "
                      "data.condition='face' conditions on")

    def _id_embed(self, index):
        raw = self.member(index, "npy")
        if raw is None:
            raise BadFile(f"{self._describe(index)} has no ID embedding (KEY.npy), which FaceID trains on")
        return read_id_embed(raw)

    def _original_size(self, index: int, width: int, height: int) -> tuple[int, int]:
        raw = self.member(index, "json")
        if raw is not None:
            try:
                meta = json.loads(raw)
                size = int(meta["original_height"]), int(meta["original_width"])
                if 0 < min(size) and max(size) < 2**31:
                    return size
            except (ValueError, KeyError, TypeError, OverflowError):
                pass      # no original size recorded (or not a dict): the stored image's
        return height, width

    def _describe(self, index):
        shard, row = self._locate(index)
        return f"{self.paths[shard]}: record {self.indexes[shard].keys[row]}"
