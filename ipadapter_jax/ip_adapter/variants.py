"""The IP-Adapter variants: one ``Variant`` entry each, the one place that
knows what a variant is.

An entry says how to recognise the variant from an official file's
``image_proj`` keys, which projection module it uses and with which
hyper-parameters (read off the weights' shapes), what the projection takes as
input, what its default negative ("uncond") input is, whether its files carry
LoRA, and how to build a fresh one for training. Adding a variant is adding an
entry to ``VARIANTS``.

The same file says what the official adapters are made for (``base_model``, from ``ipadapter_jax.families``:
SD 1.x / 2.x / SDXL by their cross-attention layers; ``IMAGE_ENCODERS``: the
ViT-H and bigG encoders by their output widths), so that a wrong pairing is
refused naming both sides and what to use instead.

Detection follows diffusers' order of checks (``_convert_ip_adapter_image_proj_to_diffusers``):
the first entry whose ``marker`` key is present wins.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np
from flax import nnx

from ipadapter_jax.families import Family, of_token_dim
from ipadapter_jax.io.errors import BadArgument, Incompatible
from ipadapter_jax.io.files import CheckpointError
from ipadapter_jax.ip_adapter.image_proj import (FaceIDPlusModel, FaceIDProjModel, ImageProjModel, MLPProjModel,
                                                 Resampler)

# What a projection takes (``Variant.input_kind``):
IMAGE_EMBEDS = "image_embeds"                      # CLIP image_embeds [B, D]
HIDDEN_STATES = "hidden_states"                    # CLIP hidden_states[-2] [B, tokens, D]
FACE_ID = "face_id"                                # InsightFace ID embedding [B, 512]
FACE_ID_AND_HIDDEN = "face_id+hidden_states"       # ID embedding + the face crop's hidden_states[-2]

_LAYERS = re.compile(r"^(?:perceiver_resampler\.)?layers\.(\d+)\.")


def _depth(sp: dict) -> int:
    found = {int(m.group(1)) for k in sp if (m := _LAYERS.match(k))}
    return max(found) + 1 if found else 0


def _base_hparams(sp: dict) -> dict:
    c = sp["norm.weight"].shape[0]
    return dict(embed_dim=sp["proj.weight"].shape[1], cross_attention_dim=c,
                num_tokens=sp["proj.weight"].shape[0] // c)


def _full_face_hparams(sp: dict) -> dict:
    return dict(embed_dim=sp["proj.0.weight"].shape[1], cross_attention_dim=sp["proj.3.weight"].shape[0])


def _faceid_hparams(sp: dict) -> dict:
    c = sp["norm.weight"].shape[0]
    id_dim = sp["proj.0.weight"].shape[1]
    return dict(id_embed_dim=id_dim, cross_attention_dim=c, num_tokens=sp["proj.2.weight"].shape[0] // c,
                mult=sp["proj.0.weight"].shape[0] // id_dim)


def _faceid_plus_hparams(sp: dict) -> dict:
    return dict(_faceid_hparams(sp), clip_embed_dim=sp["perceiver_resampler.proj_in.weight"].shape[1],
                depth=_depth(sp), heads=sp["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] // 64)


def _plus_hparams(sp: dict) -> dict:
    dim = sp["latents"].shape[2]
    return dict(dim=dim, depth=_depth(sp), dim_head=64, heads=sp["layers.0.0.to_q.weight"].shape[0] // 64,
                num_queries=sp["latents"].shape[1], embedding_dim=sp["proj_in.weight"].shape[1],
                output_dim=sp["proj_out.weight"].shape[0], ff_mult=sp["layers.0.1.1.weight"].shape[0] // dim)


def _new_base(token_dim: int, encoder_config, num_tokens: int, rngs: nnx.Rngs, *, width: int = 0) -> nnx.Module:
    if width:
        raise BadArgument(f"the base adapter's projection has no inner width to set (got {width})")
    return ImageProjModel(encoder_config.projection_dim, token_dim, num_tokens, rngs=rngs)


def _new_plus(token_dim: int, encoder_config, num_tokens: int, rngs: nnx.Rngs, *, width: int = 0) -> nnx.Module:
    # The official Plus recipe: depth 4, 64-wide heads, dim = the UNet's token width, or
    # narrower (``width``; the official SDXL Plus recipe: dim 1280, 20 heads -> 2048).
    dim = width or token_dim
    return Resampler(dim=dim, depth=4, dim_head=64, heads=max(dim // 64, 1), num_queries=num_tokens,
                     embedding_dim=encoder_config.hidden_size, output_dim=token_dim, rngs=rngs)


def _new_full_face(token_dim: int, encoder_config, num_tokens: int, rngs: nnx.Rngs, *,
                   width: int = 0) -> nnx.Module:
    # One token per CLIP hidden state (257 for ViT-H/14 at 224 px): ``num_tokens`` does not apply.
    if width:
        raise BadArgument(f"the full-face adapter's projection has no inner width to set (got {width})")
    return MLPProjModel(encoder_config.hidden_size, token_dim, rngs=rngs)


# InsightFace's ``normed_embedding`` (buffalo_l / antelopev2): what every official FaceID adapter takes.
ID_EMBED_DIM = 512


def _new_faceid(token_dim: int, encoder_config, num_tokens: int, rngs: nnx.Rngs, *, width: int = 0) -> nnx.Module:
    # The official MLPProjModel of tutorial_train_faceid.py: Linear(512, 1024), GELU, Linear(1024, T x C), LayerNorm.
    if width:
        raise BadArgument(f"the FaceID adapter's projection has no inner width to set (got {width})")
    return FaceIDProjModel(ID_EMBED_DIM, token_dim, num_tokens, mult=2, rngs=rngs)


def _new_faceid_plus(token_dim: int, encoder_config, num_tokens: int, rngs: nnx.Rngs, *,
                     width: int = 0) -> nnx.Module:
    # The official ProjPlusModel: the FaceID MLP, then a depth-4 perceiver (64-wide heads) over the
    # face crop's CLIP hidden states.
    if width:
        raise BadArgument(f"the FaceID-Plus adapter's projection has no inner width to set (got {width})")
    return FaceIDPlusModel(id_embed_dim=ID_EMBED_DIM, cross_attention_dim=token_dim,
                           clip_embed_dim=encoder_config.hidden_size, num_tokens=num_tokens, depth=4, dim_head=64,
                           heads=max(token_dim // 64, 1), mult=2, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One IP-Adapter variant.

    name: ``IPAdapter.variant``.
    marker: the ``image_proj`` key (without prefix) that identifies it.
    projection: the projection module class.
    hparams: ``image_proj`` weights -> the projection's constructor kwargs.
    input_kind: what the projection takes (``IMAGE_EMBEDS``, ``HIDDEN_STATES``, ...).
    negative: the default negative input: ``"zeros"`` (zero embeddings) or
      ``"zero_pixels"`` (the image encoder run on zero pixels).
    lora: its official files carry LoRA on every attention layer (FaceID).
    files: the official files it covers.
    new: builds a fresh projection for training ``(token_dim, encoder_config,
      num_tokens, rngs)``, or None where training one is not offered.
    """

    name: str
    marker: str
    projection: type
    hparams: Callable[[dict], dict]
    input_kind: str
    negative: str
    lora: bool
    files: str
    # (token_dim, image encoder config, num_tokens, rngs, *, width=0) -> a fresh projection, for
    # training; ``width``: the projection's inner width where it has one (0: its default).
    new: Callable | None = None

    def build(self, hparams: dict, rngs: nnx.Rngs) -> nnx.Module:
        """The projection module for these hyper-parameters (random weights)."""
        return self.projection(**hparams, rngs=rngs)

    @property
    def embed_rank(self) -> int:
        """Rank of the embeddings the projection takes: [B, tokens, D] or [B, D]."""
        return 3 if self.input_kind == HIDDEN_STATES else 2

    @property
    def takes_face_crop(self) -> bool:
        """It also takes the CLIP hidden states of the face crop (FaceID-Plus)."""
        return self.input_kind == FACE_ID_AND_HIDDEN

    @property
    def needs_face_id(self) -> bool:
        return self.input_kind in (FACE_ID, FACE_ID_AND_HIDDEN)

    @property
    def encoder_output(self) -> str | None:
        """What the CLIP image encoder must output for it (None: no CLIP input)."""
        if self.input_kind == IMAGE_EMBEDS:
            return "image_embeds"
        return None if self.input_kind == FACE_ID else "hidden_states"


# In diffusers' order of checks.
VARIANTS: tuple[Variant, ...] = (
    Variant("base", "proj.weight", ImageProjModel, _base_hparams, IMAGE_EMBEDS, "zeros", False,
            "ip-adapter_sd15, ip-adapter_sd15_light, ip-adapter_sd15_vit-G, ip-adapter_sdxl, ip-adapter_sdxl_vit-h",
            new=_new_base),
    Variant("full-face", "proj.3.weight", MLPProjModel, _full_face_hparams, HIDDEN_STATES, "zero_pixels", False,
            "ip-adapter-full-face_sd15", new=_new_full_face),
    Variant("faceid-plus", "perceiver_resampler.proj_in.weight", FaceIDPlusModel, _faceid_plus_hparams,
            FACE_ID_AND_HIDDEN, "zeros", True,
            "ip-adapter-faceid-plus_sd15, ip-adapter-faceid-plusv2_sd15, ip-adapter-faceid-plusv2_sdxl",
            new=_new_faceid_plus),
    Variant("faceid", "norm.weight", FaceIDProjModel, _faceid_hparams, FACE_ID, "zeros", True,
            "ip-adapter-faceid_sd15, ip-adapter-faceid-portrait_sd15, ip-adapter-faceid_sdxl, "
            "ip-adapter-faceid-portrait_sdxl", new=_new_faceid),
    Variant("plus", "latents", Resampler, _plus_hparams, HIDDEN_STATES, "zero_pixels", False,
            "ip-adapter-plus_sd15, ip-adapter-plus-face_sd15, ip-adapter-plus_sdxl_vit-h, "
            "ip-adapter-plus-face_sdxl_vit-h", new=_new_plus),
)
BY_NAME = {v.name: v for v in VARIANTS}


# --------------------------------------------------------------------------- what adapters are made for
# Official adapters fit one base model (its cross-attention layers) and one image
# encoder (its output widths); a wrong pairing is refused naming both sides.

def base_model(token_dim: int) -> Family | None:
    """The base-model family whose UNet takes tokens of this width (SD 1.x 768,
    SD 2.x 1024, SDXL 2048: the widths alone tell the families apart; None: not a known one)."""
    return of_token_dim(token_dim)


class BaseModelMismatch(Incompatible, CheckpointError):
    """An adapter made for another base model than the UNet's (an ``Incompatible``
    pairing; also a ``CheckpointError``, which it was before)."""


def base_model_mismatch(source: str, adapter_layers: int, adapter_dim: int, unet_layers: int,
                        unet_dim: int) -> str:
    """The message for an adapter whose cross-attention layers (count, token
    width) are not the UNet's: both sides, their base model families, and what
    to use instead."""
    mine, theirs = base_model(adapter_dim), base_model(unet_dim)
    if mine and theirs and mine is not theirs:
        return (f"{source}: this is an {mine.title} adapter ({adapter_layers} cross-attention layers of width "
                f"{adapter_dim}) but the UNet is {theirs.title} ({unet_layers} cross-attention layers of width "
                f"{unet_dim}). Use an {theirs.title} adapter ({theirs.adapters}) with this model, or an "
                f"{mine.title} model with this adapter.")
    name = lambda b: f" ({b.title})" if b else " (no known base model)"
    return (f"{source}: this adapter has {adapter_layers} cross-attention layers of width {adapter_dim}"
            f"{name(mine)}; the UNet has {unet_layers} of width {unet_dim}{name(theirs)}. Use the adapter made "
            "for this base model.")


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """An official image encoder: the widths of what it outputs and the
    h94/IP-Adapter folder it ships in."""

    name: str
    folder: str
    image_embeds: int       # projected CLS (base adapters)
    hidden_states: int      # penultimate layer (Plus, full-face, FaceID-Plus)

    def width(self, output: str) -> int:
        return self.image_embeds if output == "image_embeds" else self.hidden_states


IMAGE_ENCODERS: tuple[ImageEncoder, ...] = (
    ImageEncoder("OpenCLIP ViT-H/14", "models/image_encoder", 1024, 1280),
    ImageEncoder("OpenCLIP ViT-bigG/14", "sdxl_models/image_encoder", 1280, 1664),
)


def image_encoder_for(output: str, width: int) -> ImageEncoder | None:
    """The official encoder whose ``output`` ("image_embeds" / "hidden_states")
    has this width (None: not an official one)."""
    return next((e for e in IMAGE_ENCODERS if e.width(output) == width), None)


def encoder_mismatch(variant: str, output: str, expected: int, got: int, what: str = "got") -> str:
    """The message for CLIP features of the wrong width: both widths, the encoders
    they come from, and which encoder folder to use."""
    def named(width):
        encoder = image_encoder_for(output, width)
        return f"{width} ({encoder.name}, {encoder.folder})" if encoder else str(width)

    message = f"this {variant!r} IP-Adapter takes CLIP {output} of width {named(expected)}, {what} {named(got)}"
    needed = image_encoder_for(output, expected)
    if needed:
        return message + f": encode the reference images with {needed.folder} ({needed.name})"
    return message + ": was it encoded by the image encoder this adapter was trained with?"


def get(name: str) -> Variant:
    """The registry entry of ``name``; a clear error for unknown names."""
    if name not in BY_NAME:
        raise BadArgument(f"unknown IP-Adapter variant {name!r}; expected one of {sorted(BY_NAME)}")
    return BY_NAME[name]


def detect(image_proj: dict[str, np.ndarray], source: str = "IP-Adapter") -> tuple[Variant, dict]:
    """Variant and projection hyper-parameters from the ``image_proj`` weights
    (keys without the ``image_proj.`` prefix)."""
    for variant in VARIANTS:
        if variant.marker in image_proj:
            try:
                return variant, variant.hparams(image_proj)
            except KeyError as e:
                raise CheckpointError(f"{source}: image_proj lacks {e.args[0]!r}, which its other keys imply "
                                      f"(a {variant.name!r} adapter)") from None
    raise CheckpointError(f"{source}: unknown image_proj key layout (keys like {sorted(image_proj)[:6]}); expected "
                          f"one of the official variants ({', '.join(v.name for v in VARIANTS)})")
