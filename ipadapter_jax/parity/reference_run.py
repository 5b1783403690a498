"""The reference pass: every component of the diffusers pipeline run once on
the parity run's inputs, its named blocks' inputs and outputs captured, and
the sampling trajectory recorded step by step. Everything kept is numpy (NHWC
for feature maps), so the pipeline is freed before our side loads."""

from __future__ import annotations

import dataclasses

import numpy as np

from ipadapter_jax.parity import names as block_names
from ipadapter_jax.parity.capture import Captured, capture, flat_outputs, nhwc


@dataclasses.dataclass
class Row:
    """One component's reference outputs, the captured blocks (forward order)
    and the inputs our side is given (numpy, our layout)."""

    outputs: list
    blocks: dict[str, Captured]
    inputs: dict
    note: str = ""


def _nchw(x: np.ndarray):
    import torch

    x = np.asarray(x, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x))


def _run(module, names, fn):
    import torch

    with torch.no_grad(), capture(module, names) as captured:
        out = fn()
    return out, dict((n, captured[n]) for n in names if n in captured)


def text_rows(pipe, prompt: str, depth: int) -> dict[str, Row]:
    """Each text encoder on the prompt's token ids: [last hidden state,
    penultimate hidden state] and the pooled output as a row of its own."""
    rows = {}
    for slot in ("text_encoder", "text_encoder_2"):
        encoder, tokenizer = getattr(pipe, slot, None), getattr(pipe, slot.replace("text_encoder", "tokenizer"), None)
        if encoder is None:
            continue
        text = pipe.maybe_convert_prompt(prompt, tokenizer) if hasattr(pipe, "maybe_convert_prompt") else prompt
        ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        names = block_names.clip_block_names(encoder, depth)
        out, blocks = _run(encoder, names, lambda: encoder(ids, output_hidden_states=True))
        pooled = getattr(out, "text_embeds", None)
        pooled = out.pooler_output if pooled is None else pooled
        inputs = {"ids": ids.numpy()}
        rows[slot] = Row(flat_outputs((out.last_hidden_state, out.hidden_states[-2])), blocks, inputs)
        rows[f"{slot}.pooled"] = Row(flat_outputs(pooled), {}, inputs)
    return rows


def conditioning(pipe, prompt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The pipeline's own text conditioning of the prompt: (context [1, L, C],
    pooled or None)."""
    import torch

    with torch.no_grad():
        out = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    pooled = out[2].numpy() if len(out) == 4 else None
    return out[0].numpy(), pooled


def image_encoder_row(pipe, pixels: np.ndarray, depth: int) -> Row:
    encoder = pipe.image_encoder
    names = block_names.clip_block_names(encoder, depth)
    out, blocks = _run(encoder, names, lambda: encoder(_nchw(pixels), output_hidden_states=True))
    return Row(flat_outputs((out.image_embeds, out.hidden_states[-2])), blocks, {"pixels": pixels})


def projection_input_kind(pipe, index: int) -> str:
    """What adapter ``index``'s diffusers projection takes: "image_embeds",
    "hidden_states", "face_id", or "" (not compared)."""
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[index]
    return {"ImageProjection": "image_embeds", "IPAdapterPlusImageProjection": "hidden_states",
            "IPAdapterFullImageProjection": "hidden_states",
            "IPAdapterFaceIDImageProjection": "face_id"}.get(type(layer).__name__, "")


def projection_input_width(pipe, index: int) -> int:
    """The input width of adapter ``index``'s projection (its first linear layer)."""
    import torch

    layer = pipe.unet.encoder_hid_proj.image_projection_layers[index]
    return next(m for m in layer.modules() if isinstance(m, torch.nn.Linear)).in_features


def projection_row(pipe, index: int, embeds: np.ndarray) -> Row:
    import torch

    layer = pipe.unet.encoder_hid_proj.image_projection_layers[index]
    with torch.no_grad():
        out = layer(torch.from_numpy(np.array(embeds)))   # a writable copy (the inputs may be memory-mapped)
    return Row(flat_outputs(out), {}, {"embeds": embeds})


def unet_row(pipe, inputs: dict, depth: int, image_embeds: list | None) -> Row:
    """The UNet on (sample, t, context, added conditioning); with
    ``image_embeds`` (one per adapter, [1, D] / [1, T, D]) at the pipeline's
    adapter scales, without them at scale 0 (diffusers' IP-Adapter UNet always
    takes image embeddings; a zero scale adds exact zeros)."""
    import torch

    unet = pipe.unet
    added = {}
    if inputs.get("added") is not None:
        added.update({k: torch.from_numpy(v) for k, v in inputs["added"].items()})
    n_adapters = len(unet.encoder_hid_proj.image_projection_layers) if unet.encoder_hid_proj is not None else 0
    if n_adapters:
        if image_embeds is None:
            pipe.set_ip_adapter_scale([0.0] * n_adapters)
            image_embeds = [np.zeros((1, *shape), np.float32) for shape in inputs["embed_shapes"]]
        added["image_embeds"] = [torch.from_numpy(np.array(e[:, None])) for e in image_embeds]
    names = block_names.unet_block_names(unet, depth)
    out, blocks = _run(unet, names, lambda: unet(_nchw(inputs["sample"]), torch.tensor(inputs["t"]),
                                                 encoder_hidden_states=torch.from_numpy(inputs["context"]),
                                                 added_cond_kwargs=added or None).sample)
    return Row(flat_outputs(out), blocks, dict(inputs))


def controlnet_rows(pipe, inputs: dict, control: list[np.ndarray], depth: int) -> dict[str, Row]:
    import torch

    nets = getattr(pipe, "controlnet", None)
    nets = [] if nets is None else list(getattr(nets, "nets", [nets]))
    rows = {}
    added = None if inputs.get("added") is None else {k: torch.from_numpy(v) for k, v in inputs["added"].items()}
    for i, (net, image) in enumerate(zip(nets, control)):
        names = block_names.controlnet_block_names(net, depth)
        out, blocks = _run(net, names, lambda net=net, image=image: net(
            _nchw(inputs["sample"]), torch.tensor(inputs["t"]), encoder_hidden_states=torch.from_numpy(
                inputs["context"]), controlnet_cond=_nchw(image), conditioning_scale=1.0,
            added_cond_kwargs=added, return_dict=False))
        rows[f"controlnet.{i}"] = Row(flat_outputs(out), blocks, dict(inputs, control=image))
    return rows


def vae_rows(pipe, images: np.ndarray, latents: np.ndarray, depth: int) -> dict[str, Row]:
    vae = pipe.vae
    names = block_names.vae_block_names(vae, "encoder", depth)
    dist, enc_blocks = _run(vae, names, lambda: vae.encode(_nchw(images)).latent_dist)
    names = block_names.vae_block_names(vae, "decoder", depth)
    dec, dec_blocks = _run(vae, names, lambda: vae.decode(_nchw(latents)).sample)
    return {"vae.encoder": Row(flat_outputs((dist.mean, dist.logvar)), enc_blocks, {"images": images}),
            "vae.decoder": Row(flat_outputs(dec), dec_blocks, {"latents": latents})}


def trajectory(pipe, call: dict, noise: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The pipeline's sampling loop from ``noise`` (unit variance, NHWC):
    (latents after every scheduler step, decoded image [1, H, W, 3] in [0, 1])."""
    import torch

    steps = []

    def record(_pipe, _i, _t, tensors):
        steps.append(nhwc(tensors["latents"].detach().float().numpy()))
        return tensors

    with torch.no_grad():
        out = pipe(**call, latents=_nchw(noise), output_type="latent", callback_on_step_end=record,
                   callback_on_step_end_tensor_inputs=["latents"])
        latents = out.images
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return steps, np.clip(nhwc(image.float().numpy()) / 2 + 0.5, 0.0, 1.0)
