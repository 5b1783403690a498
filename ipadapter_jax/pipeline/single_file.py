"""A pipeline from a single-file checkpoint (the LDM layout of AUTOMATIC1111,
ComfyUI and civitai): ``load_pipeline_from_single_file``.

The file is read by the one component loader (``convert.components``: family
detection, standard or given configs, strict key map, tokenizers from
``config_dir`` or the local Hugging Face cache), then built into the pipeline
class its family names, as ``from_pretrained`` builds one from a folder.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from ipadapter_jax.convert.components import load_components
from ipadapter_jax.io.errors import MissingFile
from ipadapter_jax.io.hub import CONFIG_PATTERNS, PIPELINE_FOLDER_PATTERNS, resolve
from ipadapter_jax.pipeline.flux import FluxPipeline
from ipadapter_jax.pipeline.stable_diffusion import StableDiffusionPipeline
from ipadapter_jax.pipeline.stable_diffusion_xl import StableDiffusionXLPipeline

# ``Family.pipeline`` -> the class.
PIPELINES: dict[str, type] = {
    cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline)}


def load_pipeline_from_single_file(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
                                   vae: str | os.PathLike | None = None, ema: bool = False,
                                   prediction_type: str | None = None,
                                   image_encoder: str | os.PathLike | None = None, dtype=jnp.float32,
                                   attention_backend: str = "auto", variant: str | None = None
                                   ) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` (SD 1.x / 2.x) or ``StableDiffusionXLPipeline``
    from one ``.safetensors`` / ``.ckpt`` file in the LDM layout (a local path or
    a hub id ``org/name:file.safetensors``).

    config_dir: a diffusers folder of the file's family: its tokenizers and
      configs (instead of the family's standard ones, for unusual architectures).
      Without it the tokenizers come from the local Hugging Face cache (e.g.
      ``stable-diffusion-v1-5/stable-diffusion-v1-5``'s ``tokenizer/``), or the
      call fails saying so.
    vae: a VAE folder or file replacing the file's (needed when the file has none
      and ``config_dir`` holds no VAE weights).
    ema: the UNet's EMA weights (``model_ema.*``) instead of the plain ones.
    prediction_type: ``epsilon`` / ``v_prediction`` where the file does not say
      (SD 2.x default: v_prediction).
    image_encoder, dtype, attention_backend: as ``StableDiffusionPipeline.from_pretrained``.
    """
    path = resolve(path, kind="file", what="single-file checkpoint")
    if not path.is_file():
        raise MissingFile(f"checkpoint file not found: {path} (a folder: use load_pipeline or from_pretrained)")
    resolved = {name: None if value is None else resolve(value, kind=kind, what=what, allow_patterns=patterns)
                for name, value, kind, what, patterns in (
                    ("config_dir", config_dir, "folder", "model config folder", CONFIG_PATTERNS),
                    ("vae", vae, "any", "VAE folder or file", PIPELINE_FOLDER_PATTERNS))}
    # (load_components refuses a variant for a file, before reading it)
    components = load_components(path, dtype=dtype, attention_backend=attention_backend, variant=variant, ema=ema,
                                 prediction_type=prediction_type, **resolved)
    return PIPELINES[components.family.pipeline].from_components(
        components, image_encoder=image_encoder, dtype=dtype, attention_backend=attention_backend)
