"""Hugging Face hub ids wherever a path is taken: ``id -> local path in the hub cache``.

One spelling, for files and folders alike:

* ``org/name``                 a hub repo (its top folder), e.g. ``stabilityai/stable-diffusion-xl-base-1.0``;
* ``org/name:path/in/repo``    a file or a subfolder inside it, e.g.
  ``h94/IP-Adapter:models/ip-adapter_sd15.safetensors`` or ``h94/IP-Adapter:models/image_encoder``;
* ``org/name@rev[:path]``      the same at a branch, tag or commit (default ``main``).

A local path that exists always wins over an id of the same spelling, and only
a ``str`` can be an id (a ``pathlib.Path`` is always local). Ids resolve to files
in the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, read at call
time): a file is looked up in the cache first; a folder is asked of the hub
(which fetches only what the cache lacks, the cache being the fallback when
the hub cannot be reached); downloads show huggingface_hub's own progress
bars. ``HF_HUB_OFFLINE=1`` uses the cache alone; a missing file there (or any
failed download) is a one-line ``MissingFile`` naming the flag, the id, what
is missing and the cache folder.

This module imports no JAX, Flax or NumPy (the command lines check their
arguments with it before JAX loads); huggingface_hub is imported on first use.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ipadapter_jax.io.errors import MissingFile

Kind = Literal["file", "folder", "any"]

# huggingface_hub's repo-id rule: word characters, '-' and '.', starting and ending
# with a word character, at most 96 per part ('--' and '..' are refused below).
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_SPEC = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[A-Za-z0-9_.][A-Za-z0-9_./-]*))?(?::(?P<path>.+))?$")


@dataclass(frozen=True)
class HubId:
    """A parsed id: the repo, its revision (None: ``main``) and a path inside it ("" for its top)."""

    repo: str
    revision: str | None
    path: str

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{rev}" + (f":{self.path}" if self.path else "")


# What a pipeline folder download fetches: the configs, the tokenizers and each
# component's default safetensors weights (not its fp16 / EMA / .bin copies,
# nor a repo's single-file checkpoints beside the folders).
# (huggingface_hub matches with fnmatch: "*" crosses "/".) Text encoders by name, so a pipeline's
# safety_checker/model.safetensors (never read here) is not fetched.
CONFIG_PATTERNS = ("model_index.json", "*/*.json", "*/*.txt", "*.json", "*.txt")
PIPELINE_FOLDER_PATTERNS = (*CONFIG_PATTERNS, "*/diffusion_pytorch_model.safetensors",
                            "*/diffusion_pytorch_model-*-of-*.safetensors", "text_encoder*/model.safetensors",
                            "text_encoder*/model-*-of-*.safetensors", "diffusion_pytorch_model.safetensors",
                            "diffusion_pytorch_model-*-of-*.safetensors")
# A transformers model folder with its tokenizer or processor files (a CLIPModel for scoring).
TRANSFORMERS_FOLDER_PATTERNS = ("*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors")


def pipeline_patterns(variant: str | None = None) -> tuple[str, ...]:
    """``PIPELINE_FOLDER_PATTERNS``, or with ``variant`` ("fp16") the weights of that variant instead."""
    if variant is None:
        return PIPELINE_FOLDER_PATTERNS
    return (*CONFIG_PATTERNS, f"*/diffusion_pytorch_model.{variant}.safetensors",
            f"*/diffusion_pytorch_model.{variant}-*-of-*.safetensors", f"text_encoder*/model.{variant}.safetensors",
            f"text_encoder*/model.{variant}-*-of-*.safetensors", f"diffusion_pytorch_model.{variant}.safetensors")


def parse(spec: str) -> HubId | None:
    """The id spelled by ``spec`` (``org/name[@rev][:path]``), or None when it is
    not that spelling. Says nothing about local paths: see ``is_hub_id``."""
    if not isinstance(spec, str) or (m := _SPEC.match(spec)) is None:
        return None
    if "--" in m["repo"] or ".." in m["repo"]:
        return None
    path = (m["path"] or "").rstrip("/")
    parts = path.split("/") if path else []
    # a path inside the repo: relative, no empty, '.' or '..' parts, no Windows separators
    if m["path"] is not None and (not parts or any(p in ("", ".", "..") for p in parts) or "\\" in path):
        return None
    return HubId(m["repo"], m["rev"], path)


def is_hub_id(spec) -> bool:
    """Whether ``spec`` is a hub id rather than a local path: a ``str`` spelled
    ``org/name[@rev][:path]`` (exactly one slash in the repo part, repo-id
    characters, not starting with ``.``, ``/`` or ``~``) that is not an existing path."""
    return isinstance(spec, str) and parse(spec) is not None and not Path(spec).expanduser().exists()


def cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now: ``$HF_HUB_CACHE``,
    ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``,
    else huggingface_hub's own (``~/.cache/huggingface/hub``)."""
    env = os.environ
    # huggingface_hub reads these once at import; tests and users may set them later
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder and (env.get("HF_HOME") or env.get("XDG_CACHE_HOME")):
        folder = os.path.join(env.get("HF_HOME") or os.path.join(env["XDG_CACHE_HOME"], "huggingface"), "hub")
    if not folder:
        from huggingface_hub import constants

        folder = constants.HF_HUB_CACHE
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def offline() -> bool:
    """Whether downloads are forbidden: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
    as set now, else huggingface_hub's setting (read at its import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def join(spec, *parts: str | None):
    """``spec`` with ``parts`` (diffusers' ``subfolder=`` / ``weight_name=``) appended:
    a path for a local path, the id's path part for a hub id (``org/name`` +
    ``models`` -> ``org/name:models``). Empty parts are skipped."""
    parts = [p.strip("/") for p in parts if p and p.strip("/")]
    if not parts:
        return spec
    if is_hub_id(spec):
        hid = parse(spec)
        return str(HubId(hid.repo, hid.revision, "/".join(([hid.path] if hid.path else []) + parts)))
    return Path(spec).joinpath(*parts)


def local_path(spec, *, kind: Kind = "any", what: str | None = None, flag: str | None = None) -> Path:
    """``Path(spec)`` unless ``spec`` is a hub id, then its path in the cache
    (see ``resolve``). A missing local path is returned as is, so that the
    caller reports it as it always has. For ``kind="file"`` a bare ``org/name``
    is taken as a local path: a repo is a folder, never a file."""
    hid = parse(spec) if is_hub_id(spec) else None
    if hid is None or (kind == "file" and not hid.path):
        return Path(spec)
    return resolve(spec, kind=kind, what=what, flag=flag)


def resolve(spec, *, kind: Kind = "any", what: str | None = None, flag: str | None = None,
            allow_patterns: Sequence[str] | None = None) -> Path:
    """A local path, or the local path in the Hugging Face cache of a hub id.

    ``kind`` is what the id must name: ``"file"``, ``"folder"`` or ``"any"``
    (decided by what is in the cache, else in the repo). ``what`` ("IP-Adapter
    file", "model folder"; by default the kind) and ``flag`` (``--ip-adapter``)
    name it in errors. ``allow_patterns`` (globs relative to a folder) limit what
    a folder download fetches. Raises ``MissingFile`` (one line) for a path that
    is neither an existing path nor a hub id, an id missing from the cache when
    ``HF_HUB_OFFLINE=1``, a path the repo does not have, or a failed download.
    """
    default = {"file": "file", "folder": "folder"}.get(kind, "file or folder")
    if not isinstance(spec, str) or not is_hub_id(spec):
        path = Path(spec).expanduser()
        if path.exists():
            return path
        raise MissingFile(f"{_label(spec, flag)}: {what or default} not found{_spelling_hint(spec)}")
    hid = parse(spec)
    what = what or (default if hid.path else "repo")
    if kind == "file" and not hid.path:
        raise MissingFile(f"{_label(spec, flag)}: names a Hugging Face repo (a folder), not a file; a file inside "
                          f"it is written {hid.repo}:path/in/repo")
    if kind == "any" and hid.path:
        kind = _kind_of(hid, spec=spec, what=what, flag=flag)
        what = what.replace("file or folder", kind)
    if kind == "file":
        return _file(hid, hid.path, spec=spec, what=what, flag=flag)
    return _folder(hid, spec=spec, what=what, flag=flag, allow_patterns=allow_patterns)


def resolve_model_folder(spec, *, weights_name: str, variant: str | None = None, what: str = "model folder",
                         flag: str | None = None) -> Path:
    """A diffusers/transformers model folder (``config.json`` + weights) from a
    local path or a hub id, fetching from the hub only ``config.json`` and the
    weights ``find_weights`` will read (``{weights_name}[.{variant}].safetensors``,
    its shards, else the ``.bin`` forms), not the folder's other variants."""
    if not is_hub_id(spec):
        return resolve(spec, kind="folder", what=what, flag=flag)
    hid = parse(spec)
    sub = f"{hid.path}/" if hid.path else ""
    own = f"{what}'s"   # messages: "the model folder's unet/config.json of org/name ..."
    folder = _file(hid, f"{sub}config.json", spec=spec, what=own, flag=flag).parent
    stem = f"{weights_name}.{variant}" if variant else weights_name
    # find_weights' order: the first form present is the one read
    forms = [f"{stem}.{ext}{index}" for ext in ("safetensors", "bin") for index in (".index.json", "")]
    for cached_only in (True, False):   # what the cache holds first: no request at all then
        for name in forms:
            found = _file(hid, sub + name, spec=spec, what=own, flag=flag, optional=True, cached_only=cached_only)
            if found is not None and name.endswith(".index.json"):
                for shard in _shard_names(found):
                    _file(hid, sub + shard, spec=spec, what=f"{own} weights shard", flag=flag)
            if found is not None:
                return folder
    if offline():
        raise _offline_error(spec, flag, f"{own} weights", f"{sub}{stem}.safetensors", hid)
    raise MissingFile(f"{_label(spec, flag)}: {hid.repo} has no {sub}{stem}.safetensors or {sub}{stem}.bin (nor "
                      f"their sharded forms){_at(hid)}")


# --------------------------------------------------------------------------- cache and downloads

def _file(hid: HubId, path: str, *, spec, what, flag, optional: bool = False,
          cached_only: bool = False) -> Path | None:
    """``path`` of the repo: from the cache, else downloaded. ``optional``: None
    when the repo lacks it (or, offline, the cache does) instead of an error;
    ``cached_only``: None when the cache lacks it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    found = try_to_load_from_cache(hid.repo, path, cache_dir=str(cache_dir()), revision=hid.revision)
    if isinstance(found, str):
        return Path(found)
    if cached_only or (optional and found is not None):   # (not None: the cache knows the repo lacks it)
        return None
    if offline():
        if optional:
            return None
        raise _offline_error(spec, flag, what, path, hid)
    try:
        return Path(hf_hub_download(hid.repo, path, revision=hid.revision, cache_dir=str(cache_dir())))
    except LocalEntryNotFoundError as e:   # (before its base class: no connection, not "not in the repo")
        raise _download_error(spec, flag, what, path, hid, e) from None
    except EntryNotFoundError:
        if optional:
            return None
        raise MissingFile(f"{_label(spec, flag)}: {hid.repo} has no file {path}{_at(hid)}") from None
    except Exception as e:   # noqa: BLE001 (see _download_error)
        raise _download_error(spec, flag, what, path, hid, e) from None


def _folder(hid: HubId, *, spec, what, flag, allow_patterns) -> Path:
    """The repo's folder ``hid.path`` (its top for ""). Offline: from the cache.
    Online: through ``snapshot_download``, which fetches only the files the cache
    lacks (a cache holding part of a folder, e.g. its tokenizer or an interrupted
    download, is completed, not taken for the whole); the cache is the fallback
    when the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    patterns = _patterns(hid, allow_patterns)
    if offline():
        cached = _cached_folder(hid, patterns)
        if cached is None:
            raise _offline_error(spec, flag, what, hid.path, hid)
        return cached
    try:
        root = Path(snapshot_download(hid.repo, revision=hid.revision, cache_dir=str(cache_dir()),
                                      allow_patterns=patterns))
    except Exception as e:   # noqa: BLE001 (see _download_error)
        cached = _cached_folder(hid, patterns)
        if cached is not None:
            return cached
        raise _download_error(spec, flag, what, hid.path, hid, e) from None
    if _non_empty(root / hid.path) is None:
        raise MissingFile(f"{_label(spec, flag)}: {hid.repo} has no folder {hid.path or '(empty repo)'}{_at(hid)}"
                          + (f" holding {', '.join(allow_patterns)}" if allow_patterns else ""))
    return root / hid.path


def _patterns(hid: HubId, allow_patterns: Sequence[str] | None) -> list[str] | None:
    """Download patterns relative to the repo's top: everything under ``hid.path`` by default."""
    sub = f"{hid.path}/" if hid.path else ""
    if allow_patterns:
        return [sub + p for p in allow_patterns]
    return [f"{sub}*"] if sub else None


def _cached_folder(hid: HubId, patterns: list[str] | None) -> Path | None:
    """The folder in the cached snapshot, if it is there and holds something
    (huggingface_hub's own offline lookup: refs, snapshots, its tree listing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = snapshot_download(hid.repo, revision=hid.revision, cache_dir=str(cache_dir()),
                                 allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    return _non_empty(Path(root) / hid.path)


def _kind_of(hid: HubId, *, spec, what, flag) -> Kind:
    """Whether ``hid.path`` is a file or a folder: the cache says, else the repo."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.hf_api import RepoFolder

    if isinstance(try_to_load_from_cache(hid.repo, hid.path, cache_dir=str(cache_dir()),
                                         revision=hid.revision), str):
        return "file"
    if _cached_folder(hid, _patterns(hid, None)) is not None:
        return "folder"
    if offline():
        raise _offline_error(spec, flag, what, hid.path, hid)
    try:
        infos = HfApi().get_paths_info(hid.repo, [hid.path], revision=hid.revision)
    except Exception as e:   # noqa: BLE001 (see _download_error)
        raise _download_error(spec, flag, what, hid.path, hid, e) from None
    if not infos:
        raise MissingFile(f"{_label(spec, flag)}: {hid.repo} has no file or folder {hid.path}{_at(hid)}")
    return "folder" if isinstance(infos[0], RepoFolder) else "file"


def _non_empty(folder: Path) -> Path | None:
    return folder if folder.is_dir() and any(folder.iterdir()) else None


def _shard_names(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names; [] when it is malformed
    (``find_weights`` then reports it, naming the file)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
        return sorted({v for v in weight_map.values() if isinstance(v, str) and v and Path(v).name == v})
    except (OSError, ValueError, AttributeError):
        return []


# --------------------------------------------------------------------------- messages

def _label(spec, flag: str | None) -> str:
    return f"{flag} {spec}" if flag else str(spec)


def _at(hid: HubId) -> str:
    return f" at revision {hid.revision}" if hid.revision else ""


def _thing(what: str, path: str, hid: HubId) -> str:
    """``the IP-Adapter file models/x.safetensors of h94/IP-Adapter``; ``the repo h94/IP-Adapter``."""
    return (f"the {what} {path} of {hid.repo}" if path else f"the {what} {hid.repo}") + _at(hid)


def _offline_error(spec, flag, what: str, path: str, hid: HubId) -> MissingFile:
    also = "" if ":" in str(spec) or "@" in str(spec) else "; nor is it a local path"
    return MissingFile(f"{_label(spec, flag)}: {_thing(what, path, hid)} is not in the Hugging Face cache "
                       f"({cache_dir()}) and HF_HUB_OFFLINE=1 forbids downloading it{also}")


def _download_error(spec, flag, what: str, path: str, hid: HubId, error: Exception) -> MissingFile:
    """Any failure to fetch (HTTP errors, httpx transport errors that are no
    OSError, a bad revision) is the user's network, access or spelling: one line."""
    reason = (str(error).strip().splitlines() or [""])[0]
    also = "" if ":" in str(spec) or "@" in str(spec) else " (nor is it a local path)"
    return MissingFile(f"{_label(spec, flag)}: could not download {_thing(what, path, hid)} into the Hugging Face "
                       f"cache ({cache_dir()}){also}: {type(error).__name__}: {reason}")


def _spelling_hint(spec) -> str:
    """For ``org/name/path/in/repo`` (a missing path shaped like a repo path), the id spelling."""
    text = str(spec)
    parts = text.split("/")
    if not isinstance(spec, str) or ":" in text or len(parts) < 3 or text.startswith((".", "/", "~")):
        return ""
    guess = parse(f"{parts[0]}/{parts[1]}:{'/'.join(parts[2:])}")
    if guess is None:
        return ""
    return (f" (a file or folder inside a Hugging Face repo is written org/name:path, "
            f"here {guess.repo}:{guess.path})")
