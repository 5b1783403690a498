"""Reading and writing checkpoint files: diffusers/transformers model folders,
``.safetensors`` (no torch needed) and PyTorch pickles (``.bin`` / ``.pt`` /
``.pth`` / ``.ckpt``: ``torch.load`` with ``weights_only=True``, only when
torch is installed; ``read_torch_pickle`` is the one reader of them).

Everything is returned as float32-castable numpy arrays keyed by the torch
parameter name; nothing here knows about Flax.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ipadapter_jax.io.errors import BadFile, MissingFile, Unsupported


class CheckpointError(BadFile):
    """A checkpoint file or its contents do not fit what was asked of it."""


def load_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    """Read ``folder/name`` as JSON, with errors that name the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFile(f"model folder not found: {folder}")
    path = folder / name
    if path.is_dir():
        raise BadFile(f"{path} is a folder; expected a JSON file")
    if not path.is_file():
        raise MissingFile(f"{path} not found: a diffusers/transformers model folder holds {name} "
                                "beside its weights")
    config = read_json(path, error=CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}; expected an object "
                              "({\"key\": value, ...})")
    return config


def read_json(path: str | os.PathLike, *, error: type[BadFile] = BadFile):
    """Parse a JSON file, raising ``error`` naming the file for what is not JSON
    (invalid syntax, not UTF-8 text, nested too deeply to parse)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path} is not a JSON text file (not UTF-8: {e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path} is not valid JSON: nested too deeply to parse") from None


def find_weights(folder: str | os.PathLike, base_name: str, variant: str | None = None) -> list[Path]:
    """Weight files of a model folder, preferring safetensors over .bin.

    ``base_name`` is e.g. ``diffusion_pytorch_model`` (diffusers) or ``model``
    (transformers); ``variant`` selects ``base_name.{variant}.safetensors``
    (e.g. ``fp16``). Sharded checkpoints (``*.safetensors.index.json``) return
    every shard.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFile(f"model folder not found: {folder}")
    stem = f"{base_name}.{variant}" if variant else base_name
    candidates = []
    for ext in ("safetensors", "bin"):
        index = folder / f"{stem}.{ext}.index.json"
        if index.is_file():
            return _shards(folder, index)
        single = folder / f"{stem}.{ext}"
        if single.is_file():
            return [single]
        if single.exists():
            raise BadFile(f"{single} is a folder; expected a weights file")
        candidates.append(single.name)
    present = sorted(p.name for p in folder.iterdir())
    raise MissingFile(f"no weights in {folder}: looked for {' or '.join(candidates)} "
                            f"(and sharded .index.json forms); the folder holds {present}")


def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names (``{"weight_map": {key: file}}``)."""
    content = read_json(index, error=CheckpointError)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) and v for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected {{\"weight_map\": {{tensor name: shard file name}}}}, got "
                              f"{_short(content)}")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s]
    if outside:
        raise CheckpointError(f"{index}: shard names must be file names in {folder}, got {outside[:3]}")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise MissingFile(f"{index} lists shards that are missing: {missing}")
    return [folder / s for s in shards]


def _short(value, n: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                try:
                    out[key] = f.get_tensor(key)
                except (TypeError, AttributeError):
                    # numpy has no bfloat16 / float8; safetensors' numpy backend refuses them
                    # (TypeError) or looks them up on numpy (AttributeError).
                    out[key] = _read_raw_tensor(path, key)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return out


_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_raw_tensor(path: Path, key: str) -> np.ndarray:
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        entry = header[key]
        name = _RAW_DTYPES.get(entry["dtype"])
        if name is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']} (readable: "
                                  f"the numpy dtypes, {', '.join(_RAW_DTYPES)})")
        start, end = entry["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=getattr(ml_dtypes, name)).reshape(entry["shape"])


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TORCH_PIN = "torch==2.13.0"


class TorchRequired(Unsupported, ImportError):
    """A PyTorch pickle was given but torch is not installed (also an
    ``ImportError``, what callers caught before this class)."""


def is_safetensors(path: str | os.PathLike) -> bool:
    """A ``.safetensors`` name (any case: ``.SAFETENSORS`` too)."""
    return Path(path).suffix.lower() == ".safetensors"


def is_torch_pickle(path: str | os.PathLike) -> bool:
    """A PyTorch pickle's name: ``.bin``, ``.pt``, ``.pth``, ``.ckpt`` (any case)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def read_torch_pickle(path: str | os.PathLike, *, flatten: bool = True, keep_values: bool = False):
    """A PyTorch pickle (``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``) through
    ``torch.load(weights_only=True)``, which refuses pickles that carry code.
    Tensors come back as numpy arrays (bfloat16 as ml_dtypes' bfloat16, bit for bit).

    flatten: the file must hold a dict; nested dicts are joined with ``.``
      (``{"image_proj": {"proj.weight": t}}`` -> ``image_proj.proj.weight``).
      Without it the object is returned as stored, nesting, lists and plain
      values (names, step counts) kept.
    keep_values: with ``flatten``, keep entries that are not tensors (a training
      checkpoint's ``global_step``) as they are, instead of refusing them.

    Raises ``TorchRequired`` naming the file when torch is not installed, and
    ``CheckpointError`` (a ``BadFile``) naming it for a corrupt file or a pickle
    that carries code or objects other than tensors, containers, numbers and strings."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise TorchRequired(f"{path} is a PyTorch pickle ({path.suffix}); reading it needs torch, which is not "
                            f"installed: pip install {TORCH_PIN} (or the package's torch extra: pip install "
                            "'ipadapter-jax[torch]'), or convert the file to .safetensors") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt, truncated or unsafe pickles
        raise CheckpointError(_refusal(path, e)) from None
    obj = _to_numpy(obj)
    if not flatten:
        return obj
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return flatten_state_dict(obj, str(path), keep_values=keep_values)


def _refusal(path: Path, e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file: code (a GLOBAL the
    weights-only unpickler blocks) or a damaged file; without torch's advice to
    retry with ``weights_only=False`` (which would run the code a malicious file holds)."""
    text = str(e)
    code = re.search(r"GLOBAL\s+([\w.]+)", text)
    if code:
        return (f"{path} could not be read as a weights-only torch file: it is a pickle carrying code or objects "
                "other than tensors, containers, numbers and strings (unsupported GLOBAL "
                f"{code.group(1)}), which is refused; convert files you trust to .safetensors")
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    detail = " ".join(lines) or type(e).__name__
    return (f"{path} could not be read as a weights-only torch file: a corrupt or truncated file, or not a "
            f"PyTorch checkpoint ({_short(detail, 300)})")


def _to_numpy(value):
    """Tensors (``nn.Parameter`` too) -> numpy, inside dicts / lists / tuples; other values as they are."""
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:   # numpy has no bfloat16: the same bits as ml_dtypes'
            import ml_dtypes

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if type(value) in (list, tuple):   # (not torch.Size, a tuple of ints)
        return type(value)(_to_numpy(v) for v in value)
    return value


def flatten_state_dict(obj: dict, source: str, *, keep_values: bool = False, prefix: str = "") -> dict:
    """Nested dicts -> one dict with ``.``-joined keys; a leaf that is not an
    array is refused naming it (kept as it is with ``keep_values``)."""
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_state_dict(value, source, keep_values=keep_values, prefix=name + "."))
        elif isinstance(value, np.ndarray) or keep_values:
            out[name] = value
        else:
            raise CheckpointError(f"{source}: entry {name!r} is a {type(value).__name__}, expected a tensor")
    return out


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple], dict[str, str]]:
    """A ``.safetensors`` file's tensor shapes and ``__metadata__`` from its
    header alone (no tensor data: a 7 GB file is read in milliseconds); a
    corrupt or truncated file is an error naming it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise CheckpointError(f"{path} is not a safetensors file, or is truncated: its header claims {n} bytes "
                                  f"of a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (corrupt header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    shapes, end = {}, 0
    for key, entry in header.items():
        try:
            shapes[key] = tuple(int(d) for d in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors header entry {key!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return shapes, metadata if isinstance(metadata, dict) else {}


def require_file(path: str | os.PathLike, what: str, formats: str) -> Path:
    """``path`` as a Path, or an error naming it when it is a folder, missing or
    empty; ``what`` ("weights file") and ``formats`` (".safetensors or .bin") word it."""
    path = Path(path)
    article = "an" if what[:1].lower() in "aeiou" else "a"
    if path.is_dir():
        raise BadFile(f"{path} is a folder; expected {article} {what} ({formats})")
    if not path.is_file():
        raise MissingFile(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); expected {article} {what} ({formats})")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One weights file -> {torch key: numpy array}. ``.bin`` nested dicts are
    flattened with ``.`` (so ``{"image_proj": {"proj.weight": ...}}`` becomes
    ``image_proj.proj.weight``, the safetensors layout)."""
    path = require_file(path, "weights file", ".safetensors or .bin")
    if is_safetensors(path):
        return _read_safetensors(path)
    if is_torch_pickle(path):
        return read_torch_pickle(path)
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, or a PyTorch "
                          "pickle (.bin, .pt, .pth, .ckpt)")


def read_npy(path: str | os.PathLike, *, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` array (never a pickle), with errors that name the file. The
    header is checked against the file's size before anything is allocated (a
    header may claim any shape); ``mmap=True`` returns the memory map itself."""
    path = Path(path)
    if path.is_dir():
        raise BadFile(f"{path} is a folder; expected a .npy file")
    if not path.is_file():
        raise MissingFile(f"{path} not found")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        text = str(e)
        if "pickled" in text or "allow_pickle" in text:
            text = "no .npy header (an object array or pickle is refused: it could run code)"
        elif "Python objects" in text:
            text = "it holds Python objects, which are refused (they could run code)"
        raise BadFile(f"{path} is not a readable .npy array: {text or type(e).__name__}") from None
    return array if mmap else np.array(array)


def read_weights(paths: list[Path], *, lazy: bool = False) -> Mapping[str, np.ndarray]:
    """The tensors of ``paths`` (one model's files or shards) by name. ``lazy``:
    safetensors files are read one tensor at a time as the mapping is read, so
    a loader that converts each tensor as it goes never holds the whole
    checkpoint in numpy beside its converted copy (pickles are read whole)."""
    if lazy and all(is_safetensors(p) for p in paths):
        return LazySafetensors(paths)
    state: dict[str, np.ndarray] = {}
    for path in paths:
        state.update(read_state_dict(path))
    return state


class LazySafetensors(Mapping):
    """Safetensors files as a read-only mapping {name: numpy array}, each
    tensor read from disk when it is looked up (the files' headers up front)."""

    def __init__(self, paths: list[Path]):
        self._where: dict[str, Path] = {}
        for path in paths:
            names, _ = read_safetensors_header(path)
            self._where.update({name: Path(path) for name in names})

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        path = self._where[key]
        try:
            with safe_open(str(path), framework="numpy") as f:
                try:
                    return f.get_tensor(key)
                except (TypeError, AttributeError):   # bfloat16 / float8: as _read_safetensors
                    return _read_raw_tensor(path, key)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


# The temporary files of the atomic writes in progress: a command ended by a
# signal (``cli.interrupts``, which skips the interpreter's teardown) removes them.
IN_PROGRESS: set[Path] = set()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path``
    (one rename, so a crash never leaves half a file), with the permissions a
    plainly created file would get (mkstemp's are owner-only); on error it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    IN_PROGRESS.add(Path(tmp))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        IN_PROGRESS.discard(Path(tmp))


def save_safetensors(state_dict: dict[str, np.ndarray], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a file."""
    from safetensors.numpy import save_file

    with atomic_write(path) as tmp:
        # np.require keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d).
        save_file({k: np.require(v, requirements="C") for k, v in state_dict.items()}, tmp, metadata=metadata)
    return Path(path)
