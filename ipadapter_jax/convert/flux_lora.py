"""FLUX LoRA files merged into a ``FluxTransformer2DModel`` at load (W += m x
alpha / rank x up @ down): zero cost per denoising step, as for SD.

Layouts (read from the keys):

* diffusers / PEFT: ``transformer.<diffusers module>.lora_A.weight`` /
  ``.lora_B.weight`` (``save_lora_weights``; the ``transformer.`` prefix may be
  missing), the scale from ``.alpha`` keys or the file's
  ``lora_adapter_metadata`` (``lora_alpha`` / ``r``), else 1;
* kohya / sd-scripts: ``lora_unet_<BFL module with _>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (alpha missing: the rank);
* BFL names with PEFT weights (ComfyUI, ai-toolkit): ``[diffusion_model.]<BFL
  module>.lora_A.weight`` / ``.lora_B.weight``.

BFL modules that fuse several diffusers layers (``img_attn.qkv``,
``linear1``) have their delta split by rows (``flux_single_file.module_map``),
and the final AdaLN's delta has its halves swapped, as its weights are.
Text-encoder LoRA (``lora_te1_``, ``text_encoder.``) and XLabs' processor LoRA
are refused with what they are.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.convert.flux_single_file import module_map
from ipadapter_jax.io.errors import BadFile, Incompatible, Unsupported
from ipadapter_jax.io.files import is_safetensors, read_safetensors_header, read_state_dict

_PEFT = re.compile(r"^(?P<base>.+)\.lora_(?P<which>A|B)\.weight$")
_KOHYA = re.compile(r"^lora_unet_(?P<base>.+)\.(?P<which>lora_down|lora_up)\.weight$")


@dataclass
class FluxLoraReport:
    path: str
    layers: int
    layout: str

    def __str__(self) -> str:
        return f"LoRA {self.path}: {self.layers} layers merged ({self.layout} layout)"


def _metadata_scale(path: Path) -> float | None:
    if not is_safetensors(path):
        return None
    meta = read_safetensors_header(path)[1].get("lora_adapter_metadata")
    if not meta:
        return None
    try:
        data = json.loads(meta)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    # diffusers' save_lora_weights: the PEFT config flattened under the component's name.
    config = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith("transformer.")}
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise Unsupported(f"{path}: per-layer alpha / rank patterns in lora_adapter_metadata are not supported")
    alpha, rank = config.get("lora_alpha"), config.get("r")
    return float(alpha) / float(rank) if alpha and rank else None


def read_flux_lora(path: str | os.PathLike, transformer) -> tuple[dict, str]:
    """A LoRA file -> ({diffusers module: (down [r, in], up [out, r], scale, rows, swap)...}, layout)
    where each entry says which rows of the module's output the delta covers."""
    path = Path(path)
    state = read_state_dict(path)
    cfg = transformer.config
    single_rows = (3 + 4) * cfg.inner_dim   # linear1: q, k, v, then the 4x MLP input
    bfl = module_map(cfg.num_layers, cfg.num_single_layers, cfg.inner_dim, single_rows)
    text = sorted(k for k in state if k.startswith(("lora_te", "text_encoder", "te_", "lora_te1_")))
    if text:
        raise Unsupported(f"{path}: text-encoder LoRA ({text[0]}, ...) is not merged for FLUX; use a file with "
                          "transformer layers only")
    if any(".processor." in k for k in state):
        raise Unsupported(f"{path}: an XLabs processor LoRA (double_blocks.N.processor.*_lora*): not supported; "
                          "use a kohya or diffusers/PEFT FLUX LoRA")
    pairs: dict[str, dict] = {}
    layout = None
    for key, value in state.items():
        if key.endswith(".alpha"):
            continue
        m = _KOHYA.match(key)
        if m:
            layout, base, which = "kohya", "kohya:" + m["base"], ("down" if m["which"] == "lora_down" else "up")
        elif (m := _PEFT.match(key)):
            base, which = m["base"], ("down" if m["which"] == "A" else "up")
            layout = layout or "peft"
        else:
            raise BadFile(f"{path}: {key!r} is not a LoRA weight (expected *.lora_A/lora_B.weight or kohya's "
                          "lora_unet_*.lora_down/lora_up.weight)")
        pairs.setdefault(base, {})[which] = np.asarray(value, np.float32)
        pairs[base]["alpha_key"] = key.rsplit(".", 2)[0] + ".alpha"
    meta_scale = _metadata_scale(path)
    kohya_index = {m.replace(".", "_"): m for m in bfl}
    merged = {}
    for base, pair in pairs.items():
        if "down" not in pair or "up" not in pair:
            raise BadFile(f"{path}: {base} has only its {'down' if 'down' in pair else 'up'} weight")
        down, up = pair["down"], pair["up"]
        rank = down.shape[0]
        alpha = state.get(pair["alpha_key"])
        if base.startswith("kohya:"):
            scale = float(np.asarray(alpha)) / rank if alpha is not None else 1.0
            name = kohya_index.get(base[len("kohya:"):])
            if name is None:
                raise Incompatible(f"{path}: lora_unet_{base[len('kohya:'):]} is no layer of this FLUX transformer "
                                   f"({cfg.num_layers} double / {cfg.num_single_layers} single blocks)")
            targets = bfl[name]
        else:
            scale = (float(np.asarray(alpha)) / rank if alpha is not None else
                     meta_scale if meta_scale is not None else 1.0)
            name = re.sub(r"^(transformer\.|diffusion_model\.|model\.diffusion_model\.)", "", base)
            targets = bfl.get(name) or [(name, None, False)]
        for module, part, swap in targets:
            rows = up if part is None else up[part[0]:part[1]]
            merged.setdefault(module, []).append((down, rows, scale, swap))
    return merged, layout or "peft"


def apply_flux_lora(transformer, path: str | os.PathLike, multiplier: float = 1.0) -> FluxLoraReport:
    """Merge a FLUX LoRA file into ``transformer``'s weights (in place)."""
    merged, layout = read_flux_lora(path, transformer)
    flat = dict(nnx.to_flat_state(nnx.state(transformer, nnx.Param)))
    by_name = {".".join(str(p) for p in key[:-1]): var for key, var in flat.items() if key[-1] == "kernel"}
    for module, deltas in merged.items():
        var = by_name.get(module)
        if var is None:
            raise Incompatible(f"{path}: LoRA layer {module} is no linear layer of this FLUX transformer")
        kernel = np.array(var.get_value(), np.float32)            # [in, out]
        for down, up, scale, swap in deltas:
            delta = (up @ down) * (scale * multiplier)            # [out, in]
            if swap:
                half = delta.shape[0] // 2
                delta = np.concatenate([delta[half:], delta[:half]])
            if delta.shape != kernel.T.shape:
                raise Incompatible(f"{path}: LoRA delta {delta.shape} for {module}, whose weight is "
                                   f"{kernel.T.shape} (a LoRA for another FLUX size?)")
            kernel += delta.T
        var.set_value(jnp.asarray(kernel, var.get_value().dtype))
    return FluxLoraReport(str(path), len(merged), layout)
