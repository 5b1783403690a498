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

import argparse
import math
import os
import sys
import time
from pathlib import Path

from ipadapter_jax import demo, families
from ipadapter_jax.cli import ArgumentParser, debug_requested, run
from ipadapter_jax.cli.checks import (check_files, check_writable, claim_output, release_outputs, resolve_encoder,
                                      resolve_model, resolve_or_error, undo_created_folders)
from ipadapter_jax.io.errors import UserError
from ipadapter_jax.io.specs import parse_embedding_spec, parse_lora_spec

# The schedulers' names (ipadapter_jax.schedulers.NAMES, read without loading JAX).
from ipadapter_jax.schedulers import NAMES as SCHEDULER_NAMES

PROG = "sample.py"
# Larger images than any supported model was trained for by 8x (SDXL: 1024 px) take hours to compile
# and sample on any machine; a typo (an extra 0) should not start that.
MAX_SIZE = 8192
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}   # --out suffix -> PIL format
SEED_RANGE = (0, 2**63 - 1)   # what jax.random.key takes (int64), non-negative as in diffusers' generators
# Flags of families with a second text encoder / with size micro-conditioning (SDXL).
SECOND_ENCODER_FLAGS = (("--prompt-2", "prompt_2"), ("--negative-prompt-2", "negative_prompt_2"))
SIZE_FLAGS = (("--original-size", "original_size"), ("--crop", "crop"), ("--target-size", "target_size"))
DEFAULT_CACHE = os.environ.get("IPADAPTER_JAX_CACHE", str(Path.home() / ".cache" / "ipadapter_jax"))


def build_parser(prog: str = PROG) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_prompt_args(p)
    _add_community_args(p)
    _add_second_encoder_args(p)
    _add_control_args(p)
    _add_sampling_args(p)
    _add_output_args(p)
    return p


def _add_model_args(p) -> None:
    p.add_argument("--model", help="diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, "
                                   "scheduler/) of any supported family (SD 1.x/2.x, SDXL: model_index.json says "
                                   "which), a single-file checkpoint (.safetensors / .ckpt in the LDM layout of "
                                   "AUTOMATIC1111, ComfyUI and civitai; the family is detected from its keys; "
                                   "tokenizers from --model-config or the local Hugging Face cache), or a hub id "
                                   "(ORG/NAME, ORG/NAME:FILE); without it, the embedded demo model")
    p.add_argument("--demo", action="store_true",
                   help="use the embedded demo model, its adapter, image encoder and reference image (the default "
                        "when --model is not given)")
    p.add_argument("--ip-adapter", action="append", default=[], metavar="FILE",
                   help="official IP-Adapter file (.safetensors or .bin; or ORG/NAME:FILE); repeat for several "
                        "adapters")
    p.add_argument("--image-encoder", help="CLIP image encoder folder (transformers layout), e.g. "
                                           "IP-Adapter/models/image_encoder or h94/IP-Adapter:models/image_encoder; "
                                           "needed to encode --image")


def _add_prompt_args(p) -> None:
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="reference image; with several adapters, the i-th --image goes to the i-th adapter; "
                        "with one adapter, all images condition it (tokens concatenated)")
    p.add_argument("--face-embeds", action="append", default=[], metavar="NPY",
                   help="FaceID adapters: InsightFace ID embeddings (.npy, [N, 512] or [512]); the i-th goes to the "
                        "i-th FaceID adapter. FaceID-Plus also takes the face crop as its --image")
    p.add_argument("--s-scale", type=float, default=1.0,
                   help="FaceID-Plus(V2) shortcut scale s_scale (default 1.0)")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="strength of a FaceID adapter's LoRA (default 1.0)")
    p.add_argument("--mask", action="append", default=[], metavar="PATH",
                   help="attention mask per reference image (white = where that image applies)")
    p.add_argument("--scale", action="append", type=float, default=[],
                   help="IP-Adapter scale; once for all adapters or once per adapter (default 1.0; demo 0.5)")
    p.add_argument("--prompt", default=None, help="text prompt (default: empty, image-only prompting; demo: "
                   "a short shape prompt)")
    p.add_argument("--negative-prompt", default=None,
                   help="negative text prompt (default: empty; SDXL: none, i.e. zero negative conditioning when "
                        "the model says force_zeros_for_empty_prompt, as diffusers)")


def _add_second_encoder_args(p) -> None:
    g = p.add_argument_group("SDXL only")
    g.add_argument("--prompt-2", default=None, help="prompt for the second text encoder (default: --prompt)")
    g.add_argument("--negative-prompt-2", default=None,
                   help="negative prompt for the second text encoder (default: --negative-prompt)")
    g.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="micro-conditioning original size (default: --height --width)")
    g.add_argument("--crop", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                   help="micro-conditioning crop top-left (default: 0 0)")
    g.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="micro-conditioning target size (default: --height --width)")


def _add_control_args(p) -> None:
    g = p.add_argument_group("ControlNet (structure from a control map; repeat the flags per ControlNet)")
    g.add_argument("--controlnet", action="append", default=[], metavar="DIR_OR_FILE",
                   help="ControlNet: a diffusers folder, a single file (.safetensors / .pth) in the original "
                        "control_v11p_sd15_* layout (SD 1.5's config; --controlnet-config for others), or a hub id")
    g.add_argument("--controlnet-config", default=None, metavar="DIR",
                   help="diffusers ControlNet folder (or config.json) whose config the single-file "
                        "--controlnet files use (SDXL or unusual sizes); folders keep their own")
    g.add_argument("--control-image", action="append", default=[], metavar="PNG",
                   help="control map, one per --controlnet in the same order (edges, depth, pose, ...; "
                        "resized to the output size)")
    g.add_argument("--control-scale", action="append", type=float, default=[], metavar="S",
                   help="conditioning scale: once for all ControlNets or once per ControlNet (default 1.0)")
    g.add_argument("--control-start", type=float, default=0.0, metavar="F",
                   help="fraction of the steps after which the ControlNets start acting (default 0)")
    g.add_argument("--control-end", type=float, default=1.0, metavar="F",
                   help="fraction of the steps after which they stop (default 1)")
    g.add_argument("--guess-mode", action="store_true",
                   help="ControlNets on the conditional half only, residuals scaled 0.1 -> 1.0 (diffusers' "
                        "guess mode: the control map alone guides the structure)")
    g.add_argument("--control-preprocess", choices=["none", "canny"], default="none",
                   help="none: --control-image is already a map; canny: OpenCV's Canny edges of a photo "
                        "(pip install 'ipadapter-jax[control]')")


def _add_sampling_args(p) -> None:
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; demo 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default 7.5; demo 5)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale factor (default 0)")
    p.add_argument("--scheduler", default="ddim", help=f"one of {', '.join(SCHEDULER_NAMES)} (default ddim)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num-images", type=int, default=None, help="images to generate (default 1; demo 4)")
    p.add_argument("--height", type=int, default=None,
                   help="image height, multiple of 8 (default: the model's size, its UNet's sample_size x 8: 512 "
                        "for SD 1.x, 768 for SD 2.1, 1024 for SDXL; demo 64)")
    p.add_argument("--width", type=int, default=None,
                   help="image width, multiple of 8 (default: the model's size; demo 64)")
    p.add_argument("--init-image", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img strength in (0, 1] (default 0.8; needs --init-image)")
    p.add_argument("--init-latents", help="initial noise .npy [N, H/8, W/8, 4], unit variance; overrides --seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="UNet/text-encoder compute dtype (default float32; bfloat16 on accelerators)")


def _add_output_args(p) -> None:
    p.add_argument("--save-latents", help="write the final latents (NHWC, before the VAE) to this .npy")
    p.add_argument("--out", default=None,
                   help="output PNG (default outputs/sample.png; demo outputs/demo.png); several images are written "
                        "as NAME-0.png, NAME-1.png, ... plus NAME-grid.png")
    p.add_argument("--no-progress", action="store_true",
                   help="no per-step progress bar: the bar needs a host callback inside the compiled loop, and "
                        "JAX does not cache executables with callbacks on disk, so this makes a second run start "
                        "faster")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write the images even when the result holds NaN / inf (for debugging; by default such a "
                        "result is an error and no image is written)")
    p.add_argument("--debug", action="store_true",
                   help="show Python tracebacks for user errors too (or set IPADAPTER_JAX_DEBUG=1)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE,
                   help=f"persistent XLA compilation cache (a second run skips compiling; default {DEFAULT_CACHE}, "
                        "or $IPADAPTER_JAX_CACHE); '' uses none, unless JAX's own JAX_COMPILATION_CACHE_DIR is set")


# --------------------------------------------------------------------------- checks (no JAX)

def parse_args(argv=None, prog: str = PROG):
    """Parse and check the command line; every check that needs no model runs
    here, before JAX is imported, and hub ids are resolved to local paths."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    args.prog = prog
    try:
        _resolve_defaults(args)
        _check_numbers(args)
        _resolve_sources(args)
        _check_family_flags(args)
        _check_community_flags(args)
        _check_control_flags(p, args)
        _check_prompt_flags(args)
        check_files([*args.image, *args.mask, *args.face_embeds, args.init_image, args.init_latents,
                     *args.control_image])
        for flag, path in (("--out", args.out), ("--save-latents", args.save_latents)):
            if path:
                check_writable(flag, Path(path))
        claim_output("--out", Path(args.out))
    except UserError as e:
        undo_created_folders()
        if debug_requested(argv if argv is not None else sys.argv[1:]):
            raise
        p.error(str(e))
    return args


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
        defaults = dict(prompt="", steps=30, guidance=7.5, num_images=1, out="outputs/sample.png")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def raise_bad(message: str):
    from ipadapter_jax.io.errors import BadArgument

    raise BadArgument(message)


def _check_numbers(args) -> None:
    if args.scheduler not in SCHEDULER_NAMES:
        raise_bad(f"unknown scheduler {args.scheduler!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not (0 < value <= MAX_SIZE and value % 8 == 0):
            raise_bad(f"{flag} must be a positive multiple of 8 up to {MAX_SIZE} (8x the largest size a supported "
                      f"model was trained at), got {value}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise_bad(f"--seed must be an integer from {SEED_RANGE[0]} to 2**63 - 1, got {args.seed}"
                  + (" (-1 does not mean a random seed here: pick one)" if args.seed == -1 else ""))
    for flag, value in (("--num-images", args.num_images), ("--steps", args.steps)):
        if value < 1:
            raise_bad(f"{flag} must be at least 1, got {value}")
    for flag, values in (("--scale", args.scale), ("--guidance", [args.guidance]), ("--strength", [args.strength]),
                         ("--eta", [args.eta]), ("--guidance-rescale", [args.guidance_rescale]),
                         ("--s-scale", [args.s_scale]), ("--lora-scale", [args.lora_scale])):
        bad = [v for v in values if v is not None and not math.isfinite(v)]
        if bad:
            raise_bad(f"{flag} must be a finite number, got {bad[0]}")
    if args.strength is not None and not args.init_image:
        raise_bad("--strength applies to img2img: it needs --init-image")
    args.strength = 0.8 if args.strength is None else args.strength
    if not 0.0 < args.strength <= 1.0:
        raise_bad(f"--strength must be in (0, 1], got {args.strength}")
    if args.eta is not None and args.scheduler != "ddim":
        raise_bad("--eta applies to the ddim scheduler only")
    if Path(args.out).suffix.lower() not in IMAGE_FORMATS:
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


def _check_family_flags(args) -> None:
    """Flags of another family are refused (a .ckpt's family is checked once it is loaded)."""
    args.single_file = Path(args.model).is_file()
    args.family = _family(args)
    refused = family_flags_refused(args.family, args) if args.family is not None else []
    if refused:
        raise_bad(f"{', '.join(refused)} {'applies' if len(refused) == 1 else 'apply'} to SDXL models only; "
                  f"{args.model} is not an SDXL "
                  f"{'checkpoint (no conditioner.* keys)' if args.single_file else 'folder (model_index.json)'}")
    for flag, name in SIZE_FLAGS:
        value = getattr(args, name)
        if value is not None and (min(value) < 0 or (name != "crop" and min(value) == 0)):
            raise_bad(f"{flag} takes {'non-negative' if name == 'crop' else 'positive'} numbers, got {value}")


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
        specs.append(spec_class(images=own or None, face_embeds=face, scale=scale, masks=masks,
                                s_scale=args.s_scale, lora_scale=args.lora_scale))
    return specs


def _check_control_flags(p, args) -> None:
    """The ControlNet flags agree with each other (before anything is loaded)."""
    n = len(args.controlnet)
    if args.control_image and not n:
        p.error("--control-image needs a --controlnet")
    if n and len(args.control_image) != n:
        p.error(f"give one --control-image per --controlnet: {n} ControlNets, {len(args.control_image)} images")
    if len(args.control_scale) not in (0, 1, n):
        p.error(f"give --control-scale once or once per ControlNet ({n}), got {len(args.control_scale)}")
    for flag, values in (("--control-scale", args.control_scale),
                         ("--control-start", [args.control_start]), ("--control-end", [args.control_end])):
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            p.error(f"{flag} must be a finite number, got {bad[0]}")
    if not 0.0 <= args.control_start < args.control_end <= 1.0:
        p.error(f"need 0 <= --control-start < --control-end <= 1, got {args.control_start} and {args.control_end}")
    for path in args.controlnet:
        if not Path(path).exists():
            p.error(f"--controlnet not found: {path}")
    given = [flag for flag, used in (("--control-scale", args.control_scale), ("--guess-mode", args.guess_mode),
                                     ("--control-start", args.control_start != 0.0),
                                     ("--control-end", args.control_end != 1.0),
                                     ("--control-preprocess", args.control_preprocess != "none"),
                                     ("--controlnet-config", args.controlnet_config)) if used]
    if given and not n:
        p.error(f"{', '.join(given)} need a --controlnet")
    if args.control_preprocess == "canny":
        import importlib.util

        if importlib.util.find_spec("cv2") is None:
            p.error("--control-preprocess canny needs OpenCV: pip install 'ipadapter-jax[control]' "
                    "(or opencv-python-headless)")


def _add_community_args(p) -> None:
    """Flags for community checkpoints: single files, LoRA and textual-inversion embeddings."""
    g = p.add_argument_group(
        "community checkpoints (single-file models, LoRA, textual inversion)",
        "--model-config, --ema/--no-ema, --vae and --prediction-type apply to --model FILE only (a folder has its "
        "own); --lora and --embedding work with any model")
    g.add_argument("--model-config", metavar="DIR",
                   help="with --model FILE: a diffusers folder of the file's family (SD 1.x, 2.x or SDXL); its "
                        "tokenizers (a single file has none) and configs are used, not its weights; without it, "
                        "the family's tokenizers from the local Hugging Face cache (never downloaded)")
    ema = g.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="with --model FILE: the UNet's EMA weights (model_ema.*)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", default=None,
                     help="with --model FILE: the plain UNet weights (the default, as diffusers)")
    g.add_argument("--vae", metavar="DIR_OR_FILE",
                   help="with --model FILE: a VAE folder or file replacing the file's (needed when the file has "
                        "none and --model-config holds no VAE weights)")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="with --model FILE: what the UNet predicts, where the file does not say (default: "
                        "--model-config's scheduler, else the family's: SD 2.x v_prediction, others epsilon)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA file (kohya / A1111 / civitai, or diffusers / PEFT; LoCon too) into the UNet "
                        "and text encoder(s) at load, scaled by SCALE (default 1.0); repeatable, each with its "
                        "own scale; a layer the model lacks is an error")
    g.add_argument("--lora-lenient", action="store_true",
                   help="skip LoRA layers the model lacks (listed on stderr) instead of refusing the file")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds, SDXL "
                        "clip_l + clip_g); write TOKEN (default: the file's stem, or its diffusers key) in "
                        "--prompt or --negative-prompt; repeatable")


def save_images(images, out: Path) -> list[Path]:
    """One image file per image (NAME-0.png, ... and a NAME-grid.png for several),
    each written atomically: an interrupted run leaves no half-written image."""
    import numpy as np

    as_uint8 = (np.clip(images, 0, 1) * 255).round().astype("uint8")
    if len(as_uint8) == 1:
        return [_save_image(as_uint8[0], out)]
    paths = [_save_image(img, out.with_name(f"{out.stem}-{i}{out.suffix}")) for i, img in enumerate(as_uint8)]
    cols = int(np.ceil(np.sqrt(len(as_uint8))))
    rows = int(np.ceil(len(as_uint8) / cols))
    h, w = as_uint8.shape[1:3]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, img in enumerate(as_uint8):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    return paths + [_save_image(grid, out.with_name(f"{out.stem}-grid{out.suffix}"))]


def _save_image(pixels, path: Path) -> Path:
    from PIL import Image

    from ipadapter_jax.io.files import atomic_write

    with atomic_write(path) as tmp:
        Image.fromarray(pixels).save(tmp, format=IMAGE_FORMATS[path.suffix.lower()])
    return path


def _save_latents(latents, path: Path) -> None:
    import numpy as np

    from ipadapter_jax.io.files import atomic_write

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, latents)


def _load_latents(path: str):
    """An ``.npy`` of initial noise [N, h, w, C]; a clear error for anything else."""
    from ipadapter_jax.io.errors import BadFile
    from ipadapter_jax.io.files import read_npy

    try:
        latents = read_npy(path)
    except BadFile as e:
        raise BadFile(f"--init-latents: {e}") from None
    if latents.ndim != 4 or latents.dtype.kind != "f":
        raise BadFile(f"--init-latents {path}: expected float latents [N, h, w, C], got {latents.dtype} "
                      f"{latents.shape}")
    return latents

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
    pipe = load_pipeline(args.model, image_encoder=args.image_encoder, dtype=dtype, **options)
    refused = family_flags_refused(pipe.family, args)
    if refused:   # a .ckpt: its family is known only now
        raise_bad(f"{', '.join(refused)} {'applies' if len(refused) == 1 else 'apply'} to SDXL models only; "
                  f"{args.model} is not an SDXL checkpoint")
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
        return _generate(args, prog)
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
    import numpy as np

    from ipadapter_jax.pipeline import ImagePromptSpec

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        # Cache every executable (the encoders' and the VAE's compile in under a second each, but they add up).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    pipe = _load_model(args, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    args.height = pipe.default_size if args.height is None else args.height
    args.width = pipe.default_size if args.width is None else args.width
    specs = _image_prompts(args, pipe, ImagePromptSpec)
    controls = _controls(args, pipe)
    latents = None
    if args.init_latents:
        latents = _load_latents(args.init_latents)
        if latents.shape[0] != args.num_images:
            print(f"{prog}: --init-latents holds {latents.shape[0]} samples; generating that many", file=sys.stderr)
            args.num_images = latents.shape[0]
    optional = {name: getattr(args, attr) for name, attr in _OPTIONAL if getattr(args, attr) is not None}
    result = pipe(args.prompt, ip_adapter_prompts=specs, **optional,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  guidance_rescale=args.guidance_rescale, scheduler=args.scheduler,
                  scheduler_options={"eta": args.eta} if args.eta is not None else None,
                  height=args.height, width=args.width, num_images=args.num_images, seed=args.seed,
                  latents=latents, init_image=args.init_image, strength=args.strength,
                  controlnet_inputs=controls, guess_mode=args.guess_mode,
                  progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite)
    if args.save_latents:
        _save_latents(result.latents, Path(args.save_latents))
    paths = save_images(result.images, Path(args.out))
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
