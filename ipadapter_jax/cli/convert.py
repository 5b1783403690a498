"""``python -m ipadapter_jax.convert`` (installed: ``ipadapter-convert``):
single-file checkpoints <-> diffusers folders.

  python -m ipadapter_jax.convert to-single-file MODEL_DIR OUT.safetensors [--half]
  python -m ipadapter_jax.convert to-diffusers FILE OUT_DIR [--model-config DIR] [--vae DIR_OR_FILE]
                                                            [--ema] [--prediction-type TYPE]

The arguments are checked before JAX loads; user errors print as one line
(``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ipadapter_jax.cli import ArgumentParser, run
from ipadapter_jax.io.errors import BadArgument

PROG = "python -m ipadapter_jax.convert"
SCRIPT = "ipadapter-convert"
# ipadapter_jax.convert.single_file.PREDICTION_TYPES, here so that parsing loads no JAX
# (tests/test_community_cli.py checks they agree).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def prog() -> str:
    """The name the user ran: the console script's, else ``python -m ipadapter_jax.convert``."""
    return SCRIPT if os.path.basename(sys.argv[0]) == SCRIPT else PROG


def _to_single_file_parser(sub) -> None:
    out = sub.add_parser("to-single-file", help="diffusers folder -> one .safetensors file",
                         description="Write a diffusers folder (unet/, vae/, text_encoder/[, text_encoder_2/], "
                         "scheduler/) as one LDM-layout .safetensors file that diffusers' from_single_file, "
                         "AUTOMATIC1111 and ComfyUI read. A v-prediction model gets ComfyUI's v_pred marker.")
    out.add_argument("model_dir", metavar="MODEL_DIR", help="diffusers Stable Diffusion folder")
    out.add_argument("out", metavar="OUT.safetensors", help="file to write (replaced atomically)")
    out.add_argument("--half", action="store_true", help="store the tensors as float16 (default: as in the folder)")


def _to_diffusers_parser(sub) -> None:
    back = sub.add_parser("to-diffusers", help="single file -> diffusers folder",
                          description="Write a single-file checkpoint (.safetensors; .ckpt/.pt/.pth through "
                          "torch.load(weights_only=True)) as a diffusers folder. The family (SD 1.x, 2.x, SDXL) "
                          "is detected from the keys and its standard configuration used, unless --model-config "
                          "gives a folder's. A single file has no tokenizer: --model-config's are copied.")
    back.add_argument("file", metavar="FILE", help="single-file checkpoint")
    back.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must not exist, or be empty)")
    back.add_argument("--model-config", metavar="DIR",
                      help="diffusers folder of the same family: its configs replace the standard ones and its "
                           "tokenizers are copied (as diffusers' from_single_file(..., config=DIR))")
    back.add_argument("--vae", metavar="DIR_OR_FILE",
                      help="VAE folder or file to use instead of the file's (needed when the file has none)")
    ema = back.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true",
                     help="take the UNet's EMA weights (model_ema.*) instead of the plain ones")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="take the plain UNet weights (default)")
    back.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                      help="what the UNet predicts, where the file does not say (default: the file's marker, "
                           "else the family's: SD 2.x v_prediction, others epsilon)")


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(
        prog=prog(), description="Convert Stable Diffusion checkpoints between the single-file layout "
        "(original LDM / sgm names, one .safetensors or .ckpt: what AUTOMATIC1111, ComfyUI and civitai use) "
        "and diffusers folders. SD 1.x, SD 2.x and SDXL base; tensors are copied bit for bit both ways.")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _to_single_file_parser(sub)
    _to_diffusers_parser(sub)
    return p.parse_args(argv)


def _main(argv: list[str]) -> int:
    from ipadapter_jax.io.files import is_safetensors

    from ipadapter_jax.cli.checks import check_writable

    args = parse_args(argv)
    if args.command == "to-single-file":
        if not is_safetensors(args.out):
            raise BadArgument(f"OUT must be a .safetensors file, got {args.out}")
        check_writable("OUT", Path(args.out))       # before reading gigabytes
        if Path(args.out).exists():
            print(f"{prog()}: {args.out} exists; it is replaced once the new file is complete", file=sys.stderr)
        from ipadapter_jax.convert.ldm_detect import read_layout
        from ipadapter_jax.convert.single_file import folder_to_single_file

        path = folder_to_single_file(args.model_dir, args.out, half=args.half)
        print(f"wrote {path} ({len(read_layout(path).shapes)} tensors)")
        return 0
    from ipadapter_jax.convert.single_file import single_file_to_diffusers

    check_writable("OUT_DIR", Path(args.out_dir) / "model_index.json")
    folder = single_file_to_diffusers(args.file, args.out_dir, config_dir=args.model_config, vae=args.vae,
                                      ema=args.ema, prediction_type=args.prediction_type)
    print(f"wrote {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command (``argv``: the arguments, default ``sys.argv[1:]``); returns
    the exit status, 2 with one line on stderr for a user error."""
    return run(prog(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
