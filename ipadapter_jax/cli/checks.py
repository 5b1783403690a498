"""Checks the command lines run before JAX loads: files that must exist,
outputs that must be writable (tried, not guessed), hub ids resolved."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from ipadapter_jax.io.errors import BadArgument, MissingFile
from ipadapter_jax.io.hub import (CONFIG_PATTERNS, PIPELINE_FOLDER_PATTERNS, TRANSFORMERS_FOLDER_PATTERNS, resolve,
                                  resolve_model_folder)


# Images 8x larger than any supported model was trained for (SDXL: 1024 px) take hours to compile and
# sample on any machine; a typo (an extra 0) should not start that.
MAX_SIZE = 8192


def check_files(paths: Iterable[str | None]) -> None:
    """Each given path names an existing file (not a folder)."""
    for path in paths:
        if path and Path(path).is_dir():
            raise BadArgument(f"{path} is a folder; expected a file")
        if path and not Path(path).is_file():
            raise MissingFile(f"file not found: {path}")


def check_writable(flag: str, path: Path) -> None:
    """``path`` can be written: its folder is created, and a temporary file is
    opened beside it and removed (``os.access`` says yes to root even where the
    write then fails, e.g. under /proc)."""
    folder = path.parent
    missing = next((f for f in [folder, *folder.parents][::-1] if not f.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if missing is not None:
            _created.append(missing)
    except OSError as e:
        raise BadArgument(f"{flag} {path}: cannot create the folder {folder}: {e.strerror or e}") from None
    if path.is_dir():
        raise BadArgument(f"{flag} {path}: is a folder; expected a file name")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BadArgument(f"{flag} {path}: the folder {folder} is not writable ({e.strerror or e})") from None


_created: list[Path] = []   # folders check_writable made, removed again if the command stops before writing


def keep_created_folders() -> None:
    """The run wrote its outputs: the folders it made stay."""
    _created.clear()


def undo_created_folders() -> None:
    """Remove the (still empty) folders ``check_writable`` created: a refused
    command leaves nothing behind."""
    while _created:
        top = _created.pop()
        for folder in sorted((p for p in [top, *top.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                folder.rmdir()
            except OSError:
                pass


def resolve_or_error(flag: str, spec: str, kind: str, what: str | None, *, configs_only: bool = False) -> Path:
    """A flag's path or hub id -> a local path (``io.hub.resolve``), or a one-line error naming the flag.
    A folder fetched from the hub holds configs, tokenizers and default weights (``configs_only``: no
    weights), not every copy its repository has."""
    return resolve(spec, kind=kind, what=what, flag=flag,
                   allow_patterns=CONFIG_PATTERNS if configs_only else PIPELINE_FOLDER_PATTERNS)


def resolve_model(flag: str, spec: str) -> Path:
    """A Stable Diffusion model: a folder or single file, or a hub id (a pipeline
    repo fetches only what ``PIPELINE_FOLDER_PATTERNS`` names)."""
    return resolve(spec, kind="any", what="Stable Diffusion model (diffusers folder or single file)", flag=flag,
                   allow_patterns=PIPELINE_FOLDER_PATTERNS)


def resolve_clip(flag: str, spec: str) -> Path:
    """A transformers CLIPModel folder with its tokenizer and processor files, or its hub id."""
    return resolve(spec, kind="folder", what="CLIP model folder", flag=flag,
                   allow_patterns=TRANSFORMERS_FOLDER_PATTERNS)


def resolve_encoder(flag: str, spec: str) -> Path:
    """A transformers model folder (``config.json`` + ``model.safetensors``), or its hub id."""
    return resolve_model_folder(spec, weights_name="model", what="CLIP image encoder folder", flag=flag)


_claims: list = []   # open lock files, held until the process ends


def claim_output(flag: str, path: Path) -> None:
    """Refuse to start when another run is writing the same output: an exclusive
    ``flock`` on ``.NAME.lock`` beside it, held until this process ends (the
    kernel releases it even when the process is killed, so no stale lock
    blocks a later run)."""
    import fcntl

    from ipadapter_jax.cli import interrupts

    lock = path.with_name(f".{path.name}.lock")
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise BadArgument(f"{flag} {path}: another run ({owner}) is writing it now; wait for it to finish or "
                          "choose another output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _claims.append((handle, lock))
    interrupts.writing(lock)


def release_outputs() -> None:
    """Remove the lock files of ``claim_output`` (the locks go with the process anyway)."""
    from ipadapter_jax.cli import interrupts

    while _claims:
        handle, lock = _claims.pop()
        lock.unlink(missing_ok=True)
        interrupts.written(lock)
        handle.close()
