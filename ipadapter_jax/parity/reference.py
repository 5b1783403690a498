"""The reference side of a parity run: the same files loaded the way a
diffusers user loads them (``from_pretrained`` / ``from_single_file``,
``load_ip_adapter``, ``load_lora_weights`` + ``fuse_lora``,
``load_textual_inversion``, ``ControlNetModel``), in float32 on the CPU.
torch, diffusers and transformers are imported here only (the ``torch``
extra)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from ipadapter_jax.io.errors import BadArgument

# Our scheduler names -> diffusers classes (and their options).
SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}),
              "euler": ("EulerDiscreteScheduler", {}), "euler-a": ("EulerAncestralDiscreteScheduler", {}),
              "dpm++2m": ("DPMSolverMultistepScheduler", {}),
              "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})}


@dataclasses.dataclass
class ReferenceSpec:
    """What to load on the reference side (local paths; hub ids already resolved)."""

    model: str
    family: object                          # ipadapter_jax.families.Family
    model_config: str | None = None         # single file: its diffusers config folder
    vae: str | None = None
    image_encoder: str | None = None
    ip_adapters: Sequence[str] = ()
    loras: Sequence[tuple[str, float]] = ()
    embeddings: Sequence[tuple[str, str]] = ()   # (file, token)
    controlnets: Sequence[str] = ()
    controlnet_config: str | None = None
    scheduler: str = "ddim"


def quiet() -> None:
    """diffusers' and transformers' loading bars, INFO lines and deprecation
    warnings off: the report is the output."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def _pipeline_class(family, controlnet: bool):
    import diffusers

    name = family.pipeline.replace("Pipeline", "ControlNetPipeline") if controlnet else family.pipeline
    return getattr(diffusers, name)


def load_reference(spec: ReferenceSpec):
    """The diffusers pipeline of ``spec``, every adapter, LoRA, embedding and
    ControlNet applied, in float32 eval mode."""
    import torch

    quiet()
    controlnets = [_controlnet(path, spec.controlnet_config) for path in spec.controlnets]
    cls = _pipeline_class(spec.family, bool(controlnets))
    extra = {"controlnet": controlnets if len(controlnets) > 1 else controlnets[0]} if controlnets else {}
    model = Path(spec.model)
    common = dict(extra)
    if model.is_dir():
        index = (model / "model_index.json").read_text() if (model / "model_index.json").is_file() else ""
        if "safety_checker" in index:
            common.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(str(model), **common)
    else:
        if spec.vae:
            from diffusers import AutoencoderKL

            vae_path = Path(spec.vae)
            common["vae"] = (AutoencoderKL.from_pretrained(str(vae_path)) if vae_path.is_dir()
                             else AutoencoderKL.from_single_file(str(vae_path)))
        if "safety_checker" in spec.family.configs.get("model_index", {}):   # the family's pipelines have one
            common.update(safety_checker=None, requires_safety_checker=False)
        if spec.model_config is None:
            raise BadArgument(f"the reference side loads the single file {model} with diffusers' from_single_file, "
                              "which needs its family's diffusers folder offline: give --model-config")
        pipe = cls.from_single_file(str(model), config=spec.model_config, local_files_only=True, **common)
    _scheduler(pipe, spec.scheduler)
    if spec.ip_adapters:
        _ip_adapters(pipe, spec)
    if spec.image_encoder:
        _image_encoder(pipe, spec.image_encoder)
    for i, (path, scale) in enumerate(spec.loras):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"lora{i}"])
    for path, token in spec.embeddings:
        _embedding(pipe, path, token)
    for module in pipe.components.values():   # float32 whatever the files or configs say (fp16 files upcast)
        if isinstance(module, torch.nn.Module):
            module.float().eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _controlnet(path: str, config: str | None):
    from diffusers import ControlNetModel

    if Path(path).is_dir():
        return ControlNetModel.from_pretrained(path)
    return ControlNetModel.from_single_file(path, config=config, local_files_only=True)


def _scheduler(pipe, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise BadArgument(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    cls, options = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **options)


def _ip_adapters(pipe, spec: ReferenceSpec) -> None:
    paths = [Path(p) for p in spec.ip_adapters]
    pipe.load_ip_adapter([str(p.parent) for p in paths], subfolder=[""] * len(paths),
                         weight_name=[p.name for p in paths], image_encoder_folder=None)


def _image_encoder(pipe, folder: str) -> None:
    """The CLIP vision tower and an image processor at its own resolution (as
    our preprocessing takes it), as ``ip_adapter_image`` needs them."""
    from transformers import CLIPVisionModelWithProjection
    try:   # transformers 5: the PIL processor; 4.x: the one processor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    encoder = CLIPVisionModelWithProjection.from_pretrained(folder).float().eval()
    size = encoder.config.image_size
    pipe.register_modules(image_encoder=encoder, feature_extractor=Processor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}))


def _embedding(pipe, path: str, token: str) -> None:
    """A textual-inversion file under ``token``: diffusers' one call, or for a
    family with two text encoders (SDXL: ``clip_l`` / ``clip_g``) one call per
    encoder, as diffusers documents."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    if len(encoders) == 1:
        pipe.load_textual_inversion(str(path), token=token)
        return
    from safetensors.torch import load_file

    state = load_file(str(path))
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        if key not in state:
            raise BadArgument(f"{path}: an SDXL embedding needs a {key!r} tensor, found {sorted(state)}")
        pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
