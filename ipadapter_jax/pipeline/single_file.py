"""A pipeline from a single-file checkpoint (the LDM layout of AUTOMATIC1111,
ComfyUI and civitai): ``load_pipeline_from_single_file``.

The file's parts are read and converted by ``ipadapter_jax.convert.single_file``
(family detection, standard or given configs, strict key map), then built into
the same pipeline objects ``from_pretrained`` makes from a folder. A single
file carries no tokenizer: the tokenizers come from ``config_dir``, a diffusers
folder of the same family (only its configs and tokenizers are read, and its
weights where the file lacks a part).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from ipadapter_jax.convert.build import build_module
from ipadapter_jax.convert.single_file import SingleFileModel, read_single_file
from ipadapter_jax.io.errors import MissingFile
from ipadapter_jax.models import CLIPVisionModelWithProjection
from ipadapter_jax.pipeline.stable_diffusion import StableDiffusionPipeline
from ipadapter_jax.pipeline.stable_diffusion_xl import StableDiffusionXLPipeline

_TOKENIZER_HELP = ("a single-file checkpoint carries no tokenizer: give model_config=DIR (sample.py --model-config "
                   "DIR), a diffusers folder of the same family holding {tokenizers} (e.g. a download of {repo}; "
                   "only its configs and tokenizers are read, not its weights)")
_REPOS = {"sd1": "stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
          "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def check_tokenizers(config_dir: Path | None, names=("tokenizer",), family: str | None = None) -> list[Path]:
    """The tokenizer folders ``names`` in ``config_dir``, or an error saying where tokenizers come from."""
    folders = [config_dir / name for name in names] if config_dir is not None else []
    missing = [str(f) for f in folders if not f.is_dir()]
    if not folders or missing:
        what = " and ".join(f"{n}/" for n in names) + ("" if family else " (SDXL: and tokenizer_2/)")
        where = f" ({', '.join(missing)} not found)" if missing else ""
        raise MissingFile(_TOKENIZER_HELP.format(tokenizers=what, repo=_REPOS.get(family, _REPOS["sd1"])) + where)
    return folders


def load_tokenizers(model: SingleFileModel) -> list:
    """The family's tokenizers (``tokenizer/``, ``tokenizer_2/``) from ``model.config_dir``."""
    from transformers import CLIPTokenizer

    folders = check_tokenizers(model.config_dir, model.family.tokenizers, model.family.name)
    return [CLIPTokenizer.from_pretrained(str(f), local_files_only=True) for f in folders]


def pipeline_from_model(model: SingleFileModel, *, image_encoder: str | os.PathLike | None = None,
                        dtype=jnp.float32, attention_backend: str = "auto",
                        release: bool = False) -> StableDiffusionPipeline:
    """Build the pipeline of a read single file (``read_single_file``), as
    ``from_pretrained`` builds it from a folder. ``release``: drop each part's
    tensors from ``model`` once its module is built (lower peak memory)."""
    tokenizers = load_tokenizers(model)
    opts = dict(dtype=dtype, attention_backend=attention_backend)

    def build(name: str, **options):
        parts = model.components
        return build_module(name, parts.pop(name) if release else parts[name], **options)

    unet = build("unet", **opts)
    vae = build("vae", attention_backend=attention_backend)
    text_encoder = build("text_encoder", **opts)
    encoder = (CLIPVisionModelWithProjection.from_pretrained(image_encoder, dtype=dtype,
                                                             attention_backend=attention_backend)
               if image_encoder is not None else None)
    if model.family.name == "sdxl":
        return StableDiffusionXLPipeline(
            unet, vae, text_encoder, tokenizers[0], model.scheduler_config, encoder,
            text_encoder_2=build("text_encoder_2", **opts), tokenizer_2=tokenizers[1],
            force_zeros_for_empty_prompt=model.model_index.get("force_zeros_for_empty_prompt", True))
    return StableDiffusionPipeline(unet, vae, text_encoder, tokenizers[0], model.scheduler_config, encoder)


def load_pipeline_from_single_file(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
                                   vae: str | os.PathLike | None = None, ema: bool = False,
                                   prediction_type: str | None = None,
                                   image_encoder: str | os.PathLike | None = None, dtype=jnp.float32,
                                   attention_backend: str = "auto") -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` (SD 1.x / 2.x) or ``StableDiffusionXLPipeline``
    from one ``.safetensors`` / ``.ckpt`` file in the LDM layout.

    config_dir: a diffusers folder of the file's family: its tokenizers (needed)
      and configs (instead of the family's standard ones, for unusual architectures).
    vae: a VAE folder or file replacing the file's (needed when the file has none
      and ``config_dir`` holds no VAE weights).
    ema: the UNet's EMA weights (``model_ema.*``) instead of the plain ones.
    prediction_type: ``epsilon`` / ``v_prediction`` where the file does not say
      (SD 2.x default: v_prediction).
    image_encoder, dtype, attention_backend: as ``StableDiffusionPipeline.from_pretrained``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"checkpoint file not found: {path}")
    check_tokenizers(Path(config_dir) if config_dir is not None else None)   # before reading gigabytes
    model = read_single_file(path, config_dir=config_dir, vae=vae, ema=ema, prediction_type=prediction_type)
    return pipeline_from_model(model, image_encoder=image_encoder, dtype=dtype, attention_backend=attention_backend,
                               release=True)
