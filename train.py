"""Train an IP-Adapter (frozen SD UNet, VAE, text and image encoders; trained
image projection + to_k_ip/to_v_ip), from one device to many hosts.

    python train.py --config configs/sd15_ip_adapter.py --config.model.pretrained=SD_DIR \\
        --config.model.image_encoder=ENC_DIR --config.data.json_file=data.json --config.data.image_root=imgs/
    python train.py --config configs/tiny.py ...            # a small smoke run
    python train.py --config ... --export-only [--step N]   # export a checkpoint's adapter (official format)
    python train.py --config configs/demo/clip.py           # the demo recipe's stages: clip, vae, unet,
                                                            # ip_adapter (see configs/demo/__init__.py)

Every config field can be overridden with --config.FIELD=VALUE (the config is locked: typos fail).
Resumes automatically from the latest checkpoint in the workdir. Multi-host: launch one process per host
with JAX's coordinator environment set (or --coordinator/--num-processes/--process-id); the same command
runs on 1 device, N local devices or several hosts. Logs: <workdir>/metrics.csv and a progress bar.

Preemption: on SIGTERM (multi-host: to any host, through JAX's preemption service) every process
finishes its step, saves a checkpoint of that step, prints where and exits with status 0; the same
command resumes it with the losses of an uninterrupted run. User errors (a missing model or data file, a bad config value,
an unknown flag or --config field, a NaN loss) are one line, "train.py: error: ...", exit status 2;
--debug (or IPADAPTER_JAX_DEBUG=1) shows their traceback.
"""

import logging
import os
import re
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

PROG = "train.py"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "Only export the adapter of a checkpoint, then exit.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for --export_only (default: latest).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of user errors too (or IPADAPTER_JAX_DEBUG=1).")


# --------------------------------------------------------------------------- command-line errors as one line
# (the package is imported lazily: jax.distributed.initialize must come before any backend use)

def _debug_requested(args) -> bool:
    from ipadapter_jax.cli import debug_requested

    return debug_requested(args) or any(a in ("--debug=true", "--debug=True", "--debug=1") for a in args)


def _config_path(args) -> str:
    """The --config argument (``path`` or ``path:arg``), or ""."""
    for i, a in enumerate(args):
        if a in ("--config", "-config") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
    return ""


def _config_file_message(args, error: BaseException) -> tuple[bool, str]:
    """``(found, message)`` for a config file that failed to load or to run."""
    arg = _config_path(args)
    path = arg.split(":", 1)[0]
    if not os.path.isfile(path):
        return False, f"--config {arg}: no such file"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    if not isinstance(error, (flags.Error, OSError)):
        last = f"{type(error).__name__}: {last}"
    return True, f"--config {arg}: {last}"


def _unknown_field_message(args, error: BaseException) -> str | None:
    """ml_collections' error for an override of a field the locked config lacks, as
    ``--config.a.b=v: the config has no field 'b' (did you mean "c"?)``; None if it is not one."""
    text = str(error).replace("\\'", "'").replace("\\n", " ")
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    lookup = re.search(r"Attempting to lookup: ([\w.]+)", text)
    bare = re.fullmatch(r"""["']*(\w+)["']*""", text.strip())
    bad = hint[2] if hint else lookup[1].split(".")[-1] if lookup else bare[1] if bare else None
    if bad is None:
        return None
    culprit = next((a for a in args if a.startswith("--config.")
                    and bad in a[len("--config."):].split("=", 1)[0].split(".")), None)
    if culprit is None:
        return None
    suggestion = f' (did you mean "{hint[1]}"?)' if hint else ""
    return f"{culprit}: the config has no field {bad!r}{suggestion}"


def _in_config_file(args, error: BaseException) -> bool:
    """Whether ``error`` was raised loading the config file or running its code."""
    path = _config_path(args).split(":", 1)[0]
    if isinstance(error, OSError) and "config file" in str(error):   # ml_collections: failed to load it
        return True
    frames = traceback.extract_tb(error.__traceback__) if path else []
    return any(os.path.abspath(f.filename) == os.path.abspath(path) for f in frames) or (
        "Error whilst parsing config file" in str(error))


def _flags_error_message(args, error: BaseException) -> str | None:
    """One line for an error of flag parsing: absl's (unknown flag, bad value),
    ml_collections' (unknown --config field) or the config file's; None for
    anything else (a bug keeps its traceback)."""
    if _in_config_file(args, error):
        return _config_file_message(args, error)[1]
    if isinstance(error, (AttributeError, KeyError)):
        return _unknown_field_message(args, error)
    if isinstance(error, flags.Error):
        return " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return None


def _parse_flags(argv):
    """absl's flag parsing (``--help`` included), its errors as one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:
        message = _flags_error_message(argv[1:], e)
        if message is None or _debug_requested(argv[1:]):
            raise
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _config():
    """The parsed config; a user error when there is none or its file did not load."""
    from ipadapter_jax.io.errors import BadArgument, BadFile, MissingFile

    cfg = _CONFIG.value
    if cfg is None:
        raise BadArgument("--config is required (e.g. --config configs/sd15_ip_adapter.py)")
    try:
        cfg.get("task")
    except OSError as e:       # ml_collections reports a config file that failed to load when it is read
        found, message = _config_file_message(sys.argv[1:], e)
        raise (BadFile if found else MissingFile)(message) from e
    return cfg


# --------------------------------------------------------------------------- main

def _run(_argv) -> int:
    from ipadapter_jax.training import loop

    cfg = _config()
    try:
        if cfg.get("task", "ip_adapter") != "ip_adapter":   # the demo's base-model stages (configs/demo/)
            from ipadapter_jax.demo import recipe

            print(f"done: {recipe.run_stage(cfg)}")
        elif _EXPORT_ONLY.value:
            print(f"exported {loop.export_checkpoint(cfg, _STEP.value)}")
        else:
            print(f"done: {loop.train(cfg)}")
    except loop.Preempted as e:   # a checkpoint of the step was saved on every process
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
    return 0


def main(argv):
    del argv
    import jax

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if _COORDINATOR.value:
        # Only affects CPU collectives (GPU/TPU use their own); must precede any backend use.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from ipadapter_jax.cli import run

    return run(PROG, _run, ["--debug"] if _DEBUG.value else [])


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
