"""Textual-inversion embeddings: new tokens with their own rows in a text
encoder's token-embedding matrix, usable in prompts and negative prompts.

File formats (told apart by their keys):

* A1111 ``.pt``: ``{"string_to_param": {"*": [n, d]}, "name": ..., "step": ...}``,
  read with ``torch.load(weights_only=True)`` (``io.files.read_torch_pickle``:
  dicts, strings, numbers and tensors load; a pickle holding code or other
  objects, such as the original ``textual_inversion`` repo's ``ParameterDict``,
  is refused);
* A1111 ``.safetensors``: ``{"emb_params": [n, d]}``;
* diffusers' ``learned_embeds.safetensors`` / ``.bin``: ``{token: [d] or [n, d]}``;
* SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``, one embedding per text encoder.

The token is the ``token`` argument, else the key of a diffusers file, else the
file's stem (A1111 names an embedding by its file). An embedding of ``n > 1``
vectors adds ``token, token_1, ..., token_{n-1}``; prompts are rewritten
(``token`` -> ``"token token_1 ... token_{n-1}"``) by the tokenizer wrapper
``TextualInversionTokenizer``, as diffusers' ``maybe_convert_prompt`` does, so
the pipelines' text stages need no change.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.io.hub import resolve
from ipadapter_jax.io.specs import parse_embedding_spec
from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, require_finite
from ipadapter_jax.io.files import is_safetensors, is_torch_pickle, read_state_dict, read_torch_pickle, require_file

# The pipelines' (text encoder, tokenizer) attribute pairs, in order.
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclasses.dataclass
class Embedding:
    """A read embedding file: its token and vectors [n, d], per text encoder
    (``"text_encoder"`` / ``"text_encoder_2"`` for SDXL pairs, ``None`` for a
    single embedding that goes to the one encoder it fits)."""

    path: Path
    kind: str
    token: str
    vectors: dict[str | None, np.ndarray]


class TextualInversionTokenizer:
    """A tokenizer (transformers ``CLIPTokenizer``) that expands multi-vector
    embedding tokens in the text it is called on: ``token`` -> ``token token_1
    ... token_{n-1}``, as diffusers' ``maybe_convert_prompt`` (tokens found by
    tokenizing the prompt, then replaced in the text). Everything else is the
    wrapped tokenizer's."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.multi_vector: dict[str, list[str]] = {}

    def __getattr__(self, name):
        if name == "tokenizer":   # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def expand(self, text: str) -> str:
        """``text`` with each multi-vector token replaced by its n tokens."""
        if not self.multi_vector:
            return text
        for token in set(self.tokenizer.tokenize(text)):
            if token in self.multi_vector:
                text = text.replace(token, " ".join(self.multi_vector[token]))
        return text

    def __call__(self, text, *args, **kwargs):
        text = self.expand(text) if isinstance(text, str) else [self.expand(t) for t in text]
        return self.tokenizer(text, *args, **kwargs)


# --------------------------------------------------------------------------- reading

def _read_raw(path: Path):
    """The file's content: nested dicts / numpy arrays / plain values (A1111
    ``.pt`` files keep names and step counts beside the vectors)."""
    path = require_file(path, "embedding file", ".safetensors, .pt or .bin")
    if is_torch_pickle(path):
        return read_torch_pickle(path, flatten=False)
    if is_safetensors(path):
        return read_state_dict(path)
    raise BadFile(f"{path}: unknown embedding format {path.suffix!r}; expected .safetensors, .pt or .bin")


def _vectors(value, what: str, path: Path) -> np.ndarray:
    """[d] or [n, d] floats -> [n, d] float32."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" and str(value.dtype) != "bfloat16":
        raise BadFile(f"{path}: {what} is a {type(value).__name__}, expected a float tensor [n_vectors, width]")
    array = np.asarray(value, np.float32)
    array = array[None] if array.ndim == 1 else array
    if array.ndim != 2 or 0 in array.shape:
        raise BadFile(f"{path}: {what} has shape {tuple(value.shape)}; expected [n_vectors, width] or [width]")
    require_finite(f"{path}: {what}", array)
    return array


def _interpret(raw, path: Path) -> tuple[str, str | None, dict]:
    """(kind, the token the file names or None, vectors per encoder)."""
    if isinstance(raw, np.ndarray):
        return "tensor", None, {None: _vectors(raw, "the tensor", path)}
    if not isinstance(raw, dict) or not raw:
        raise BadFile(f"{path} holds a {type(raw).__name__}; expected an embedding dict")
    if "clip_l" in raw or "clip_g" in raw:
        missing = [k for k in _SDXL_KEYS if k not in raw]
        if missing:
            raise BadFile(f"{path}: an SDXL embedding has clip_l and clip_g; {missing[0]} is missing")
        return "SDXL clip_l/clip_g", None, {enc: _vectors(raw[k], k, path) for k, enc in _SDXL_KEYS.items()}
    params = raw.get("string_to_param")
    if params is not None or "string_to_param.*" in raw:
        vectors = params.get("*") if isinstance(params, dict) else raw.get("string_to_param.*")
        if vectors is None:
            raise BadFile(f"{path}: string_to_param has no '*' entry (an A1111 embedding keeps its vectors there)")
        return "A1111", None, {None: _vectors(vectors, "string_to_param['*']", path)}
    if "emb_params" in raw:
        return "A1111", None, {None: _vectors(raw["emb_params"], "emb_params", path)}
    tensors = {k: v for k, v in raw.items() if isinstance(v, np.ndarray)}
    if len(raw) == 1 and len(tensors) == 1:
        token, vectors = next(iter(tensors.items()))
        return "diffusers", token, {None: _vectors(vectors, repr(token), path)}
    raise BadFile(f"{path} is not a textual-inversion embedding: expected string_to_param (A1111 .pt), "
                  "emb_params (A1111 .safetensors), clip_l + clip_g (SDXL) or one {token: tensor} entry "
                  f"(diffusers), found keys {sorted(map(str, raw))[:8]}")


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """Read an embedding file; ``token`` overrides the token it would get."""
    path = Path(path)
    kind, named, vectors = _interpret(_read_raw(path), path)
    token = token or named or path.stem
    if not token or any(c.isspace() for c in token):
        raise BadArgument(f"{path}: embedding token {token!r} must be one word without spaces")
    return Embedding(path, kind, token, vectors)


# --------------------------------------------------------------------------- loading

def token_names(token: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding: ``token, token_1, ..., token_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _width(text_encoder) -> int:
    return int(text_encoder.text_model.embeddings.token_embedding.embedding.get_value().shape[1])


def _assign(embedding: Embedding, encoders: dict) -> dict[str, np.ndarray]:
    """Text encoder attribute -> the vectors it gets; refuses what fits no encoder."""
    widths = {name: _width(te) for name, te in encoders.items()}
    have = ", ".join(f"{name} {w}" for name, w in widths.items())
    family = "SDXL (two text encoders)" if len(encoders) > 1 else "SD 1.x/2.x (one text encoder)"
    if None in embedding.vectors:
        vectors = embedding.vectors[None]
        fits = [name for name, w in widths.items() if w == vectors.shape[1]]
        if len(encoders) > 1 or not fits:
            fit = f"it fits {fits[0]} only" if fits else "it fits neither text encoder" if len(widths) > 1 \
                else "it does not fit the text encoder"
            need = "; SDXL embeddings hold clip_l and clip_g vectors, one per encoder" if len(encoders) > 1 else ""
            raise Incompatible(f"{embedding.path}: the embedding is {vectors.shape[1]} wide; {fit} (this model is "
                               f"{family}, widths {have}){need}")
        return {fits[0]: vectors}
    if len(encoders) == 1:
        raise Incompatible(f"{embedding.path} is an SDXL embedding (clip_l + clip_g); this model is {family}, "
                           f"width {have}")
    for name, vectors in embedding.vectors.items():
        if vectors.shape[1] != widths[name]:
            key = next(k for k, v in _SDXL_KEYS.items() if v == name)
            raise Incompatible(f"{embedding.path}: {key} is {vectors.shape[1]} wide but {name} is {widths[name]} "
                               f"wide; the embedding fits neither text encoder of this model ({have})")
    return dict(embedding.vectors)


def add_embedding(tokenizer: TextualInversionTokenizer, text_encoder, token: str,
                  vectors: np.ndarray) -> list[str]:
    """Add ``token`` (and ``token_1``... for several vectors) to the tokenizer and
    their rows to ``text_encoder``'s token embedding; returns the tokens added."""
    names = token_names(token, len(vectors))
    tokenizer.add_tokens(names)
    ids = [tokenizer.convert_tokens_to_ids(name) for name in names]
    embed = text_encoder.text_model.embeddings.token_embedding
    table = np.asarray(embed.embedding.get_value())
    rows = max(table.shape[0], max(ids) + 1)
    grown = np.zeros((rows, table.shape[1]), table.dtype)
    grown[: table.shape[0]] = table
    grown[ids] = vectors
    embed.embedding.set_value(jnp.asarray(grown))
    embed.num_embeddings = rows
    if hasattr(text_encoder, "_set_config"):   # keep config.json right for a later save_pretrained
        text_encoder._set_config(dataclasses.replace(text_encoder.config, vocab_size=rows))
    if len(names) > 1:
        tokenizer.multi_vector[token] = names
    return names


def load_textual_inversion(pipe, path: str | os.PathLike, token: str | None = None) -> list[str]:
    """Load an embedding file into a pipeline: new token rows in ``pipe.text_encoder``
    (and ``pipe.text_encoder_2`` for SDXL ``clip_l`` / ``clip_g`` pairs), and the
    token in the matching tokenizer, wrapped in ``TextualInversionTokenizer`` so
    multi-vector tokens expand in prompts. Returns the tokens added (the one to
    write in prompts first). Refuses, before changing anything, a token the
    tokenizer knows already and an embedding whose width fits no text encoder."""
    embedding = read_embedding(path, token)
    encoders = {te: getattr(pipe, te) for te, _ in ENCODERS if getattr(pipe, te, None) is not None}
    plan = _assign(embedding, encoders)
    tokenizers = dict(ENCODERS)
    for te, vectors in plan.items():
        vocab = getattr(pipe, tokenizers[te]).get_vocab()
        taken = [t for t in token_names(embedding.token, len(vectors)) if t in vocab]
        if taken:
            raise BadArgument(f"{embedding.path}: token {taken[0]!r} is already in {tokenizers[te]}'s vocabulary; "
                              "give another token (sample.py --embedding FILE:TOKEN)")
    added: list[str] = []
    for te, vectors in plan.items():
        tokenizer = getattr(pipe, tokenizers[te])
        if not isinstance(tokenizer, TextualInversionTokenizer):
            tokenizer = TextualInversionTokenizer(tokenizer)
            setattr(pipe, tokenizers[te], tokenizer)
        names = add_embedding(tokenizer, encoders[te], embedding.token, vectors)
        added += [n for n in names if n not in added]
    return added


def load_embeddings(pipe, specs: Sequence[str]) -> list[list[str]]:
    """``load_textual_inversion`` for each ``FILE[:TOKEN]`` spec, in order."""
    found = [parse_embedding_spec(spec) for spec in specs]
    return [load_textual_inversion(pipe, resolve(str(path), kind="file", what="embedding file", flag="--embedding"),
                                   token) for path, token in found]
