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
``ldm_blocks`` (the numbering), ``TOP`` and ``RESNET`` are the one statement of
this layout: the single-file reader and writer, the sgm names of kohya SDXL
LoRA files (``convert.lora``) and original-layout ControlNets
(``convert.controlnet``) all derive from them.
"""

from __future__ import annotations

import functools
import re

from ipadapter_jax.convert.ldm_plan import Rule
from ipadapter_jax.models.unet import UNetConfig

# Modules outside the numbered blocks: diffusers name -> LDM name.
TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
# A resnet's parts: diffusers name -> LDM name.
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
RESNET_FROM_LDM = {ldm: name for name, ldm in RESNET.items()}
# A sampler's ``conv`` in the LDM layout: the downsampler's is ``op``, the upsampler's ``conv``.
SAMPLER_CONV = {"downsampler": "op", "upsampler": "conv"}

_BLOCK_PARAM = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+"
                          r"|mid_block\.(?:resnets|attentions)\.\d+)\.(.+)$")


@functools.lru_cache(maxsize=64)
def ldm_blocks(layers: tuple[int, ...], down_attention: tuple[bool, ...], up_attention: tuple[bool, ...] = (),
               mid: bool = True) -> dict[str, tuple[str, str]]:
    """The LDM UNet's numbered blocks -> (diffusers module, role), roles
    "resnet", "attention", "downsampler", "upsampler": ``input_blocks.{i}.{0|1}``,
    ``middle_block.{0|1|2}``, ``output_blocks.{i}.{0|1|2}``.

    layers: the resnets of each down block (``layers_per_block``);
    down_attention / up_attention: whether each down / up block has
    transformers; no up blocks (a ControlNet: the encoder half) number none;
    mid: whether there is a mid block. (Returned shared: do not modify.)"""
    n = len(layers)
    blocks: dict[str, tuple[str, str]] = {}
    i = 1   # input_blocks.0 is conv_in
    for b, count in enumerate(layers):
        for j in range(count):
            blocks[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", "resnet")
            if down_attention[b]:
                blocks[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", "attention")
            i += 1
        if b < n - 1:
            blocks[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.downsamplers.0", "downsampler")
            i += 1
    if mid:
        blocks.update({"middle_block.0": ("mid_block.resnets.0", "resnet"),
                       "middle_block.1": ("mid_block.attentions.0", "attention"),
                       "middle_block.2": ("mid_block.resnets.1", "resnet")})
    i = 0
    for b, (attention, count) in enumerate(zip(up_attention, layers[::-1])):
        for j in range(count + 1):
            blocks[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", "resnet")
            if attention:
                blocks[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", "attention")
            if j == count and b < n - 1:   # the upsampler beside the last layer, after its transformer
                blocks[f"output_blocks.{i}.{2 if attention else 1}"] = (f"up_blocks.{b}.upsamplers.0", "upsampler")
            i += 1
    return blocks


def unet_blocks(config: UNetConfig) -> dict[str, tuple[str, str]]:
    """``ldm_blocks`` of a UNet config."""
    return ldm_blocks(tuple(int(n) for n in config.per_block("layers_per_block")),
                      tuple(t.startswith("CrossAttn") for t in config.down_block_types),
                      tuple(t.startswith("CrossAttn") for t in config.up_block_types), bool(config.mid_block_type))


def by_module(blocks: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """``ldm_blocks``' map inverted: diffusers module -> (LDM block, role)."""
    return {module: (block, role) for block, (module, role) in blocks.items()}


def ldm_sublayer(role: str, sub: str) -> str | None:
    """A module inside a block, diffusers name -> LDM name (None: not one of the block's)."""
    if role == "resnet":
        return RESNET.get(sub)
    if role in SAMPLER_CONV:
        return SAMPLER_CONV[role] if sub == "conv" else None
    return sub


def diffusers_sublayer(role: str, sub: str) -> str | None:
    """A module inside a block, LDM name -> diffusers name (the inverse of ``ldm_sublayer``)."""
    if role == "resnet":
        return RESNET_FROM_LDM.get(sub)
    if role in SAMPLER_CONV:
        return "conv" if sub == SAMPLER_CONV[role] else None
    return sub


def block_param(key: str, modules: dict[str, tuple[str, str]]) -> str | None:
    """A diffusers parameter inside a numbered block -> its LDM name, or None.
    ``modules``: ``by_module`` of the model's blocks. Resnet and sampler parts
    hold ``weight`` / ``bias``; names inside a transformer are kept."""
    m = _BLOCK_PARAM.match(key)
    if not m or m.group(1) not in modules:
        return None
    block, role = modules[m.group(1)]
    if role == "attention":
        return f"{block}.{m.group(2)}"
    sub, _, leaf = m.group(2).rpartition(".")
    name = ldm_sublayer(role, sub) if leaf in ("weight", "bias") else None
    return name and f"{block}.{name}.{leaf}"


def unet_rule(config: dict) -> Rule:
    """``rule(diffusers key) -> (LDM key, "copy", 0)`` for a UNet of this diffusers config."""
    modules = by_module(unet_blocks(UNetConfig.from_dict(config, source="unet config")))

    def rule(key: str):
        module, _, leaf = key.rpartition(".")
        name = f"{TOP[module]}.{leaf}" if module in TOP else block_param(key, modules)
        return (name, "copy", 0) if name else None

    return rule
