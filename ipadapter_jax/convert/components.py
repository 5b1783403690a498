"""The one component loader: a family's models, tokenizers and scheduler config
from a diffusers folder or a single-file checkpoint.

``load_components(source)`` reads what ``source``'s family (``families``)
lists: the UNet, the VAE, each text encoder and its tokenizer, and the
scheduler config. A folder is read component by component
(``from_pretrained``); a single file through ``convert.single_file`` (family
detection from its keys, standard or given configs, strict key map), with
tokenizers from ``config_dir`` (a diffusers folder of the same family) or, as
diffusers' ``from_single_file`` finds them offline, from the Hugging Face
cache (the family's ``hub_tokenizers``; nothing is downloaded). The pipelines
and the trainer build on it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax.numpy as jnp

from ipadapter_jax import schedulers
from ipadapter_jax.convert.build import MODEL_CLASSES, build_module
from ipadapter_jax.convert.ldm_detect import detect_family, read_layout
from ipadapter_jax.convert.single_file import SingleFileModel, read_single_file
from ipadapter_jax.families import FAMILIES, Family, HubTokenizer, of_folder
from ipadapter_jax.io.errors import BadArgument, MissingFile
from ipadapter_jax.io.files import is_safetensors, load_config
from ipadapter_jax.models import AutoencoderKL, UNet2DConditionModel


@dataclasses.dataclass
class Components:
    """A loaded base model: its family, modules, tokenizers (one per text
    encoder, in the family's order) and scheduler config."""

    family: Family
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    model_index: dict
    source: Path


def load_components(source: str | os.PathLike, *, dtype=jnp.float32, attention_backend: str = "auto",
                    variant: str | None = None, remat: str = "none", config_dir: str | os.PathLike | None = None,
                    vae: str | os.PathLike | None = None, ema: bool = False,
                    prediction_type: str | None = None) -> Components:
    """A diffusers folder or a single file's components. ``dtype`` and
    ``attention_backend`` go to the UNet and text encoders (the VAE computes in
    float32); ``remat`` to the UNet (training). ``variant`` is for folders;
    ``config_dir``, ``vae``, ``ema``, ``prediction_type`` for single files
    (``convert.single_file.read_single_file``)."""
    source = Path(source)
    options = dict(dtype=dtype, attention_backend=attention_backend)
    unet_options = {**options, **({"remat": remat} if remat != "none" else {})}
    if source.is_file():
        if variant is not None:
            raise BadArgument(f"variant={variant!r}: {source} is a single-file checkpoint, which has one set of "
                              "weights (variant selects among the weights files of a diffusers folder)")
        config_dir = Path(config_dir) if config_dir is not None else None
        tokenizers_first(source, config_dir)
        model = read_single_file(source, config_dir=config_dir, vae=vae, ema=ema, prediction_type=prediction_type)
        return from_single_file_model(model, source, options, unet_options, release=True)
    given = [k for k, v in (("config_dir", config_dir), ("vae", vae), ("ema", ema),
                            ("prediction_type", prediction_type)) if v not in (None, False)]
    if given:
        raise BadArgument(f"{', '.join(given)}: {source} is a diffusers folder, with its own configs, VAE and "
                          "scheduler (these options are for single-file checkpoints)")
    return _from_folder(source, variant, options, unet_options)


def _from_folder(model_dir: Path, variant, options: dict, unet_options: dict) -> Components:
    family = of_folder(model_dir)
    for sub in family.components:
        if not (model_dir / sub).is_dir():
            raise MissingFile(f"{sub} folder not found: {model_dir / sub}. The {family.title} folder {model_dir} "
                              f"lacks its {sub} ({_what(family, sub)}); a {family.pipeline} folder holds "
                              f"{', '.join(c + '/' for c in (*family.components, 'scheduler'))}")
    from transformers import CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", variant=variant, **unet_options)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", attention_backend=options["attention_backend"],
                                        variant=variant)
    encoders = [MODEL_CLASSES[slot.component].from_pretrained(model_dir / slot.component, variant=variant,
                                                              **options) for slot in family.text]
    tokenizers = [CLIPTokenizer.from_pretrained(str(model_dir / name), local_files_only=True)
                  for name in family.tokenizers]
    index = load_config(model_dir, "model_index.json") if (model_dir / "model_index.json").is_file() else {}
    return Components(family, unet, vae, encoders, tokenizers, schedulers.load_scheduler_config(model_dir), index,
                      model_dir)


def _what(family: Family, sub: str) -> str:
    slots = {slot.component: slot.what for slot in family.text}
    slots.update({slot.tokenizer: f"the tokenizer of {slot.what}" for slot in family.text})
    return slots.get(sub, {"unet": "the UNet", "vae": "the VAE"}.get(sub, sub))


def from_single_file_model(model: SingleFileModel, source: Path, options: dict, unet_options: dict | None = None,
                           *, release: bool = False) -> Components:
    """Build a read single file's modules. ``release``: drop each part's tensors
    from ``model`` once its module is built (lower peak memory)."""
    tokenizers = load_tokenizers(model)

    def build(name: str, **opts):
        parts = model.components
        return build_module(name, parts.pop(name) if release else parts[name], **opts)

    unet = build("unet", **(unet_options or options))
    vae = build("vae", attention_backend=options["attention_backend"])
    encoders = [build(slot.component, **options) for slot in model.family.text]
    return Components(model.family, unet, vae, encoders, tokenizers, model.scheduler_config, model.model_index,
                      source)


# --------------------------------------------------------------------------- tokenizers of single files

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
    return (family or next(iter(FAMILIES.values()))).text[0].hub_tokenizers[0].repo


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


def tokenizers_first(path: Path, config_dir: Path | None) -> None:
    """Fail for want of tokenizers before reading gigabytes: ``config_dir``'s,
    or without one the cached ones of the family a ``.safetensors`` header
    tells (a pickle's family is known once it is read)."""
    if config_dir is not None:
        check_tokenizers(config_dir)
    elif is_safetensors(path):
        family = detect_family(read_layout(path).shapes, str(path))
        if family is not None:
            hub_tokenizers(family)
