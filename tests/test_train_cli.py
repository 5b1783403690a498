"""train.py's user errors are one line: ``train.py: error: MESSAGE`` on stderr,
naming the culprit, exit status 2, no traceback (unless ``--debug`` or
``IPADAPTER_JAX_DEBUG=1``): a missing model or data file, an unknown or
mistyped ``--config`` override, a bad config value, an unknown flag, a missing
config file. ``--help`` exits 0 and names only real flags; the libraries' INFO
logs (JAX, orbax, absl) show only with ``--verbose``. The command lines'
argument errors come before JAX loads; the console scripts are installed."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import sd_fixtures

ROOT = Path(__file__).resolve().parent.parent
TINY = "configs/tiny.py"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD folder and image encoder: the paths train.py's model flags take."""
    paths = sd_fixtures.build_pipeline_folder(tmp_path_factory.mktemp("model"))
    return [f"--config.model.pretrained={paths['sd']}", f"--config.model.image_encoder={paths['image_encoder']}"]


def train_py(*args, debug_env: bool = False, platforms: str | None = "cpu") -> subprocess.CompletedProcess:
    """``python train.py ARGS``; ``platforms=None``: JAX_PLATFORMS unset (JAX probes every backend)."""
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    if platforms is None:
        env.pop("JAX_PLATFORMS")
    env.pop("IPADAPTER_JAX_DEBUG", None)
    if debug_env:
        env["IPADAPTER_JAX_DEBUG"] = "1"
    return subprocess.run([sys.executable, "train.py", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def assert_one_line_error(result: subprocess.CompletedProcess, *culprits: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for culprit in culprits:
        assert culprit in lines[0], lines[0]


def test_no_model():
    assert_one_line_error(train_py("--config", TINY), "model.pretrained")


def test_missing_data_json(model, tmp_path):
    result = train_py("--config", TINY, *model, f"--config.data.json_file={tmp_path / 'nope.json'}",
                      f"--config.data.image_root={tmp_path}", f"--config.workdir={tmp_path / 'run'}")
    assert_one_line_error(result, "nope.json")


@pytest.mark.parametrize("args, culprits", [
    (["--config.train.stepz=3"], ["--config.train.stepz=3", "stepz", '"steps"']),      # a typo in a field
    (["--config.trian.steps=3"], ["--config.trian.steps=3", '"train"']),                # ... in a section
    (["--config.train.steps=abc"], ["--config.train.steps", "abc"]),                    # not a number
    (["--config.optimizer.lr=fast"], ["--config.optimizer.lr", "fast"]),
    (["--config.data.kind=parquet"], ["data.kind", "parquet"]),                         # not one of the choices
    (["--config.train.log_every=0"], ["train.log_every"]),                              # out of range
    (["--bogus"], ["bogus"]),                                                           # an unknown flag
])
def test_bad_command_line(args, culprits):
    assert_one_line_error(train_py("--config", TINY, *args), *culprits)


def test_config_file_errors(tmp_path):
    assert_one_line_error(train_py("--config", "configs/nope.py"), "configs/nope.py")
    assert_one_line_error(train_py("--config=configs/nope.py", "--config.train.steps=3"), "configs/nope.py")
    assert_one_line_error(train_py(), "--config is required")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return undefined_name\n")
    assert_one_line_error(train_py("--config", broken), str(broken), "undefined_name")


@pytest.mark.parametrize("args", [["--config.train.stepz=3"], []], ids=["flag parsing", "training"])
def test_debug_shows_the_traceback(args):
    for result in (train_py("--config", TINY, *args, "--debug"), train_py("--config", TINY, *args, debug_env=True)):
        assert result.returncode not in (0, 2) and "Traceback (most recent call last)" in result.stderr, \
            result.stderr[-3000:]


def test_positional_argument_is_refused_with_a_hint():
    assert_one_line_error(train_py(TINY), "configs/tiny.py", f"--config {TINY}")


# --------------------------------------------------------------------------- --help

DEFINED_FLAGS = """
import json
from absl import app, flags
import ipadapter_jax.cli.train
app.define_help_flags()
print(json.dumps(sorted(flags.FLAGS)))
"""


@pytest.mark.parametrize("spelling", ["--help", "-h", "--helpshort"])
def test_help_exits_0_and_names_only_real_flags(spelling):
    result = train_py(spelling)
    assert result.returncode == 0 and not result.stderr, result.stderr[-2000:]
    for flag in ("--config", "--config.FIELD=VALUE", "--export_only", "--step", "--coordinator", "--num_processes",
                 "--process_id", "--verbose", "--debug"):
        assert flag.replace("--", "--[no]") in result.stdout or flag in result.stdout, flag
    defined = set(json.loads(subprocess.run([sys.executable, "-c", DEFINED_FLAGS], capture_output=True, text=True,
                                            check=True, cwd=ROOT).stdout))
    mentioned = set(re.findall(r"(?<![\w-])--(?:\[no\])?([A-Za-z]\w*)", result.stdout))
    assert {"config", "export_only", "num_processes", "verbose", "helpfull", "verbosity"} <= mentioned
    assert mentioned <= defined, mentioned - defined     # e.g. no --export-only: absl has only --export_only


# --------------------------------------------------------------------------- logging

def test_quiet_by_default_verbose_shows_the_libraries_logs(model, tmp_path):
    """--export_only of an empty workdir: JAX probes its backends (JAX_PLATFORMS unset: its
    "Unable to initialize backend" INFO line), orbax logs its CheckpointManager at INFO, then
    the user error. By default the error is the only line; --verbose brings the INFO logs back."""
    args = ["--config", TINY, *model, f"--config.workdir={tmp_path / 'run'}", "--export_only"]
    assert_one_line_error(train_py(*args, platforms=None), "no checkpoint")
    verbose = train_py(*args, "--verbose")
    assert verbose.returncode == 2 and verbose.stderr.splitlines()[-1].startswith("train.py: error: no checkpoint")
    assert "CheckpointManager" in verbose.stderr, verbose.stderr[-2000:]


# --------------------------------------------------------------------------- argument errors before JAX

NO_JAX = """
import sys
from ipadapter_jax.cli import {module} as cli
if {module!r} == "train":
    sys.argv = {argv!r}   # ml_collections finds --config.FIELD overrides in sys.argv
try:
    code = cli.main({argv!r})
except SystemExit as e:      # argparse's own errors
    code = e.code
assert "jax" not in sys.modules, "JAX was imported"
sys.exit(code)
"""


@pytest.mark.parametrize("module, argv, mention", [
    ("train", ["train.py", "--config", TINY, "--config.train.stepz=3"], "stepz"),
    ("train", ["train.py", "--bogus"], "bogus"),
    ("train", ["train.py", "--config", TINY, "--config.data.kind=webdataset",
               "--config.data.shards=/nonexistent/{000..003}.tar"], "data.shards: no such shard file: /nonexistent/000"),
    ("train", ["train.py", "--config", TINY, "--config.data.kind=webdataset", "--config.data.shards=/tmp/*.nothing"],
     "data.shards: no file matches '/tmp/*.nothing'"),
    ("convert", ["to-single-file", "folder", "out.ckpt"], "must be a .safetensors file"),
    ("convert", ["to-diffusers", "file", "out", "--prediction-type", "x0"], "--prediction-type"),
    ("eval", ["--modes", "text,sketch"], "sketch"),
    ("eval", ["--model", "m"], "--image-encoder"),
    ("ablation", ["--simple", "/nonexistent.safetensors"], "/nonexistent.safetensors"),
])
def test_argument_errors_come_before_jax(module, argv, mention):
    code = NO_JAX.format(module=module, argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error:" in result.stderr.splitlines()[-1] and mention in result.stderr.splitlines()[-1], result.stderr


# --------------------------------------------------------------------------- console scripts

SCRIPTS = {"ipadapter-sample": "ipadapter_jax.cli.sample:main", "ipadapter-train": "ipadapter_jax.cli.train:main",
           "ipadapter-convert": "ipadapter_jax.cli.convert:main", "ipadapter-eval": "ipadapter_jax.cli.eval:main",
           "ipadapter-parity": "ipadapter_jax.cli.parity:main"}


def test_console_scripts_are_installed():
    """pyproject.toml's [project.scripts], installed (``pip install -e ".[test]"``, as CI does)."""
    declared = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
                if ep.name in SCRIPTS}
    assert declared == SCRIPTS
    bin_dir = Path(sysconfig.get_path("scripts"))
    for name in SCRIPTS:
        assert (bin_dir / name).is_file(), f"{name} is not installed in {bin_dir}"
    for name in ("ipadapter-train", "ipadapter-convert", "ipadapter-eval", "ipadapter-parity"):
        result = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {name}"), result.stderr[-2000:]
