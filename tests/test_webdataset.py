"""img2dataset tar shards (``data.kind="webdataset"``): shard lists, the index
(incomplete records, a shard cut short, a file that is not a tar, reuse),
records as the other sources give them (SDXL's original size from the json),
disjoint shares per process; then ``train.py`` on shards with a corrupt
image: a run killed or stopped and restarted from its checkpoint has exactly
the losses of an uninterrupted one, with one process and with two (the first part of the
two-process run started as a SLURM job step: ``--distributed``). A bad shard
list is one line before JAX loads: tests/test_train_cli.py."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sd_fixtures
from helpers import cpu_env

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 4
PER_SHARD = 5


def png(colour, h: int = 24, w: int = 20) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()).save(buf, "PNG")
    return buf.getvalue()


def write_shards(folder: Path) -> Path:
    """SHARDS shards of PER_SHARD complete records (sizes vary, a json with the original
    size on even records); shard 1 also holds a corrupt image and a record without a
    caption."""
    from ipadapter_jax.training.shards import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        records = []
        for i in range(PER_SHARD):
            key = f"{s:05d}{i:04d}"
            members = {"jpg" if i % 3 == 2 else "png": png(rng.integers(0, 256, 3), 24 + i, 20 + s),
                       "txt": f"a colour {s} {i}".encode()}
            if i % 2 == 0:
                members["json"] = json.dumps({"width": 20 + s, "height": 24 + i, "original_width": 400 + s,
                                              "original_height": 300 + i, "url": "x"}).encode()
            records.append((key, members))
        if s == 1:
            records.insert(2, (f"{s:05d}corrupt", {"jpg": b"not a jpeg", "txt": b"broken"}))
            records.append((f"{s:05d}nocaption", {"png": png((1, 2, 3))}))
        write_shard(folder / f"{s:05d}.tar", records)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    sd_fixtures.write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


# --------------------------------------------------------------------------- shard lists and the index

def test_brace_ranges_globs_and_errors(shards):
    from ipadapter_jax.io.errors import BadArgument, MissingFile
    from ipadapter_jax.training.shards import expand_braces, shard_paths

    assert expand_braces("d/{00008..00011}.tar") == [f"d/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    everything = [shards / f"{s:05d}.tar" for s in range(SHARDS)]
    assert shard_paths(str(shards / "{00000..00003}.tar")) == everything
    assert shard_paths(f"{shards}/*.tar {shards}/00001.tar") == everything     # sorted, once each
    with pytest.raises(MissingFile, match=r"no file matches .*\*\.tgz"):
        shard_paths(str(shards / "*.tgz"))
    with pytest.raises(MissingFile, match="no such shard file: .*00004.tar"):
        shard_paths(str(shards / "{00000..00004}.tar"))
    with pytest.raises(BadArgument, match="data.shards is required"):
        shard_paths("")


def test_index_skips_incomplete_records_broken_shards_and_is_reused(shards, tmp_path, caplog):
    import shutil

    from ipadapter_jax.training.shards import index_shard, load_indexes

    index, problems = index_shard(shards / "00001.tar")
    assert len(index) == PER_SHARD + 1 and index.incomplete == 1 and not problems    # the corrupt image is indexed
    assert index.keys[2] == "00001corrupt"
    # a shard cut short keeps the records before the cut; a file that is not a tar has none
    data = (shards / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "text.tar").write_text("hello")
    cut, problems = index_shard(tmp_path / "cut.tar")
    assert 0 < len(cut) < PER_SHARD and len(problems) == 1, problems
    none, problems = index_shard(tmp_path / "text.tar")
    assert len(none) == 0 and "not a readable tar" in problems[0]

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    with caplog.at_level(logging.WARNING):
        first = load_indexes(sorted(copy.glob("*.tar")), tmp_path / "idx", progress=False)
    assert [len(i) for i in first] == [PER_SHARD, PER_SHARD + 1, PER_SHARD, PER_SHARD]
    assert "00001.tar: 1 records without an image" in caplog.text
    saved = sorted((tmp_path / "idx").glob("*.npz"))
    assert len(saved) == SHARDS
    # reused while the shard is unchanged (a saved index marked here would otherwise be rebuilt) ...
    z = dict(np.load(saved[0]))
    z["keys"] = np.array(["marked"] * len(z["keys"]))
    np.savez(saved[0], **z)
    again = load_indexes(sorted(copy.glob("*.tar")), tmp_path / "idx", progress=False)
    assert {str(again[i].keys[0]) for i in range(SHARDS)} & {"marked"}
    # ... and rebuilt once the shard changed
    changed = next(p for p in sorted(copy.glob("*.tar")) if p.stem in saved[0].name)
    os.utime(changed, ns=(1, 1))
    again = load_indexes(sorted(copy.glob("*.tar")), tmp_path / "idx", progress=False)
    assert "marked" not in {str(k) for i in again for k in i.keys}


# --------------------------------------------------------------------------- the source

def test_records_and_process_shares(shards, tokenizer, tmp_path):
    from ipadapter_jax.io.errors import BadArgument
    from ipadapter_jax.training.webdataset import WebDatasetSource

    spec = str(shards / "*.tar")
    whole = WebDatasetSource(spec, tokenizer, 16, index_dir=tmp_path / "idx", process_index=0, process_count=1)
    assert len(whole) == SHARDS * PER_SHARD + 1
    keys = [whole._describe(i).rsplit(" ", 1)[1] for i in range(len(whole))]
    record = whole[0]
    assert record["pixels"].shape == (16, 16, 3) and record["clip_pixels"].shape == (224, 224, 3)
    assert record["input_ids"].shape == (77,) and int(record["skipped"]) == 0
    np.testing.assert_array_equal(record["original_size"], [300, 400])      # the json's original size
    odd = whole[1]                                                            # no json: the stored image's
    np.testing.assert_array_equal(odd["original_size"], [25, 20])
    # the corrupt image is skipped (the next record is used) and counted
    corrupt = keys.index("00001corrupt")
    after = whole[corrupt]
    assert int(after["skipped"]) == 1
    np.testing.assert_array_equal(after["pixels"], whole[corrupt + 1]["pixels"])
    # two processes: disjoint shards, every record once
    shares = [WebDatasetSource(spec, tokenizer, 16, index_dir=tmp_path / "idx", process_index=p, process_count=2)
              for p in range(2)]
    assert [[p.name for p in s.paths] for s in shares] == [["00000.tar", "00002.tar"], ["00001.tar", "00003.tar"]]
    seen = [s._describe(i) for s in shares for i in range(len(s))]
    assert sorted(seen) == sorted(whole._describe(i) for i in range(len(whole)))
    assert repr(shares[0]) != repr(shares[1])
    with pytest.raises(BadArgument, match="4 shard.*for 5 processes"):
        WebDatasetSource(spec, tokenizer, 16, process_index=0, process_count=5)


# --------------------------------------------------------------------------- train.py on shards

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sd_fixtures.build_pipeline_folder(tmp_path_factory.mktemp("wds_model"))


def command(model, shards, workdir, steps, extra=()):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
            f"--config.model.pretrained={model['sd']}", f"--config.model.image_encoder={model['image_encoder']}",
            "--config.data.kind=webdataset", f"--config.data.shards={shards}/{{00000..00003}}.tar",
            f"--config.workdir={workdir}", f"--config.train.steps={steps}", "--config.train.save_every=4", *extra]


def rows(workdir) -> list[dict]:
    with open(Path(workdir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def run_all(cmds, env) -> list[str]:
    """Start every command (one per process), wait; their stderr, once all exited with status 0."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for c in cmds]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    return [out + err for out, err in outputs]


STEPS = 16     # steps of ~30 ms: a kill after the first checkpoint (step 4) lands before the end


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on localhost (JAX derives a SLURM job's coordinator port from its id)."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("processes", [1, 2])
def test_restart_from_checkpoint_matches_uninterrupted(model, shards, tmp_path, processes):
    """An uninterrupted run, and a run killed (one process: SIGKILL after its first checkpoint)
    or stopped after its step-4 checkpoint (two processes) and restarted: the same losses (the
    data position is part of the checkpoint). Two processes read
    disjoint shards."""
    from test_train_multiprocess import free_port

    env = dict(cpu_env(), JAX_PLATFORMS="cpu")
    port = free_port()

    def commands(workdir, steps):
        extra = [] if processes == 1 else [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}"]
        return [command(model, shards, workdir, steps, [*extra, *([f"--process_id={i}"] * (processes > 1))])
                for i in range(processes)]

    def slurm(workdir, steps):
        """Two processes as SLURM's srun starts them: --distributed, JAX reads the job from the environment."""
        job = next(str(j) for j in range(os.getpid(), os.getpid() + 4096) if port_free(j % 2**12 + 61440))
        procs = [subprocess.Popen(command(model, shards, workdir, steps, ["--distributed"]), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env=dict(env, SLURM_JOB_ID=job, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                                           SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
                 for i in range(2)]
        outputs = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, outputs):
            assert p.returncode == 0, err[-4000:]
        assert "process 1 of 2 reads" in outputs[1][1], outputs[1][1][-2000:]

    straight = tmp_path / "straight"
    evaluation = []
    if processes == 2:   # live evaluation shared by the processes (it must not change the losses)
        from ipadapter_jax.demo import demo_paths

        cases = tmp_path / "cases.json"
        for i in range(3):
            (tmp_path / f"ref{i}.png").write_bytes(png((40 * i, 90, 200)))
        cases.write_text(json.dumps([{"image": f"ref{i}.png", "caption": f"a colour {i}"} for i in range(3)]))
        evaluation = [f"--config.train.eval_every={STEPS}", f"--config.eval.cases={cases}",
                      f"--config.eval.clip_model={demo_paths()['clip']}", "--config.eval.grid=1",
                      "--config.eval.steps=2", "--config.eval.size=16"]
    logs = run_all([c + evaluation for c in commands(straight, STEPS)], env)
    if processes == 2:
        assert "process 0 of 2 reads 2 of 4 shards (00000.tar ... 00002.tar)" in logs[0], logs[0][-2000:]
        assert "process 1 of 2 reads 2 of 4 shards (00001.tar ... 00003.tar)" in logs[1], logs[1][-2000:]
        final = json.loads((straight / "eval.json").read_text())   # cases 0 and 2 on process 0, 1 on process 1
        assert final["clip_cases"] == 3 and -1 <= final["clip_i"] <= 1, final
        assert (straight / "samples" / f"step_{STEPS:07d}.png").is_file()
    reference = rows(straight)
    assert len(reference) == STEPS and np.isfinite([float(r["loss"]) for r in reference]).all()
    assert int(reference[-1]["skipped_images"]) >= 1          # the corrupt image was met and counted
    assert (straight / "ip_adapter.safetensors").is_file()

    restarted = tmp_path / "restarted"
    if processes == 2:    # the first part as a SLURM job step (--distributed), the rest with --coordinator
        slurm(restarted, 4)
        last = 4
    else:                 # killed (SIGKILL) once its first checkpoint is there
        proc = subprocess.Popen(commands(restarted, STEPS)[0], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, cwd=ROOT)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not (
                (restarted / "checkpoints").is_dir() and any(p.name.isdigit()
                                                            for p in (restarted / "checkpoints").iterdir())):
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        last = max(int(p.name) for p in (restarted / "checkpoints").iterdir() if p.name.isdigit())
        assert 4 <= last < STEPS
    out = run_all(commands(restarted, STEPS), env)
    assert f"'resumed_from': {last}" in out[0], out[0][-2000:]
    assert [r["loss"] for r in rows(restarted)] == [r["loss"] for r in reference]
    assert [r["skipped_images"] for r in rows(restarted)] == [r["skipped_images"] for r in reference]
