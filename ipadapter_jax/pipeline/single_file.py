"""A pipeline from a single-file checkpoint (the LDM layout of AUTOMATIC1111,
ComfyUI and civitai): ``load_pipeline_from_single_file``.

The file's parts are read and converted by ``ipadapter_jax.convert.single_file``
(family detection, standard or given configs, strict key map), then built into
the same pipeline objects ``from_pretrained`` makes from a folder. A single
file carries no tokenizer: the tokenizers come from ``config_dir``, a diffusers
folder of the same family (only its configs and tokenizers are read, and its
weights where the file lacks a part), or, without one, from the local Hugging
Face cache as diffusers' ``from_single_file`` finds them offline (the family's
repos, ``convert.ldm_families``; nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from ipadapter_jax.convert.build import build_module
from ipadapter_jax.convert.ldm_detect import detect_family, read_layout
from ipadapter_jax.convert.ldm_families import SD1, Family, HubTokenizer
from ipadapter_jax.convert.single_file import SingleFileModel, read_single_file
from ipadapter_jax.io.errors import MissingFile
from ipadapter_jax.io.files import is_safetensors
from ipadapter_jax.models import CLIPVisionModelWithProjection
from ipadapter_jax.pipeline.stable_diffusion import StableDiffusionPipeline
from ipadapter_jax.pipeline.stable_diffusion_xl import StableDiffusionXLPipeline

_TOKENIZER_HELP = ("a single-file checkpoint carries no tokenizer: give model_config=DIR (sample.py --model-config "
                   "DIR), a diffusers folder of the same family holding {tokenizers} (e.g. a download of {repo}; "
                   "only its configs and tokenizers are read, not its weights)")
# Either set of files makes a CLIP tokenizer (transformers 5 saves tokenizer.json only).
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _holds_tokenizer(folder: Path) -> bool:
    # (transformers 5 makes an empty tokenizer of a folder without these files, silently)
    return any(all((folder / name).is_file() for name in files) for files in _TOKENIZER_FILES)


def check_tokenizers(config_dir: Path | None, names=("tokenizer",), family: Family | None = None) -> list[Path]:
    """The tokenizer folders ``names`` in ``config_dir``, or an error saying where tokenizers come from."""
    folders = [config_dir / name for name in names] if config_dir is not None else []
    missing = [f"{f} {'holds no vocab.json + merges.txt or tokenizer.json' if f.is_dir() else 'not found'}"
               for f in folders if not _holds_tokenizer(f)]
    if not folders or missing:
        what = " and ".join(f"{n}/" for n in names) + ("" if family else " (SDXL: and tokenizer_2/)")
        where = f" ({'; '.join(missing)})" if missing else ""
        raise MissingFile(_TOKENIZER_HELP.format(tokenizers=what, repo=_example_repo(family)) + where)
    return folders


def _example_repo(family: Family | None) -> str:
    return (family or SD1).text[0].hub_tokenizers[0].repo


def hub_cache() -> str:
    """The Hugging Face hub cache to look in: ``$HF_HUB_CACHE`` as it is now,
    else huggingface_hub's (``$HF_HOME/hub``, by default ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def cached_tokenizer(source: HubTokenizer) -> Path | None:
    """The folder of ``source``'s tokenizer in the local Hugging Face cache, or
    None when it is not there (nothing is downloaded, no setting is changed)."""
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{source.subfolder}/" if source.subfolder else ""
    for files in _TOKENIZER_FILES:
        found = [try_to_load_from_cache(source.repo, prefix + name, cache_dir=hub_cache()) for name in files]
        if all(isinstance(f, str) for f in found):   # (a path; else None or "known missing")
            return Path(found[0]).parent
    return None


def hub_tokenizers(family: Family) -> list[tuple[Path, HubTokenizer]]:
    """Each of the family's tokenizers from the local Hugging Face cache (the
    first of its repos found), or an error naming what was looked for."""
    found, lacking = [], []
    for slot in family.text:
        hit = next(((folder, source) for source in slot.hub_tokenizers
                    if (folder := cached_tokenizer(source)) is not None), None)
        if hit is None:
            lacking.append(f"{slot.tokenizer}: {' / '.join(map(str, slot.hub_tokenizers))}")
        found.append(hit)
    if lacking:
        what = " and ".join(f"{n}/" for n in family.tokenizers)
        raise MissingFile(_TOKENIZER_HELP.format(tokenizers=what, repo=_example_repo(family)) +
                          f"; nor is the {family.title} tokenizer in the local Hugging Face cache "
                          f"({hub_cache()}; looked for "
                          f"{'; '.join(lacking)}; nothing is downloaded)")
    return found


def load_tokenizers(model: SingleFileModel) -> list:
    """The family's tokenizers (``tokenizer/``, ``tokenizer_2/``): from
    ``model.config_dir``, or without one from the local Hugging Face cache."""
    from transformers import CLIPTokenizer

    if model.config_dir is not None:
        folders = check_tokenizers(model.config_dir, model.family.tokenizers, model.family)
        return [CLIPTokenizer.from_pretrained(str(f), local_files_only=True) for f in folders]
    return [CLIPTokenizer.from_pretrained(str(folder), local_files_only=True,
                                          **({"pad_token": source.pad_token} if source.pad_token else {}))
            for folder, source in hub_tokenizers(model.family)]


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
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"checkpoint file not found: {path}")
    _tokenizers_first(path, Path(config_dir) if config_dir is not None else None)
    model = read_single_file(path, config_dir=config_dir, vae=vae, ema=ema, prediction_type=prediction_type)
    return pipeline_from_model(model, image_encoder=image_encoder, dtype=dtype, attention_backend=attention_backend,
                               release=True)


def _tokenizers_first(path: Path, config_dir: Path | None) -> None:
    """Fail for want of tokenizers before reading gigabytes: ``config_dir``'s,
    or without one the cached ones of the family a ``.safetensors`` header
    tells (a pickle's family is known once it is read)."""
    if config_dir is not None:
        check_tokenizers(config_dir)
    elif is_safetensors(path):
        family = detect_family(read_layout(path).shapes, str(path))
        if family is not None:
            hub_tokenizers(family)
