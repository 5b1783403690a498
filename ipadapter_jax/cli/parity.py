"""Check that the JAX model computes what the PyTorch one does, on your own files.
(`ipadapter-parity`, or `python -m ipadapter_jax.parity`.)

Loads the model (and its adapters, LoRAs, embeddings, ControlNets) in both frameworks: diffusers /
transformers in float32 on the CPU as the reference (--reference loads another model there), this
package on the other side. Then reports, against the reference:
  per component  text encoder(s) and their pooled output, image encoder, image projection, UNet without
                 and with image tokens, ControlNet, VAE encoder and decoder, on seeded inputs of the real
                 shapes: relative error ||jax - ref|| / ||ref|| and max absolute error;
  per block      each block as diffusers names it (down_blocks.0, ..., mid_block, up_blocks.0, ...; with
                 --depth 2 their resnets / attentions / samplers), fed the reference block's own input, and
                 the first block past the bound;
  trajectory     both sampling loops from the same noise, prompt and images: the latents' relative error
                 after every scheduler step, and the decoded image's.
--dtype bfloat16 runs ours in bfloat16 *and* float32, side by side, to tell precision loss from a bug.
Components run one after another and each side is freed before the next loads (SDXL float32 fits in 24 GB).

Exit status: 0 when every figure is within its bound (the test suite's, printed in the table; --bound
replaces them), 1 when one is not, 2 on a user error.

  ipadapter-parity --demo                                 # the embedded demo model, no download
  ipadapter-parity --model stable-diffusion-v1-5 --image-encoder IP-Adapter/models/image_encoder \\
      --ip-adapter IP-Adapter/models/ip-adapter_sd15.safetensors --image ref.png --prompt "a cat" \\
      --json parity.json --plot parity.png
  ipadapter-parity --model my-finetune.safetensors --model-config stable-diffusion-v1-5 \\
      --reference stable-diffusion-v1-5 --components unet,vae   # where does my file differ from its base?

Needs the torch extra for the reference side (pip install 'ipadapter-jax[torch]'); --plot needs the plot
extra (pip install 'ipadapter-jax[plot]').
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

from ipadapter_jax import demo, families
from ipadapter_jax.cli import ArgumentParser, checked, run
from ipadapter_jax.cli import sample as sample_cli
from ipadapter_jax.cli.checks import MAX_SIZE, check_files, check_writable, resolve_model
from ipadapter_jax.io.errors import BadArgument, UserError
from ipadapter_jax.io.specs import parse_embedding_spec, parse_lora_spec
from ipadapter_jax.schedulers import NAMES as SCHEDULER_NAMES

PROG = "ipadapter-parity"
GROUPS = ("text", "image_encoder", "image_proj", "unet", "unet_ip", "controlnet", "vae", "trajectory")
DEFAULT_STEPS = 10


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (as ipadapter-sample takes them)")
    m.add_argument("--model", help="diffusers folder, single-file checkpoint or hub id (any supported family)")
    m.add_argument("--demo", action="store_true", help="the embedded demo model, its adapter, image encoder and "
                                                       "reference image (no download)")
    m.add_argument("--reference", metavar="PATH_OR_ID",
                   help="load this model on the reference side instead of --model (same family): your single file "
                        "against its original folder, a fine-tune against its base")
    m.add_argument("--model-config", metavar="DIR", help="with --model FILE: its family's diffusers folder (configs, "
                                                         "tokenizers)")
    m.add_argument("--vae", metavar="DIR_OR_FILE", help="with --model FILE: a VAE replacing the file's")
    m.add_argument("--ip-adapter", action="append", default=[], metavar="FILE", help="IP-Adapter file; repeatable")
    m.add_argument("--image-encoder", help="CLIP image encoder folder (transformers layout)")
    m.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="reference image (one per adapter, or all for one adapter); the image encoder's and the "
                        "trajectory's input (default: seeded pixels for the components)")
    m.add_argument("--face-embeds", action="append", default=[], metavar="NPY",
                   help="FaceID adapters: an InsightFace ID embedding .npy each (default: seeded)")
    m.add_argument("--controlnet", action="append", default=[], metavar="DIR_OR_FILE", help="ControlNet; repeatable")
    m.add_argument("--controlnet-config", metavar="DIR", help="config of single-file --controlnet files")
    m.add_argument("--control-image", action="append", default=[], metavar="PNG", help="one per --controlnet")
    m.add_argument("--control-scale", action="append", type=float, default=[], metavar="S",
                   help="once or once per ControlNet (default 1.0; the trajectory's)")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA merged on both sides (diffusers: load_lora_weights + fuse_lora)")
    m.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding on both sides (diffusers: load_textual_inversion)")
    r = p.add_argument_group("inputs")
    r.add_argument("--prompt", default=None, help="text prompt (default: empty; demo: its prompt)")
    r.add_argument("--negative-prompt", default=None, help="negative prompt of the trajectory (default: none)")
    r.add_argument("--scale", action="append", type=float, default=[],
                   help="IP-Adapter scale, once or once per adapter (default 1.0; demo 0.5)")
    r.add_argument("--scheduler", default="ddim", help=f"the trajectory's: {', '.join(SCHEDULER_NAMES)} "
                                                       "(default ddim; euler-a draws noise, so no trajectory)")
    r.add_argument("--steps", type=int, default=None, help=f"trajectory steps (default {DEFAULT_STEPS})")
    r.add_argument("--guidance", type=float, default=None, help="guidance scale (default 7.5; demo 5)")
    r.add_argument("--height", type=int, default=None, help="pixels (default: the model's size; demo 64)")
    r.add_argument("--width", type=int, default=None, help="pixels (default: the model's size; demo 64)")
    r.add_argument("--seed", type=int, default=0, help="seed of every generated input (default 0)")
    r.add_argument("--max-sequence-length", type=int, default=512, metavar="N",
                   help="FLUX: T5 tokens of the prompt (default 512)")
    o = p.add_argument_group("what to compare and report")
    o.add_argument("--components", default=",".join(GROUPS),
                   help=f"comma-separated subset of {','.join(GROUPS)} (default: all that apply)")
    o.add_argument("--depth", type=int, choices=(1, 2), default=1,
                   help="1: blocks (down_blocks.0, ...); 2: their children (down_blocks.0.resnets.0, ...)")
    o.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="our compute dtype; bfloat16 also runs float32 and shows both")
    o.add_argument("--bound", type=float, default=None,
                   help="relative-error bound of every component, block and step (default: the test suite's: "
                        "components, blocks and steps 1e-4, image 2e-3 max abs; bfloat16 5e-2)")
    o.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    o.add_argument("--plot", metavar="OUT.png", help="error per block and per step on a log axis (matplotlib)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--debug", action="store_true", help="tracebacks for user errors too")
    return p


def parse_args(argv=None, prog: str = PROG):
    """Parse and check the command line before JAX or torch loads."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    args.prog = prog
    # The sample command's checks read these; parity has no such flags.
    for name, value in dict(ema=None, prediction_type=None, lora_lenient=False, guess_mode=False, control_start=0.0,
                            control_end=1.0, control_preprocess="none", mask=[], s_scale=1.0, lora_scale=1.0,
                            prompt_2=None, negative_prompt_2=None, original_size=None, crop=None,
                            target_size=None).items():
        setattr(args, name, value)
    checked(p, argv, lambda: _check(args))
    return args


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):   # a broken or blocked install counts as none
        return False


def _check(args) -> None:
    if not (_installed("torch") and _installed("diffusers")):
        raise BadArgument("the reference side needs torch and diffusers: pip install 'ipadapter-jax[torch]'")
    if args.plot and not _installed("matplotlib"):
        raise BadArgument("--plot needs matplotlib: pip install 'ipadapter-jax[plot]'")
    if args.demo and args.model:
        raise BadArgument("--demo and --model are exclusive: --demo uses the embedded model")
    if not args.demo and not args.model:
        raise BadArgument("give --model (a folder, single file or hub id), or --demo for the embedded model")
    if args.demo:
        paths = demo.demo_paths()
        args.model = str(paths["sd"])
        args.image_encoder = args.image_encoder or str(paths["image_encoder"])
        args.ip_adapter = args.ip_adapter or [str(paths["adapter"])]
        args.image = args.image or [str(paths["reference"])]
        args.scale = args.scale or [demo.DEFAULT_SCALE]
        for name, value in dict(prompt=demo.DEFAULT_PROMPT, guidance=demo.DEFAULT_GUIDANCE, height=demo.DEFAULT_SIZE,
                                width=demo.DEFAULT_SIZE).items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.prompt = "" if args.prompt is None else args.prompt
    args.guidance_given = args.guidance is not None     # FLUX's default embedded guidance differs
    args.guidance = 7.5 if args.guidance is None else args.guidance
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.groups = [g.strip() for g in args.components.split(",") if g.strip()]
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown or not args.groups:
        raise BadArgument(f"--components: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(GROUPS)}")
    if args.scheduler not in SCHEDULER_NAMES:
        raise BadArgument(f"unknown scheduler {args.scheduler!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    if args.steps < 1:
        raise BadArgument(f"--steps must be at least 1, got {args.steps}")
    if args.seed < 0:
        raise BadArgument(f"--seed must be a non-negative integer, got {args.seed}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not (0 < value <= MAX_SIZE and value % 8 == 0):
            raise BadArgument(f"{flag} must be a positive multiple of 8 up to {MAX_SIZE}, got {value}")
    if args.bound is not None and not (math.isfinite(args.bound) and args.bound > 0):
        raise BadArgument(f"--bound must be a positive number, got {args.bound}")
    for flag, values in (("--scale", args.scale), ("--guidance", [args.guidance]),
                         ("--control-scale", args.control_scale)):
        if any(not math.isfinite(v) for v in values):
            raise BadArgument(f"{flag} must be a finite number")
    args.out = "parity.png"   # the sample checks want an --out; nothing is written there
    sample_cli._resolve_sources(args)
    if args.reference:
        args.reference = str(resolve_model("--reference", args.reference))
    sample_cli._check_family_flags(args)
    if args.family is not None and args.family.denoiser == "transformer":
        _check_flux(args)
        return
    sample_cli._check_community_flags(args)
    sample_cli._check_control_flags(args)
    if args.image and not args.image_encoder:
        raise BadArgument("--image needs --image-encoder (the CLIP vision folder the adapter was trained with)")
    if args.ip_adapter and not args.image_encoder and not args.face_embeds:
        raise BadArgument("--ip-adapter needs --image-encoder (or --face-embeds for a FaceID adapter)")
    if len(args.scale) not in (0, 1, len(args.ip_adapter)):
        raise BadArgument(f"give --scale once or once per adapter ({len(args.ip_adapter)}), got {len(args.scale)}")
    check_files([*args.image, *args.face_embeds, *args.control_image])
    _check_inputs(args)
    if args.reference:
        reference = Path(args.reference)
        ref_family = families.of_folder(reference) if reference.is_dir() else None
        if ref_family is not None and args.family is not None and ref_family.name != args.family.name:
            raise BadArgument(f"--reference {args.reference} is {ref_family.title}, --model is {args.family.title}: "
                              "compare models of one family")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(flag, Path(path))


def _check_flux(args) -> None:
    """FLUX: one XLabs adapter at most, its images; the UNet-only flags refused (before JAX loads)."""
    given = [flag for flag, value in (("--controlnet", args.controlnet), ("--lora", args.lora),
                                      ("--embedding", args.embedding), ("--face-embeds", args.face_embeds),
                                      ("--negative-prompt", args.negative_prompt), ("--reference", args.reference))
             if value]
    if args.scheduler != "ddim":
        given.append("--scheduler")
    if args.components != ",".join(GROUPS) or args.depth != 1:
        given.append("--components / --depth")
    if given or Path(args.model).is_file():
        raise BadArgument(f"{', '.join(given) or '--model FILE'}: not compared for FLUX yet (a diffusers FLUX folder, "
                          "one XLabs IP-Adapter, its image encoder and images)")
    if len(args.ip_adapter) > 1:
        raise BadArgument("FLUX: give one --ip-adapter (the toolkit compares one XLabs adapter)")
    if args.ip_adapter and (not args.image or not args.image_encoder):
        raise BadArgument("FLUX: --ip-adapter needs --image and --image-encoder (CLIP ViT-L/14)")
    if args.image and not args.ip_adapter:
        raise BadArgument("FLUX: --image is an IP-Adapter's reference: give the --ip-adapter")
    if len(args.scale) > 1:
        raise BadArgument("FLUX: give one --scale (the toolkit compares one adapter)")
    from ipadapter_jax.io.files import is_safetensors, read_safetensors_header

    for path in args.ip_adapter:
        keys = read_safetensors_header(path)[0] if is_safetensors(path) else {}
        if not any(k.startswith(("ip_adapter_proj_model.", "double_blocks.")) for k in keys):
            raise BadArgument(f"--ip-adapter {path}: the FLUX toolkit compares XLabs adapters (.safetensors with "
                              "ip_adapter_proj_model.* / double_blocks.* keys), which diffusers runs")
    if not 1 <= args.max_sequence_length <= 512:
        raise BadArgument(f"--max-sequence-length must be in [1, 512], got {args.max_sequence_length}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 16:
            raise BadArgument(f"{flag} must be a multiple of 16 for FLUX, got {value}")
    if not args.guidance_given:
        args.guidance = 3.5
    check_files(list(args.image))
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(flag, Path(path))


def _check_flux_run(args) -> int:
    """``compare_flux`` on a FLUX folder: the same report as for SD."""
    import jax.numpy as jnp
    import torch
    from diffusers import FluxPipeline as TorchFlux

    from ipadapter_jax.parity.flux import FluxRequest, compare_flux
    from ipadapter_jax.pipeline.flux import FluxPipeline

    def load_reference():
        pipe = TorchFlux.from_pretrained(args.model, torch_dtype=torch.float32)
        for path in args.ip_adapter:
            pipe.load_ip_adapter(str(Path(path).parent), weight_name=Path(path).name,
                                 image_encoder_pretrained_model_name_or_path=args.image_encoder,
                                 image_encoder_dtype=torch.float32)
        return pipe

    def load_ours(dtype):
        pipe = FluxPipeline.from_pretrained(args.model, image_encoder=args.image_encoder,
                                            dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        for path in args.ip_adapter:
            pipe.load_ip_adapter(path)
        return pipe

    size = 1024
    req = FluxRequest(prompt=args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      scale=args.scale[0] if args.scale else 1.0, images=list(args.image) if args.ip_adapter else [],
                      max_sequence_length=args.max_sequence_length)
    dtypes = ("float32", "bfloat16") if args.dtype == "bfloat16" else ("float32",)
    results = compare_flux(load_reference, load_ours, req, dtypes, height=args.height or size,
                           width=args.width or size)
    return _report(args, results, {"model": args.model, "family": args.family.name, "prompt": args.prompt,
                                   "steps": args.steps, "seed": args.seed})


def _check_inputs(args) -> None:
    """The inputs agree with the models and with each other; files are readable
    (our readers: images, ID embeddings); what a requested component needs is there."""
    from ipadapter_jax.io.files import read_npy
    from ipadapter_jax.io.images import load_image

    for path in [*args.image, *args.control_image]:
        load_image(path)
    for path in args.face_embeds:
        if read_npy(path).ndim not in (1, 2):
            raise BadArgument(f"--face-embeds {path}: expected [512] or [N, 512] ID embeddings")
    if len(args.ip_adapter) > 1 and args.image and len(args.image) != len(args.ip_adapter) and not args.face_embeds:
        raise BadArgument(f"with {len(args.ip_adapter)} adapters give one --image per adapter, got {len(args.image)}")
    explicit = args.components != ",".join(GROUPS)
    needs = {"controlnet": (args.controlnet, "--controlnet"), "unet_ip": (args.ip_adapter, "--ip-adapter"),
             "image_proj": (args.ip_adapter, "--ip-adapter"), "image_encoder": (args.image_encoder, "--image-encoder")}
    for group, (given, flag) in needs.items():
        if explicit and group in args.groups and not given:
            raise BadArgument(f"--components {group} needs {flag}: there is nothing to compare without it")
    reference = args.reference or args.model
    if Path(reference).is_file() and not args.model_config and not Path(args.model).is_dir():
        raise BadArgument(f"the reference side loads the single file {reference} with diffusers' from_single_file, "
                          "which needs its family's diffusers folder offline: give --model-config")


def _reference_spec(args, family):
    from ipadapter_jax.convert.textual_inversion import read_embedding
    from ipadapter_jax.parity.reference import ReferenceSpec

    model = args.reference or args.model
    single = Path(model).is_file()
    config = args.model_config or (args.model if Path(args.model).is_dir() else None)   # the folder of --model
    embeddings = []
    for spec in args.embedding:
        path, token = parse_embedding_spec(spec)
        embeddings.append((str(path), read_embedding(path, token).token))
    return ReferenceSpec(model=model, family=family, model_config=config if single else None,
                         vae=args.vae if single else None, image_encoder=args.image_encoder,
                         ip_adapters=list(args.ip_adapter),
                         loras=[(str(p), s) for p, s in map(parse_lora_spec, args.lora)],
                         embeddings=embeddings, controlnets=list(args.controlnet),
                         controlnet_config=args.controlnet_config, scheduler=args.scheduler)


def _read_inputs(args) -> None:
    """Read every adapter, LoRA and embedding file with our readers first, so a
    file neither side can use is our loader's one-line error before any model loads."""
    from ipadapter_jax.convert.lora import read_lora
    from ipadapter_jax.ip_adapter.official import read_ip_adapter

    for path in args.ip_adapter:
        read_ip_adapter(path)
    for spec in args.lora:
        read_lora(parse_lora_spec(spec)[0])


def _load_reference(args, family):
    """The reference pipeline; what diffusers cannot load is a one-line error naming it."""
    from ipadapter_jax.io.errors import BadFile
    from ipadapter_jax.parity.reference import load_reference

    spec = _reference_spec(args, family)
    try:
        return load_reference(spec)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise BadFile(f"the reference side (diffusers {_version('diffusers')}) could not load {spec.model} with "
                      f"its adapters and extras: {type(e).__name__}: {e}") from e


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def _load_ours(args, dtype: str):
    import jax.numpy as jnp

    pipe = sample_cli._load_model(args, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    for path in args.ip_adapter:
        pipe.load_ip_adapter(path)
    for net in args.controlnet:
        pipe.load_controlnet(net, config=args.controlnet_config if Path(net).is_file() else None)
    return pipe


def check(argv, prog: str = PROG) -> int:
    args = parse_args(argv, prog)
    import jax

    with jax.default_matmul_precision("highest"):   # the tests' setting: compare the math, not the kernels
        return _check_run(args)


def _check_run(args) -> int:
    from ipadapter_jax.parity.run import Request, compare

    if args.family is not None and args.family.denoiser == "transformer":
        return _check_flux_run(args)

    _read_inputs(args)
    family = args.family
    if family is None:   # a .ckpt: the family is known once ours has loaded it
        from ipadapter_jax.parity.run import free

        pipe = _load_ours(args, "float32")
        family = pipe.family
        del pipe
        free()
    req = Request(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                  scales=args.scale, images=args.image, face_embeds=args.face_embeds,
                  control_images=args.control_image, control_scales=args.control_scale, depth=args.depth,
                  groups=args.groups, dtype=args.dtype, bound=args.bound)
    results, _ = compare(lambda: _load_reference(args, family), lambda d: _load_ours(args, d),
                         family, req, show_progress=not args.no_progress)
    if not any(r.components or r.trajectory for r in results):
        raise BadArgument(f"nothing was compared ({'; '.join(results[0].notes) or 'no component applies'}): "
                          "check --components and the models given")
    return _report(args, results, {"model": args.model, "reference": args.reference or args.model,
                                   "family": family.name, "prompt": args.prompt, "steps": args.steps,
                                   "scheduler": args.scheduler, "seed": args.seed, "depth": args.depth})


def _report(args, results, run_info: dict) -> int:
    """Print the table, write --json / --plot; exit status 1 when a figure is past its bound."""
    from ipadapter_jax.parity import report
    from ipadapter_jax.parity.run import over_bounds

    print(report.markdown(results, args.bound))
    if args.json:
        run_info = {**run_info, "peak_rss_gb": _peak_rss_gb()}
        Path(args.json).write_text(json.dumps(report.to_json(results, bound=args.bound, run=run_info), indent=1))
    if args.plot:
        report.plot(results, args.plot, args.bound)
    bad = over_bounds(results, args.bound)
    print(f"peak memory {_peak_rss_gb():.2f} GB | " + (f"past the bound: {', '.join(bad)}" if bad
                                                        else "every figure within its bound"), file=sys.stderr)
    return 1 if bad else 0


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def main(argv=None) -> int:
    """The parity command with user errors as one line (exit 2); exit 1 when a figure passes its bound."""
    return run(PROG, lambda a: check(a, PROG), argv)


if __name__ == "__main__":
    sys.exit(main())
