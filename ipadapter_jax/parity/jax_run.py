"""Our side of a parity run: each component of our pipeline on the inputs the
reference pass recorded, its blocks on the reference blocks' own inputs
(``blocks.run_captured``), and the sampling trajectory step by step."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models import UNetConditioning
from ipadapter_jax.parity.reference_run import Row
from ipadapter_jax.pipeline.jitted import JittedModule


def _np(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def text_outputs(encoder, row: Row) -> tuple[list, list]:
    """(outputs as the reference row's, pooled) of one of our text encoders."""
    out = encoder(jnp.asarray(row.inputs["ids"], jnp.int32))
    pooled = out.text_embeds if out.text_embeds is not None else out.pooler_output
    return [_np(out.last_hidden_state), _np(out.hidden_states[-2])], [_np(pooled)]


def clip_mask(ids: np.ndarray):
    """The causal mask our text towers apply (``CLIPTextTransformer``)."""
    n = ids.shape[1]
    return jnp.tril(jnp.ones((n, n), bool))[None, None]


def image_encoder_outputs(encoder, row: Row) -> list:
    out = encoder(jnp.asarray(row.inputs["pixels"]))
    return [_np(out.image_embeds), _np(out.hidden_states[-2])]


def unet_outputs(unet, row: Row, prompts: tuple = ()) -> list:
    i = row.inputs
    cond = UNetConditioning(jnp.asarray(i["context"]), image_prompts=prompts, added_cond=i.get("added"))
    return [_np(unet(jnp.asarray(i["sample"]), jnp.asarray(i["t"]), cond))]


def controlnet_outputs(net, row: Row) -> list:
    i = row.inputs
    down, mid = net(jnp.asarray(i["sample"]), jnp.asarray(i["t"]), jnp.asarray(i["context"]),
                    jnp.asarray(i["control"]), 1.0, added_cond=i.get("added"))
    return [_np(d) for d in down] + [_np(mid)]


def vae_outputs(vae, rows: dict) -> dict[str, list]:
    """The VAE through jit: at full resolution its eager activations alone can
    pass the memory a full-size pipeline leaves."""
    dist = JittedModule(vae, "encode")(jnp.asarray(rows["vae.encoder"].inputs["images"]))
    decoded = JittedModule(vae, "decode")(jnp.asarray(rows["vae.decoder"].inputs["latents"]))
    return {"vae.encoder": [_np(dist.mean), _np(dist.logvar)], "vae.decoder": [_np(decoded)]}


def prepare_trajectory(pipe, call: dict, noise: np.ndarray):
    """Our pipeline's request for the sampling loop from ``noise`` (the
    encoders' part of the trajectory)."""
    return pipe.prepare(**call, latents=noise)


def trajectory(pipe, request) -> tuple[list[np.ndarray], np.ndarray]:
    """Our sampling loop on a prepared request, one step per call: (latents
    after every scheduler step, decoded image [1, H, W, 3] in [0, 1])."""
    steps = []
    final, _ = pipe.denoise(request, on_step=lambda latents: steps.append(_np(latents)))
    return steps, pipe.decode(final)
