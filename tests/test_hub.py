"""Hugging Face hub ids (``org/name``, ``org/name:path``, ``org/name@rev:path``)
wherever a path is taken: resolved in a fake hub cache laid out as
huggingface_hub lays it out, never over the network (HF_HUB_OFFLINE=1, or
huggingface_hub's download functions replaced)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import ipadapter_fixtures as fx
from ipadapter_jax.io import hub
from ipadapter_jax.io.errors import MissingFile
from ipadapter_jax.io.params import AbstractRngs, module_state_dict, to_torch_layout, torch_key
from ipadapter_jax.ip_adapter import load_ip_adapter
from ipadapter_jax.models import UNet2DConditionModel

REPO = "h94/IP-Adapter"
ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "models/ip-adapter_sd15.safetensors"


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty hub cache (HF_HUB_CACHE) with downloads forbidden (HF_HUB_OFFLINE=1,
    also in huggingface_hub's constants, which it reads once at import)."""
    from huggingface_hub import constants

    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return folder


def snapshot(cache: Path, repo: str, files: dict[str, bytes | Path], revision: str = "main") -> Path:
    """A cached repo as huggingface_hub lays it out: ``models--org--name/refs/<revision>``
    holds the commit hash, ``snapshots/<commit>/`` the files (blobs/ + symlinks in
    real caches; plain files are what it writes where symlinks are unavailable)."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / revision).write_text(commit)
    root = entry / "snapshots" / commit
    for name, content in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    return root


# --------------------------------------------------------------------------- the spelling

def test_spelling():
    assert hub.parse("h94/IP-Adapter") == hub.HubId("h94/IP-Adapter", None, "")
    assert hub.parse(f"{REPO}:{ADAPTER}") == hub.HubId(REPO, None, ADAPTER)
    assert hub.parse(f"{REPO}@v1.0:models/image_encoder/") == hub.HubId(REPO, "v1.0", "models/image_encoder")
    assert str(hub.parse(f"{REPO}@refs/pr/3:{ADAPTER}")) == f"{REPO}@refs/pr/3:{ADAPTER}"
    for spec in (f"{REPO}:{ADAPTER}", "stabilityai/stable-diffusion-xl-base-1.0", "a/b@main"):
        assert hub.is_hub_id(spec), spec
    for spec in ("./h94/IP-Adapter", "/h94/IP-Adapter", "~/IP-Adapter", "IP-Adapter", "h94/IP-Adapter/models",
                 "a--b/c", "a/b..c", "-a/b", "a/b:", "a/b:../x", "a/b:/x", "a/b:x//y", "a/b@:x", "C:/x/y",
                 Path("h94/IP-Adapter"), "https://huggingface.co/h94/IP-Adapter"):
        assert not hub.is_hub_id(spec), spec
    assert hub.join(REPO, "models", "x.safetensors") == f"{REPO}:models/x.safetensors"
    assert hub.join(f"{REPO}@v2:models", "", "x.safetensors") == f"{REPO}@v2:models/x.safetensors"
    assert hub.join(Path("folder"), "models", None) == Path("folder/models")
    assert hub.join(REPO, None, "") == REPO


def test_imports_no_jax():
    """The command lines resolve ids before JAX starts."""
    code = ("import sys, ipadapter_jax.io.hub as h; h.is_hub_id('a/b'); "
            "print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out


def test_cache_folder_is_read_at_call_time(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()


# --------------------------------------------------------------------------- resolve

def test_resolve_file_subfolder_and_repo(cache):
    root = snapshot(cache, REPO, {ADAPTER: b"weights", "models/image_encoder/config.json": b"{}",
                                  "README.md": b"hi"})
    tagged = snapshot(cache, REPO, {ADAPTER: b"older"}, revision="v1")
    assert hub.resolve(f"{REPO}:{ADAPTER}", kind="file") == root / ADAPTER
    assert hub.resolve(f"{REPO}:{ADAPTER}") == root / ADAPTER                    # kind="any": a file
    assert hub.resolve(f"{REPO}:models/image_encoder", kind="folder") == root / "models/image_encoder"
    assert hub.resolve(f"{REPO}:models/image_encoder/") == root / "models/image_encoder"   # kind="any": a folder
    assert hub.resolve(REPO, kind="folder") == root
    assert hub.resolve(REPO) == root
    assert hub.resolve(f"{REPO}@v1:{ADAPTER}").read_bytes() == b"older"
    assert hub.resolve(f"{REPO}@{tagged.name}:{ADAPTER}", kind="file") == tagged / ADAPTER   # a commit hash
    assert hub.local_path(f"{REPO}:{ADAPTER}", kind="file") == root / ADAPTER
    assert hub.local_path(REPO, kind="file") == Path(REPO)   # a repo is never a file: left to the caller


def test_local_path_wins(cache, tmp_path, monkeypatch):
    snapshot(cache, REPO, {"x.txt": b"hub"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "h94" / "IP-Adapter").mkdir(parents=True)
    (tmp_path / "h94" / "IP-Adapter" / "x.txt").write_text("local")
    assert not hub.is_hub_id(REPO)
    assert hub.resolve(REPO) == Path(REPO)
    assert hub.resolve(REPO, kind="folder").joinpath("x.txt").read_text() == "local"
    assert hub.local_path(REPO) == Path(REPO)
    assert hub.join(REPO, "x.txt") == Path(REPO, "x.txt")
    assert hub.resolve(f"{REPO}:x.txt").read_text() == "hub"   # a different spelling: the id


def test_offline_and_missing_gives_one_line(cache):
    snapshot(cache, REPO, {ADAPTER: b"weights"})
    cases = [(f"{REPO}:models/x.safetensors", "file", "IP-Adapter file models/x.safetensors of h94/IP-Adapter"),
             (f"{REPO}:models/image_encoder", "folder", "image encoder models/image_encoder of h94/IP-Adapter"),
             (f"{REPO}:models/x.safetensors", "any", "models/x.safetensors of h94/IP-Adapter"),
             ("org/never-cached:unet", "folder", "unet of org/never-cached"),
             ("org/never-cached", "any", "org/never-cached is not in the Hugging Face cache")]
    for spec, kind, missing in cases:
        with pytest.raises(MissingFile) as e:
            hub.resolve(spec, kind=kind, what="image encoder" if kind == "folder" else "IP-Adapter file",
                        flag="--ip-adapter")
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(f"--ip-adapter {spec}: "), message
        assert missing in message and f"({cache})" in message, message
        assert "HF_HUB_OFFLINE=1 forbids downloading it" in message, message
        assert message.endswith("nor is it a local path") == (":" not in spec), message


def test_not_an_id_and_not_found(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFile, match=r"^--ip-adapter \./nope/x\.safetensors: IP-Adapter file not found$"):
        hub.resolve("./nope/x.safetensors", what="IP-Adapter file", flag="--ip-adapter")
    with pytest.raises(MissingFile, match=r"^h94/IP-Adapter/models/x\.safetensors: IP-Adapter file not found \(a "
                                          r"file or folder inside a Hugging Face repo is written org/name:path, "
                                          r"here h94/IP-Adapter:models/x\.safetensors\)$"):
        hub.resolve(f"{REPO}/models/x.safetensors", what="IP-Adapter file")
    with pytest.raises(MissingFile, match=r"^h94/IP-Adapter: names a Hugging Face repo \(a folder\), not a file; a "
                                          r"file inside it is written h94/IP-Adapter:path/in/repo$"):
        hub.resolve(REPO, kind="file", what="IP-Adapter file")


def test_downloads_when_online(cache, tmp_path, monkeypatch):
    """Online, what the cache lacks is fetched with huggingface_hub's own
    functions (replaced here: no network); a file the repo lacks and a failed
    download are one-line errors; a model folder fetches its config and the
    weights that will be read, not the other variants."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    remote = {"unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"st",
              "unet/diffusion_pytorch_model.fp16.safetensors": b"fp16", "unet/diffusion_pytorch_model.bin": b"bin"}
    asked = []

    def fake_download(repo_id, filename, *, revision=None, cache_dir=None, **_):
        asked.append(filename)
        if repo_id == "org/down":
            raise OSError("Connection refused\nmore")
        if filename not in remote:
            raise EntryNotFoundError(f"{filename} not found")
        return str(snapshot(Path(cache_dir), repo_id, {filename: remote[filename]}) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    folder = hub.resolve_model_folder("org/sd:unet", weights_name="diffusion_pytorch_model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert asked == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    asked.clear()
    assert hub.resolve_model_folder("org/sd:unet", weights_name="diffusion_pytorch_model") == folder
    assert asked == []                                                        # cached now: nothing asked
    assert hub.resolve("org/sd:unet/config.json", kind="file") == folder / "config.json"
    with pytest.raises(MissingFile, match=r"^--unet org/sd:unet/x\.bin: org/sd has no file unet/x\.bin$"):
        hub.resolve("org/sd:unet/x.bin", kind="file", flag="--unet")
    with pytest.raises(MissingFile, match=r"^org/down:a\.bin: could not download the file a\.bin of org/down into "
                                          rf"the Hugging Face cache \({cache}\): OSError: Connection refused$"):
        hub.resolve("org/down:a.bin", kind="file")


# --------------------------------------------------------------------------- the Python API

UNET_CONFIG = json.loads(json.dumps(dict(fx.UNET, _class_name="UNet2DConditionModel")))


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    """A tiny UNet folder with random weights, its shapes from the abstract model
    (a real random init of even this UNet takes ~20 s on the CPU)."""
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel.from_config(UNET_CONFIG, rngs=AbstractRngs()))
    rng = np.random.default_rng(0)
    weights = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        shape = (var.get_value() if hasattr(var, "get_value") else var.value).shape
        weights[torch_key(path)] = to_torch_layout(path, rng.standard_normal(shape).astype(np.float32)).copy()
    folder = tmp_path_factory.mktemp("local") / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(UNET_CONFIG))
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    return folder


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_from_pretrained_through_an_id(cache, unet_folder):
    snapshot(cache, "org/tiny-sd", {f"unet/{f.name}": f for f in unet_folder.iterdir()})
    expected = module_state_dict(UNet2DConditionModel.from_pretrained(unet_folder))
    for spec, subfolder in (("org/tiny-sd:unet", None), ("org/tiny-sd", "unet"), (str(unet_folder.parent), "unet")):
        assert_same(module_state_dict(UNet2DConditionModel.from_pretrained(spec, subfolder=subfolder)), expected)
    with pytest.raises(MissingFile, match=r"org/tiny-sd:vae: the model folder's vae/config\.json of org/tiny-sd is "
                                          r"not in the Hugging Face cache"):
        UNet2DConditionModel.from_pretrained("org/tiny-sd", subfolder="vae")


def test_load_ip_adapter_through_both_spellings(cache, unet_folder, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    ip = {}
    for n, layer in enumerate(unet.cross_attention_layers()):
        for kv in ("to_k_ip", "to_v_ip"):
            ip[f"{2 * n + 1}.{kv}.weight"] = fx.Rand(n).w(layer.hidden_size, layer.token_dim)
    local = tmp_path / "local" / ADAPTER
    local.parent.mkdir(parents=True)
    save_file(fx.flat(fx.image_proj("base", fx.UNET["cross_attention_dim"]), ip), local)
    snapshot(cache, REPO, {ADAPTER: local})
    expected = module_state_dict(load_ip_adapter(local, unet, attach=False))
    for args, kwargs in (((f"{REPO}:{ADAPTER}",), {}),
                         ((REPO,), dict(subfolder="models", weight_name="ip-adapter_sd15.safetensors")),
                         ((tmp_path / "local",), dict(subfolder="models",
                                                      weight_name="ip-adapter_sd15.safetensors")),
                         ((str(local.parent),), dict(weight_name="ip-adapter_sd15.safetensors"))):
        adapter = load_ip_adapter(*args, unet, attach=False, **kwargs)
        assert adapter.variant == "base"
        assert_same(module_state_dict(adapter), expected)
    with pytest.raises(MissingFile, match=r"h94/IP-Adapter:models/ip-adapter_sd15_light\.safetensors: the IP-Adapter "
                                          r"file models/ip-adapter_sd15_light\.safetensors of h94/IP-Adapter is not in"):
        load_ip_adapter(REPO, unet, subfolder="models", weight_name="ip-adapter_sd15_light.safetensors")


# --------------------------------------------------------------------------- the commands and the pipelines

def _demo_repo(cache: Path) -> Path:
    """The shipped demo model as a cached hub repo ``org/demo`` (sd/, image_encoder/, the adapter)."""
    from ipadapter_jax import demo

    root = demo.MODEL_DIR
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()
             and p.relative_to(root).parts[0] in ("sd", "image_encoder", "ip-adapter_demo.safetensors")}
    return snapshot(cache, "org/demo", files)


def test_sample_command_takes_hub_ids(cache, tmp_path):
    """sample.py resolves --model, --image-encoder and --ip-adapter ids to the cache
    before JAX loads; a missing one is one line naming the flag and the id."""
    from ipadapter_jax import demo
    from ipadapter_jax.cli.sample import parse_args

    root = _demo_repo(cache)
    args = parse_args(["--model", "org/demo:sd", "--image-encoder", "org/demo:image_encoder",
                       "--ip-adapter", "org/demo:ip-adapter_demo.safetensors",
                       "--image", str(demo.MODEL_DIR / "reference.png"), "--out", str(tmp_path / "x.png")])
    assert Path(args.model) == root / "sd" and Path(args.image_encoder) == root / "image_encoder"
    assert args.ip_adapter == [str(root / "ip-adapter_demo.safetensors")]
    assert args.family.name == "sd1"
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "org/demo:sd",
                             "--ip-adapter", "org/demo:nope.safetensors", "--image-encoder",
                             "org/demo:image_encoder", "--image", str(demo.MODEL_DIR / "reference.png")],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("sample.py: error: --ip-adapter org/demo:nope.safetensors") and "nope" in lines[0]


def test_load_pipeline_through_an_id(cache):
    """``load_pipeline("org/name:sub")`` reads the cached folder as its local path would be read."""
    from ipadapter_jax import demo
    from ipadapter_jax.io.params import module_state_dict
    from ipadapter_jax.pipeline import load_pipeline

    _demo_repo(cache)
    ours = load_pipeline("org/demo:sd", image_encoder="org/demo:image_encoder")
    local = load_pipeline(demo.MODEL_DIR / "sd", image_encoder=demo.MODEL_DIR / "image_encoder")
    assert ours.family is local.family
    for name in ("unet", "text_encoder", "image_encoder"):
        assert_same(module_state_dict(getattr(ours, name)), module_state_dict(getattr(local, name)))


def test_partly_cached_folder_is_completed_online(cache, monkeypatch):
    """A cache holding part of a folder (its tokenizer, an interrupted download) is not taken for the
    whole: online, huggingface_hub is asked for the folder (it fetches what is missing); offline the
    cache is all there is."""
    import huggingface_hub
    from huggingface_hub import constants

    root = snapshot(cache, "org/sd", {"tokenizer/vocab.json": b"{}"})
    calls = []

    def fake_snapshot(repo, *, local_files_only=False, allow_patterns=None, **kwargs):
        calls.append((repo, local_files_only, tuple(allow_patterns or ())))
        if not local_files_only:
            (root / "unet").mkdir(exist_ok=True)
            (root / "unet" / "config.json").write_text("{}")
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert hub.resolve("org/sd", kind="folder") == root and calls[-1][1] is True      # offline: the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = hub.resolve("org/sd", kind="folder", allow_patterns=hub.PIPELINE_FOLDER_PATTERNS)
    assert folder == root and (root / "unet" / "config.json").is_file()
    assert calls[-1][:2] == ("org/sd", False) and "text_encoder*/model.safetensors" in calls[-1][2]
    assert "*/diffusion_pytorch_model.fp16.safetensors" in hub.pipeline_patterns("fp16")
    assert "text_encoder*/model.safetensors" not in hub.pipeline_patterns("fp16")
