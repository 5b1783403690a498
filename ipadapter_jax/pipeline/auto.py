"""Pick the pipeline class for a diffusers folder from its ``model_index.json``."""

from __future__ import annotations

import os
from pathlib import Path

from ipadapter_jax.io.errors import MissingFile
from ipadapter_jax.pipeline.stable_diffusion import StableDiffusionPipeline, XL_CLASSES, pipeline_class_name
from ipadapter_jax.pipeline.stable_diffusion_xl import StableDiffusionXLPipeline


def pipeline_class(model_dir: str | os.PathLike) -> type[StableDiffusionPipeline]:
    """``StableDiffusionXLPipeline`` for an SDXL folder (``_class_name`` in
    ``model_index.json``), else ``StableDiffusionPipeline`` (which refuses, by
    name, the other pipelines it cannot run)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingFile(f"model folder not found: {model_dir}")
    return StableDiffusionXLPipeline if pipeline_class_name(model_dir) in XL_CLASSES else StableDiffusionPipeline


def load_pipeline(model_dir: str | os.PathLike, **kwargs) -> StableDiffusionPipeline:
    """``from_pretrained`` of the class ``model_dir``'s ``model_index.json`` names
    (keyword arguments as ``StableDiffusionPipeline.from_pretrained``)."""
    return pipeline_class(model_dir).from_pretrained(model_dir, **kwargs)
