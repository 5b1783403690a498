"""train.py's user errors are one line: ``train.py: error: MESSAGE`` on stderr,
naming the culprit, exit status 2, no traceback (unless ``--debug`` or
``IPADAPTER_JAX_DEBUG=1``): a missing model or data file, an unknown or
mistyped ``--config`` override, a bad config value, an unknown flag, a missing
config file."""

from __future__ import annotations

import os
import subprocess
import sys
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


def train_py(*args, debug_env: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
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


def test_help_lists_the_flags():
    result = train_py("--help")
    assert "--config" in result.stdout and "--debug" in result.stdout and "error" not in result.stderr
