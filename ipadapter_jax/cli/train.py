"""Train an IP-Adapter (frozen SD UNet, VAE, text and image encoders; trained
image projection + to_k_ip/to_v_ip), from one device to many hosts.

    python train.py --config configs/sd15_ip_adapter.py --config.model.pretrained=SD_DIR \\
        --config.model.image_encoder=ENC_DIR --config.data.json_file=data.json --config.data.image_root=imgs/
    python train.py --config configs/tiny.py ...            # a small smoke run
    python train.py --config ... --export_only [--step=N]   # export a checkpoint's adapter (official format)
    python train.py --config configs/demo/clip.py           # the demo recipe's stages: clip, vae, unet,
                                                            # ip_adapter (see configs/demo/__init__.py)
    python train.py sweep -h                                # ablations (the sweep command's own flags):
                                                            # one run per override set, one results table

Installed, the same command is `ipadapter-train` (the same flags).

Every config field can be overridden with --config.FIELD=VALUE (the config is locked: typos fail).
Resumes automatically from the latest checkpoint in the workdir. Multi-host: launch one process per host
with JAX's coordinator environment set (or --coordinator, --num_processes and --process_id); the same
command runs on 1 device, N local devices or several hosts.

Logs: <workdir>/metrics.csv (loss, grad norm, lr, steps/s, samples/s, data wait, skipped images), TensorBoard
event files in <workdir>/tensorboard (train.tensorboard), a progress bar and train's own messages (resumed
from, preempted, ...). Live evaluation: --config.train.eval_every=N --config.eval.cases=CASES.json
[--config.eval.clip_model=CLIP_DIR] samples a grid of held-out references every N steps
(<workdir>/samples/, TensorBoard) and scores CLIP-I / CLIP-T (eval.csv, eval.json).
The INFO logs of JAX, orbax and absl are off: --verbose shows them (as does absl's --verbosity=0;
--logger_levels=NAME:LEVEL,... sets single loggers).

Preemption: on SIGTERM (multi-host: to any host, through JAX's preemption service) every process
finishes its step, saves a checkpoint of that step, prints where and exits with status 0; the same
command resumes it with the losses of an uninterrupted run. User errors (a missing model or data file,
a bad config value, an unknown flag or --config field, a NaN loss) are one line, "train.py: error: ...",
exit status 2; --debug (or IPADAPTER_JAX_DEBUG=1) shows their traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

PROG = "train.py"
FLAGS = flags.FLAGS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "Only export the adapter of a checkpoint, then exit.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for --export_only (default: latest).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialise jax.distributed from the cluster's environment (JAX's detection: TPU pod "
    "slices, SLURM, Open MPI, Kubernetes): the same command on every host, no coordinator flags.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the INFO logs of JAX, orbax and absl too.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of user errors too (or IPADAPTER_JAX_DEBUG=1).")

# What --help answers with (exit status 0); absl's --helpfull (every absl flag) stays absl's.
HELP_ARGS = frozenset({"--help", "-help", "--helpshort", "-helpshort", "-h", "-?"})


# --------------------------------------------------------------------------- --help

def help_text(prog: str = PROG) -> str:
    """The module docstring and the flags this command defines (absl's formatting)."""
    module = FLAGS.find_module_defining_flag("export_only")
    usage = f"usage: {prog} --config CONFIG.py [--config.FIELD=VALUE ...] [flags]"
    own = FLAGS.module_help(module).strip().splitlines()[1:]   # less its "module_name:" header
    return "\n".join([usage, "", __doc__.strip(), "", "flags:", *own,
                      "", "--helpfull lists absl's flags too (--verbosity, --logger_levels, ...)."])


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


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's flags_parser): ``--help`` prints :func:`help_text`
    and exits 0; errors are one line and exit status 2. Returns the arguments left."""
    prog = _prog(argv)
    options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if HELP_ARGS.intersection(options):
        print(help_text(prog))
        sys.exit(0)
    try:
        return FLAGS(argv)
    except Exception as e:
        message = _flags_error_message(argv[1:], e)
        if message is None or _debug_requested(argv[1:]):
            raise
        _fail(prog, message)


def _config(args):
    """The parsed config; a user error when there is none or its file did not load."""
    from ipadapter_jax.io.errors import BadArgument, BadFile, MissingFile

    cfg = _CONFIG.value
    if cfg is None:
        raise BadArgument("--config is required (e.g. --config configs/sd15_ip_adapter.py)")
    try:
        cfg.get("task")
    except OSError as e:       # ml_collections reports a config file that failed to load when it is read
        found, message = _config_file_message(args, e)
        raise (BadFile if found else MissingFile)(message) from e
    return cfg


# --------------------------------------------------------------------------- logging, processes

def configure_logging(verbose: bool) -> None:
    """Train's own INFO lines (the ``ipadapter_jax`` loggers); every other logger
    (JAX's backend probing, orbax's and absl's checkpoint chatter) from WARNING.
    ``--verbose``, or absl's ``--verbosity`` given, leaves absl's levels (INFO by
    default); loggers named in ``--logger_levels`` keep theirs."""
    if verbose or FLAGS["verbosity"].present:
        return
    logging.root.setLevel(logging.WARNING)
    if "ipadapter_jax" not in (FLAGS.logger_levels or {}):
        logging.getLogger("ipadapter_jax").setLevel(logging.INFO)


def _init_distributed(prog: str) -> None:
    """jax.distributed for --coordinator, or from the cluster's environment with
    --distributed (before any backend use)."""
    import jax

    if not (_COORDINATOR.value or _DISTRIBUTED.value):
        return
    # Only affects CPU collectives (GPU/TPU use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
        return
    try:
        jax.distributed.initialize()
    except ValueError as e:    # no cluster environment found: JAX asks for the coordinator's address
        _fail(prog, f"--distributed: JAX found no cluster environment (TPU pod slice, SLURM, Open MPI, Kubernetes) "
                    f"to start from ({str(e).splitlines()[0]}); outside one, give --coordinator host:port "
                    "--num_processes N --process_id i")


def _check_data(prog: str, args: list[str]) -> None:
    """The data a training config names, checked before JAX loads where no model is needed:
    the webdataset shard list (an empty glob or a missing shard is one line)."""
    from ipadapter_jax.io.errors import UserError

    try:
        cfg = _config(args)
        if (cfg.get("task", "ip_adapter") in ("ip_adapter", "flux_ip_adapter") and cfg.data.get("kind") == "webdataset"
                and not _EXPORT_ONLY.value):    # exporting a checkpoint reads no data
            from ipadapter_jax.training.shards import shard_paths

            shard_paths(cfg.data.shards)
    except UserError as e:
        if _debug_requested(args) or _DEBUG.value:
            raise
        _fail(prog, str(e))


# --------------------------------------------------------------------------- main

def _train(prog: str, args: list[str], _argv) -> int:
    from ipadapter_jax.training import ip_adapter_task as task

    cfg = _config(args)
    if cfg.get("task") == "flux_ip_adapter":
        from ipadapter_jax.io.errors import Unsupported
        from ipadapter_jax.training import flux_task

        if _EXPORT_ONLY.value:
            raise Unsupported("--export_only is not supported for FLUX adapters yet: the run exports at its end")
        try:
            print(f"done: {flux_task.train(cfg)}")
        except flux_task.Preempted as e:
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return 0
    try:
        if cfg.get("task", "ip_adapter") != "ip_adapter":   # the demo's base-model stages (configs/demo/)
            from ipadapter_jax.demo import recipe

            print(f"done: {recipe.run_stage(cfg)}")
        elif _EXPORT_ONLY.value:
            print(f"exported {task.export_checkpoint(cfg, _STEP.value)}")
        else:
            from ipadapter_jax.eval.live import LiveEval

            print(f"done: {task.train(cfg, evaluation=LiveEval)}")
    except task.Preempted as e:   # a checkpoint of the step was saved on every process
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
    return 0


def _absl_main(argv: list[str], *, prog: str, args: list[str]) -> int:
    """app.run's main: ``argv`` is what flag parsing left (the program name first)."""
    if len(argv) > 1:
        hint = f" (did you mean --config {argv[1]}?)" if argv[1].endswith(".py") else ""
        _fail(prog, f"unexpected argument {argv[1]!r}: train takes flags only{hint}")
    configure_logging(_VERBOSE.value)
    _check_data(prog, args)
    _init_distributed(prog)
    from ipadapter_jax.cli import run

    return run(prog, functools.partial(_train, prog, args), ["--debug"] if _DEBUG.value else [])


def _prog(argv: Sequence[str]) -> str:
    """The name the user ran: ``train.py``, ``ipadapter-train``, ..."""
    return os.path.basename(argv[0]) if argv and argv[0] else PROG


def main(argv: Sequence[str] | None = None) -> int:
    """``python train.py`` and the ``ipadapter-train`` console script: parse the
    flags of ``argv`` (as ``sys.argv``: the program name first; default
    ``sys.argv``), train, return the exit status (2: a user error)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] == "sweep":
        from ipadapter_jax.cli import sweep

        return sweep.main(argv[2:])
    try:
        app.run(functools.partial(_absl_main, prog=_prog(argv), args=argv[1:]), argv=argv,
                flags_parser=_parse_flags)
    except SystemExit as e:   # app.run ends with sys.exit(main's value); --help and errors exit too
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
