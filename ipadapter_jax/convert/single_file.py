"""Single-file Stable Diffusion checkpoints (the original LDM layout that
AUTOMATIC1111, ComfyUI and civitai use) in and out.

In: ``read_single_file(path)`` detects the family (SD 1.x, SD 2.x, SDXL base)
from the key names, takes the family's standard configuration (or a diffusers
folder's, ``config_dir``), and returns each part's tensors under diffusers
names (``SingleFileModel``); ``convert.build.build_module`` turns a part into a
Flax module. Reading is strict like the folder loader: every tensor of the file
is used or on the family's list of ignored keys, every parameter is filled with
the right shape, and errors name the file's keys. Tensors keep their dtype (fp16 files are cast
to float32 only when filled into a module), so conversions are bit-exact.

Out: ``ldm_state_dict`` maps diffusers tensors to the LDM layout (the exact
inverse); ``folder_to_single_file`` writes a diffusers folder as one
``.safetensors`` file, ``single_file_to_diffusers`` a single file as a
diffusers folder.

A file of no known family, a ``config_dir`` of another family than the file,
EMA weights asked of a file without them and a file without a VAE (unless
``vae`` or ``config_dir`` gives one) are errors that say so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ipadapter_jax.convert import ldm_plan
from ipadapter_jax.convert.build import MODEL_CLASSES, WEIGHTS_NAMES, expected_shapes
from ipadapter_jax.convert.ldm_detect import (V_PRED_KEY, ZTSNR_KEY, Layout, detect_family, file_prediction_type,
                                              read_layout)
from ipadapter_jax.families import EMA_PREFIX, IGNORED_KEYS, UNET_PREFIX, VAE_PREFIX, Family, TextSlot
from ipadapter_jax.families import of_configs
from ipadapter_jax.convert.ldm_plan import list_some
from ipadapter_jax.convert.ldm_text import clip_rule, openclip_rule, with_text_model_prefix
from ipadapter_jax.convert.ldm_unet import unet_rule
from ipadapter_jax.convert.ldm_vae import vae_rule
from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, MissingFile, Unsupported
from ipadapter_jax.io.files import (CheckpointError, find_weights, load_config, read_weights, save_safetensors)
from ipadapter_jax.io.params import module_state_dict
from ipadapter_jax.models import AutoencoderKL

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
# A standalone VAE training checkpoint also holds its loss's networks (LPIPS, discriminator).
VAE_FILE_IGNORED_PREFIX = "loss."


@dataclasses.dataclass
class Component:
    """One part of a pipeline: its diffusers config, its tensors under diffusers
    names (dtype as stored), and where they came from (for messages)."""

    config: dict
    state_dict: dict[str, np.ndarray]
    source: str


@dataclasses.dataclass
class SingleFileModel:
    """What a single file (with its configs) holds, ready to build a pipeline from."""

    family: Family
    components: dict[str, Component]       # unet, vae, text_encoder[, text_encoder_2]
    scheduler_config: dict
    model_index: dict
    prediction_type: str
    config_dir: Path | None = None         # where tokenizers come from (a single file has none)


# --------------------------------------------------------------------------- LDM -> diffusers

def _rule(name: str, config: dict, slot: TextSlot | None = None):
    """The key rule of a component (names without the file prefix)."""
    if name == "unet":
        return unet_rule(config)
    if name == "vae":
        return vae_rule(len(config["block_out_channels"]))
    return clip_rule if slot.layout == "clip" else openclip_rule


def _prefix(name: str, slot: TextSlot | None = None) -> str:
    return {"unet": UNET_PREFIX, "vae": VAE_PREFIX}.get(name) or slot.prefix


def _from_ldm(name: str, config: dict, section: Mapping[str, np.ndarray], rule, prefix: str,
              source: str) -> dict[str, np.ndarray]:
    """One part's tensors (LDM names without ``prefix``) -> diffusers names,
    strictly: the file's keys and the model's parameters must match one to one,
    shapes included; errors name the file's keys."""
    expected = expected_shapes(name, config)
    plan = ldm_plan.build_plan(expected, rule, f"{name} config")
    wanted = {link.ldm for link in plan}
    unexpected = sorted(prefix + k for k in section if k not in wanted)
    missing = sorted(prefix + k for k in wanted if k not in section)
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} keys match no parameter of the {name}: {list_some(unexpected)}")
    if missing:
        parts.append(f"{len(missing)} {name} parameters are missing: {list_some(missing)}")
    mismatched = []
    for link in plan:
        if link.ldm not in section:
            continue
        got = tuple(section[link.ldm].shape)
        want = [expected[k] for k in link.diffusers]
        if ldm_plan.diffusers_shapes(link, got) != want:
            mismatched.append(f"{prefix}{link.ldm} {got} (expected {ldm_plan.ldm_shape(link, want)})")
    if mismatched:
        parts.append(f"{len(mismatched)} {name} tensors have the wrong shape: {list_some(mismatched, 4)}")
    if parts:
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    return ldm_plan.from_ldm(plan, section, source)


def _section(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _ema_key(unet_key: str) -> str:
    """Where the original EMA code keeps a UNet weight: ``model_ema.`` + the key
    after ``model.``, dots removed."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def _unet_tensors(tensors: dict, ema: bool, source: str, used: set) -> dict[str, np.ndarray]:
    """The UNet's tensors (names without the prefix): the EMA copy with ``ema``."""
    unet_keys = [k for k in tensors if k.startswith(UNET_PREFIX)]
    ema_of = {_ema_key(k): k for k in unet_keys}
    if len(ema_of) != len(unet_keys):   # dropping the dots merged two names
        raise CheckpointError(f"{source}: UNet key names that differ only in their dots; EMA copies are ambiguous")
    present = [k for k in tensors if k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS]
    used.update(unet_keys)
    used.update(k for k in present if k in ema_of)   # the copy not chosen is used up too
    section = _section(tensors, UNET_PREFIX)
    if not ema:
        return section
    if not present:
        raise BadArgument(f"{source}: EMA weights were asked for (ema=True, --ema) but the file has none "
                          f"(no {EMA_PREFIX}* keys); leave the flag out to read its weights")
    lacking = sorted(k for k in ema_of if k not in tensors)
    if lacking:
        raise CheckpointError(f"{source}: {len(lacking)} UNet weights have no EMA copy: {list_some(lacking)}")
    return {ema_of[e][len(UNET_PREFIX):]: tensors[e] for e in ema_of}


def _text_section(tensors: Mapping, slot: TextSlot, config: dict, family: Family) -> tuple[dict, set]:
    """A text encoder's tensors (names without the prefix) and the file keys they take."""
    keys = {k for k in tensors if k.startswith(slot.prefix) and k not in family.ignored}
    section = {k[len(slot.prefix):]: tensors[k] for k in keys}
    if slot.layout == "clip":
        # Files made with transformers before 4.x's text_model nesting lack the prefix.
        section = with_text_model_prefix(section)
    elif slot.skips_last_block:
        # diffusers' SD 2.x text encoder stops one block before OpenCLIP's last
        # (SD 2.x conditions on the penultimate block's output): that block is not used.
        last = f"transformer.resblocks.{config['num_hidden_layers']}."
        section = {k: v for k, v in section.items() if not k.startswith(last)}
        keys |= {k for k in tensors if k.startswith(slot.prefix + last)}
    return section, keys


# --------------------------------------------------------------------------- configs

def _dir_configs(config_dir: Path) -> dict[str, dict]:
    if not config_dir.is_dir():
        raise MissingFile(f"model config folder not found: {config_dir}")
    configs = {name: load_config(config_dir / name) for name in MODEL_CLASSES
               if (config_dir / name / "config.json").is_file()}
    if (config_dir / "scheduler" / "scheduler_config.json").is_file():
        configs["scheduler"] = load_config(config_dir / "scheduler", "scheduler_config.json")
    if (config_dir / "model_index.json").is_file():
        configs["model_index"] = load_config(config_dir, "model_index.json")
    if "unet" not in configs and "text_encoder" not in configs:
        raise BadFile(f"{config_dir} is not a diffusers model folder: it has no unet/config.json or "
                      "text_encoder/config.json")
    return configs


def _configs(file_family: Family | None, config_dir: Path | None, source: str) -> tuple[Family, dict]:
    """The family and every component's config: ``config_dir``'s where it has
    one, else the family's standard configuration."""
    if config_dir is None:
        if file_family is None:
            raise BadFile(f"{source}: cannot tell which Stable Diffusion family this file is (it has no text "
                          "encoder and its UNet's cross-attention width is none of 768 / 1024 / 2048); give a "
                          "diffusers folder of its architecture as model_config (sample.py --model-config DIR)")
        return file_family, {name: file_family.config(name) for name in file_family.configs}
    found = _dir_configs(config_dir)
    family = of_configs(found)
    if file_family is not None and family is not file_family:
        raise Incompatible(f"{source} is an {file_family.title} checkpoint but the model config folder {config_dir} "
                           f"describes an {family.title} model; give a folder of the file's family")
    configs = {name: found.get(name, family.configs[name]) for name in family.configs}
    return family, json.loads(json.dumps(configs))


def _prediction_type(layout: Layout, asked: str | None, scheduler: dict, source: str) -> str:
    said = file_prediction_type(layout)
    if asked is not None:
        if asked not in PREDICTION_TYPES:
            raise BadArgument(f"prediction_type must be one of {PREDICTION_TYPES}, got {asked!r}")
        if said is not None and said != asked:
            log.warning("%s says %s, but %s was asked for; using %s", source, said, asked, asked)
        return asked
    return said or scheduler.get("prediction_type", "epsilon")


# --------------------------------------------------------------------------- read

def read_single_file(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
                     vae: str | os.PathLike | None = None, ema: bool = False,
                     prediction_type: str | None = None) -> SingleFileModel:
    """Read a single-file checkpoint (``.safetensors``; ``.ckpt`` / ``.pt`` /
    ``.pth`` through ``torch.load(weights_only=True)``).

    config_dir: a diffusers folder whose configs replace the family's standard
      ones (as diffusers' ``from_single_file(..., config=DIR)``), and whose
      tokenizers and (where the file lacks them) VAE / text encoder weights are used.
    vae: a VAE to use instead of the file's: a diffusers VAE folder (or a
      pipeline folder with ``vae/``), or a VAE file (LDM or diffusers names).
    ema: read the UNet's EMA copy (``model_ema.*``); default the plain weights, as diffusers.
    prediction_type: ``epsilon`` / ``v_prediction``; default what the file says,
      else the config's (SD 2.x: v_prediction, as SD 2.1).
    """
    source = str(path)
    config_dir = Path(config_dir) if config_dir is not None else None
    layout = read_layout(path)
    family, configs = _configs(detect_family(layout.shapes, source), config_dir, source)
    if ZTSNR_KEY in layout.shapes:
        raise Unsupported(f"{source} is marked zero-terminal-SNR ({ZTSNR_KEY!r}); the schedulers here do not "
                          "support rescale_betas_zero_snr")
    prediction = _prediction_type(layout, prediction_type, configs["scheduler"], source)
    configs["scheduler"]["prediction_type"] = prediction
    if family.epsilon_sample_size and config_dir is None and prediction == "epsilon":   # SD 2.x-base: 512 px
        size = family.epsilon_sample_size
        configs["unet"]["sample_size"], configs["vae"]["sample_size"] = size, size * 8
    tensors = layout.load()
    try:
        components = _components(tensors, family, configs, source, ema=ema, vae=vae, config_dir=config_dir)
    except CheckpointError as e:
        if config_dir is None:
            raise CheckpointError(f"{e} (read with the standard {family.title} configuration; a model of other "
                                  "sizes needs its diffusers configs: model_config=DIR, sample.py --model-config)"
                                  ) from None
        raise
    return SingleFileModel(family, components, configs["scheduler"], configs["model_index"], prediction, config_dir)


def _components(tensors: dict, family: Family, configs: dict, source: str, *, ema: bool, vae,
                config_dir: Path | None) -> dict[str, Component]:
    """Every part of the model, each file key accounted for."""
    used = {V_PRED_KEY} & set(tensors)
    unet = _unet_tensors(tensors, ema, source, used)
    components = {"unet": Component(configs["unet"], _from_ldm(
        "unet", configs["unet"], unet, _rule("unet", configs["unet"]), UNET_PREFIX, source),
        f"{source} ({UNET_PREFIX}*)")}
    components["vae"] = _vae(tensors, configs["vae"], vae, config_dir, source, used)
    for slot in family.text:
        components[slot.component] = _text(tensors, slot, configs[slot.component], family, config_dir, source, used)
    unused = sorted(set(tensors) - used - set(IGNORED_KEYS) - set(family.ignored))
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} keys belong to no part of an {family.title} model: "
                              f"{list_some(unused)}")
    return components


def _from_folder(name: str, folder: Path, config: dict) -> Component:
    files = find_weights(folder, WEIGHTS_NAMES[name])
    return Component(config, read_weights(files), str(files[0]) if len(files) == 1 else str(folder))


def _fallback(config_dir: Path | None, name: str, config: dict) -> Component | None:
    """Component ``name`` from ``config_dir``'s weights, or None when it has none."""
    if config_dir is None or not (config_dir / name).is_dir():
        return None
    try:
        return _from_folder(name, config_dir / name, config)
    except MissingFile:   # a folder of configs only
        return None


def _vae(tensors: dict, config: dict, vae, config_dir: Path | None, source: str, used: set) -> Component:
    """The VAE: ``vae`` if given, else the file's, else ``config_dir``'s weights."""
    baked = [k for k in tensors if k.startswith(VAE_PREFIX)]
    used.update(baked)   # replaced by ``vae`` or read below: used either way
    if vae is not None:
        return read_vae(vae, config)
    if baked:
        section = _section(tensors, VAE_PREFIX)
        return Component(config, _from_ldm("vae", config, section, _rule("vae", config), VAE_PREFIX, source),
                         f"{source} ({VAE_PREFIX}*)")
    fallback = _fallback(config_dir, "vae", config)
    if fallback is not None:
        return fallback
    raise BadFile(f"{source} has no VAE ({VAE_PREFIX}* keys): give one with vae=DIR_OR_FILE (sample.py --vae), "
                  "or a model_config folder that holds vae/ weights")


def read_vae(vae: str | os.PathLike, config: dict) -> Component:
    """A VAE from a diffusers VAE folder (``config.json`` beside the weights, or
    a pipeline folder's ``vae/``) or a file (LDM names, with or without the
    ``first_stage_model.`` prefix, or diffusers names); a file is read with ``config``."""
    vae = Path(vae)
    if vae.is_dir():
        folder = vae if (vae / "config.json").is_file() else vae / "vae"
        if not (folder / "config.json").is_file():
            raise MissingFile(f"{vae} is not a VAE folder: it has neither config.json nor vae/config.json")
        return _from_folder("vae", folder, load_config(folder))
    layout = read_layout(vae)
    tensors = {k: v for k, v in layout.load().items() if not k.startswith(VAE_FILE_IGNORED_PREFIX)}
    if any(k.startswith(VAE_PREFIX) for k in tensors):
        tensors = _section(tensors, VAE_PREFIX)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in tensors):
        return Component(config, tensors, str(vae))   # diffusers names: the module fill checks them
    return Component(config, _from_ldm("vae", config, tensors, _rule("vae", config), "", str(vae)), str(vae))


def _text(tensors: dict, slot: TextSlot, config: dict, family: Family, config_dir: Path | None, source: str,
          used: set) -> Component:
    section, keys = _text_section(tensors, slot, config, family)
    used.update(keys)
    if section:
        rule = _rule(slot.component, config, slot)
        return Component(config, _from_ldm(slot.component, config, section, rule, slot.prefix, source),
                         f"{source} ({slot.prefix}*)")
    fallback = _fallback(config_dir, slot.component, config)
    if fallback is not None:
        return fallback
    raise BadFile(f"{source} has no {slot.component.replace('_', ' ')} ({slot.prefix}* keys): give a model_config "
                  f"folder that holds {slot.component}/ weights")


# --------------------------------------------------------------------------- diffusers -> LDM

def _diffusers_tensors(name: str, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A folder's tensors under the names the rules know: legacy VAE attention
    names renamed, transformers 5's bare CLIP keys prefixed, position-id buffers dropped."""
    if name == "vae":
        return dict(AutoencoderKL.rename_key(k, v) for k, v in state.items())
    if name.startswith("text_encoder"):
        return {k: v for k, v in with_text_model_prefix(state).items() if not k.endswith("position_ids")}
    return dict(state)


def ldm_state_dict(family: Family, components: Mapping[str, Component],
                   prediction_type: str = "epsilon") -> dict[str, np.ndarray]:
    """diffusers components (``unet``, ``vae``, text encoders; each config +
    tensors) -> one LDM-layout state dict (dtypes kept). Every tensor must have
    a place in the layout; a v-prediction model gets ComfyUI's ``v_pred`` marker."""
    out: dict[str, np.ndarray] = {}
    slots = {slot.component: slot for slot in family.text}
    for name in ("unet", "vae", *slots):
        if name not in components:
            raise BadArgument(f"an {family.title} model needs a {name}; none given")
        component = components[name]
        state = _diffusers_tensors(name, component.state_dict)
        prefix = _prefix(name, slots.get(name))
        plan = ldm_plan.build_plan(state, _rule(name, component.config, slots.get(name)), component.source)
        out.update({prefix + k: v for k, v in ldm_plan.to_ldm(plan, state).items()})
    if prediction_type == "v_prediction":
        out[V_PRED_KEY] = np.zeros((0,), np.float32)
    return out


def ldm_shapes(family: Family, shapes: Mapping[str, Mapping[str, tuple]], configs: Mapping[str, dict]
               ) -> dict[str, tuple]:
    """``ldm_state_dict`` on shapes alone: {component: {diffusers key: shape}}
    -> {LDM key: shape}, the layout of a model without its weights."""
    out = {}
    slots = {slot.component: slot for slot in family.text}
    for name in ("unet", "vae", *slots):
        state = _diffusers_tensors(name, shapes[name])
        prefix = _prefix(name, slots.get(name))
        plan = ldm_plan.build_plan(state, _rule(name, configs[name], slots.get(name)), name)
        out.update({prefix + k: v for k, v in ldm_plan.ldm_shapes(plan, state).items()})
    return out


def modules_to_ldm(unet, vae, text_encoder, text_encoder_2=None, *,
                   prediction_type: str = "epsilon") -> dict[str, np.ndarray]:
    """Loaded Flax modules -> an LDM-layout state dict (float32). The family
    follows the modules: a second text encoder is SDXL, a gelu text encoder
    (OpenCLIP) SD 2.x. Detach IP-Adapters first: they have no place in the layout."""
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    if text_encoder_2 is not None:
        parts["text_encoder_2"] = text_encoder_2
    configs = {name: module.config_dict for name, module in parts.items()}
    family = of_configs(configs)
    components = {name: Component(configs[name], module_state_dict(module), name) for name, module in parts.items()}
    return ldm_state_dict(family, components, prediction_type)


def read_folder(model_dir: str | os.PathLike) -> tuple[Family, dict[str, Component], dict]:
    """A diffusers folder's family, components (configs + tensors as stored) and scheduler config."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingFile(f"model folder not found: {model_dir}")
    configs = _dir_configs(model_dir)
    family = of_configs(configs)
    components = {}
    for name in ("unet", "vae", *(slot.component for slot in family.text)):
        if name not in configs:
            raise MissingFile(f"{model_dir / name / 'config.json'} not found: an {family.title} folder holds "
                              f"{name}/ with its config and weights")
        components[name] = _from_folder(name, model_dir / name, configs[name])
    return family, components, configs.get("scheduler", {})


def folder_to_single_file(model_dir: str | os.PathLike, out: str | os.PathLike, *,
                          half: bool = False) -> Path:
    """Write a diffusers folder (SD 1.x, 2.x, SDXL) as one LDM-layout
    ``.safetensors`` file, tensors bit for bit (``half``: float16)."""
    family, components, scheduler = read_folder(model_dir)
    state = ldm_state_dict(family, components, scheduler.get("prediction_type", "epsilon"))
    if half:
        state = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v) for k, v in state.items()}
    return save_safetensors(state, out, metadata={"format": "pt"})


# --------------------------------------------------------------------------- LDM -> folder

def single_file_to_diffusers(path: str | os.PathLike, out_dir: str | os.PathLike, **options) -> Path:
    """Write a single file as a diffusers folder (configs, weights bit for bit,
    scheduler, ``model_index.json``; tokenizers copied from ``config_dir`` when
    given). ``options`` as ``read_single_file``. ``out_dir`` must not exist or be empty."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadArgument(f"{out_dir} already exists and is not an empty folder; choose a new folder")
    model = read_single_file(path, **options)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp's folders are owner-only; a plain mkdir's are not
    try:
        for name, component in model.components.items():
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text(json.dumps(component.config, indent=2, sort_keys=True) + "\n")
            save_safetensors(component.state_dict, tmp / name / f"{WEIGHTS_NAMES[name]}.safetensors",
                             metadata={"format": "pt"})
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(model.model_index, indent=2) + "\n")
        for tokenizer in model.family.tokenizers:
            if model.config_dir is not None and (model.config_dir / tokenizer).is_dir():
                shutil.copytree(model.config_dir / tokenizer, tmp / tokenizer)
            else:
                log.warning("%s has no tokenizer: copy %s/ from a diffusers %s folder into %s before loading it",
                            path, tokenizer, model.family.title, out_dir)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
