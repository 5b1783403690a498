"""Our blocks, run on the reference's inputs or block by block.

``run_captured`` calls one of our blocks with the inputs the diffusers /
transformers block of the same name received (``capture.Captured``), so each
block is measured on its own: an error in ``down_blocks.1`` does not show up
again in every later block. ``block_figures`` does it for every captured
block: the diagnosis of ``ipadapter-parity`` and of the tests' parity checks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.parity.capture import Captured, nhwc
from ipadapter_jax.parity.metrics import Figure, figure
from ipadapter_jax.parity.names import get_submodule


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


def block_figures(root, blocks: dict[str, Captured], env: BlockInputs | None = None,
                  on_block: Callable[[], None] = lambda: None) -> list[Figure]:
    """Each captured reference block (``capture.capture``) run on our ``root``
    model's block of the same name, fed the reference block's inputs: one
    ``Figure`` per block, in the captured (forward) order. A block that cannot
    be lined up (missing on our side, another signature) is an inf figure
    saying why."""
    env = env or BlockInputs()
    figures = []
    for name, captured in blocks.items():
        try:
            ours = run_captured(submodule(root, name), captured, env)
            figures.append(figure(name, ours, captured.output))
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            figures.append(Figure(name, float("inf"), float("inf"), f"{type(e).__name__}: {e}"))
        on_block()
    return figures
