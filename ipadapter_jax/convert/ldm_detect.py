"""What a single-file checkpoint holds, from its key names and shapes alone.

``read_layout`` reads a ``.safetensors`` header (names, shapes, dtypes,
metadata; no tensor data, so a 7 GB file is inspected in milliseconds and a
truncated one is caught before anything is loaded), or a torch pickle
(``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``) through ``torch.load(weights_only=True)``,
which refuses pickles that carry code, unwrapping the ``state_dict`` nesting of
training checkpoints. ``detect_family`` names the family (SD 1.x, SD 2.x, SDXL
base) from which text encoders the file has and the UNet's shape;
``file_prediction_type`` reads what the file says about v-prediction.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ipadapter_jax.convert.ldm_plan import list_some
from ipadapter_jax.families import FAMILIES, UNET_PREFIX, Family, of_token_dim
from ipadapter_jax.io.errors import BadFile, Unsupported
from ipadapter_jax.io.files import (CheckpointError, flatten_state_dict, is_safetensors, is_torch_pickle,
                                    read_safetensors_header, read_state_dict, read_torch_pickle, require_file)

_SCALARS = (int, float, str, bool)
# Markers files write beside the weights (empty tensors): ComfyUI's v-prediction
# and zero-terminal-SNR flags.
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"
_CROSS_ATTENTION_K = "attn2.to_k.weight"


@dataclasses.dataclass
class Layout:
    """A single file's tensors by name: shapes always, the tensors themselves
    once ``load`` is called (pickles are loaded whole when read)."""

    path: Path
    shapes: dict[str, tuple]
    metadata: dict[str, str]                # safetensors ``__metadata__``
    extras: dict[str, object]               # a training checkpoint's scalars (``global_step``, ``epoch``)
    tensors: dict[str, np.ndarray] | None = None

    def load(self) -> dict[str, np.ndarray]:
        if self.tensors is None:
            self.tensors = read_state_dict(self.path)
        return self.tensors


def read_layout(path: str | os.PathLike) -> Layout:
    """The names, shapes and metadata of a single-file checkpoint."""
    path = require_file(path, "single-file checkpoint", ".safetensors or .ckpt")
    if is_safetensors(path):
        shapes, metadata = read_safetensors_header(path)
        return Layout(path, shapes, metadata, {})
    if is_torch_pickle(path):
        tensors, extras = _read_pickle(path)
        return Layout(path, {k: tuple(v.shape) for k, v in tensors.items()}, {}, extras, tensors)
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors, .ckpt, "
                          ".pt, .pth or .bin")


def _read_pickle(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """A training checkpoint's ``state_dict`` (nested any depth) is the weights;
    the scalars around it are kept as extras and everything else around it
    (optimizer states, callbacks) is left alone."""
    obj = read_torch_pickle(path, flatten=False)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    extras: dict[str, object] = {}
    while isinstance(obj.get("state_dict"), dict):
        extras.update({k: v for k, v in obj.items() if isinstance(v, _SCALARS)})
        obj = obj["state_dict"]
    tensors = {}
    for name, value in flatten_state_dict(obj, str(path), keep_values=True).items():
        if isinstance(value, np.ndarray):
            tensors[name] = value
        elif "." not in name and isinstance(value, _SCALARS):   # a scalar beside the weights (``epoch``)
            extras[name] = value
        else:
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, expected a tensor")
    return tensors, extras


# --------------------------------------------------------------------------- family

def _has(shapes: Mapping, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def context_width(shapes: Mapping[str, tuple]) -> int | None:
    """The UNet's cross-attention input width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL), or None."""
    key = next((k for k in sorted(shapes) if k.startswith(UNET_PREFIX) and k.endswith(_CROSS_ATTENTION_K)), None)
    return int(shapes[key][-1]) if key and shapes[key] else None


def detect_family(shapes: Mapping[str, tuple], source: str = "checkpoint") -> Family | None:
    """The family of a single file from its key names (and the UNet's context
    width when it has no text encoder; None when that says nothing either)."""
    # A transformer family's single file (FLUX: BFL's layout, or ComfyUI's with the UNet prefix).
    for family in FAMILIES.values():
        if family.denoiser == "transformer" and any(_has(shapes, m) or _has(shapes, UNET_PREFIX + m)
                                                    for m in family.file_markers):
            return family
    if not _has(shapes, UNET_PREFIX):
        hint = ""
        if _has(shapes, "lora_") or any(".lora_" in k for k in shapes):
            hint = " (it looks like a LoRA file: those are applied to a model, not loaded as one)"
        elif _has(shapes, "control_model."):
            hint = " (it looks like a ControlNet)"

        raise BadFile(f"{source} is not a Stable Diffusion checkpoint in the single-file (LDM) layout: it has no "
                      f"{UNET_PREFIX}* keys{hint}; its keys include {list_some(sorted(shapes), 5)}")
    if _has(shapes, "conditioner.embedders.0.model.") and not _has(shapes, "conditioner.embedders.1."):
        raise Unsupported(f"{source} is an SDXL refiner (one OpenCLIP text encoder at conditioner.embedders.0.model); "
                          "only SDXL base models are supported")
    width = context_width(shapes)
    # Latest family first (as the messages list them).
    found = [f for f in reversed(FAMILIES.values()) if any(_has(shapes, marker) for marker in f.file_markers)]
    if len(found) > 1:   # text encoders of two families: the UNet's context width decides
        fits = [f for f in found if f.token_dim == width]
        if len(fits) != 1:
            raise BadFile(f"{source} holds parts of several families ({', '.join(f.title for f in found)}: "
                          f"{', '.join(' / '.join(m + '*' for m in f.file_markers) for f in found)}) and its "
                          f"UNet's context width ({width}) does not tell which it is")
        found = fits
    if found:
        return found[0]
    return of_token_dim(width) if width is not None else None


def file_prediction_type(layout: Layout) -> str | None:
    """``v_prediction`` / ``epsilon`` where the file says (ComfyUI's ``v_pred``
    marker, the SAI model spec's ``modelspec.prediction_type``; a ``.ckpt``'s
    ``global_step`` 875000 is SD 2.0-base, epsilon, as diffusers reads it),
    else None."""
    if V_PRED_KEY in layout.shapes:
        return "v_prediction"
    said = str(layout.metadata.get("modelspec.prediction_type", "")).lower().replace("-", "_")
    if said in ("v", "v_prediction"):
        return "v_prediction"
    if said in ("epsilon", "eps"):
        return "epsilon"
    if layout.extras.get("global_step") == 875000:
        return "epsilon"
    return None
