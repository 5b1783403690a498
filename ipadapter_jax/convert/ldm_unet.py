"""The UNet's names in the original (LDM / sgm) layout, from its diffusers names.

The LDM UNet numbers its blocks flat instead of nesting them:

* ``input_blocks.0.0`` is ``conv_in``; then each down block's layers, one index
  each (``.0`` the resnet, ``.1`` its transformer), and after them one index
  for the down block's downsampler (``.0.op``);
* ``middle_block.0`` / ``.1`` / ``.2``: resnet, transformer, resnet;
* ``output_blocks``: each up block's ``layers_per_block + 1`` layers, the
  upsampler (``.conv``) beside the last one, after its transformer when the
  block has one (``.2.conv``), else after the resnet (``.1.conv``);
* ``time_embed.0/2``, ``label_emb.0.0/2`` (SDXL's ``add_embedding``),
  ``out.0/2`` (``conv_norm_out`` / ``conv_out``);
* resnets rename ``norm1/conv1`` -> ``in_layers.0/2``, ``norm2/conv2`` ->
  ``out_layers.0/3``, ``time_emb_proj`` -> ``emb_layers.1``, ``conv_shortcut``
  -> ``skip_connection``. Transformers keep diffusers' names.

Keys here carry no prefix (the single file adds ``model.diffusion_model.``).
"""

from __future__ import annotations

import re

from ipadapter_jax.convert.ldm_plan import Rule
from ipadapter_jax.models.unet import UNetConfig

_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_PARAM = re.compile(r"(\w+)\.(weight|bias)$")


def _resnet(rest: str) -> str | None:
    m = _PARAM.match(rest)
    return f"{RESNET[m.group(1)]}.{m.group(2)}" if m and m.group(1) in RESNET else None


def unet_rule(config: dict) -> Rule:
    """``rule(diffusers key) -> (LDM key, "copy", 0)`` for a UNet of this diffusers config."""
    cfg = UNetConfig.from_dict(config, source="unet config")
    layers = [int(n) for n in cfg.per_block("layers_per_block")]
    n = len(layers)
    # Each down block's layers take one index each, then its downsampler one more.
    down_start = [1 + sum(layers[:b]) + b for b in range(n)]
    up_layers = [count + 1 for count in reversed(layers)]
    up_start = [sum(up_layers[:b]) for b in range(n)]
    up_attention = [t.startswith("CrossAttn") for t in cfg.up_block_types]

    def down(b: int, kind: str, j: int, rest: str) -> str | None:
        if kind == "resnets" and j < layers[b]:
            name = _resnet(rest)
            return name and f"input_blocks.{down_start[b] + j}.0.{name}"
        if kind == "attentions" and j < layers[b]:
            return f"input_blocks.{down_start[b] + j}.1.{rest}"
        if kind == "downsamplers" and j == 0 and b < n - 1 and rest in ("conv.weight", "conv.bias"):
            return f"input_blocks.{down_start[b] + layers[b]}.0.op.{rest[5:]}"
        return None

    def up(b: int, kind: str, j: int, rest: str) -> str | None:
        if kind == "resnets" and j < up_layers[b]:
            name = _resnet(rest)
            return name and f"output_blocks.{up_start[b] + j}.0.{name}"
        if kind == "attentions" and j < up_layers[b]:
            return f"output_blocks.{up_start[b] + j}.1.{rest}"
        if kind == "upsamplers" and j == 0 and b < n - 1 and rest in ("conv.weight", "conv.bias"):
            slot = 2 if up_attention[b] else 1
            return f"output_blocks.{up_start[b] + up_layers[b] - 1}.{slot}.{rest}"
        return None

    def mid(kind: str, j: int, rest: str) -> str | None:
        if kind == "resnets" and j in (0, 1):
            name = _resnet(rest)
            return name and f"middle_block.{2 * j}.{name}"
        if kind == "attentions" and j == 0:
            return f"middle_block.1.{rest}"
        return None

    def rule(key: str):
        module, _, leaf = key.rpartition(".")
        if module in _TOP:
            return f"{_TOP[module]}.{leaf}", "copy", 0
        name = None
        if m := _DOWN.match(key):
            b = int(m.group(1))
            name = down(b, m.group(2), int(m.group(3)), m.group(4)) if b < n else None
        elif m := _UP.match(key):
            b = int(m.group(1))
            name = up(b, m.group(2), int(m.group(3)), m.group(4)) if b < n else None
        elif m := _MID.match(key):
            name = mid(m.group(1), int(m.group(2)), m.group(3))
        return (name, "copy", 0) if name else None

    return rule
