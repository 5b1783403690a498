"""Block names as diffusers and transformers name their submodules
(``down_blocks.1``, ``mid_block``, ``decoder.up_blocks.0``,
``text_model.encoder.layers.3``), in forward order. The same name means the
same tensor on both sides, so every function here takes a diffusers /
transformers module or ours (they share the attribute names)."""

from __future__ import annotations

# The children a block is split into at depth 2, in forward order within the block (the resnets and
# attentions alternate: see ``_children``).
CHILD_LISTS = ("resnets", "attentions", "downsamplers", "upsamplers")


def _length(module, attribute: str) -> int:
    value = getattr(module, attribute, None)
    return 0 if value is None else len(value)


def _children(block, name: str) -> list[str]:
    """A block's children in the order its forward runs them: resnet i, then
    attention i (the mid block: resnet 0, attention 0, resnet 1), then the
    down- or upsampler."""
    resnets, attentions = _length(block, "resnets"), _length(block, "attentions")
    names = []
    for i in range(resnets):
        names.append(f"{name}.resnets.{i}")
        if i < attentions:
            names.append(f"{name}.attentions.{i}")
    names += [f"{name}.{kind}.{i}" for kind in ("downsamplers", "upsamplers") for i in range(_length(block, kind))]
    return names or [name]


def _expand(module, names: list[str], depth: int, splittable) -> list[str]:
    if depth < 2:
        return names
    out = []
    for name in names:
        out += _children(get_submodule(module, name), name) if splittable(name) else [name]
    return out


def get_submodule(module, name: str):
    """``module``'s submodule at a dotted diffusers name (torch or ours)."""
    for piece in name.split("."):
        if piece.isdigit():
            module = module[int(piece)]
        else:
            module = getattr(module, piece)
    return module


def _is_block(name: str) -> bool:
    return name.startswith(("down_blocks.", "up_blocks.", "encoder.down_blocks.", "decoder.up_blocks.")) \
        or name.endswith("mid_block")


def unet_block_names(unet, depth: int = 1) -> list[str]:
    """The UNet's blocks in forward order (depth 2: their resnets, attentions
    and samplers): every part with weights, so a changed weight anywhere is
    named. ``time_embedding`` is the timestep's part of ``emb`` (SDXL adds
    ``add_embedding``); ``conv_out`` is the prediction."""
    names = ["time_embedding", *_present(unet, "add_embedding"), "conv_in"]
    names += [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    return _expand(unet, names + [*_present(unet, "conv_norm_out"), "conv_out"], depth, _is_block)


def _present(module, *names: str) -> list[str]:
    """The names among ``names`` that ``module`` has (not None): optional parts."""
    return [name for name in names if getattr(module, name, None) is not None]


def controlnet_block_names(net, depth: int = 1) -> list[str]:
    """A ControlNet's blocks in forward order: the conditioning embedding, the
    down and mid blocks, then the zero convolutions of each residual."""
    names = ["time_embedding", *_present(net, "add_embedding"), "conv_in", "controlnet_cond_embedding"]
    names += [f"down_blocks.{i}" for i in range(len(net.down_blocks))] + ["mid_block"]
    names += [f"controlnet_down_blocks.{i}" for i in range(len(net.controlnet_down_blocks))]
    return _expand(net, names + ["controlnet_mid_block"], depth, _is_block)


def vae_block_names(vae, part: str, depth: int = 1) -> list[str]:
    """The VAE's ``"encoder"`` or ``"decoder"`` blocks (with the quant convs)
    in forward order."""
    if part == "encoder":
        enc = vae.encoder
        names = ["encoder.conv_in"] + [f"encoder.down_blocks.{i}" for i in range(len(enc.down_blocks))]
        names += ["encoder.mid_block", "encoder.conv_norm_out", "encoder.conv_out"]
        names += ["quant_conv"] if getattr(vae, "quant_conv", None) is not None else []
    elif part == "decoder":
        dec = vae.decoder
        names = ["post_quant_conv"] if getattr(vae, "post_quant_conv", None) is not None else []
        names += ["decoder.conv_in", "decoder.mid_block"]
        names += [f"decoder.up_blocks.{i}" for i in range(len(dec.up_blocks))]
        names += ["decoder.conv_norm_out", "decoder.conv_out"]
    else:
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    return _expand(vae, names, depth, _is_block)


def clip_block_names(model, depth: int = 1) -> list[str]:
    """A CLIP tower's encoder layers and its final norm / projection
    (``text_model.*`` or ``vision_model.*``), in forward order. transformers 5
    builds ``CLIPTextModel`` without the ``text_model`` level: its names are
    then ``encoder.layers.0``, ... (``blocks.submodule`` finds ours by them)."""
    if hasattr(model, "text_model") or hasattr(model, "final_layer_norm"):
        tower = "text_model." if hasattr(model, "text_model") else ""
        text = model.text_model if tower else model
        names = [f"{tower}embeddings"] + [f"{tower}encoder.layers.{i}" for i in range(len(text.encoder.layers))]
        return names + [f"{tower}final_layer_norm"]
    tower = "vision_model"
    names = [f"{tower}.embeddings", f"{tower}.pre_layrnorm"] + [f"{tower}.encoder.layers.{i}"
                                         for i in range(len(model.vision_model.encoder.layers))]
    return names + [f"{tower}.post_layernorm"] + (["visual_projection"] if hasattr(model, "visual_projection")
                                                  else [])
