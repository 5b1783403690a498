"""train.py end to end on a tiny model and a dataset made here: trains, logs,
checkpoints, exports an adapter that diffusers and sample.py load; a run killed
with SIGKILL, or stopped by SIGTERM, resumes with exactly the loss sequence of
an uninterrupted one (one uninterrupted run is the reference of both)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sd_fixtures

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40     # of the uninterrupted run (~30 ms a step): a SIGTERM after 3 logged steps lands well before the end


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("train")
    paths = sd_fixtures.build_pipeline_folder(root)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        colour = rng.integers(0, 256, 3)
        img = np.broadcast_to(colour, (24 + i, 20, 3)).astype(np.uint8)
        Image.fromarray(img).save(images / f"{i}.png")
        records.append({"image_file": f"{i}.png", "text": f"a colour {i}"})
    (images / "broken.png").write_bytes(b"not a png")
    records.append({"image_file": "broken.png", "text": "broken"})
    (root / "data.json").write_text(json.dumps(records))
    paths.update(json=root / "data.json", images=images, root=root)
    return paths


def command(setup, workdir, steps=12, extra=()):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
            f"--config.model.pretrained={setup['sd']}", f"--config.model.image_encoder={setup['image_encoder']}",
            f"--config.data.json_file={setup['json']}", f"--config.data.image_root={setup['images']}",
            f"--config.workdir={workdir}", f"--config.train.steps={steps}", "--config.train.save_every=4",
            *extra]


def losses(workdir) -> list[float]:
    with open(Path(workdir) / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def run(cmd, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# --------------------------------------------------------------------------- runs stopped from outside
# (here and in tests/test_preemption.py)

NO_REGULAR_SAVES = ["--config.train.save_every=1000"]   # the only checkpoint before the end is the preemption's
LINE = re.compile(r"^train\.py: preempted at step (\d+); saved a checkpoint in (\S+); "
                  r"rerun the same command to resume$", re.M)


@dataclasses.dataclass
class Process:
    popen: subprocess.Popen
    out: Path
    err: Path


def start(cmds, logs: Path, env: dict) -> list[Process]:
    """The commands, each writing stdout / stderr into files in ``logs`` (not
    pipes: a full pipe would stall a process, and the other's collectives)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, c in enumerate(cmds):
        out, err = logs / f"{i}.out", logs / f"{i}.err"
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(Process(subprocess.Popen(c, stdout=o, stderr=e, env=env, cwd=ROOT), out, err))
    return procs


def finish(procs: list[Process], timeout=600) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr), once all exited with status 0 (any still
    running after ``timeout`` is killed)."""
    try:
        for p in procs:
            p.popen.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.kill()
    outputs = [(p.out.read_text(), p.err.read_text()) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.popen.returncode == 0, err[-4000:]
    return outputs


def logged_rows(workdir: Path) -> int:
    try:
        return max(len((workdir / "metrics.csv").read_text().splitlines()) - 1, 0)
    except FileNotFoundError:
        return 0


def sigterm_after(procs: list[Process], workdir: Path, rows: int = 3) -> None:
    """SIGTERM to every process once ``rows`` steps are logged, and again right
    after (while the checkpoint is being written)."""
    deadline = time.time() + 600
    running = lambda: all(p.popen.poll() is None for p in procs)  # noqa: E731
    while logged_rows(workdir) < rows and time.time() < deadline and running():
        time.sleep(0.005)
    if not running():
        finish(procs)
        raise AssertionError("the run ended before it was preempted")
    for _ in range(2):
        for p in procs:
            p.popen.send_signal(signal.SIGTERM)
        time.sleep(0.05)


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def check_preempted(outputs, workdir: Path, total: int = STEPS) -> int:
    """Every process printed the line, naming the same step, whose checkpoint
    (complete: no temporary folder left) is the only one; nothing was exported."""
    found = [LINE.search(err) for _, err in outputs]
    assert all(found), [err[-3000:] for _, err in outputs]
    steps = {int(m[1]) for m in found}
    assert len(steps) == 1, steps
    step = steps.pop()
    assert {Path(m[2]) for m in found} == {workdir / "checkpoints"}
    assert 3 <= step < total
    assert saved_steps(workdir) == [step]
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert not (workdir / "ip_adapter.safetensors").exists()
    return step


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """One uninterrupted 40-step run (a checkpoint every 4 steps, a loss row per
    step): the export the load test reads, and the reference of the resume tests
    (constant learning rate, draws that depend on the step only and a data
    iterator whose position is checkpointed, so its first k losses are those of
    a k-step run, whatever the checkpoint cadence)."""
    workdir = tmp_path_factory.mktemp("straight")
    run(command(setup, workdir, steps=STEPS))
    return workdir


def test_train_export_and_load(setup, straight, tmp_path):
    values = losses(straight)
    assert len(values) == STEPS and np.isfinite(values).all()
    assert np.mean(values[-10:]) < np.mean(values[:10]), values          # the loss falls
    with open(straight / "metrics.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["skipped_images"]) >= 1    # the broken image was counted
    export = straight / "ip_adapter.safetensors"
    assert export.is_file()

    # diffusers loads the exported file...
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    class Holder(IPAdapterMixin):
        def __init__(self, unet):
            self.unet = unet

    Holder(TorchUNet.from_pretrained(setup["sd"] / "unet")).load_ip_adapter(
        str(straight), subfolder="", weight_name=export.name, image_encoder_folder=None)
    # ... and so does sample.py.
    out = tmp_path / "img.png"
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(setup["sd"]),
                             "--image-encoder", str(setup["image_encoder"]), "--ip-adapter", str(export),
                             "--image", str(setup["images"] / "0.png"), "--steps", "2", "--height", "16",
                             "--width", "16", "--out", str(out), "--cache-dir", ""],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file()


def test_kill_and_resume_matches_uninterrupted(setup, straight, tmp_path):
    steps = 24     # after the first checkpoint (step 4) the run has 20 steps and 5 saves to go: the kill lands
    killed = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(command(setup, killed, steps=steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.time() + 600
    ckpt = killed / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
            break
        time.sleep(0.05)
    time.sleep(0.3)            # land somewhere in the following steps (or in the next save)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    # A rerun that ignored the checkpoints and started over would write the same losses:
    # only the step it says it resumed from tells them apart.
    last = max(saved_steps(killed))
    assert last > 0
    out = run(command(setup, killed, steps=steps)).stdout
    assert f"'resumed_from': {last}" in out, out[-2000:]
    np.testing.assert_array_equal(losses(killed), losses(straight)[:steps])


def test_sigterm_checkpoints_the_step_and_resumes_exactly(setup, straight, tmp_path):
    """SIGTERM (twice: the second lands during the save) stops the run after the
    current step with a checkpoint of it and one line; the rerun resumes with
    the uninterrupted run's losses. Two processes: tests/test_preemption.py."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")   # as ``run`` gives the reference: the same XLA settings
    workdir = tmp_path / "preempted"
    cmd = command(setup, workdir, steps=STEPS, extra=NO_REGULAR_SAVES)
    procs = start([cmd], tmp_path / "logs1", env)
    sigterm_after(procs, workdir)
    step = check_preempted(finish(procs), workdir, STEPS)

    (out, _), = finish(start([cmd], tmp_path / "logs2", env))
    assert f"'resumed_from': {step}" in out
    np.testing.assert_array_equal(losses(workdir), losses(straight))
    assert (workdir / "ip_adapter.safetensors").is_file()


def test_missing_data_is_a_clear_error_before_compiling(setup, tmp_path):
    cmd = command(setup, tmp_path / "x")
    cmd[cmd.index(f"--config.data.json_file={setup['json']}")] = f"--config.data.json_file={tmp_path}/nope.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode != 0 and "nope.json" in result.stderr


def test_config_typo_fails(setup, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command(setup, tmp_path / "x", extra=["--config.optimizer.learning_rate=1"]),
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode != 0 and "learning_rate" in result.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
    workdir = tmp_path / "nan"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = command(setup, workdir, steps=8, extra=["--config.optimizer.lr=1e30", "--config.train.save_every=1"])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode != 0
    assert "stopping. The last good checkpoint" in result.stderr, result.stderr[-2000:]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    bad_step = len(losses(workdir)) + 1
    assert saved and max(saved) < bad_step


def test_train_on_a_tfds_dataset(setup, tmp_path):
    """A TFDS dataset prepared in a data_dir (uint8 Tensor image + Text: no
    TensorFlow needed), read by name through the TF-free data-source API."""
    import tensorflow_datasets as tfds

    class TinyPictures(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(24, 20, 3), dtype=np.uint8), "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(8):
                yield i, {"image": rng.integers(0, 256, (24, 20, 3), dtype=np.uint8), "caption": f"picture {i}"}

    data_dir = tmp_path / "tfds"
    TinyPictures(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    workdir = tmp_path / "run"
    cmd = command(setup, workdir, steps=6, extra=["--config.data.kind=tfds", "--config.data.tfds_name=tiny_pictures",
                                                  f"--config.data.tfds_dir={data_dir}",
                                                  "--config.data.text_key=caption"])
    run(cmd)
    assert len(losses(workdir)) == 6 and (workdir / "ip_adapter.safetensors").is_file()


@pytest.fixture(scope="module")
def cached(setup, tmp_path_factory):
    """A 6-step run with data.cache_dir: (its workdir, the feature cache it made)."""
    root = tmp_path_factory.mktemp("cached")
    workdir, cache = root / "run", root / "cache"
    run(command(setup, workdir, steps=6, extra=[f"--config.data.cache_dir={cache}"]))
    return workdir, cache


def test_train_from_cached_features(setup, cached, tmp_path):
    """data.cache_dir: the json dataset is encoded once by the frozen encoders, then
    training reads only the cached latents / embeddings (and reuses the cache)."""
    workdir, cache = cached
    assert {p.name for p in cache.iterdir()} >= {"latents.npy", "text_embeds.npy", "image_embeds.npy"}
    assert np.load(cache / "latents.npy").shape[1:] == (8, 8, 4)
    assert len(losses(workdir)) == 6 and np.isfinite(losses(workdir)).all()
    run(command(setup, tmp_path / "run2", steps=3, extra=[f"--config.data.cache_dir={cache}",
                                                          "--config.data.kind=cached"]))


def test_ema_accumulation_and_clipping(setup, tmp_path):
    """The configurable optimiser options run end to end; the EMA is what gets
    exported, and --export_only exports a checkpoint."""
    from safetensors.numpy import load_file

    workdir = tmp_path / "ema"
    run(command(setup, workdir, steps=8, extra=["--config.optimizer.ema_decay=0.9",
                                                "--config.optimizer.accumulate=2",
                                                "--config.optimizer.clip_norm=1.0",
                                                "--config.optimizer.schedule=cosine",
                                                "--config.optimizer.warmup_steps=2"]))
    final = load_file(workdir / "ip_adapter.safetensors")
    result = run(command(setup, workdir, steps=8, extra=["--config.optimizer.ema_decay=0.9",
                                                         "--config.optimizer.accumulate=2",
                                                         "--config.optimizer.clip_norm=1.0",
                                                         "--config.optimizer.schedule=cosine",
                                                         "--config.optimizer.warmup_steps=2",
                                                         "--export_only", "--step=8"]))
    assert "exported" in result.stdout
    again = load_file(workdir / "ip_adapter_step8.safetensors")
    for key in final:
        np.testing.assert_array_equal(again[key], final[key])


def test_continue_training_a_plus_adapter(setup, tmp_path):
    """adapter_init with an official Plus file: the variant comes from the file
    (CLIP hidden states, zero-pixel image dropout), whatever model.variant says."""
    workdir = tmp_path / "plus"
    run(command(setup, workdir, steps=4, extra=[f"--config.model.adapter_init={setup['plus']}"]))
    assert len(losses(workdir)) == 4 and np.isfinite(losses(workdir)).all()
    from safetensors.numpy import load_file

    assert "image_proj.latents" in load_file(workdir / "ip_adapter.safetensors")


def test_feature_cache_of_another_setting_is_refused(setup, cached, tmp_path):
    _, cache = cached
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command(setup, tmp_path / "b", steps=2, extra=[f"--config.data.cache_dir={cache}",
                                                                           "--config.data.resolution=32"]),
                            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode != 0 and "was made for" in result.stderr


def tensorboard_events(folder: Path) -> dict[str, list]:
    """Tag -> [(step, value or image bytes)] of the TensorBoard event files in ``folder``
    (TFRecord framing: length, its CRC, the Event, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    found: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for value in event.summary.value:
                item = value.image.encoded_image_string if value.HasField("image") else value.simple_value
                found.setdefault(value.tag, []).append((event.step, item))
    return found


def test_live_evaluation_and_tensorboard(setup, straight, tmp_path):
    """train.eval_every: a sample grid (PNG and TensorBoard) and CLIP-I / CLIP-T at steps
    4 and 8, eval.csv / eval.json; the training losses are those of the run without it;
    TensorBoard holds the logged scalars."""
    import io

    from PIL import Image

    from ipadapter_jax.demo import demo_paths

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"image": str(setup["images"] / f"{i}.png"), "caption": f"a colour {i}"}
                                 for i in range(3)]))
    workdir = tmp_path / "run"
    run(command(setup, workdir, steps=8, extra=[
        "--config.train.eval_every=4", f"--config.eval.cases={cases}", f"--config.eval.clip_model="
        f"{demo_paths()['clip']}", "--config.eval.grid=2", "--config.eval.steps=2", "--config.eval.size=16"]))
    np.testing.assert_array_equal(losses(workdir), losses(straight)[:8])
    with open(workdir / "eval.csv") as f:
        evals = list(csv.DictReader(f))
    assert [int(r["step"]) for r in evals] == [4, 8]
    for r in evals:
        assert -1 <= float(r["clip_i"]) <= 1 and -1 <= float(r["clip_t"]) <= 1
    final = json.loads((workdir / "eval.json").read_text())
    assert final["step"] == 8 and abs(final["clip_i"] - float(evals[-1]["clip_i"])) < 1e-5
    for step in (4, 8):    # 2 cases x (reference, image prompt, image prompt + caption), 16 px each
        assert Image.open(workdir / "samples" / f"step_{step:07d}.png").size == (48, 32)
    events = tensorboard_events(workdir / "tensorboard")
    assert [s for s, _ in events["train/loss"]] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in events["train/loss"]], losses(workdir), rtol=1e-6)
    assert {"train/grad_norm", "train/lr", "train/samples_per_s", "train/data_wait_s"} <= events.keys()
    assert [s for s, _ in events["eval/clip_i"]] == [4, 8]
    assert [s for s, _ in events["samples"]] == [4, 8]
    assert Image.open(io.BytesIO(events["samples"][-1][1])).size == (48, 32)


def test_sweep_runs_the_grid_and_gathers_a_table(setup, tmp_path):
    """``train.py sweep``: two override sets trained one after the other into their own
    folders (common overrides after --), one Markdown table of their final losses; --print
    writes the commands instead; a bad --grid is one line."""
    root = tmp_path / "sweep"
    base = command(setup, tmp_path / "unused", steps=2)
    common = [a for a in base[4:] if not a.startswith(("--config.workdir", "--config.train.steps"))]
    sweep = [sys.executable, str(ROOT / "train.py"), "sweep", "--config", str(ROOT / "configs" / "tiny.py"),
             "--grid", "step.snr_gamma=0,5", "--workdir", str(root)]
    printed = run([*sweep, "--print", "--", *common, "--config.train.steps=2"]).stdout.splitlines()
    assert len(printed) == 2 and printed[1].startswith("ipadapter-train --config")
    assert f"--config.step.snr_gamma=5 --config.workdir={root / 'snr_gamma=5'}" in printed[1]
    out = run([*sweep, "--", *common, "--config.train.steps=2"]).stdout
    table = (root / "sweep.md").read_text()
    assert table in out
    lines = table.splitlines()
    assert lines[0] == "| run | step.snr_gamma | status | folder | step | final loss |"
    for line, name in zip(lines[2:], ("snr_gamma=0", "snr_gamma=5"), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == name and cells[2] == "done" and cells[3] == str(root / name) and cells[4] == "2"
        assert float(cells[5]) == pytest.approx(losses(root / name)[-1], abs=1e-4)
        assert (root / name / "ip_adapter.safetensors").is_file()
    bad = subprocess.run([*sweep[:5], "--grid", "snr_gamma"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "ipadapter-train sweep: error: --grid 'snr_gamma': expected FIELD=V1,V2,... with a config field, "
        "e.g. model.num_tokens=1,4,16"], bad.stderr
