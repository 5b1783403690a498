"""Reference images -> CLIP embeddings -> one adapter's image tokens.

* ``encode_image``: ``image_embeds`` (base adapters) or ``hidden_states[-2]``
  (Plus, full-face, the CLIP half of FaceID-Plus).
* ``prompt_tokens``: the tokens of the reference images and of the negative
  ("uncond") side for one adapter, with the variant's default negative
  (``Variant.negative``: zero embeddings, or the encoder on zero pixels), or a
  user-given negative image.
* ``save_embeds`` / ``load_embeds``: keep embeddings of big encoders on disk.

Face ID embeddings are inputs: compute them with InsightFace (``FaceAnalysis``,
``buffalo_l``; the ``normed_embedding`` of the detected face, 512 floats) and
pass the array; InsightFace is not a dependency of this package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, MissingFile
from ipadapter_jax.io.files import read_npy, read_state_dict, save_safetensors
from ipadapter_jax.io.images import preprocess
from ipadapter_jax.ip_adapter import variants
from ipadapter_jax.ip_adapter.combine import combine_embeds


def encode_image(image_encoder, pixels: np.ndarray, output: str = "image_embeds") -> np.ndarray:
    """Normalised NHWC pixels -> ``image_embeds`` [N, D] or ``hidden_states`` (the
    penultimate layer, no post-LN) [N, tokens, hidden]."""
    if output not in ("image_embeds", "hidden_states"):
        raise BadArgument(f"output must be 'image_embeds' or 'hidden_states', got {output!r}")
    result = image_encoder(jnp.asarray(pixels))
    return np.asarray(result.image_embeds if output == "image_embeds" else result.hidden_states[-2])


def prompt_tokens(adapter, *, image_encoder=None, images: Iterable | None = None, embeds=None,
                  face_embeds=None, negative_images: Iterable | None = None, negative_embeds=None,
                  combine: str = "concat", s_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of N reference images for one adapter, and of their negative.

    Give either ``images`` (encoded with ``image_encoder``) or precomputed
    ``embeds`` ([N, ...] in the adapter's input kind). FaceID variants take
    ``face_embeds`` [N, 512]; FaceID-Plus also the face crops as ``images`` (or
    their hidden states as ``embeds``). ``combine`` merges the N references
    (see ``combine.combine_embeds``). The negative side is ``negative_images``
    / ``negative_embeds`` when given, else the variant's default.

    Returns (cond, uncond), each [1, N', T, C] with N' = N for "concat", else 1.
    """
    spec = adapter.spec

    def encode(imgs):
        if image_encoder is None:
            raise BadArgument("pass image_encoder= to encode images (or precomputed embeds=)")
        check_image_encoder(adapter, image_encoder)
        # The encoder's own resolution (224 for the official encoders; the demo's is 64).
        size = getattr(getattr(image_encoder, "config", None), "image_size", 224)
        return encode_image(image_encoder, preprocess(list(imgs), size, size), spec.encoder_output)

    clip = None
    if spec.needs_face_id:
        if face_embeds is None:
            raise BadArgument(f"a {adapter.variant!r} IP-Adapter needs face_embeds (InsightFace ID embeddings)")
        ident = np.asarray(face_embeds, np.float32).reshape(-1, np.shape(face_embeds)[-1])
        if spec.input_kind == variants.FACE_ID_AND_HIDDEN:
            clip = np.asarray(embeds, np.float32) if embeds is not None else encode(images)
    else:
        ident = np.asarray(embeds, np.float32) if embeds is not None else encode(images)
    _check_finite(ident, "embeddings")

    if negative_embeds is not None or negative_images is not None:
        if spec.needs_face_id:
            raise BadArgument("FaceID negatives are zero ID embeddings; negative images do not apply")
        neg = np.asarray(negative_embeds, np.float32) if negative_embeds is not None else encode(negative_images)
        _check_finite(neg, "negative embeddings")
        if neg.shape[1:] != ident.shape[1:]:
            raise BadArgument(f"negative embeddings {neg.shape} do not match the references {ident.shape}")
        neg = np.broadcast_to(neg[:1], ident.shape) if neg.shape[0] == 1 else neg
    elif spec.negative == "zero_pixels":
        neg = np.repeat(zero_image_states(adapter, image_encoder, 1), ident.shape[0], axis=0)
    else:
        neg = np.zeros_like(ident)
    if neg.shape[0] != ident.shape[0]:
        raise BadArgument(f"{neg.shape[0]} negative embeddings for {ident.shape[0]} reference images")
    neg_clip = None if clip is None else zero_image_states(adapter, image_encoder, clip.shape[0])

    cond_in = np.asarray(combine_embeds(ident, combine))
    cond_clip = None if clip is None else np.asarray(combine_embeds(clip, combine))
    if combine != "concat":
        neg, neg_clip = neg[:1], (None if neg_clip is None else neg_clip[:1])
    cond = adapter.project(cond_in, cond_clip, s_scale=s_scale)
    uncond = adapter.project(neg, neg_clip, s_scale=s_scale)
    return np.asarray(cond)[None], np.asarray(uncond)[None]


def zero_image_states(adapter, image_encoder, n: int) -> np.ndarray:
    """The default negative of hidden-state variants: ``hidden_states[-2]`` of
    the encoder on zero (already normalised) pixels, [n, tokens, hidden]."""
    if image_encoder is None:
        raise BadArgument(f"the default negative of a {adapter.variant!r} IP-Adapter is the image encoder run on "
                         "zero pixels: pass image_encoder= or negative_embeds=")
    check_image_encoder(adapter, image_encoder)
    size = image_encoder.config.image_size
    return encode_image(image_encoder, np.zeros((n, size, size, 3), np.float32), "hidden_states")


def check_image_encoder(adapter, image_encoder) -> None:
    """Refuse, before running it, an image encoder whose output does not have the
    width the adapter takes (e.g. the SDXL bigG encoder for a ViT-H adapter),
    naming both encoders and the folder to use. Encoders without a config pass."""
    config = getattr(image_encoder, "config", None)
    output = "hidden_states" if adapter.spec.takes_face_crop else adapter.spec.encoder_output
    if config is None or output is None:
        return
    width = config.projection_dim if output == "image_embeds" else config.hidden_size
    if width != adapter.clip_dim:
        raise Incompatible(variants.encoder_mismatch(adapter.variant, output, adapter.clip_dim, width,
                                                     what="the image encoder gives"))


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise BadArgument(f"{what} contain NaN or inf; refusing to use them")


def save_embeds(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Save embeddings: one array to ``.npy``, any number (named) to ``.safetensors``."""
    path = Path(path)
    if path.suffix == ".npy":
        if len(arrays) != 1:
            raise BadArgument(".npy holds one array; use .safetensors for several")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(next(iter(arrays.values())), np.float32))
        return path
    if path.suffix == ".safetensors":
        return save_safetensors({k: np.asarray(v, np.float32) for k, v in arrays.items()}, path)
    raise BadArgument(f"{path}: save embeddings as .npy or .safetensors")


def load_embeds(path: str | os.PathLike) -> np.ndarray | dict[str, np.ndarray]:
    """Load what ``save_embeds`` wrote (an array for .npy, a dict for .safetensors);
    refuses files holding NaN/inf."""
    path = Path(path)
    if path.is_dir():
        raise BadFile(f"{path} is a folder; expected an embeddings file (.npy or .safetensors)")
    if not path.is_file():
        raise MissingFile(f"embeddings file not found: {path}")
    if path.suffix == ".npy":
        arr = read_npy(path)
        if arr.dtype.kind not in "fiu":
            raise BadFile(f"{path} holds a {arr.dtype} array; expected float embeddings")
        _check_finite(arr, str(path))
        return arr
    arrays = read_state_dict(path)
    for key, value in arrays.items():
        _check_finite(value, f"{path}:{key}")
    return arrays
