"""The text encoders' names in single files, from their transformers names.

Two layouts (keys here carry no prefix; the family says where each encoder lives):

* ``clip``: OpenAI CLIP ViT-L as transformers names it (SD 1.x
  ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``):
  the transformers key under a prefix;
* ``openclip``: OpenCLIP's own names (SD 2.x ``cond_stage_model.model.``, SDXL's
  bigG ``conditioner.embedders.1.model.``): ``token_embedding``,
  ``positional_embedding``, ``transformer.resblocks.i`` with ``ln_1`` / ``ln_2``,
  ``attn.in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked),
  ``attn.out_proj``, ``mlp.c_fc`` / ``mlp.c_proj``, ``ln_final``, and
  ``text_projection`` stored transposed (used as ``x @ P``).

transformers 5 saves a bare ``CLIPTextModel`` without the ``text_model.``
prefix; ``with_text_model_prefix`` restores it so both spellings map.
"""

from __future__ import annotations

import re
from typing import Mapping


_BARE = ("embeddings.", "encoder.", "final_layer_norm.")

_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def with_text_model_prefix(state: Mapping) -> dict:
    """transformers 5's bare ``CLIPTextModel`` keys (``embeddings.``, ``encoder.``,
    ``final_layer_norm.``) under ``text_model.``, as every other CLIP checkpoint has them."""
    return {(f"text_model.{k}" if k.startswith(_BARE) else k): v for k, v in state.items()}


def clip_rule(key: str):
    """transformers names kept (position ids are a buffer, not a weight)."""
    if key.startswith("text_model.") and not key.endswith("position_ids"):
        return key, "copy", 0
    return None


def openclip_rule(key: str):
    """OpenCLIP names; q/k/v fuse into ``in_proj_*``."""
    if key in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[key], "copy", 0
    if key == "text_projection.weight":
        return "text_projection", "transpose", 0
    m = _LAYER.match(key)
    if m is None:
        return None
    layer, module, leaf = m.groups()
    base = f"transformer.resblocks.{layer}."
    if module in _QKV:
        return f"{base}attn.in_proj_{leaf}", "fuse", _QKV[module]
    if module in _OPENCLIP_LAYER:
        return f"{base}{_OPENCLIP_LAYER[module]}.{leaf}", "copy", 0
    return None
