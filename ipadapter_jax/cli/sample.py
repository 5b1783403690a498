"""Generate images from a text prompt and reference images with IP-Adapter (JAX).
(`ipadapter-sample`, or `python sample.py` in the repository.)

With no arguments (or --demo) it uses the embedded demo model shipped in the package (a miniature SD +
IP-Adapter trained on procedural shapes; see configs/demo/): a default prompt and reference image, 64x64
images, no download. Any flag you give overrides the demo's choice:
  python sample.py
  python sample.py --demo --prompt "a circle on a black background" --image my_ref.png --scale 0.7

Examples with real weights:
  python sample.py --model stable-diffusion-v1-5 --image-encoder IP-Adapter/models/image_encoder \\
      --ip-adapter IP-Adapter/models/ip-adapter_sd15.safetensors --image ref.png \\
      --prompt "a cat, best quality" --scale 0.6 --steps 30 --num-images 4 --out outputs/cat.png
  python sample.py --model SD --ip-adapter a.safetensors --image x.png --ip-adapter b.bin --image y.png \\
      --scale 0.5 --scale 0.8          # two adapters, one reference image each
  python sample.py --model SD --prompt "a house" --init-image sketch.png --strength 0.6   # img2img
  python sample.py --model stable-diffusion-xl-base-1.0 --image-encoder IP-Adapter/sdxl_models/image_encoder \
      --ip-adapter IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors --image ref.png --prompt "a cat" \
      --scheduler euler --guidance 5      # SDXL: the pipeline class comes from model_index.json (1024 px)
  python sample.py --model dreamshaper_8.safetensors --model-config stable-diffusion-v1-5 \\
      --lora add_detail.safetensors:0.8 --embedding easynegative.safetensors --negative-prompt easynegative \\
      --image-encoder IP-Adapter/models/image_encoder --ip-adapter IP-Adapter/models/ip-adapter_sd15.safetensors \\
      --image ref.png --prompt "a cat"    # a civitai-style single file + a LoRA + an embedding

Reproducibility / cross-framework checks: --init-latents noise.npy (unit variance NHWC; overrides --seed,
scaled by the scheduler's initial sigma as diffusers does) and --save-latents final.npy (NHWC, before the VAE).

Models, adapters, image encoders, ControlNets, LoRAs and VAEs may be Hugging Face hub ids instead of paths:
ORG/NAME for a repository, ORG/NAME:PATH for a file or folder in it (a local path of the same spelling
wins), read from the Hugging Face cache and downloaded where the hub is reachable (not with HF_HUB_OFFLINE=1):
  python sample.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --image-encoder h94/IP-Adapter:models/image_encoder \
      --ip-adapter h94/IP-Adapter:models/ip-adapter_sd15.safetensors --image ref.png --prompt "a cat"

Compiled executables are cached in ~/.cache/ipadapter_jax (--cache-dir, or $IPADAPTER_JAX_CACHE), so a second
run with the same shapes compiles nothing.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ipadapter_jax import demo, families
from ipadapter_jax.cli import ArgumentParser, checked, run
from ipadapter_jax.cli.checks import (MAX_SIZE, check_files, check_writable, claim_output, release_outputs,
                                      keep_created_folders, resolve_encoder, resolve_model, resolve_or_error,
                                      undo_created_folders)
from ipadapter_jax.io.specs import parse_embedding_spec, parse_lora_spec

from ipadapter_jax.cli.sample_args import SCHEDULER_NAMES, build_parser

PROG = "sample.py"
SEED_RANGE = (0, 2**63 - 1)   # what jax.random.key takes (int64), non-negative as in diffusers' generators
# Flags of families with a second text encoder / with size micro-conditioning (SDXL).
SECOND_ENCODER_FLAGS = (("--prompt-2", "prompt_2"), ("--negative-prompt-2", "negative_prompt_2"))
SIZE_FLAGS = (("--original-size", "original_size"), ("--crop", "crop"), ("--target-size", "target_size"))


# --------------------------------------------------------------------------- checks (no JAX)

def parse_args(argv=None, prog: str = PROG):
    """Parse and check the command line; every check that needs no model runs
    here, before JAX is imported, and hub ids are resolved to local paths."""
    p = build_parser(prog, __doc__)
    args = p.parse_args(argv)
    args.prog = prog
    checked(p, argv, lambda: _check_all(args))
    return args


def _check_all(args) -> None:
    _resolve_defaults(args)
    _check_numbers(args)
    _resolve_sources(args)
    _check_family_flags(args)
    _family_defaults(args)
    _check_community_flags(args)
    _check_control_flags(args)
    _check_prompt_flags(args)
    check_files([*args.image, *args.mask, *args.negative_image, *args.face_embeds, args.init_image, args.init_latents,
                 *args.control_image])
    if args.save_latents and not args.save_latents.endswith(".npy"):   # as np.save names it
        args.save_latents += ".npy"
    for flag, path in (("--out", args.out), ("--save-latents", args.save_latents)):
        if path:
            check_writable(flag, Path(path))


def _resolve_defaults(args) -> None:
    """Fill unset flags: the demo's choices (no --model, or --demo), else the usual defaults."""
    if args.demo and args.model:
        raise_bad("--demo and --model are exclusive: --demo uses the embedded model")
    args.demo = args.demo or not args.model
    if args.demo:
        try:
            paths = demo.demo_paths()
        except FileNotFoundError as e:
            raise_bad(str(e))
        args.model = str(paths["sd"])
        args.image_encoder = args.image_encoder or str(paths["image_encoder"])
        if not args.ip_adapter:
            args.ip_adapter = [str(paths["adapter"])]
        if not args.image and not args.face_embeds:   # the demo's reference, for its adapter or the one given
            args.image = [str(paths["reference"])]
        defaults = dict(prompt=demo.DEFAULT_PROMPT, steps=demo.DEFAULT_STEPS, guidance=demo.DEFAULT_GUIDANCE,
                        num_images=demo.DEFAULT_NUM_IMAGES, height=demo.DEFAULT_SIZE, width=demo.DEFAULT_SIZE,
                        out="outputs/demo.png")
        args.scale = args.scale or [demo.DEFAULT_SCALE]
    else:
        # height / width stay None here: the model's size, once it is loaded.
        # steps, guidance, strength and the scheduler: the model family's defaults (_family_defaults).
        defaults = dict(prompt="", num_images=1, out="outputs/sample.png")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def raise_bad(message: str):
    from ipadapter_jax.io.errors import BadArgument

    raise BadArgument(message)


def _check_numbers(args) -> None:
    if args.scheduler is not None and args.scheduler not in SCHEDULER_NAMES:
        raise_bad(f"unknown scheduler {args.scheduler!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not (0 < value <= MAX_SIZE and value % 8 == 0):
            raise_bad(f"{flag} must be a positive multiple of 8 up to {MAX_SIZE} (8x the largest size a supported "
                      f"model was trained at), got {value}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise_bad(f"--seed must be an integer from {SEED_RANGE[0]} to 2**63 - 1, got {args.seed}"
                  + (" (-1 does not mean a random seed here: pick one)" if args.seed == -1 else ""))
    for flag, value in (("--num-images", args.num_images), ("--steps", args.steps),
                        ("--max-sequence-length", args.max_sequence_length), ("--fsdp", args.fsdp)):
        if value is not None and value < 1:
            raise_bad(f"{flag} must be at least 1, got {value}")
    for flag, values in (("--scale", args.scale), ("--guidance", [args.guidance]), ("--strength", [args.strength]),
                         ("--eta", [args.eta]), ("--guidance-rescale", [args.guidance_rescale]),
                         ("--s-scale", [args.s_scale]), ("--lora-scale", [args.lora_scale]),
                         ("--true-cfg", [args.true_cfg])):
        bad = [v for v in values if v is not None and not math.isfinite(v)]
        if bad:
            raise_bad(f"{flag} must be a finite number, got {bad[0]}")
    if args.strength is not None and not args.init_image:
        raise_bad("--strength applies to img2img: it needs --init-image")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise_bad(f"--strength must be in (0, 1], got {args.strength}")
    if args.eta is not None and args.scheduler not in (None, "ddim"):
        raise_bad("--eta applies to the ddim scheduler only")
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):   # io.outputs.IMAGE_FORMATS
        raise_bad(f"--out must name an image file (.png, .jpg, .webp), got {args.out!r}")
    _warn_unusual(args)


# Values outside these ranges work but nobody means them: a one-line warning, then sampling.
USUAL = {"--scale": (0.0, 2.0), "--guidance": (0.0, 30.0), "--guidance-rescale": (0.0, 1.0)}


def _warn_unusual(args) -> None:
    values = {"--scale": args.scale, "--guidance": [args.guidance], "--guidance-rescale": [args.guidance_rescale]}
    for flag, (low, high) in USUAL.items():
        odd = [v for v in values[flag] if v is not None and not low <= v <= high]
        if odd:
            print(f"{args.prog}: warning: {flag} {odd[0]:g} is outside the usual range [{low:g}, {high:g}]; "
                  "sampling with it anyway", file=sys.stderr)


def _resolve_sources(args) -> None:
    """Model-side flags (paths or hub ids) -> local paths, each checked to exist."""
    args.model = str(resolve_model("--model", args.model))
    args.ip_adapter = [str(resolve_or_error("--ip-adapter", f, "file", "IP-Adapter file"))
                       for f in args.ip_adapter]
    if args.image_encoder:
        args.image_encoder = str(resolve_encoder("--image-encoder", args.image_encoder))
    args.controlnet = [str(resolve_or_error("--controlnet", c, "any", "ControlNet folder or file"))
                       for c in args.controlnet]
    for flag, name, kind, configs_only in (("--vae", "vae", "any", False),
                                           ("--model-config", "model_config", "folder", True),
                                           ("--controlnet-config", "controlnet_config", "any", True)):
        if getattr(args, name):
            setattr(args, name, str(resolve_or_error(flag, getattr(args, name), kind, None,
                                                     configs_only=configs_only)))


def _family(args):
    """The model's family (a folder's model_index.json / configs, a .safetensors
    file's keys), or None where it is known only once loaded (a .ckpt)."""
    from ipadapter_jax.convert.ldm_detect import detect_family, read_layout   # numpy only, no JAX
    from ipadapter_jax.io.files import is_safetensors

    model = Path(args.model)
    if model.is_dir():
        return families.of_folder(model)
    return detect_family(read_layout(model).shapes, str(model)) if is_safetensors(model) else None


def family_flags_refused(family, args) -> list[str]:
    """The SDXL-only flags given for a family without a second text encoder / size conditioning."""
    refused = []
    if len(family.text) < 2:
        refused += [flag for flag, name in SECOND_ENCODER_FLAGS if getattr(args, name) is not None]
    if family.added_conditioning is None:
        refused += [flag for flag, name in SIZE_FLAGS if getattr(args, name) is not None]
    return refused


def refuse_family_flags(family, args) -> None:
    """Flags of another family than ``family`` (None: not known yet) are an error naming them."""
    refused = family_flags_refused(family, args) if family is not None else []
    if refused:
        what = "checkpoint (no conditioner.* keys)" if args.single_file else "folder (model_index.json / configs)"
        raise_bad(f"{', '.join(refused)} {'applies' if len(refused) == 1 else 'apply'} to SDXL models only; "
                  f"{args.model} is not an SDXL {what}: it is {family.title}")


def _check_family_flags(args) -> None:
    """Flags of another family are refused (a .ckpt's family is checked once it is loaded)."""
    args.single_file = Path(args.model).is_file()
    args.family = _family(args)
    refuse_family_flags(args.family, args)
    for flag, name in SIZE_FLAGS:
        value = getattr(args, name)
        if value is not None and (min(value) < 0 or (name != "crop" and min(value) == 0)):
            raise_bad(f"{flag} takes {'non-negative' if name == 'crop' else 'positive'} numbers, got {value}")


# Flags that mean something for one kind of denoiser only: (flag, attribute, value when not given).
SD_ONLY = (("--scheduler", "scheduler", None), ("--eta", "eta", None), ("--guidance-rescale", "guidance_rescale", 0.0),
           ("--face-embeds", "face_embeds", []), ("--s-scale", "s_scale", 1.0), ("--lora-scale", "lora_scale", 1.0),
           ("--prompt-2", "prompt_2", None), ("--negative-prompt-2", "negative_prompt_2", None),
           ("--controlnet", "controlnet", []), ("--lora-lenient", "lora_lenient", False),
           ("--embedding", "embedding", []),
           ("--ema", "ema", None), ("--prediction-type", "prediction_type", None))
FLUX_ONLY = (("--true-cfg", "true_cfg", None), ("--max-sequence-length", "max_sequence_length", None),
             ("--fsdp", "fsdp", None))


def _given(args, flags) -> list[str]:
    return [flag for flag, name, unset in flags if getattr(args, name) != unset]


def _family_defaults(args) -> None:
    """Defaults and refusals that depend on the model's family: a FLUX folder
    (a transformer denoiser) takes the FLUX flags and not the UNet ones, and
    the other way round; IP-Adapter files must be made for the family."""
    family = args.family
    flux = family is not None and family.denoiser == "transformer"
    refused = _given(args, SD_ONLY if flux else FLUX_ONLY)
    if refused:
        kind = "Stable Diffusion (UNet) models" if flux else "FLUX models"
        raise_bad(f"{', '.join(refused)} {'applies' if len(refused) == 1 else 'apply'} to {kind} only; "
                  f"{args.model} is {family.title if family else 'a Stable Diffusion checkpoint'}")
    if flux and args.single_file and not args.model_config:
        raise_bad(f"{args.model} is a FLUX transformer file (BFL layout), which holds no text encoders, tokenizers "
                  "or VAE: give --model-config FOLDER, a diffusers FLUX folder (its transformer weights are not "
                  "read), and optionally --vae")
    if flux:
        true_cfg = args.true_cfg is not None and args.true_cfg > 1
        if true_cfg and args.negative_prompt is None:
            raise_bad("--true-cfg needs a --negative-prompt (FLUX's real classifier-free guidance runs against it)")
        if not true_cfg and (args.negative_prompt is not None or args.negative_image):
            given = "--negative-prompt" if args.negative_prompt is not None else "--negative-image"
            raise_bad(f"{given} applies to FLUX with --true-cfg S > 1 (real classifier-free guidance); the embedded "
                      "guidance (--guidance) takes no negative")
        distilled = _flux_guidance_embeds(args.model)
        defaults = dict(steps=28 if distilled else 4, guidance=3.5 if distilled else 0.0, strength=0.6,
                        true_cfg=1.0, max_sequence_length=512, fsdp=1)
        if args.max_sequence_length is not None and args.max_sequence_length > 512:
            raise_bad(f"--max-sequence-length must be from 1 to 512 (T5 tokens), got {args.max_sequence_length}")
        for flag, value in (("--height", args.height), ("--width", args.width)):
            if value is not None and value % 16:
                raise_bad(f"{flag} must be a multiple of 16 for FLUX (the VAE's 8 x 2x2 latent packing), got {value}")
    else:
        defaults = dict(steps=30, guidance=7.5, strength=0.8, scheduler="ddim")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_adapter_families(args, family)


def _flux_guidance_embeds(model: str) -> bool:
    """Whether a FLUX transformer embeds guidance (dev) or not (schnell): a folder's
    config says, a single file's ``guidance_in.*`` keys."""
    import json

    from ipadapter_jax.io.files import read_safetensors_header

    if Path(model).is_file():
        return any("guidance_in." in key for key in read_safetensors_header(model)[0])
    try:
        return bool(json.loads((Path(model) / "transformer" / "config.json").read_text()).get("guidance_embeds"))
    except (OSError, ValueError):
        return True      # the loader names the missing or broken config


def _check_adapter_families(args, family) -> None:
    """An SD adapter on FLUX or a FLUX adapter on SD is one line naming both (safetensors keys, no JAX)."""
    from ipadapter_jax.io.files import is_safetensors, read_safetensors_header

    if family is None:
        return
    for path in args.ip_adapter:
        if not is_safetensors(path):
            continue
        made_for = families.adapter_denoiser(read_safetensors_header(path)[0])
        if made_for is not None and made_for != family.denoiser:
            what = ("a FLUX IP-Adapter (XLabs layout)" if made_for == "transformer" else
                    "a Stable Diffusion IP-Adapter (h94/IP-Adapter layout)")
            raise_bad(f"--ip-adapter {path} is {what} but {args.model} is {family.title}: use an adapter made for "
                      f"{family.title} ({family.adapters})")


def _check_community_flags(args) -> None:
    """Single-file flags need a single file; --lora / --embedding specs parse and
    name existing files (or hub ids)."""
    single = [flag for flag, value in (("--model-config", args.model_config), ("--vae", args.vae),
                                       ("--prediction-type", args.prediction_type),
                                       ("--ema" if args.ema else "--no-ema", args.ema)) if value is not None]
    if single and Path(args.model).is_dir():
        raise_bad(f"{', '.join(single)} {'applies' if len(single) == 1 else 'apply'} to single-file models "
                  f"(--model FILE) only; {args.model} is a folder, which has its own configs, tokenizers and VAE")
    for spec in args.lora:
        resolve_or_error("--lora", str(parse_lora_spec(spec)[0]), "file", "LoRA file (.safetensors, .pt, .bin)")
    if args.lora_lenient and not args.lora:
        raise_bad("--lora-lenient needs a --lora")
    for spec in args.embedding:
        resolve_or_error("--embedding", str(parse_embedding_spec(spec)[0]), "file",
                         "embedding file (.safetensors, .pt, .bin)")


def _check_prompt_flags(args) -> None:
    """The image-prompt flags agree with each other."""
    if args.image and not args.image_encoder:
        raise_bad("--image needs --image-encoder (the CLIP vision folder the adapter was trained with)")
    if args.image and not args.ip_adapter:
        raise_bad("--image needs an --ip-adapter")
    if args.ip_adapter and not args.image and not args.face_embeds:
        raise_bad("--ip-adapter needs at least one --image (or --face-embeds for a FaceID adapter)")
    if args.face_embeds and not args.ip_adapter:
        raise_bad("--face-embeds needs a FaceID --ip-adapter")
    if len(args.scale) not in (0, 1, len(args.ip_adapter)):
        raise_bad(f"give --scale once or once per adapter ({len(args.ip_adapter)}), got {len(args.scale)}")
    if len(args.ip_adapter) > 1 and len(args.image) != len(args.ip_adapter) and not args.face_embeds:
        raise_bad(f"with {len(args.ip_adapter)} adapters give one --image per adapter, got {len(args.image)}")
    if args.negative_image and not args.ip_adapter:
        raise_bad("--negative-image needs an --ip-adapter")
    if len(args.negative_image) not in (0, 1, len(args.ip_adapter)):
        raise_bad(f"give --negative-image once or once per adapter ({len(args.ip_adapter)}), "
                  f"got {len(args.negative_image)}")
    if args.mask and len(args.mask) != len(args.image):
        raise_bad(f"{len(args.mask)} masks for {len(args.image)} images: give one --mask per --image")


def _image_prompts(args, pipe, spec_class) -> list:
    """Load the adapters; one image prompt each: its --image(s) (with one adapter,
    all of them), its --scale, its --mask(s); FaceID adapters take the next
    --face-embeds (FaceID-Plus: and the face crop as --image)."""
    import numpy as np

    from ipadapter_jax.io.errors import BadArgument

    adapters = [pipe.load_ip_adapter(path) for path in args.ip_adapter]
    face_ids = iter(args.face_embeds)
    image_users = [a for a in adapters if not (a.spec.needs_face_id and not a.spec.takes_face_crop)]
    if len(adapters) > 1 and len(args.image) != len(image_users):
        raise BadArgument(f"{len(image_users)} of the {len(adapters)} adapters take an image: give one --image each "
                          f"(in --ip-adapter order), got {len(args.image)}")
    n_face = sum(a.spec.needs_face_id for a in adapters)
    if len(args.face_embeds) != n_face:
        raise BadArgument(f"{n_face} FaceID adapters: give one --face-embeds each, got {len(args.face_embeds)}")
    takes_image = {id(a) for a in image_users}
    next_image = 0
    specs = []
    for i, adapter in enumerate(adapters):
        scale = args.scale[i] if len(args.scale) > 1 else (args.scale[0] if args.scale else 1.0)
        own, masks = None, None
        if id(adapter) in takes_image:
            own = args.image if len(adapters) == 1 else [args.image[next_image]]
            if args.mask:
                masks = args.mask if len(adapters) == 1 else [args.mask[next_image]]
            next_image += 1
        face = np.load(next(face_ids)) if adapter.spec.needs_face_id else None
        negative = None
        if args.negative_image:
            negative = [args.negative_image[i] if len(args.negative_image) > 1 else args.negative_image[0]]
        specs.append(spec_class(images=own or None, face_embeds=face, scale=scale, masks=masks,
                                s_scale=args.s_scale, lora_scale=args.lora_scale, negative_images=negative))
    return specs


def _flux_image_prompts(args, pipe, spec_class) -> list:
    """FLUX: load the adapters; each takes its --image (one adapter: all of them),
    --scale, --mask and --negative-image (one for all or one per adapter)."""
    adapters = [pipe.load_ip_adapter(path) for path in args.ip_adapter]
    specs = []
    for i, _ in enumerate(adapters):
        scale = args.scale[i] if len(args.scale) > 1 else (args.scale[0] if args.scale else 1.0)
        own = args.image if len(adapters) == 1 else [args.image[i]]
        masks = (args.mask if len(adapters) == 1 else [args.mask[i]]) if args.mask else None
        negative = None
        if args.negative_image:
            negative = [args.negative_image[i] if len(args.negative_image) > 1 else args.negative_image[0]]
        specs.append(spec_class(images=own, scale=scale, masks=masks, negative_images=negative))
    return specs


def _check_control_flags(args) -> None:
    """The ControlNet flags agree with each other (before anything is loaded)."""
    n = len(args.controlnet)
    if args.control_image and not n:
        raise_bad("--control-image needs a --controlnet")
    if n and len(args.control_image) != n:
        raise_bad(f"give one --control-image per --controlnet: {n} ControlNets, {len(args.control_image)} images")
    if len(args.control_scale) not in (0, 1, n):
        raise_bad(f"give --control-scale once or once per ControlNet ({n}), got {len(args.control_scale)}")
    for flag, values in (("--control-scale", args.control_scale),
                         ("--control-start", [args.control_start]), ("--control-end", [args.control_end])):
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise_bad(f"{flag} must be a finite number, got {bad[0]}")
    if not 0.0 <= args.control_start < args.control_end <= 1.0:
        raise_bad(f"need 0 <= --control-start < --control-end <= 1, got {args.control_start} and {args.control_end}")
    for path in args.controlnet:
        if not Path(path).exists():
            raise_bad(f"--controlnet not found: {path}")
    given = [flag for flag, used in (("--control-scale", args.control_scale), ("--guess-mode", args.guess_mode),
                                     ("--control-start", args.control_start != 0.0),
                                     ("--control-end", args.control_end != 1.0),
                                     ("--control-preprocess", args.control_preprocess != "none"),
                                     ("--controlnet-config", args.controlnet_config)) if used]
    if given and not n:
        raise_bad(f"{', '.join(given)} need a --controlnet")
    if args.control_preprocess == "canny":
        import importlib.util

        if importlib.util.find_spec("cv2") is None:
            raise_bad("--control-preprocess canny needs OpenCV: pip install 'ipadapter-jax[control]' "
                    "(or opencv-python-headless)")


# --------------------------------------------------------------------------- the run (JAX from here on)

def _load_model(args, dtype):
    """The pipeline of --model (``pipeline.load_pipeline``: a folder, or a single
    file read with its flags), with the --lora files merged into its weights
    and the --embedding tokens added."""
    from ipadapter_jax.convert.lora import apply_loras
    from ipadapter_jax.convert.textual_inversion import load_embeddings
    from ipadapter_jax.pipeline import load_pipeline

    options = dict(config_dir=args.model_config, vae=args.vae, ema=bool(args.ema),
                   prediction_type=args.prediction_type) if args.single_file else {}
    if getattr(args, "fsdp", None) is not None:      # FLUX only (_family_defaults); the parity CLI has none
        options["fsdp"] = args.fsdp
    pipe = load_pipeline(args.model, image_encoder=args.image_encoder, dtype=dtype, **options)
    refuse_family_flags(pipe.family, args)   # a .ckpt: its family is known only now
    if pipe.family.denoiser == "transformer":    # FLUX: transformer LoRA (kohya, PEFT, BFL names)
        for path, scale in map(parse_lora_spec, args.lora):
            print(pipe.load_lora(path, scale), file=sys.stderr)
        return pipe
    for report in apply_loras(pipe, args.lora, lenient=args.lora_lenient):
        print(report, file=sys.stderr)
    for tokens in load_embeddings(pipe, args.embedding):
        print(f"embedding: use {tokens[0]!r} in prompts", file=sys.stderr)
    return pipe


def _controls(args, pipe) -> list:
    """Load the --controlnet models; one ControlNetSpec each."""
    from ipadapter_jax.pipeline.control import ControlNetSpec

    controls = []
    for i, (net, image) in enumerate(zip(args.controlnet, args.control_image)):
        # --controlnet-config is for single files; a diffusers folder carries its own config.json.
        pipe.load_controlnet(net, config=args.controlnet_config if Path(net).is_file() else None)
        scale = args.control_scale[i] if len(args.control_scale) > 1 else (
            args.control_scale[0] if args.control_scale else 1.0)
        controls.append(ControlNetSpec(image, scale=scale, start=args.control_start, end=args.control_end,
                                       preprocess=args.control_preprocess))
    return controls


# Optional call arguments, passed only when given (each pipeline has its own default).
_OPTIONAL = (("negative_prompt", "negative_prompt"), ("prompt_2", "prompt_2"),
             ("negative_prompt_2", "negative_prompt_2"), ("original_size", "original_size"),
             ("crops_coords_top_left", "crop"), ("target_size", "target_size"))


def generate(argv, prog: str = PROG) -> int:
    args = parse_args(argv, prog)
    try:
        claim_output("--out", Path(args.out))
        status = _generate(args, prog)
        keep_created_folders()
        return status
    except BaseException:
        release_outputs()
        undo_created_folders()    # a folder made for an output never written
        raise
    finally:
        release_outputs()


def _generate(args, prog: str) -> int:
    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.io.outputs import load_latents
    from ipadapter_jax.pipeline import ImagePromptSpec

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        # Cache every executable (the encoders' and the VAE's compile in under a second each, but they add up).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    pipe = _load_model(args, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    args.height = pipe.default_size if args.height is None else args.height
    args.width = pipe.default_size if args.width is None else args.width
    flux = pipe.family.denoiser == "transformer"
    specs = _flux_image_prompts(args, pipe, ImagePromptSpec) if flux else _image_prompts(args, pipe, ImagePromptSpec)
    controls = _controls(args, pipe)
    latents = None
    if args.init_latents:
        latents = load_latents(args.init_latents)
        if latents.shape[0] != args.num_images:
            print(f"{prog}: --init-latents holds {latents.shape[0]} samples; generating that many", file=sys.stderr)
            args.num_images = latents.shape[0]
    if flux:
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, ip_adapter_prompts=specs,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg,
                      height=args.height, width=args.width, num_images=args.num_images, seed=args.seed,
                      latents=latents, init_image=args.init_image, strength=args.strength,
                      max_sequence_length=args.max_sequence_length, progress=not args.no_progress,
                      allow_nonfinite=args.allow_nonfinite)
        return _write_results(args, result, t_start)
    optional = {name: getattr(args, attr) for name, attr in _OPTIONAL if getattr(args, attr) is not None}
    result = pipe(args.prompt, ip_adapter_prompts=specs, **optional,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  guidance_rescale=args.guidance_rescale, scheduler=args.scheduler,
                  scheduler_options={"eta": args.eta} if args.eta is not None else None,
                  height=args.height, width=args.width, num_images=args.num_images, seed=args.seed,
                  latents=latents, init_image=args.init_image, strength=args.strength,
                  controlnet_inputs=controls, guess_mode=args.guess_mode,
                  progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite)
    return _write_results(args, result, t_start)


def _write_results(args, result, t_start: float) -> int:
    from ipadapter_jax.io.outputs import save_images, save_latents

    if args.save_latents:
        save_latents(result.latents, args.save_latents)
    paths = save_images(result.images, args.out)
    t = result.timings
    print(f"compile {t['compile_s']:.2f} s | denoise {t['denoise_s']:.2f} s ({t['steps']} steps, "
          f"{t['steps_per_s']:.2f} steps/s) | decode {t['decode_s']:.2f} s | total "
          f"{time.perf_counter() - t_start:.2f} s")
    print("wrote " + ", ".join(str(p.resolve()) for p in paths))
    return 0


def main(argv=None) -> int:
    """The sample command (``ipadapter-sample``, ``python sample.py``) with user
    errors as one line (``--debug`` for tracebacks). Run as a command (``argv``
    None), Ctrl-C or SIGTERM at any moment exits 130 / 143 with one line and
    no partial file (``cli.interrupts``)."""
    name = Path(sys.argv[0]).name
    prog = name if name.startswith("ipadapter-") else PROG
    return run(prog, lambda a: generate(a, prog), argv)
