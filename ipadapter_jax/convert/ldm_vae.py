"""The VAE's names in the original (LDM) layout, from its diffusers names.

* encoder ``down_blocks.i.resnets.j`` -> ``down.i.block.j``, its downsampler
  ``down.i.downsample.conv``; decoder ``up_blocks.i`` -> ``up.{n-1-i}`` (LDM
  numbers the decoder's blocks from the lowest resolution's end), its upsampler
  ``upsample.conv``;
* ``mid_block.resnets.0/1`` -> ``mid.block_1/2``; ``mid_block.attentions.0``
  -> ``mid.attn_1`` with ``group_norm`` -> ``norm``, ``to_q/k/v`` -> ``q/k/v``,
  ``to_out.0`` -> ``proj_out``; these four are 1x1 convolutions in LDM;
* resnet ``conv_shortcut`` -> ``nin_shortcut``; ``conv_norm_out`` -> ``norm_out``;
  ``conv_in``, ``conv_out``, ``quant_conv``, ``post_quant_conv`` keep their names.

Keys here carry no prefix (the single file adds ``first_stage_model.``).
"""

from __future__ import annotations

import re

from ipadapter_jax.convert.ldm_plan import Rule

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_SAME = {"encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
         "post_quant_conv"}

_BLOCK = re.compile(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.(\d+)\.(\w+)|(down|up)samplers\.0\.conv)\."
                    r"(weight|bias)$")
_MID_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)$")
_MID_ATTENTION = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
                            r"(weight|bias)$")


def vae_rule(num_blocks: int) -> Rule:
    """``rule(diffusers key) -> (LDM key, op, 0)`` for a VAE of ``num_blocks`` blocks per side."""

    def block(m: re.Match) -> str | None:
        part, i = m.group(1).split(".")[0], int(m.group(2))
        if i >= num_blocks:
            return None
        index = i if part == "encoder" else num_blocks - 1 - i
        side = "down" if part == "encoder" else "up"
        if m.group(4) is not None:
            name = _RESNET.get(m.group(5))
            return name and f"{part}.{side}.{index}.block.{m.group(4)}.{name}.{m.group(7)}"
        if m.group(6) != side:
            return None
        return f"{part}.{side}.{index}.{side}sample.conv.{m.group(7)}"

    def rule(key: str):
        module, _, leaf = key.rpartition(".")
        if module in _SAME:
            return key, "copy", 0
        if module in ("encoder.conv_norm_out", "decoder.conv_norm_out"):
            return f"{module.split('.')[0]}.norm_out.{leaf}", "copy", 0
        if m := _BLOCK.match(key):
            name = block(m)
            return (name, "copy", 0) if name else None
        if m := _MID_RESNET.match(key):
            name = _RESNET.get(m.group(3))
            return (f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{name}.{m.group(4)}", "copy", 0) if name else None
        if m := _MID_ATTENTION.match(key):
            part, module_name, leaf = m.groups()
            op = "conv1x1" if leaf == "weight" and module_name != "group_norm" else "copy"
            return f"{part}.mid.attn_1.{_ATTENTION[module_name]}.{leaf}", op, 0
        return None

    return rule
