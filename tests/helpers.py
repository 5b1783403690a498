"""Helpers the test modules import (``from helpers import rel_err, ...``):
error metrics, NHWC <-> NCHW conversion, weight-file comparison, and per-block
outputs of the UNet / VAE on both sides, so that an end-to-end parity failure
names the first block where JAX and diffusers part ways."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np


# XLA:CPU compiler settings of the test run (tests/conftest.py sets them; BENCHMARKS.md, "Test suite time").
# The tests' models are tiny, so their time goes to compiling, most of it in LLVM's optimisation of the
# generated loops, not to running: at LLVM level 0 with XLA's expensive LLVM passes off the tests take less
# time (tests/test_train_step.py alone 113 -> 91 s). XLA builds the same programs (HLO, fusions, library calls
# for the matmuls and convolutions); the generated loops round differently at the last bits, and every parity
# bound holds unchanged. IPADAPTER_JAX_TEST_XLA_FLAGS="" runs the suite with XLA's defaults.
TEST_XLA_FLAGS = os.environ.get("IPADAPTER_JAX_TEST_XLA_FLAGS",
                                "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def cpu_env(devices: int | None = None, *, xla_defaults: bool = False) -> dict:
    """The environment of a subprocess test: this run's environment (its
    compilation cache and XLA settings, tests/conftest.py) on CPU, with
    ``devices`` virtual CPU devices (XLA's default of one when None) and,
    with ``xla_defaults``, XLA's default compiler settings instead of the
    test run's (``TEST_XLA_FLAGS``)."""
    drop = set(TEST_XLA_FLAGS.split()) if xla_defaults else set()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform") and f not in drop]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def saved_diffusers(tmp_path_factory, name: str, class_name: str, config: dict, *, seed: int = 0):
    """A random diffusers ``class_name(**config)`` (seeded) saved to a fresh temp folder
    ``name``, the way users' model folders look; returns the folder."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    folder = tmp_path_factory.mktemp(name)
    getattr(diffusers, class_name)(**config).save_pretrained(folder)
    return folder


def nchw(x: np.ndarray):
    """NHWC numpy -> NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t) -> np.ndarray:
    """NCHW torch tensor -> NHWC numpy."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def assert_same_weights_file(a, b) -> None:
    """Two safetensors files hold the same keys with bit-identical tensors."""
    from safetensors.numpy import load_file

    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


# --------------------------------------------------------------------------- block outputs
#
# Block names are diffusers' submodule names (``down_blocks.1``, ``mid_block``,
# ``decoder.up_blocks.0``); the same name means the same tensor on both sides.
# A block's output is its first output where it returns several (a diffusers
# down block returns (hidden_states, res_samples), ours (x, skips)).


def unet_block_names(unet) -> list[str]:
    """The UNet's blocks in forward order; ``unet`` is a diffusers or a JAX UNet."""
    names = ["time_embedding", "conv_in"] + [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))] + ["conv_out"]


def vae_block_names(vae, part: str) -> list[str]:
    """The VAE's ``"encoder"`` or ``"decoder"`` blocks (with the quant convs) in
    forward order; ``vae`` is a diffusers or a JAX AutoencoderKL."""
    if part == "encoder":
        enc = vae.encoder
        names = ["encoder.conv_in"] + [f"encoder.down_blocks.{i}" for i in range(len(enc.down_blocks))]
        names += ["encoder.mid_block", "encoder.conv_out"]
        return names + (["quant_conv"] if vae.quant_conv is not None else [])
    if part == "decoder":
        dec = vae.decoder
        names = ["post_quant_conv"] if vae.post_quant_conv is not None else []
        names += ["decoder.conv_in", "decoder.mid_block"]
        names += [f"decoder.up_blocks.{i}" for i in range(len(dec.up_blocks))]
        return names + ["decoder.conv_out"]
    raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")


def _torch_output_as_nhwc(output) -> np.ndarray:
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "sample"):
        output = output.sample
    array = output.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.transpose(array, (0, 2, 3, 1)) if array.ndim == 4 else array)


@contextlib.contextmanager
def capture_torch_blocks(module, names):
    """Forward hooks on ``module.get_submodule(name)`` for each name. Yields a
    dict that the forward passes run inside the block fill with
    ``{name: output as NHWC numpy}`` (the last call of each block). Only these
    copies are kept, never the modules' inputs or autograd state; the hooks
    are removed on exit."""
    captured: dict[str, np.ndarray] = {}

    def hook(name):
        def record(_module, _inputs, output):
            captured[name] = _torch_output_as_nhwc(output)
        return record

    handles = [module.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def block_outputs_torch(module, names, *inputs, **kwargs):
    """``module(*inputs, **kwargs)`` under no_grad with the blocks ``names``
    captured: returns (result, {name: NHWC numpy output})."""
    import torch

    with torch.no_grad(), capture_torch_blocks(module, names) as captured:
        result = module(*inputs, **kwargs)
    return result, captured


def unet_block_outputs(unet, sample, timesteps, conditioning, *, jit: bool = False) -> dict:
    """Run a JAX ``UNet2DConditionModel`` block by block, in the order of its
    ``__call__``, and return ``{block name: output}`` (names as
    ``unet_block_names``; ``conv_out`` is the prediction). ``conditioning`` is
    the text context or a ``UNetConditioning``. ``jit=True`` compiles the whole
    run once (for the full-size UNet) instead of running it op by op.

    Keep in step with ``UNet2DConditionModel.__call__``; the tests check that
    ``conv_out`` here equals the model's own output.
    """
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.models import layers

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
    emb = out["time_embedding"] = unet.time_conditioning(timesteps, sample.shape[0], cond.added_cond)
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
    x = unet.conv_out(layers.activation(cfg.act_fn)(unet.conv_norm_out(x)))
    out["conv_out"] = x.astype(jnp.float32)
    return out


def vae_block_outputs(vae, part: str, inputs) -> dict:
    """Run a JAX ``AutoencoderKL``'s encoder (``inputs`` = images) or decoder
    (``inputs`` = latents) block by block: ``{block name: output}``, names as
    ``vae_block_names``. Keep in step with ``encode`` / ``decode``."""
    import jax.numpy as jnp

    out = {}
    x = jnp.asarray(inputs).astype(vae.dtype)
    if part == "encoder":
        enc = vae.encoder
        x = out["encoder.conv_in"] = enc.conv_in(x)
        for i, block in enumerate(enc.down_blocks):
            x = out[f"encoder.down_blocks.{i}"] = block(x)
        x = out["encoder.mid_block"] = enc.mid_block(x)
        x = out["encoder.conv_out"] = enc.conv_out(enc.act(enc.conv_norm_out(x)))
        if vae.quant_conv is not None:
            out["quant_conv"] = vae.quant_conv(x)
        return out
    if part == "decoder":
        dec = vae.decoder
        if vae.post_quant_conv is not None:
            x = out["post_quant_conv"] = vae.post_quant_conv(x)
        x = out["decoder.conv_in"] = dec.conv_in(x)
        x = out["decoder.mid_block"] = dec.mid_block(x)
        for i, block in enumerate(dec.up_blocks):
            x = out[f"decoder.up_blocks.{i}"] = block(x)
        out["decoder.conv_out"] = dec.conv_out(dec.act(dec.conv_norm_out(x)))
        return out
    raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")


def block_errors(jax_outputs: dict, torch_outputs: dict) -> dict[str, float]:
    """{name: rel err} over the JAX blocks in order (inf on a shape mismatch,
    nan where torch has no output of that name)."""
    errors = {}
    for name, actual in jax_outputs.items():
        actual = np.asarray(actual)
        expected = torch_outputs.get(name)
        if expected is None:
            errors[name] = math.nan
        elif actual.shape != expected.shape:
            errors[name] = math.inf
        else:
            errors[name] = rel_err(actual, expected)
    return errors


def first_divergence(jax_outputs: dict, torch_outputs: dict, bound: float) -> str:
    """A failure message naming the first block (in forward order) whose
    output differs from diffusers' by a relative error above ``bound``,
    followed by every block's relative error."""
    errors = block_errors(jax_outputs, torch_outputs)
    first = next((name for name, err in errors.items() if not err <= bound), None)
    if first is None:
        head = (f"no block output differs by more than {bound:g}: the divergence comes after the last "
                "captured block or only shows in the final output")
    elif math.isnan(errors[first]):
        head = f"first divergence at {first}: no torch output captured under that name"
    elif math.isinf(errors[first]):
        head = (f"first divergence at {first}: shape {tuple(np.shape(jax_outputs[first]))} "
                f"(NHWC) vs torch {tuple(torch_outputs[first].shape)}")
    else:
        head = f"first divergence at {first} (rel err {errors[first]:.3e} > {bound:g})"
    missing = [name for name in torch_outputs if name not in jax_outputs]
    tail = f"; torch-only blocks: {missing}" if missing else ""
    return head + "\nper-block rel err: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()) + tail
