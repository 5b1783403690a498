"""Official IP-Adapter files (h94/IP-Adapter layout) <-> ``IPAdapter`` modules.

File layouts:
* ``.safetensors``: flat keys ``image_proj.*`` and ``ip_adapter.*``;
* ``.bin``: a torch pickle ``{"image_proj": {...}, "ip_adapter": {...}}``, read
  with ``torch.load(weights_only=True)``.

``ip_adapter`` keys are indices into the UNet's attention processors in
diffusers' ``attn_processors`` order (down, up, mid; attn1 then attn2):
``{2n+1}.to_k_ip.weight`` / ``.to_v_ip.weight`` belong to the n-th
cross-attention layer, ``{p}.to_{q,k,v,out}_lora.{down,up}.weight`` (FaceID) to
processor p. The variant is read from the ``image_proj`` keys in diffusers'
order of checks (see ``detect_variant``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from flax import nnx

from ipadapter_jax.convert.files import CheckpointError, atomic_write, read_state_dict, save_safetensors
from ipadapter_jax.convert.params import load_state_dict_into, module_state_dict

_KV = re.compile(r"^ip_adapter\.(\d+)\.(to_[kv]_ip)\.weight$")
_LORA = re.compile(r"^ip_adapter\.(\d+)\.(to_(?:q|k|v|out)_lora)\.(down|up)\.weight$")
_LAYERS = re.compile(r"^(?:perceiver_resampler\.)?layers\.(\d+)\.")


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
    return state


def _depth(image_proj: dict) -> int:
    found = {int(m.group(1)) for k in image_proj if (m := _LAYERS.match(k))}
    return max(found) + 1 if found else 0


def detect_variant(image_proj: dict[str, np.ndarray], source: str = "IP-Adapter") -> tuple[str, dict]:
    """Variant and projection hyper-parameters from the ``image_proj`` weights
    (keys without the ``image_proj.`` prefix), in diffusers' order of checks."""
    sp = image_proj
    try:
        if "proj.weight" in sp:
            c = sp["norm.weight"].shape[0]
            return "base", dict(embed_dim=sp["proj.weight"].shape[1], cross_attention_dim=c,
                                num_tokens=sp["proj.weight"].shape[0] // c)
        if "proj.3.weight" in sp:
            return "full-face", dict(embed_dim=sp["proj.0.weight"].shape[1],
                                     cross_attention_dim=sp["proj.3.weight"].shape[0])
        if "perceiver_resampler.proj_in.weight" in sp:
            c = sp["norm.weight"].shape[0]
            id_dim = sp["proj.0.weight"].shape[1]
            return "faceid-plus", dict(id_embed_dim=id_dim, cross_attention_dim=c,
                                       clip_embed_dim=sp["perceiver_resampler.proj_in.weight"].shape[1],
                                       num_tokens=sp["proj.2.weight"].shape[0] // c,
                                       depth=_depth(sp),
                                       heads=sp["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] // 64,
                                       mult=sp["proj.0.weight"].shape[0] // id_dim)
        if "norm.weight" in sp:
            c = sp["norm.weight"].shape[0]
            id_dim = sp["proj.0.weight"].shape[1]
            return "faceid", dict(id_embed_dim=id_dim, cross_attention_dim=c,
                                  num_tokens=sp["proj.2.weight"].shape[0] // c,
                                  mult=sp["proj.0.weight"].shape[0] // id_dim)
        if "latents" in sp:
            dim = sp["latents"].shape[2]
            return "plus", dict(dim=dim, depth=_depth(sp), dim_head=64,
                                heads=sp["layers.0.0.to_q.weight"].shape[0] // 64,
                                num_queries=sp["latents"].shape[1], embedding_dim=sp["proj_in.weight"].shape[1],
                                output_dim=sp["proj_out.weight"].shape[0],
                                ff_mult=sp["layers.0.1.1.weight"].shape[0] // dim)
    except KeyError as e:
        raise CheckpointError(f"{source}: image_proj lacks {e.args[0]!r}, which its other keys imply") from None
    raise CheckpointError(f"{source}: unknown image_proj key layout (keys like {sorted(sp)[:6]}); expected one "
                          "of the official variants (base, full-face, plus, faceid, faceid-plus)")


def build_image_proj(variant: str, hparams: dict, rngs: nnx.Rngs):
    from ipadapter_jax.models.image_proj import (FaceIDPlusModel, FaceIDProjModel, ImageProjModel, MLPProjModel,
                                                 Resampler)

    if variant == "base":
        return ImageProjModel(hparams["embed_dim"], hparams["cross_attention_dim"], hparams["num_tokens"], rngs=rngs)
    if variant == "full-face":
        return MLPProjModel(hparams["embed_dim"], hparams["cross_attention_dim"], rngs=rngs)
    if variant == "plus":
        return Resampler(**hparams, rngs=rngs)
    if variant == "faceid":
        return FaceIDProjModel(hparams["id_embed_dim"], hparams["cross_attention_dim"], hparams["num_tokens"],
                               hparams["mult"], rngs=rngs)
    if variant == "faceid-plus":
        return FaceIDPlusModel(**hparams, rngs=rngs)
    raise ValueError(f"unknown variant {variant!r}")


def _check_against_unet(ip: dict[str, np.ndarray], hparams: dict, unet, source: str) -> tuple[int | None, int]:
    """Clear errors for an adapter made for another UNet; returns (LoRA rank or None, token dim)."""
    cross = unet.cross_attention_layers()
    kv_ids = sorted({int(m.group(1)) for k in ip if (m := _KV.match(k))})
    if not kv_ids:
        raise CheckpointError(f"{source}: no ip_adapter.N.to_k_ip.weight keys")
    token_dim = ip[f"ip_adapter.{kv_ids[0]}.to_k_ip.weight"].shape[1]
    unet_dim = cross[0].token_dim
    base = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
    if token_dim != unet_dim or len(kv_ids) != len(cross):
        raise CheckpointError(
            f"{source}: this adapter has {len(kv_ids)} cross-attention layers of width {token_dim} "
            f"({base.get(token_dim, 'unknown base model')}); the UNet has {len(cross)} of width {unet_dim} "
            f"({base.get(unet_dim, 'unknown base model')}). Use the adapter made for this base model.")
    proj_dim = hparams.get("cross_attention_dim", hparams.get("output_dim"))
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


def load_ip_adapter(path: str | os.PathLike, unet, *, attach: bool = True, shortcut: bool | None = None):
    """Load an official IP-Adapter file for ``unet`` and (by default) attach it.

    The variant (``IPAdapter.variant``) and token count come from the keys.
    ``shortcut`` (FaceID-PlusV2's ``out = id_tokens + s_scale * out``) defaults to
    True when the file name says ``plusv2``: the keys of Plus and PlusV2 are the
    same. Refuses, naming the reason: files that are not IP-Adapters, unknown
    layouts, adapters for another base model (e.g. SDXL on SD 1.5), truncated
    files, any key that does not land or weight that is missing.
    """
    from ipadapter_jax import adapters

    path = Path(path)
    state = read_ip_adapter(path)
    image_proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
    ip = {k: v for k, v in state.items() if k.startswith("ip_adapter.")}
    variant, hparams = detect_variant(image_proj, str(path))
    lora_rank, _ = _check_against_unet(ip, hparams, unet, str(path))
    if shortcut is None:
        shortcut = "plusv2" in path.name.lower()

    def build():
        return adapters.IPAdapter.for_unet(unet, build_image_proj(variant, hparams, nnx.Rngs(0)), variant=variant,
                                           lora_rank=lora_rank, shortcut=shortcut, rngs=nnx.Rngs(0))

    adapter, _ = load_state_dict_into(build, state, source=str(path), rename=_rename_official)
    if attach:
        adapters.attach(unet, adapter)
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
        return save_safetensors(state, path, metadata={"format": "pt"})
    if path.suffix == ".bin":
        import torch

        nested = {"image_proj": {}, "ip_adapter": {}}
        for key, value in state.items():
            group, name = key.split(".", 1)
            nested[group][name] = torch.from_numpy(np.array(value))  # a writable copy
        with atomic_write(path) as tmp:
            torch.save(nested, tmp)
        return path
    raise ValueError(f"{path}: save as .safetensors or .bin")
