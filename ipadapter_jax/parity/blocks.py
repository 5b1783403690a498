"""Our blocks, run on the reference's inputs or block by block.

``run_captured`` calls one of our blocks with the inputs the diffusers /
transformers block of the same name received (``capture.Captured``), so each
block is measured on its own: an error in ``down_blocks.1`` does not show up
again in every later block. ``unet_block_outputs`` / ``vae_block_outputs`` run
a whole model block by block on its own activations (the tests' end-to-end
diagnosis). Both follow the forward code of the models: keep them in step
(the tests check the last block against the model's own output).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models import layers
from ipadapter_jax.models.unet import timestep_embedding
from ipadapter_jax.parity.capture import Captured, nhwc
from ipadapter_jax.parity.names import get_submodule, unet_block_names, vae_block_names


@dataclasses.dataclass
class BlockInputs:
    """What a block call needs beyond the captured tensors: the compute
    dtype, the image prompts built from the reference's image tokens
    (``ip(tokens_per_adapter) -> ((adapter, ImagePrompt), ...)``), and the
    attention mask of a CLIP tower's layers."""

    dtype: object = jnp.float32
    ip: Callable[[list], tuple] | None = None
    clip_mask: object = None


def _arg(c: Captured, index: int, name: str, default=None):
    if name in c.kwargs:
        return c.kwargs[name]
    return c.args[index] if len(c.args) > index else default


def _map(x, dtype):
    """A captured feature map (NCHW) or token tensor -> our layout and dtype."""
    return None if x is None else jnp.asarray(nhwc(np.asarray(x))).astype(dtype)


def _context(c: Captured, index: int, env: BlockInputs):
    """(text context, ip) from a captured ``encoder_hidden_states``: diffusers
    passes (text, [image tokens per adapter]) when IP-Adapters are loaded."""
    ctx = _arg(c, index, "encoder_hidden_states")
    if isinstance(ctx, tuple):
        text, tokens = ctx
        if env.ip is None:
            raise ValueError("the reference block received image tokens but no image prompts were given")
        return jnp.asarray(text).astype(env.dtype), env.ip(list(tokens))
    return (None if ctx is None else jnp.asarray(ctx).astype(env.dtype)), ()


def _size(value):
    return None if value is None else tuple(int(v) for v in value)


def run_captured(module, c: Captured, env: BlockInputs) -> list[np.ndarray]:
    """Our ``module`` on the captured inputs of the reference block of the
    same name (``c.kind``: its class); outputs as float32 numpy, flattened as
    ``capture.flat_outputs`` flattens the reference's."""
    d = env.dtype
    x = _map(_arg(c, 0, "hidden_states"), d) if c.args or "hidden_states" in c.kwargs else None
    kind = c.kind
    if kind in ("CrossAttnDownBlock2D", "DownBlock2D"):
        ctx, ip = _context(c, 2, env)
        out, skips = module(x, _map(_arg(c, 1, "temb"), d), ctx, ip)
        result = [out, *skips]
    elif kind in ("CrossAttnUpBlock2D", "UpBlock2D"):
        ctx, ip = _context(c, 3, env)
        skips = [_map(s, d) for s in _arg(c, 1, "res_hidden_states_tuple")]
        result = [module(x, skips, _map(_arg(c, 2, "temb"), d), ctx, ip,
                         upsample_size=_size(_arg(c, 4, "upsample_size")))]
    elif kind == "UNetMidBlock2DCrossAttn":
        ctx, ip = _context(c, 2, env)
        result = [module(x, _map(_arg(c, 1, "temb"), d), ctx, ip)]
    elif kind == "UNetMidBlock2D":   # a ControlNet's (with temb) or the VAE's (without)
        temb = _arg(c, 1, "temb")
        result = [module(x) if temb is None else module(x, _map(temb, d))]
    elif kind == "ResnetBlock2D":
        x = _map(_arg(c, 0, "input_tensor"), d)
        temb = _arg(c, 1, "temb")
        result = [module(x, None if temb is None else _map(temb, d))]
    elif kind == "Transformer2DModel":
        ctx, ip = _context(c, 1, env)
        result = [module(x, ctx, ip)]
    elif kind == "Upsample2D":
        result = [module(x, _size(_arg(c, 1, "output_size")))]
    elif kind == "CLIPEncoderLayer":
        result = [module(x, env.clip_mask)]
    elif kind == "CLIPTextEmbeddings":
        result = [module(jnp.asarray(_arg(c, 0, "input_ids"), jnp.int32))]
    elif kind == "CLIPVisionEmbeddings":
        result = [module(_map(_arg(c, 0, "pixel_values"), d))]
    elif kind in ("GroupNorm", "TimestepEmbedding", "Downsample2D", "DownEncoderBlock2D", "UpDecoderBlock2D", "Attention",
                  "ControlNetConditioningEmbedding", "LayerNorm", "Linear", "Conv2d"):
        result = [module(x)]   # one input, positional on the reference side
    else:
        raise ValueError(f"no rule to call our block for a reference {kind}")
    return [np.asarray(jnp.asarray(r).astype(jnp.float32)) for r in result]


def submodule(root, name: str):
    """Our submodule at a dotted diffusers / transformers name (a text
    tower's names with or without the ``text_model`` level)."""
    if hasattr(root, "text_model") and not name.startswith("text_model."):
        name = "text_model." + name
    return get_submodule(root, name)


# ----------------------------------------------------------------- whole models, block by block

def unet_block_outputs(unet, sample, timesteps, conditioning, *, jit: bool = False) -> dict:
    """Run a JAX ``UNet2DConditionModel`` block by block, in the order of its
    ``__call__``, and return ``{block name: output}`` (names as
    ``unet_block_names``; ``conv_out`` is the prediction). ``conditioning`` is
    the text context or a ``UNetConditioning``. ``jit=True`` compiles the whole
    run once (for the full-size UNet) instead of running it op by op."""
    if jit:
        from flax import nnx

        graphdef, state = nnx.split(unet)
        run = jax.jit(lambda s, x, t, c: unet_block_outputs(nnx.merge(graphdef, s), x, t, c))
        out = run(state, sample, timesteps, conditioning)
        return {name: out[name] for name in unet_block_names(unet)}  # jit returns dicts key-sorted

    cfg = unet.config
    cond = unet.conditioning(conditioning)
    ip = tuple(zip(unet.ip_adapters, cond.image_prompts))
    sample = jnp.asarray(sample)
    if cfg.center_input_sample:
        sample = 2 * sample - 1.0
    sample = sample.astype(unet.dtype)
    context = jnp.asarray(cond.encoder_hidden_states).astype(unet.dtype)
    out = {}
    t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))   # as UNet2DConditionModel.time_conditioning
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               downscale_freq_shift=cfg.freq_shift)
    emb = out["time_embedding"] = unet.time_embedding(t_emb.astype(unet.dtype))
    if unet.add_embedding is not None:
        added = out["add_embedding"] = unet.added_embedding(unet.check_added_cond(cond.added_cond, sample.shape[0]))
        emb = emb + added
    x = out["conv_in"] = unet.conv_in(sample)
    skips = [x]
    for i, block in enumerate(unet.down_blocks):
        x, block_skips = block(x, emb, context, ip)
        skips.extend(block_skips)
        out[f"down_blocks.{i}"] = x
    if cond.down_block_residuals is not None:
        assert len(cond.down_block_residuals) == len(skips), (len(cond.down_block_residuals), len(skips))
        skips = [s + jnp.asarray(r).astype(s.dtype) for s, r in zip(skips, cond.down_block_residuals)]
    if unet.mid_block is not None:
        x = out["mid_block"] = unet.mid_block(x, emb, context, ip)
    if cond.mid_block_residual is not None:
        x = x + jnp.asarray(cond.mid_block_residual).astype(x.dtype)
    for i, block in enumerate(unet.up_blocks):
        n_res = len(block.resnets)
        block_skips, skips = skips[-n_res:], skips[:-n_res]
        size = skips[-1].shape[1:3] if skips and block.upsamplers is not None else None
        x = out[f"up_blocks.{i}"] = block(x, list(block_skips), emb, context, ip, upsample_size=size)
    x = out["conv_norm_out"] = unet.conv_norm_out(x)
    out["conv_out"] = unet.conv_out(layers.activation(cfg.act_fn)(x)).astype(jnp.float32)
    return out


def vae_block_outputs(vae, part: str, inputs) -> dict:
    """Run a JAX ``AutoencoderKL``'s encoder (``inputs`` = images) or decoder
    (``inputs`` = latents) block by block: ``{block name: output}``, names as
    ``vae_block_names``. Keep in step with ``encode`` / ``decode``."""
    vae_block_names(vae, part)   # checks ``part``
    out = {}
    x = jnp.asarray(inputs).astype(vae.dtype)
    if part == "encoder":
        enc = vae.encoder
        x = out["encoder.conv_in"] = enc.conv_in(x)
        for i, block in enumerate(enc.down_blocks):
            x = out[f"encoder.down_blocks.{i}"] = block(x)
        x = out["encoder.mid_block"] = enc.mid_block(x)
        x = out["encoder.conv_norm_out"] = enc.conv_norm_out(x)
        x = out["encoder.conv_out"] = enc.conv_out(enc.act(x))
        if vae.quant_conv is not None:
            out["quant_conv"] = vae.quant_conv(x)
        return out
    dec = vae.decoder
    if vae.post_quant_conv is not None:
        x = out["post_quant_conv"] = vae.post_quant_conv(x)
    x = out["decoder.conv_in"] = dec.conv_in(x)
    x = out["decoder.mid_block"] = dec.mid_block(x)
    for i, block in enumerate(dec.up_blocks):
        x = out[f"decoder.up_blocks.{i}"] = block(x)
    x = out["decoder.conv_norm_out"] = dec.conv_norm_out(x)
    out["decoder.conv_out"] = dec.conv_out(dec.act(x))
    return out
