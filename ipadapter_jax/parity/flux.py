"""Parity of a FLUX folder (and an XLabs IP-Adapter) against diffusers: the
reference pass first (diffusers' ``FluxPipeline`` + ``load_ip_adapter``,
float32; every block's inputs and outputs captured as numpy), then ours per
dtype, each side freed before the next loads, into the same ``Result`` the
SD toolkit reports (``parity.report``: Markdown, JSON, plot).

Components: CLIP's pooled text, T5's tokens, the image encoder's embeddings,
the adapter's projection, the transformer at a mid-schedule noise level
(each double- and single-stream block fed the reference block's inputs, so
an error names its block), the VAE's decode; then the trajectory: both
sampling loops from the same noise, step by step, and the decoded image.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.ip_adapter.flux import flux_image_prompt
from ipadapter_jax.parity.capture import capture, to_numpy
from ipadapter_jax.parity.metrics import Figure, figure
from ipadapter_jax.parity.run import Result, free
from ipadapter_jax.pipeline.flux import latent_image_ids, pack_latents, unpack_latents
from ipadapter_jax.pipeline.prompts import ImagePromptSpec

SIGMA = 0.5   # the components' noise level: mid-schedule


@dataclasses.dataclass
class FluxRequest:
    prompt: str = ""
    height: int | None = None
    width: int | None = None
    steps: int = 10
    guidance: float = 3.5
    seed: int = 0
    scale: float = 1.0
    images: Sequence[str] = ()
    max_sequence_length: int = 512


def _reference(load: Callable, req: FluxRequest, height: int, width: int) -> dict:
    """The diffusers side: every compared output (numpy), then the pipeline is freed."""
    import torch

    pipe = load()
    out: dict = {}
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(req.prompt, req.prompt, max_sequence_length=req.max_sequence_length)
        out["t5"], out["pooled"] = to_numpy(prompt_embeds), to_numpy(pooled)
        tf = pipe.transformer
        ip = getattr(tf, "encoder_hid_proj", None) is not None and req.images
        lh, lw = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
        rng = np.random.default_rng(req.seed)
        noise = rng.standard_normal((1, lh, lw, tf.config.in_channels // 4)).astype(np.float32)
        out["noise"] = noise
        kwargs = {}
        if ip:
            from PIL import Image

            embeds = pipe.encode_image([Image.open(p).convert("RGB") for p in req.images], "cpu", 1)
            embeds = embeds[0] if isinstance(embeds, tuple) else embeds
            out["image_embeds"] = to_numpy(embeds)
            tokens = tf.encoder_hid_proj([embeds[None]])
            out["tokens"] = to_numpy(tokens[0])
            kwargs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": [embeds[None]]}
            pipe.set_ip_adapter_scale(req.scale)
        x = torch.from_numpy(np.asarray(pack_latents(noise)))
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3)
        img_ids = torch.from_numpy(latent_image_ids(lh, lw))
        guidance = torch.full((1,), req.guidance) if tf.config.guidance_embeds else None
        names = [f"transformer_blocks.{i}" for i in range(len(tf.transformer_blocks))] + \
                [f"single_transformer_blocks.{i}" for i in range(len(tf.single_transformer_blocks))]
        with capture(tf, names) as blocks:
            pred = tf(hidden_states=x, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                      timestep=torch.full((1,), SIGMA), img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                      return_dict=False, **{k: dict(v) for k, v in kwargs.items()})[0]
        out["transformer"], out["blocks"] = to_numpy(pred), dict(blocks)
        latents = torch.from_numpy(np.asarray(pack_latents(noise)))
        dec_in = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
        out["vae"] = to_numpy(pipe.vae.decode(dec_in / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                              return_dict=False)[0]).transpose(0, 2, 3, 1)
        steps = []
        call = dict(prompt=req.prompt, height=height, width=width, num_inference_steps=req.steps,
                    guidance_scale=req.guidance, latents=latents, max_sequence_length=req.max_sequence_length,
                    output_type="latent", return_dict=False,
                    callback_on_step_end=lambda p, i, t, kw: steps.append(to_numpy(kw["latents"])) or {})
        if ip:
            from PIL import Image

            call["ip_adapter_image"] = [Image.open(p).convert("RGB") for p in req.images]
        final = pipe(**call)[0]
        out["steps"] = steps
        out["image"] = to_numpy(pipe.vae.decode(torch.from_numpy(np.asarray(unpack_latents(to_numpy(final), lh, lw)))
                                                .permute(0, 3, 1, 2) / pipe.vae.config.scaling_factor
                                                + pipe.vae.config.shift_factor, return_dict=False)[0])
        out["image"] = np.clip(out["image"].transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
        out["latent_size"] = (lh, lw)
    del pipe
    free()
    return out


def _block_figures(pipe, ref: dict, prompt) -> list[Figure]:
    """Each of our transformer blocks on the reference block's captured inputs."""
    tf = pipe.transformer
    figures = []
    for name, c in ref["blocks"].items():
        kind, index = name.split(".")
        index = int(index)
        kw = c.kwargs
        rope = tuple(jnp.asarray(r) for r in kw["image_rotary_emb"])
        temb = jnp.asarray(kw["temb"])
        x = jnp.asarray(kw["hidden_states"])
        ctx = jnp.asarray(kw["encoder_hidden_states"])
        ip = ((pipe.ip_adapters[0], prompt),) if prompt is not None else ()
        if kind == "transformer_blocks":
            block = tf.transformer_blocks[index]
            out_fn = None
            if ip:
                out_fn = lambda q, i=index: ip[0][0].attend("double", i, q, ip[0][1])  # noqa: E731
            new_ctx, new_x = block(x.astype(tf.dtype), ctx.astype(tf.dtype), temb, rope, ip_out=out_fn)
            actual = [np.asarray(new_ctx, np.float32), np.asarray(new_x, np.float32)]
        else:
            block = tf.single_transformer_blocks[index]
            h = block(jnp.concatenate([ctx, x], axis=1).astype(tf.dtype), temb, rope)
            text = ctx.shape[1]
            actual = [np.asarray(h[:, :text], np.float32), np.asarray(h[:, text:], np.float32)]
        figures.append(figure(name, actual, c.output))
    return figures


def _ours(load: Callable, dtype: str, req: FluxRequest, ref: dict, height: int, width: int) -> Result:
    pipe = load(dtype)
    result = Result(dtype)
    context, pooled = pipe.encode_prompt([req.prompt], req.max_sequence_length)
    result.components.append((figure("text_encoder (CLIP pooled)", pooled, ref["pooled"]), []))
    result.components.append((figure("text_encoder_2 (T5)", context, ref["t5"]), []))
    tf = pipe.transformer
    prompt = None
    if "image_embeds" in ref and pipe.ip_adapters:
        embeds = pipe.encode_images(list(req.images))
        result.components.append((figure("image_encoder", embeds, ref["image_embeds"]), []))
        adapter = pipe.ip_adapters[0]
        tokens = np.asarray(adapter.project(ref["image_embeds"].reshape(-1, adapter.input_dim)))
        result.components.append((figure("image_proj", tokens, ref["tokens"].reshape(tokens.shape)), []))
        prompt = flux_image_prompt(adapter, jnp.asarray(ref["tokens"])[:, None] if ref["tokens"].ndim == 3
                                   else jnp.asarray(ref["tokens"]), req.scale)
    lh, lw = ref["latent_size"]
    rope = tf.rope(np.zeros((ref["t5"].shape[1], 3), np.float32), latent_image_ids(lh, lw))
    guidance = np.full((1,), req.guidance, np.float32) if tf.config.guidance_embeds else None
    ip = ((pipe.ip_adapters[0], prompt),) if prompt is not None else ()
    pred = tf(pack_latents(ref["noise"]), ref["t5"], ref["pooled"], np.full((1,), SIGMA, np.float32), rope,
              guidance, ip=ip)
    result.components.append((figure("transformer", pred, ref["transformer"]), _block_figures(pipe, ref, prompt)))
    result.components.append((figure("vae (decode)", np.asarray(pipe._vae_decode(
        jnp.asarray(ref["noise"]) / pipe.vae.scaling_factor + (pipe.vae.config.shift_factor or 0.0))),
        ref["vae"]), []))
    steps: list = []
    specs = [ImagePromptSpec(images=list(req.images), scale=req.scale)] if prompt is not None else []
    out = pipe(req.prompt, ip_adapter_prompts=specs, num_inference_steps=req.steps, guidance_scale=req.guidance,
               height=height, width=width, latents=ref["noise"], max_sequence_length=req.max_sequence_length,
               allow_nonfinite=True, on_step=lambda x: steps.append(np.asarray(x)))
    result.trajectory = [figure(f"step {i + 1}", a, e) for i, (a, e) in enumerate(zip(steps, ref["steps"]))]
    result.image = figure("image", out.images, ref["image"])
    del pipe
    free()
    return result


def compare_flux(load_reference: Callable, load_ours: Callable[[str], object], req: FluxRequest,
                 dtypes: Sequence[str] = ("float32",), *, height: int, width: int) -> list[Result]:
    """The reference pass, then ours for each dtype (see the module docstring)."""
    ref = _reference(load_reference, req, height, width)
    return [_ours(load_ours, dtype, req, ref, height, width) for dtype in dtypes]
