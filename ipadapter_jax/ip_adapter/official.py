"""Official IP-Adapter files (h94/IP-Adapter layout) <-> ``IPAdapter`` modules.

File layouts:
* ``.safetensors``: flat keys ``image_proj.*`` and ``ip_adapter.*``;
* ``.bin``: a torch pickle ``{"image_proj": {...}, "ip_adapter": {...}}``, read
  with ``torch.load(weights_only=True)``.

``ip_adapter`` keys are indices into the UNet's attention processors in
diffusers' ``attn_processors`` order (down, up, mid; attn1 then attn2):
``{2n+1}.to_k_ip.weight`` / ``.to_v_ip.weight`` belong to the n-th
cross-attention layer, ``{p}.to_{q,k,v,out}_lora.{down,up}.weight`` (FaceID) to
processor p. The variant is read from the ``image_proj`` keys by the variant
registry (``variants.detect``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from flax import nnx

from ipadapter_jax.io import hub
from ipadapter_jax.io.errors import BadArgument
from ipadapter_jax.io.files import CheckpointError, atomic_write, read_state_dict, save_safetensors
from ipadapter_jax.io.params import load_state_dict_into, module_state_dict
from ipadapter_jax.ip_adapter import modules, variants
from ipadapter_jax.ip_adapter.variants import BaseModelMismatch

_KV = re.compile(r"^ip_adapter\.(\d+)\.(to_[kv]_ip)\.weight$")
_LORA = re.compile(r"^ip_adapter\.(\d+)\.(to_(?:q|k|v|out)_lora)\.(down|up)\.weight$")


def read_ip_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An official adapter file -> flat ``{"image_proj.*", "ip_adapter.*"}`` arrays."""
    path = Path(path)
    state = read_state_dict(path)
    if not any(k.startswith("image_proj.") for k in state) or not any(k.startswith("ip_adapter.") for k in state):
        sample = sorted(state)[:5]
        raise CheckpointError(f"{path}: not an IP-Adapter file: expected 'image_proj.*' and 'ip_adapter.*' keys "
                              f"(official layout), found keys like {sample}")
    other = sorted(k for k in state if not k.startswith(("image_proj.", "ip_adapter.")))
    if other:
        raise CheckpointError(f"{path}: unknown keys outside image_proj/ip_adapter: {other[:5]}")
    even = sorted(k for k in state if (m := _KV.match(k)) and int(m.group(1)) % 2 == 0)
    if even:
        raise CheckpointError(f"{path}: {even[0]}: image K/V keys have odd indices (they belong to the "
                              "cross-attention processors, 2n+1)")
    not_matrices = sorted(f"{k} {v.shape}" for k, v in state.items()
                          if k.startswith("ip_adapter.") and (v.ndim != 2 or 0 in v.shape))
    if not_matrices:
        raise CheckpointError(f"{path}: ip_adapter weights must be non-empty matrices [out, in], got "
                              f"{not_matrices[:3]}")
    return state


def _detect(image_proj: dict[str, np.ndarray], source: str):
    """``variants.detect``, refusing weights whose shapes give no sensible projection."""
    try:
        variant, hparams = variants.detect(image_proj, source)
    except (IndexError, ZeroDivisionError):   # a weight of too few dimensions, or an empty one
        shapes = {k: v.shape for k, v in sorted(image_proj.items())[:6]}
        raise CheckpointError(f"{source}: the image_proj weights have shapes no IP-Adapter variant has "
                              f"(e.g. {shapes})") from None
    bad = {k: v for k, v in hparams.items() if isinstance(v, int) and not isinstance(v, bool) and v < 1}
    if bad:
        raise CheckpointError(f"{source}: the image_proj weight shapes give {bad} for a {variant.name!r} "
                              "adapter (each must be at least 1): a corrupt or foreign file")
    return variant, hparams


def _check_against_unet(ip: dict[str, np.ndarray], proj_dim: int, unet, source: str) -> tuple[int | None, int]:
    """Clear errors for an adapter made for another UNet; returns (LoRA rank or None, token dim)."""
    cross = unet.cross_attention_layers()
    kv_ids = sorted({int(m.group(1)) for k in ip if (m := _KV.match(k))})
    if not kv_ids:
        raise CheckpointError(f"{source}: no ip_adapter.N.to_k_ip.weight keys")
    token_dim = ip[f"ip_adapter.{kv_ids[0]}.to_k_ip.weight"].shape[1]
    unet_dim = cross[0].token_dim
    if token_dim != unet_dim or len(kv_ids) != len(cross):
        raise BaseModelMismatch(variants.base_model_mismatch(source, len(kv_ids), token_dim, len(cross), unet_dim))
    if proj_dim != token_dim:
        raise CheckpointError(f"{source}: image_proj makes tokens of width {proj_dim} but ip_adapter expects "
                              f"{token_dim}")
    lora_ranks = {v.shape[0] for k, v in ip.items() if (m := _LORA.match(k)) and m.group(3) == "down"}
    if len(lora_ranks) > 1:
        raise CheckpointError(f"{source}: LoRA layers have different ranks {sorted(lora_ranks)}")
    return (lora_ranks.pop() if lora_ranks else None), token_dim


def _rename_official(key: str, value):
    """Official key -> ``IPAdapter`` state key (``image_proj.*`` unchanged)."""
    if key.startswith("image_proj."):
        return key, value
    if m := _KV.match(key):
        n, name = int(m.group(1)), m.group(2)
        if n % 2 == 0:
            raise CheckpointError(f"{key}: image K/V keys are odd (cross-attention processors)")
        return f"layers.{(n - 1) // 2}.{name}.weight", value
    if m := _LORA.match(key):
        return f"lora.{m.group(1)}.{m.group(2)}.{m.group(3)}.weight", value
    return key, value  # unmatched: reported as unexpected by the strict loader


def adapter_file(path: str | os.PathLike, subfolder: str | None = None, weight_name: str | None = None) -> Path:
    """The adapter file ``path[/subfolder][/weight_name]`` as a local path: ``path``
    a local file or folder, or a Hugging Face hub id (``org/name:path/file``, or
    ``org/name`` with ``subfolder`` / ``weight_name`` as diffusers spells it),
    which is fetched into the hub cache (``io.hub``). A missing local file is
    returned as is (the reader names it)."""
    return hub.local_path(hub.join(path, subfolder, weight_name), kind="file", what="IP-Adapter file")


# The safetensors metadata key that marks a FaceID-PlusV2 file written here (``save_ip_adapter``), whatever its name.
SHORTCUT_METADATA = "ipadapter_jax.shortcut"


def _saved_shortcut(path: Path) -> bool:
    """Whether a ``.safetensors`` file's metadata says PlusV2 (``SHORTCUT_METADATA``)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return (f.metadata() or {}).get(SHORTCUT_METADATA) == "true"
    except Exception:  # noqa: BLE001 - read_ip_adapter has read it already; no metadata means none
        return False


def load_ip_adapter(path: str | os.PathLike, unet, *, attach: bool = True, shortcut: bool | None = None,
                    subfolder: str | None = None, weight_name: str | None = None):
    """Load an official IP-Adapter file for ``unet`` and (by default) attach it.

    ``path`` is the file, or with diffusers' ``subfolder`` / ``weight_name`` the
    folder they are joined onto; a Hugging Face hub id works for either
    (``"h94/IP-Adapter:models/ip-adapter_sd15.safetensors"``, or ``"h94/IP-Adapter"``
    with ``subfolder="models", weight_name="ip-adapter_sd15.safetensors"``).
    The variant (``IPAdapter.variant``) and token count come from the keys.
    ``shortcut`` (FaceID-PlusV2's ``out = id_tokens + s_scale * out``) defaults to
    True when the file name says ``plusv2`` or its metadata does (files this
    package exports): the keys of Plus and PlusV2 are the same. Refuses, naming the reason: files that are not IP-Adapters, unknown
    layouts, adapters for another base model (e.g. SDXL on SD 1.5), truncated
    files, any key that does not land or weight that is missing.
    """
    path = adapter_file(path, subfolder, weight_name)
    state = read_ip_adapter(path)
    image_proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
    ip = {k: v for k, v in state.items() if k.startswith("ip_adapter.")}
    variant, hparams = _detect(image_proj, str(path))
    proj_dim = nnx.eval_shape(lambda: variant.build(hparams, nnx.Rngs(0))).token_dim
    lora_rank, _ = _check_against_unet(ip, proj_dim, unet, str(path))
    if lora_rank is not None and not variant.lora:
        with_lora = ", ".join(v.name for v in variants.VARIANTS if v.lora)
        raise CheckpointError(f"{path}: LoRA keys (ip_adapter.N.to_*_lora) in a {variant.name!r} adapter; only "
                              f"the variants whose files carry LoRA ({with_lora}) may have them")
    if shortcut is None:
        shortcut = "plusv2" in path.name.lower() or _saved_shortcut(path)

    def build():
        return modules.IPAdapter.for_unet(unet, variant.build(hparams, nnx.Rngs(0)), variant=variant.name,
                                          lora_rank=lora_rank, shortcut=shortcut, rngs=nnx.Rngs(0))

    adapter, _ = load_state_dict_into(build, state, source=str(path), rename=_rename_official)
    if attach:
        modules.attach(unet, adapter)
    return adapter


def ip_adapter_state_dict(adapter) -> dict[str, np.ndarray]:
    """``IPAdapter`` -> the official flat layout (torch tensor layout)."""
    out = {}
    for key, value in module_state_dict(adapter).items():
        if key.startswith("image_proj."):
            out[key] = value
        elif m := re.match(r"^layers\.(\d+)\.(to_[kv]_ip)\.weight$", key):
            out[f"ip_adapter.{2 * int(m.group(1)) + 1}.{m.group(2)}.weight"] = value
        elif m := re.match(r"^lora\.(\d+)\.(\w+)\.(down|up)\.weight$", key):
            out[f"ip_adapter.{m.group(1)}.{m.group(2)}.{m.group(3)}.weight"] = value
        else:
            raise AssertionError(f"no official name for {key}")
    return out


def save_ip_adapter(adapter, path: str | os.PathLike) -> Path:
    """Write the adapter in the official format: ``.safetensors`` (flat keys) or
    ``.bin`` (torch pickle ``{"image_proj", "ip_adapter"}``, needs torch).
    Written atomically. diffusers' ``load_ip_adapter`` and ComfyUI read both."""
    path = Path(path)
    state = ip_adapter_state_dict(adapter)
    if path.suffix == ".safetensors":
        metadata = {"format": "pt"}
        if getattr(adapter, "shortcut", False):   # PlusV2 and Plus have the same keys: say which it is
            metadata[SHORTCUT_METADATA] = "true"
        return save_safetensors(state, path, metadata=metadata)
    if path.suffix == ".bin":
        import torch

        nested = {"image_proj": {}, "ip_adapter": {}}
        for key, value in state.items():
            group, name = key.split(".", 1)
            nested[group][name] = torch.from_numpy(np.array(value))  # a writable copy
        with atomic_write(path) as tmp:
            torch.save(nested, tmp)
        return path
    raise BadArgument(f"{path}: save as .safetensors or .bin")
