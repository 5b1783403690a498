"""Pick the pipeline class for a model: the family (``ipadapter_jax.families``)
of a diffusers folder (its ``model_index.json``, or its configs) or of a
single file (its keys) names it."""

from __future__ import annotations

import os
from pathlib import Path

from ipadapter_jax import families
from ipadapter_jax.io.hub import pipeline_patterns, resolve
from ipadapter_jax.io.errors import BadArgument
from ipadapter_jax.convert.flux_single_file import is_bfl_transformer
from ipadapter_jax.io.files import is_safetensors, read_safetensors_header
from ipadapter_jax.pipeline.flux import FluxPipeline
from ipadapter_jax.pipeline.single_file import PIPELINES, load_pipeline_from_single_file
from ipadapter_jax.pipeline.stable_diffusion import StableDiffusionPipeline

# A single file's reading options (``load_pipeline_from_single_file``); a folder has its own.
_FILE_ONLY = ("config_dir", "vae", "ema", "prediction_type")


def pipeline_class(model_dir: str | os.PathLike) -> type[StableDiffusionPipeline]:
    """The pipeline class of a diffusers folder's family (``families.of_folder``:
    ``model_index.json``'s class, else its configs; other pipelines are refused by name)."""
    return PIPELINES[families.of_folder(Path(model_dir)).pipeline]


def load_pipeline(model_dir: str | os.PathLike, **kwargs) -> StableDiffusionPipeline:
    """``from_pretrained`` of the class ``model_dir``'s family names (keyword
    arguments as ``StableDiffusionPipeline.from_pretrained``); a file (a
    single-file checkpoint) goes to ``load_pipeline_from_single_file`` (its
    keyword arguments). ``model_dir`` may be a hub id (``org/name``,
    ``org/name:path``). An option of the other loader is a ``BadArgument``:
    ``variant`` (a folder's ``*.{variant}.safetensors``) for a file, a single
    file's options (``config_dir``, ``vae``, ``ema``, ``prediction_type``) for a folder."""
    source = resolve(model_dir, kind="any", what="model folder or single-file checkpoint",
                     allow_patterns=pipeline_patterns(kwargs.get("variant")))
    if source.is_file():
        if is_safetensors(source) and is_bfl_transformer(read_safetensors_header(source)[0]):
            if kwargs.get("config_dir") is None:
                raise BadArgument(f"{source} is a FLUX transformer file (BFL layout), which holds no text encoders, "
                                  "tokenizers or VAE: give config_dir= (--model-config), a diffusers FLUX folder")
            options = {k: v for k, v in kwargs.items() if k not in ("config_dir", "ema", "prediction_type", "variant")}
            return FluxPipeline.from_single_file(source, model_config=kwargs["config_dir"], **options)
        return load_pipeline_from_single_file(source, **kwargs)
    given = [k for k in _FILE_ONLY if kwargs.get(k) not in (None, False)]
    if given:
        raise BadArgument(f"{', '.join(f'{k}={kwargs[k]!r}' for k in given)}: {source} is a diffusers folder, with "
                          "its own configs, VAE and scheduler (these options are for single-file checkpoints)")
    return pipeline_class(source).from_pretrained(source, **{k: v for k, v in kwargs.items() if k not in _FILE_ONLY})
