"""ControlNet checkpoints: diffusers folders and the original single-file layout.

Most ControlNet files in the wild (``control_v11p_sd15_*.pth`` / ``.safetensors``)
keep the layout of the original ControlNet code (``cldm``): the UNet-encoder
copy under LDM names plus the hint encoder and the zero convs, usually under
``control_model.``::

    input_hint_block.0 / .2, .4, ... / .{last}  controlnet_cond_embedding.conv_in / blocks.0, 1, ... / conv_out
    time_embed.0 / .2                           time_embedding.linear_1 / linear_2
    label_emb.0.0 / .0.2  (SDXL)                add_embedding.linear_1 / linear_2
    input_blocks.0.0                            conv_in
    input_blocks.{i}.0 / .1 / .0.op             down_blocks.{b}.resnets.{j} / attentions.{j} / downsamplers.0.conv
                                                (i = 1 + b (layers_per_block + 1) + j)
    middle_block.0 / .1 / .2                    mid_block.resnets.0 / attentions.0 / resnets.1
    zero_convs.{i}.0                            controlnet_down_blocks.{i}
    middle_block_out.0                          controlnet_mid_block

with resnet parts ``in_layers.0/2`` (norm1/conv1), ``emb_layers.1`` (time_emb_proj),
``out_layers.0/3`` (norm2/conv2), ``skip_connection`` (conv_shortcut); names inside
an attention block are the same in both layouts (the block numbering and the
part names are the UNet's, from ``convert.ldm_unet``). ``original_key`` is that
map (diffusers name -> original name); reading inverts it over every parameter
of the model the config describes, so the two directions cannot disagree.
Training buffers beside the weights of a full checkpoint (``DDPM_BUFFERS``) are
those the single-file reader ignores (``ipadapter_jax.families``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.families import DDPM_BUFFERS
from ipadapter_jax.convert.ldm_unet import TOP, block_param, by_module, ldm_blocks
from ipadapter_jax.io.errors import BadArgument, Incompatible, MissingFile
from ipadapter_jax.io.files import CheckpointError, load_config, read_json, read_state_dict
from ipadapter_jax.io.params import load_state_dict_into, to_torch_layout, torch_key
from ipadapter_jax.models.controlnet import ControlNetConfig, ControlNetModel

CONTROL_PREFIX = "control_model."

# lllyasviel/control_v11p_sd15_canny config.json: the built-in config of an
# original-layout file (SD 1.5: 768-wide text tokens, 8 heads per block).
SD15_CONTROLNET_CONFIG = {
    "_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None, "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                     "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}

# A full training checkpoint of the original code holds the whole Stable
# Diffusion model beside ``control_model.``: those parts are not the ControlNet's.
SD_COMPONENT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                         "model_ema.")
# The UNet's modules outside the numbered blocks that a ControlNet (the UNet's
# encoder half) has, and its own: diffusers name -> original name.
_FIXED_NAMES = {**{k: v for k, v in TOP.items() if k not in ("conv_norm_out", "conv_out")},
                "controlnet_cond_embedding.conv_in": "input_hint_block.0",
                "controlnet_mid_block": "middle_block_out.0"}


# --------------------------------------------------------------------------- the key map

def original_key(key: str, *, layers_per_block: int, hint_blocks: int) -> str:
    """A diffusers ControlNet parameter name -> its name in the original layout
    (without the ``control_model.`` prefix). ``hint_blocks``: the number of
    ``controlnet_cond_embedding.blocks`` (6 for the default embedding)."""
    module, _, leaf = key.rpartition(".")
    if module in _FIXED_NAMES:
        return f"{_FIXED_NAMES[module]}.{leaf}"
    if module == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{2 * (hint_blocks + 1)}.{leaf}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{leaf}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m[1]}.0.{leaf}"
    if m := re.match(r"down_blocks\.(\d+)\.|mid_block\.", key):
        name = block_param(key, _encoder_blocks(layers_per_block, int(m[1] or 0) + 2))
        if name is not None:
            return name
    raise CheckpointError(f"{key!r} is not a ControlNet parameter of the original layout's map")


@functools.lru_cache(maxsize=32)
def _encoder_blocks(layers_per_block: int, blocks: int) -> dict[str, tuple[str, str]]:
    """The LDM numbering (``ldm_unet.ldm_blocks``) of a ControlNet's down blocks
    and mid block, inverted: diffusers module -> (LDM block, role). Down block
    b's numbers depend only on the blocks before it, so a map of ``blocks`` > b
    equal blocks (each with transformers, which the model has or not) names it."""
    return by_module(ldm_blocks((layers_per_block,) * blocks, (True,) * blocks))


def _count(keys, pattern: str) -> int:
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def controlnet_to_original(state_dict: dict, *, prefix: str = CONTROL_PREFIX) -> dict:
    """A diffusers-layout ControlNet state dict -> the original single-file
    layout (keys ``{prefix}input_hint_block.0.weight``, ...), values as given.
    ``layers_per_block`` and the hint blocks are read off the keys."""
    keys = list(state_dict)
    layers_per_block = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    hint_blocks = _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    if not layers_per_block:
        raise CheckpointError("not a diffusers ControlNet state dict: no down_blocks.0.resnets.* keys")
    return {prefix + original_key(k, layers_per_block=layers_per_block, hint_blocks=hint_blocks): v
            for k, v in state_dict.items()}


# --------------------------------------------------------------------------- reading

def detect_layout(state_dict: dict, source: str) -> tuple[str, str]:
    """``("original", prefix)`` or ``("diffusers", "")`` for a single file's keys."""
    keys = list(state_dict)
    if any(k.startswith(CONTROL_PREFIX) for k in keys):
        return "original", CONTROL_PREFIX
    if "input_hint_block.0.weight" in state_dict or "time_embed.0.weight" in state_dict:
        return "original", ""
    if "controlnet_cond_embedding.conv_in.weight" in state_dict:
        return "diffusers", ""
    what = " (a Stable Diffusion checkpoint without a ControlNet)" \
        if any(k.startswith("model.diffusion_model.") for k in keys) else ""
    raise CheckpointError(f"{source} is not a ControlNet file{what}: expected the original layout "
                          f"({CONTROL_PREFIX}input_hint_block.*, zero_convs.*) or diffusers names "
                          f"(controlnet_cond_embedding.*); its first keys are {sorted(keys)[:5]}")


def _control_keys(state_dict: dict, prefix: str, source: str) -> dict:
    """The ControlNet's entries without ``prefix``; other parts of a full
    training checkpoint (the SD model, DDPM buffers) are skipped, anything
    else is refused."""
    if not prefix:
        return dict(state_dict)
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif not (key.startswith(SD_COMPONENT_PREFIXES) or key in DDPM_BUFFERS):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys are neither ControlNet weights ({prefix}*) nor parts "
                              f"of a Stable Diffusion checkpoint: {_some(sorted(unknown))}")
    return out


def _some(keys: list, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def parameter_shapes(config: ControlNetConfig) -> dict[str, tuple]:
    """{diffusers name: torch-layout shape} of every parameter ``config`` builds."""
    abstract = nnx.eval_shape(lambda: ControlNetModel(config, rngs=nnx.Rngs(0)))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = var.get_value().shape
        out[torch_key(path)] = tuple(to_torch_layout(path, np.empty(shape, dtype=np.uint8)).shape)
    return out


def original_to_diffusers(state_dict: dict, config: ControlNetConfig, *, prefix: str = CONTROL_PREFIX,
                          source: str = "checkpoint") -> dict:
    """An original-layout ControlNet state dict -> diffusers names, strictly:
    a key the map does not produce, a parameter the file lacks, or a shape that
    does not fit ``config`` is an error naming the file's key."""
    ucfg = config.unet
    hint_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    targets = parameter_shapes(config)
    names = {original_key(k, layers_per_block=ucfg.layers_per_block, hint_blocks=hint_blocks): k for k in targets}
    entries = _control_keys(state_dict, prefix, source)
    unknown = sorted(prefix + k for k in entries if k not in names)
    missing = sorted(f"{prefix}{k} ({names[k]})" for k in names if k not in entries)
    if unknown or missing:
        parts = ([f"{len(unknown)} keys match no ControlNet parameter: {_some(unknown)}"] if unknown else []) + \
                ([f"{len(missing)} ControlNet parameters are missing: {_some(missing)}"] if missing else [])
        raise CheckpointError(f"{source}: " + "; ".join(parts) + _CONFIG_HINT)
    bad = [f"{prefix}{k} ({names[k]}): file {tuple(np.shape(v))} vs model {targets[names[k]]}"
           for k, v in entries.items() if tuple(np.shape(v)) != targets[names[k]]]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch for {len(bad)} tensors: {_some(bad, 4)}" + _CONFIG_HINT)
    return {names[k]: v for k, v in entries.items()}


_CONFIG_HINT = (". The layout is read with the given config (default: SD 1.5's ControlNet); for an SD 2.x, "
                "SDXL or other-sized ControlNet pass config= (its diffusers config.json folder, file or dict)")


def resolve_config(config) -> dict:
    """``config`` as a diffusers ControlNet config dict: None (SD 1.5's), a
    dict, a folder holding ``config.json``, or a ``.json`` file."""
    if config is None:
        return dict(SD15_CONTROLNET_CONFIG)
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            return load_config(path)
        if not path.exists():
            raise MissingFile(f"ControlNet config not found: {path}")
        content = read_json(path, error=CheckpointError)
        if not isinstance(content, dict):
            raise CheckpointError(f"{path} holds a JSON {type(content).__name__}; expected a ControlNet config object")
        return content
    raise BadArgument(f"config must be None, a dict, or a path to a diffusers ControlNet config (folder or "
                      f".json), got {type(config).__name__}")


def load_controlnet(path: str | os.PathLike, config=None, *, variant: str | None = None, dtype=jnp.float32,
                    attention_backend: str = "auto") -> ControlNetModel:
    """A ``ControlNetModel`` from a diffusers folder (``config.json`` + weights,
    ``variant="fp16"`` for ``*.fp16.safetensors``) or a single file:
    ``.safetensors`` or ``.pth`` / ``.ckpt`` / ``.bin`` / ``.pt`` (through
    ``torch.load(weights_only=True)``), in the original layout (keys with or
    without ``control_model.``) or with diffusers names. A single file takes its
    config from ``config`` (a diffusers config folder / ``.json`` / dict),
    SD 1.5's ControlNet by default. Strict: every key used, every parameter
    filled, errors naming the keys."""
    path = Path(path)
    options = dict(dtype=dtype, attention_backend=attention_backend)
    if path.is_dir():
        if config is not None:
            raise BadArgument(f"{path} is a diffusers folder with its own config.json; config= is for single files")
        return ControlNetModel.from_pretrained(path, variant=variant, **options)
    if not path.exists():
        raise MissingFile(f"ControlNet not found: {path} (expected a diffusers folder or a weights file)")
    if variant is not None:
        raise BadArgument(f"variant={variant!r} selects a weights file in a diffusers folder; {path} is a file")
    config_dict = resolve_config(config)
    parsed = ControlNetModel.parse_config(config_dict)
    state_dict = read_state_dict(path)
    if state_dict and all(k.startswith("state_dict.") for k in state_dict):   # a training checkpoint's wrapper
        state_dict = {k[len("state_dict."):]: v for k, v in state_dict.items()}
    layout, prefix = detect_layout(state_dict, str(path))
    added = [k for k in state_dict if k.startswith((prefix + "label_emb.", prefix + "add_embedding."))]
    if config is None and added:
        raise Incompatible(f"{path} is an SDXL-style ControlNet (it holds {added[0]}, the added text/time "
                           "embedding), but no config was given and the built-in one is SD 1.5's: pass config= "
                           "(the diffusers config.json folder, file or dict of this ControlNet)")
    if layout == "original":
        state_dict = original_to_diffusers(state_dict, parsed, prefix=prefix, source=str(path))

    def build():
        module = ControlNetModel(parsed, rngs=nnx.Rngs(0), **options)
        module.config_json = json.dumps(config_dict, sort_keys=True)
        return module

    try:
        module, _ = load_state_dict_into(build, state_dict, source=str(path))
    except CheckpointError as e:   # (strict=False is not offered here: drop that advice)
        message = str(e).replace(" (strict=False loads what matches and reports the rest)", "")
        raise CheckpointError(message.rstrip(".") + _CONFIG_HINT) from None
    return module


__all__ = ["CONTROL_PREFIX", "SD15_CONTROLNET_CONFIG", "controlnet_to_original", "detect_layout",
           "load_controlnet", "original_key", "original_to_diffusers", "parameter_shapes", "resolve_config"]
