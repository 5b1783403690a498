"""Pick the pipeline class for a diffusers folder: from its ``model_index.json``,
or, in a folder without one, from what its UNet takes."""

from __future__ import annotations

import os
from pathlib import Path

from ipadapter_jax.io.errors import BadArgument, MissingFile
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


# A single file's reading options (``load_pipeline_from_single_file``); a folder has its own.
_FILE_ONLY = ("config_dir", "vae", "ema", "prediction_type")


def load_pipeline(model_dir: str | os.PathLike, **kwargs) -> StableDiffusionPipeline:
    """``from_pretrained`` of the class ``model_dir``'s ``model_index.json`` names
    (keyword arguments as ``StableDiffusionPipeline.from_pretrained``); a file
    (a single-file checkpoint) goes to ``load_pipeline_from_single_file`` (its
    keyword arguments). An option of the other loader is a ``BadArgument``:
    ``variant`` (a folder's ``*.{variant}.safetensors``) for a file, a single
    file's options (``config_dir``, ``vae``, ``ema``, ``prediction_type``) for a folder."""
    if Path(model_dir).is_file():
        _other_loaders(kwargs, ("variant",), f"{model_dir} is a single-file checkpoint, which has one set of "
                       "weights (variant selects among the weights files of a diffusers folder)")
        return load_pipeline_from_single_file(model_dir, **kwargs)
    cls = pipeline_class(model_dir)
    _other_loaders(kwargs, _FILE_ONLY, f"{model_dir} is a diffusers folder, with its own configs, VAE and "
                   "scheduler (these options are for single-file checkpoints)")
    return cls.from_pretrained(model_dir, **kwargs)


def _other_loaders(kwargs: dict, names: tuple, why: str) -> None:
    """Drop the options ``names`` from ``kwargs`` when left at their defaults
    (None / False); refuse them, saying ``why``, when set."""
    given = [k for k in names if kwargs.get(k) not in (None, False)]
    if given:
        raise BadArgument(f"{', '.join(f'{k}={kwargs[k]!r}' for k in given)}: {why}")
    for name in names:
        kwargs.pop(name, None)
