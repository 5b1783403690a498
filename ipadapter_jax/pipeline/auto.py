"""Pick the pipeline class for a diffusers folder: from its ``model_index.json``,
or, in a folder without one, from what its UNet takes."""

from __future__ import annotations

import os
from pathlib import Path

from ipadapter_jax.io.errors import MissingFile
from ipadapter_jax.io.files import load_config
from ipadapter_jax.pipeline.single_file import load_pipeline_from_single_file
from ipadapter_jax.pipeline.stable_diffusion import StableDiffusionPipeline, XL_CLASSES, pipeline_class_name
from ipadapter_jax.pipeline.stable_diffusion_xl import StableDiffusionXLPipeline


def _unet_takes_text_time(model_dir: Path) -> bool:
    """The folder's UNet takes SDXL's added conditioning (pooled text + time ids)."""
    if not (model_dir / "unet" / "config.json").is_file():
        return False  # the loader names what is missing
    return load_config(model_dir / "unet", "config.json").get("addition_embed_type") == "text_time"


def pipeline_class(model_dir: str | os.PathLike) -> type[StableDiffusionPipeline]:
    """``StableDiffusionXLPipeline`` for an SDXL folder (``_class_name`` in
    ``model_index.json``; without that file, a UNet taking SDXL's ``text_time``
    conditioning), else ``StableDiffusionPipeline`` (which refuses, by name,
    the other pipelines it cannot run)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingFile(f"model folder not found: {model_dir}")
    name = pipeline_class_name(model_dir)
    xl = name in XL_CLASSES if name is not None else _unet_takes_text_time(model_dir)
    return StableDiffusionXLPipeline if xl else StableDiffusionPipeline


def load_pipeline(model_dir: str | os.PathLike, **kwargs) -> StableDiffusionPipeline:
    """``from_pretrained`` of the class ``model_dir``'s ``model_index.json`` names
    (keyword arguments as ``StableDiffusionPipeline.from_pretrained``); a file
    (a single-file checkpoint) goes to ``load_pipeline_from_single_file``."""
    if Path(model_dir).is_file():
        return load_pipeline_from_single_file(model_dir, **kwargs)
    return pipeline_class(model_dir).from_pretrained(model_dir, **kwargs)
