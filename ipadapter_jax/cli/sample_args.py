"""The flags of the sample command (``ipadapter_jax.cli.sample``), one group per
function; its module docstring is the ``--help`` description."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ipadapter_jax.cli import ArgumentParser
from ipadapter_jax.schedulers import NAMES as SCHEDULER_NAMES   # no JAX: the schedulers' names only

DEFAULT_CACHE = os.environ.get("IPADAPTER_JAX_CACHE", str(Path.home() / ".cache" / "ipadapter_jax"))


def build_parser(prog: str, description: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_prompt_args(p)
    _add_community_args(p)
    _add_second_encoder_args(p)
    _add_flux_args(p)
    _add_control_args(p)
    _add_sampling_args(p)
    _add_output_args(p)
    return p


def _add_model_args(p) -> None:
    p.add_argument("--model", help="diffusers model folder (unet/ or transformer/, vae/, text_encoder/, "
                                   "tokenizer/, scheduler/) of any supported family (SD 1.x/2.x, SDXL, FLUX.1 dev "
                                   "or schnell: model_index.json says which), a single-file checkpoint (.safetensors / .ckpt in the LDM layout of "
                                   "AUTOMATIC1111, ComfyUI and civitai; the family is detected from its keys; "
                                   "tokenizers from --model-config or the local Hugging Face cache), or a hub id "
                                   "(ORG/NAME, ORG/NAME:FILE); without it, the embedded demo model")
    p.add_argument("--demo", action="store_true",
                   help="use the embedded demo model, its adapter, image encoder and reference image (the default "
                        "when --model is not given)")
    p.add_argument("--ip-adapter", action="append", default=[], metavar="FILE",
                   help="IP-Adapter file (.safetensors or .bin; or ORG/NAME:FILE): h94/IP-Adapter's for SD, "
                        "XLabs' flux-ip-adapter(-v2) for FLUX; repeat for several adapters")
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
    p.add_argument("--negative-image", action="append", default=[], metavar="PATH",
                   help="negative image prompt, one per adapter (FLUX: used with --true-cfg, default a black "
                        "image as diffusers; SD: the unconditional side of classifier-free guidance)")
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


def _add_flux_args(p) -> None:
    g = p.add_argument_group("FLUX only")
    g.add_argument("--true-cfg", type=float, default=None, metavar="S",
                   help="real classifier-free guidance with --negative-prompt when S > 1 (two transformer passes "
                        "per step; diffusers' true_cfg_scale; default 1: off)")
    g.add_argument("--fsdp", type=int, default=None, metavar="N",
                   help="split the transformer's weights over N of this host's devices (a 12B transformer on "
                        "accelerators that hold only a slice of it); the batch splits over the rest (default 1)")
    g.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="T5 tokens the prompt is padded / truncated to, 1-512 (default 512)")


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
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default 30; FLUX dev 28, schnell 4; demo 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default 7.5; demo 5); FLUX: the embedded guidance of "
                        "guidance-distilled models (dev, default 3.5; diffusers' guidance_scale)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale factor (default 0)")
    p.add_argument("--scheduler", default=None,
                   help=f"one of {', '.join(SCHEDULER_NAMES)} (default ddim; FLUX: its flow-matching Euler)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num-images", type=int, default=None, help="images to generate (default 1; demo 4)")
    p.add_argument("--height", type=int, default=None,
                   help="image height, multiple of 8 (FLUX: of 16) (default: the model's size, its UNet's "
                        "sample_size x 8: 512 for SD 1.x, 768 for SD 2.1, 1024 for SDXL and FLUX; demo 64)")
    p.add_argument("--width", type=int, default=None,
                   help="image width, multiple of 8 (default: the model's size; demo 64)")
    p.add_argument("--init-image", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img strength in (0, 1] (default 0.8; FLUX 0.6; needs --init-image)")
    p.add_argument("--init-latents", help="initial noise .npy [N, H/8, W/8, C] (C = 4; FLUX 16, unpacked), unit "
                                          "variance; overrides --seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="UNet/text-encoder compute dtype (default float32; bfloat16 on accelerators)")


def _add_output_args(p) -> None:
    p.add_argument("--save-latents", help="write the final latents (NHWC, before the VAE) to this .npy")
    p.add_argument("--out", default=None,
                   help="output PNG (default outputs/sample.png; demo outputs/demo.png); several images are written "
                        "as NAME-0.png, NAME-1.png, ... plus NAME-grid.png")
    p.add_argument("--no-progress", action="store_true",
                   help="no per-step progress bar (the loop then runs as one call; either way the compiled loop is "
                        "cached on disk)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write the images even when the result holds NaN / inf (for debugging; by default such a "
                        "result is an error and no image is written)")
    p.add_argument("--debug", action="store_true",
                   help="show Python tracebacks for user errors too (or set IPADAPTER_JAX_DEBUG=1)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE,
                   help=f"persistent XLA compilation cache (a second run skips compiling; default {DEFAULT_CACHE}, "
                        "or $IPADAPTER_JAX_CACHE); '' uses none, unless JAX's own JAX_COMPILATION_CACHE_DIR is set")


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
