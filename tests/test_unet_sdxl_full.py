"""The official SDXL UNet architecture (2.57B parameters, random weights),
compared block by block against diffusers: bound 1e-4 per block output.

Both frameworks' full SDXL UNets in float32 do not fit this machine's memory
together, so the diffusers UNet is built on the ``meta`` device and one block
at a time is materialised (torch's default init), converted into the same
block of our UNet, run on both sides on the same inputs, and freed. Each
block gets diffusers' outputs of the block before it as input, so every
block is measured on its own; a non-square latent makes the SDXL time ids and
the down/up sizes matter."""

from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import nchw, nhwc, rel_err
from ipadapter_jax.io.params import load_state_dict_into
from ipadapter_jax.models import UNet2DConditionModel
from test_sdxl_models import SDXL_UNET, SameKey

BOUND = 1e-4
LATENT_HW = (24, 40)   # 192 x 320 px: full-size weights, small activations


def materialise(module: torch.nn.Module) -> torch.nn.Module:
    """A meta-device submodule made real with torch's default initialisation.
    Every parameter is first set to NaN, so one that no ``reset_parameters``
    covers fails the finiteness check instead of holding stale memory."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    bad = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"not initialised: {bad[:5]}"
    return module.eval()


def free(module: torch.nn.Module) -> None:
    module.to_empty(device="meta")   # the weights go with their last reference (no cycle holds them)


SPLIT = ("down_blocks.2", "up_blocks.0")   # compared child by child (memory)


@functools.cache
def abstract_unet() -> nnx.Module:
    """Our SDXL UNet traced once, shapes only (a few seconds): every block's
    abstract build is a slice of it, not another trace of the whole model."""
    return nnx.eval_shape(lambda: UNet2DConditionModel(SDXL_UNET, rngs=SameKey()))


def jax_block(name: str, block: torch.nn.Module):
    """Our UNet's submodule ``name`` (dotted, e.g. ``up_blocks.0.attentions.1``)
    holding the torch module's weights (strict)."""
    module = abstract_unet()
    for piece in name.split("."):
        module = module[int(piece)] if piece.isdigit() else getattr(module, piece)
    graphdef, shapes = nnx.split(module)

    def make():   # the block's structure and shapes, under load_state_dict_into's own trace
        return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    state = {k: v.numpy() for k, v in block.state_dict().items()}
    module, _ = load_state_dict_into(make, state, source=name)
    return module


def compare(name: str, module: torch.nn.Module, run_torch, run_ours) -> tuple[float, torch.Tensor]:
    """Materialise ``module``, run it, convert it, free the torch weights, run
    ours: (relative error, torch output). Outputs are NCHW tensors / NHWC arrays."""
    materialise(module)
    with torch.no_grad():
        out_torch = run_torch(module)
    ours = jax_block(name, module)
    free(module)
    err = rel_err(run_ours(ours), nhwc(out_torch))
    del ours
    gc.collect()   # our block's weights sit in reference cycles: collect them before the next block
    return err, out_torch


def down_children(name, block, x, emb, ctx, emb_np, context):
    """A down block one child at a time: ({child: error}, output, residuals)."""
    errors, res = {}, []
    for j in range(len(block.resnets)):
        errors[f"{name}.resnets.{j}"], x = compare(f"{name}.resnets.{j}", block.resnets[j],
                                                   lambda m, x=x: m(x, emb), lambda o, x=x: o(nhwc(x), emb_np))
        errors[f"{name}.attentions.{j}"], x = compare(
            f"{name}.attentions.{j}", block.attentions[j],
            lambda m, x=x: m(x, encoder_hidden_states=ctx, return_dict=False)[0], lambda o, x=x: o(nhwc(x), context))
        res.append(x)
    if block.downsamplers is not None:
        errors[f"{name}.downsamplers.0"], x = compare(f"{name}.downsamplers.0", block.downsamplers[0],
                                                      lambda m, x=x: m(x), lambda o, x=x: o(nhwc(x)))
        res.append(x)
    return errors, x, tuple(res)


def up_children(name, block, x, res, emb, ctx, emb_np, context, size):
    """An up block one child at a time: ({child: error}, output)."""
    errors, res = {}, list(res)
    for j in range(len(block.resnets)):
        x = torch.cat([x, res.pop()], dim=1)
        errors[f"{name}.resnets.{j}"], x = compare(f"{name}.resnets.{j}", block.resnets[j],
                                                   lambda m, x=x: m(x, emb), lambda o, x=x: o(nhwc(x), emb_np))
        errors[f"{name}.attentions.{j}"], x = compare(
            f"{name}.attentions.{j}", block.attentions[j],
            lambda m, x=x: m(x, encoder_hidden_states=ctx, return_dict=False)[0], lambda o, x=x: o(nhwc(x), context))
    if block.upsamplers is not None:
        errors[f"{name}.upsamplers.0"], x = compare(f"{name}.upsamplers.0", block.upsamplers[0],
                                                    lambda m, x=x: m(x, output_size=size),
                                                    lambda o, x=x: o(nhwc(x), size))
    return errors, x


@pytest.fixture(scope="module")
def reference():
    from diffusers import UNet2DConditionModel as TorchUNet

    with torch.device("meta"):
        model = TorchUNet(**SDXL_UNET)
    return model


@pytest.mark.slow
def test_sdxl_unet_full_size_block_by_block(reference):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    h, w = LATENT_HW
    sample = rng.standard_normal((1, h, w, 4), dtype=np.float32)
    context = rng.standard_normal((1, 77, 2048), dtype=np.float32)
    text_embeds = rng.standard_normal((1, 1280), dtype=np.float32)
    time_ids = np.array([[8 * h + 64, 8 * w, 16, 0, 8 * h, 8 * w]], dtype=np.float32)
    t = np.array([601])
    errors: dict[str, float] = {}

    # Time conditioning (time_embedding + add_embedding) and conv_in.
    with torch.no_grad():
        for name in ("time_embedding", "add_embedding", "conv_in"):
            materialise(reference.get_submodule(name))
        emb_torch = reference.get_time_embed(sample=nchw(sample), timestep=torch.from_numpy(t))
        emb_torch = reference.time_embedding(emb_torch)
        aug = reference.get_aug_embed(emb=emb_torch, encoder_hidden_states=torch.from_numpy(context),
                                         added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                                            "time_ids": torch.from_numpy(time_ids)})
        emb_torch = emb_torch + aug
        x_torch = reference.conv_in(nchw(sample))
    ours = UNet2DConditionModel
    state = {k: v.numpy() for name in ("time_embedding", "add_embedding", "conv_in")
             for k, v in reference.get_submodule(name).state_dict(prefix=f"{name}.").items()}
    stem, _ = load_state_dict_into(lambda: _stem(ours), state, source="stem")
    emb = stem.time_conditioning(t, 1, {"text_embeds": text_embeds, "time_ids": time_ids})
    errors["time_conditioning"] = rel_err(emb, emb_torch.numpy())
    errors["conv_in"] = rel_err(stem.conv_in(sample), nhwc(x_torch))
    for name in ("time_embedding", "add_embedding", "conv_in"):
        free(reference.get_submodule(name))
    del stem

    ctx_torch = torch.from_numpy(context)
    emb_np = emb_torch.numpy()
    skips_torch = [x_torch]
    for i, block in enumerate(reference.down_blocks):
        if f"down_blocks.{i}" in SPLIT:
            children, x_torch, res_torch = down_children(
                f"down_blocks.{i}", block, x_torch, emb_torch, ctx_torch, emb_np, context)
            errors.update(children)
            skips_torch.extend(res_torch)
            continue
        materialise(block)
        with torch.no_grad():
            kwargs = {"encoder_hidden_states": ctx_torch} if hasattr(block, "attentions") else {}
            out_torch, res_torch = block(x_torch, emb_torch, **kwargs)
        ours_block = jax_block(f"down_blocks.{i}", block)
        out, res = ours_block(nhwc(x_torch), emb_np, context)
        errors[f"down_blocks.{i}"] = max([rel_err(out, nhwc(out_torch))]
                                         + [rel_err(a, nhwc(b)) for a, b in zip(res, res_torch, strict=True)])
        free(block)
        del ours_block
        x_torch = out_torch
        skips_torch.extend(res_torch)

    materialise(reference.mid_block)
    with torch.no_grad():
        out_torch = reference.mid_block(x_torch, emb_torch, encoder_hidden_states=ctx_torch)
    mid = jax_block("mid_block", reference.mid_block)
    errors["mid_block"] = rel_err(mid(nhwc(x_torch), emb_np, context), nhwc(out_torch))
    free(reference.mid_block)
    del mid
    x_torch = out_torch

    for i, block in enumerate(reference.up_blocks):
        n = len(block.resnets)
        res_torch, skips_torch = tuple(skips_torch[-n:]), skips_torch[:-n]
        size = tuple(skips_torch[-1].shape[2:]) if skips_torch and block.upsamplers is not None else None
        if f"up_blocks.{i}" in SPLIT:
            children, x_torch = up_children(
                f"up_blocks.{i}", block, x_torch, res_torch, emb_torch, ctx_torch, emb_np, context, size)
            errors.update(children)
            continue
        materialise(block)
        with torch.no_grad():
            kwargs = {"encoder_hidden_states": ctx_torch} if hasattr(block, "attentions") else {}
            out_torch = block(x_torch, res_torch, emb_torch, upsample_size=size, **kwargs)
        ours_block = jax_block(f"up_blocks.{i}", block)
        out = ours_block(nhwc(x_torch), [nhwc(r) for r in res_torch], emb_np, context, upsample_size=size)
        errors[f"up_blocks.{i}"] = rel_err(out, nhwc(out_torch))
        free(block)
        del ours_block
        x_torch = out_torch

    bad = {k: v for k, v in errors.items() if not v <= BOUND}
    assert not bad, f"blocks over {BOUND:g}: {bad}; all: {errors}"
    split = {*(f"down_blocks.2.{kind}.{j}" for kind in ("resnets", "attentions") for j in range(2)),
             *(f"up_blocks.0.{kind}.{j}" for kind in ("resnets", "attentions") for j in range(3)),
             "up_blocks.0.upsamplers.0"}   # SDXL's down_blocks.2 has no downsampler
    assert set(errors) == {"time_conditioning", "conv_in", "mid_block", "down_blocks.0", "down_blocks.1",
                           "up_blocks.1", "up_blocks.2", *split}, errors
    assert x_torch.shape[2:] == (h, w)


def _stem(cls):
    """Our UNet with only the parts the stem test fills (the rest dropped)."""
    unet = cls(SDXL_UNET, rngs=SameKey())
    for name in ("down_blocks", "up_blocks", "mid_block", "conv_norm_out", "conv_out", "ip_adapters"):
        setattr(unet, name, None)
    return unet
