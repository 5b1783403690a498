"""FLUX transformers in Black Forest Labs' single-file layout (``flux1-dev.safetensors``,
``flux1-schnell.safetensors``; ComfyUI saves the same keys under ``model.diffusion_model.``).

BFL's names fuse what diffusers keeps apart: ``img_attn.qkv`` / ``txt_attn.qkv``
(q, k, v stacked on the output axis), the single blocks' ``linear1`` (q, k, v
and the MLP input stacked), and the final AdaLN's (shift, scale) halves, which
diffusers' ``norm_out`` orders (scale, shift). ``BFLTransformerWeights`` maps
them to diffusers' names lazily, tensor by tensor, so a 12B file is never held
twice; fp8 / bf16 / fp16 storage is read into float32 parameters. The file has
no configuration: the block counts, widths and the guidance embedding are read
from its shapes over FLUX.1-dev's standard configuration (``families``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import json

import numpy as np
from flax import nnx

from ipadapter_jax.io.errors import BadFile
from ipadapter_jax.io.files import CheckpointError, read_safetensors_header, read_weights
from ipadapter_jax.io.params import AbstractRngs, load_state_dict_into
from ipadapter_jax.models.flux import FluxTransformer2DModel

COMFY_PREFIX = "model.diffusion_model."

# (BFL name, diffusers name) of the tensors that are renamed only; {i} a block index.
_PLAIN = [
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
]
_DOUBLE = [
    ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
    ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
    ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
]
_DOUBLE_NORMS = [("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                 ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                 ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                 ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight")]
_SINGLE = [("modulation.lin", "norm.linear"), ("linear2", "proj_out")]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]
_BLOCK = re.compile(r"^(double|single)_blocks\.(\d+)\.")


def module_map(num_layers: int, num_single_layers: int, inner: int, linear1_rows: int) -> dict[str, list]:
    """BFL module name -> [(diffusers module name, (first, end) rows or None, swap halves)]:
    where each BFL linear layer's output rows go (fused ones split; the final AdaLN's
    halves swapped). Shared by the single-file reader and the LoRA merge."""
    out = {bfl: [(ours, None, False)] for bfl, ours in _PLAIN}
    out["final_layer.adaLN_modulation.1"] = [("norm_out.linear", None, True)]
    d = inner
    thirds = [(j * d, (j + 1) * d) for j in range(3)]
    for i in range(num_layers):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        out.update({src + bfl: [(dst + ours, None, False)] for bfl, ours in _DOUBLE})
        out[src + "img_attn.qkv"] = [(dst + f"attn.{n}", part, False) for n, part in zip(("to_q", "to_k", "to_v"),
                                                                                       thirds)]
        out[src + "txt_attn.qkv"] = [(dst + f"attn.{n}", part, False)
                                     for n, part in zip(("add_q_proj", "add_k_proj", "add_v_proj"), thirds)]
    for i in range(num_single_layers):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        out.update({src + bfl: [(dst + ours, None, False)] for bfl, ours in _SINGLE})
        out[src + "linear1"] = [(dst + n, part, False) for n, part in
                                zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                                    thirds + [(3 * d, linear1_rows)])]
    return out


def is_bfl_transformer(keys) -> bool:
    """Whether a file's keys are a FLUX transformer in BFL's (or ComfyUI's) layout."""
    return any(k.startswith(("double_blocks.", COMFY_PREFIX + "double_blocks.")) for k in keys)


class BFLTransformerWeights(Mapping):
    """A BFL-layout file as a read-only {diffusers name: float32 array} mapping,
    each tensor read (and split) when it is looked up."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        shapes, _ = read_safetensors_header(self.path)
        prefix = COMFY_PREFIX if any(k.startswith(COMFY_PREFIX) for k in shapes) else ""
        self._file = read_weights([self.path], lazy=True)
        self._prefix = prefix
        self.shapes = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
        scaled = [k for k in self.shapes if k.endswith(("scale_weight", "scale_input"))]
        if scaled:
            raise CheckpointError(f"{self.path}: a 'scaled fp8' file ({scaled[0]}, ...): its weights need their "
                                  "per-tensor scales; use a plain fp8 / bf16 / fp16 FLUX file")
        self._sources: dict[str, tuple] = {}
        self._map()

    # ---- the name map: diffusers name -> (BFL name, slice along axis 0 or None, swap halves)
    def _add(self, name: str, source: str, part=None, swap: bool = False):
        if source not in self.shapes:
            raise CheckpointError(f"{self.path}: missing {self._prefix}{source} (FLUX transformer, BFL layout)")
        self._sources[name] = (source, part, swap)

    def _map(self) -> None:
        blocks = {(m[1], int(m[2])) for k in self.shapes if (m := _BLOCK.match(k))}
        self.num_layers = 1 + max((i for kind, i in blocks if kind == "double"), default=-1)
        self.num_single_layers = 1 + max((i for kind, i in blocks if kind == "single"), default=-1)
        if "img_in.weight" not in self.shapes:
            raise BadFile(f"{self.path} is not a FLUX transformer file (no {self._prefix}img_in.weight)")
        self.inner = self.shapes["img_in.weight"][0]
        self.guidance = "guidance_in.in_layer.weight" in self.shapes
        rows = self.shapes.get("single_blocks.0.linear1.weight", (7 * self.inner,))[0]
        for bfl, targets in module_map(self.num_layers, self.num_single_layers, self.inner, rows).items():
            if bfl.startswith("guidance_in") and not self.guidance:
                continue
            for ours, part, swap in targets:
                for leaf in ("weight", "bias"):
                    self._add(f"{ours}.{leaf}", f"{bfl}.{leaf}", part, swap)
        for count, src, dst, norms in ((self.num_layers, "double_blocks", "transformer_blocks", _DOUBLE_NORMS),
                                       (self.num_single_layers, "single_blocks", "single_transformer_blocks",
                                        _SINGLE_NORMS)):
            for i in range(count):
                for bfl, ours in norms:
                    self._add(f"{dst}.{i}.{ours}", f"{src}.{i}.{bfl}")
        used = {source for source, _, _ in self._sources.values()}
        left = sorted(set(self.shapes) - used)
        if left:
            raise CheckpointError(f"{self.path}: keys that are not part of a FLUX transformer: "
                                  f"{', '.join(self._prefix + k for k in left[:5])}{' ...' if len(left) > 5 else ''}")

    def config(self, base: dict) -> dict:
        """``base`` (a transformer config.json dict) with what the file's shapes say."""
        head_dim = self.shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0] if self.num_layers else \
            self.shapes["single_blocks.0.norm.query_norm.scale"][0]
        cfg = dict(base)
        cfg.update(num_layers=self.num_layers, num_single_layers=self.num_single_layers,
                   guidance_embeds=self.guidance, in_channels=self.shapes["img_in.weight"][1],
                   joint_attention_dim=self.shapes["txt_in.weight"][1],
                   pooled_projection_dim=self.shapes["vector_in.in_layer.weight"][1],
                   attention_head_dim=head_dim, num_attention_heads=self.inner // head_dim)
        cfg["out_channels"] = self.shapes["final_layer.linear.weight"][0]
        if cfg["out_channels"] == cfg["in_channels"]:
            cfg["out_channels"] = None
        return cfg

    def __getitem__(self, name: str) -> np.ndarray:
        source, part, swap = self._sources[name]
        value = np.asarray(self._file[self._prefix + source])
        if part is not None:
            value = value[part[0]:part[1]]
        if swap:   # BFL: (shift, scale); diffusers' AdaLayerNormContinuous: (scale, shift)
            half = value.shape[0] // 2
            value = np.concatenate([value[half:], value[:half]])
        return value.astype(np.float32)

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def load_bfl_transformer(path: str | os.PathLike, base_config: dict, **options):
    """A ``FluxTransformer2DModel`` from a BFL-layout file; ``base_config``: a
    transformer config.json dict (a FLUX folder's, or the family's standard one)
    that the file's shapes override; ``options``: ``dtype``, ``attention_backend``."""
    weights = BFLTransformerWeights(path)
    config = weights.config(base_config)
    FluxTransformer2DModel.parse_config(config)   # a bad config fails before any weight is read

    def build(rngs):
        model = FluxTransformer2DModel.from_config(config, rngs=rngs, **options)
        model.config_json = json.dumps(config, sort_keys=True)
        return model

    model, _ = load_state_dict_into(lambda: build(nnx.Rngs(0)), weights, source=str(path),
                                    make_abstract=lambda: build(AbstractRngs()))
    return model
