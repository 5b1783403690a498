"""README.md's ```python blocks run.

Every ```python block of README.md (indented ones inside lists too) runs, in
README order, in one shared namespace: blocks continue each other, as a reader
would run them. Paths to real checkpoints become small random models built
once with ``sd_fixtures`` (a diffusers SD folder, a CLIP image encoder, base
and plus IP-Adapter files, a reference image), and sizes that only make sense
for the real models shrink. The demo block (diffusers on the shipped demo
model) runs as written, from the repository root.

When the README changes, update the tables below: ``PATHS`` (a quoted string
in the README -> fixture file), ``REWRITES`` (other literal text -> its
replacement) and ``PRELUDES`` (names a block uses but the README leaves to the
reader: defined before a block that reads them without defining them, when no
earlier block did). A table entry no block uses fails
``test_substitution_tables_are_used`` so stale entries show.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import flux_fixtures
import ipadapter_fixtures as fx
import sd_fixtures
from ipadapter_jax.convert.single_file import folder_to_single_file
from test_controlnet_pipeline import control_png, random_controlnet

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# A quoted string literal as written in the README -> key of the fixture file replacing it.
PATHS = {
    '"path/to/stable-diffusion-v1-5"': "sd",
    '"stable-diffusion-v1-5"': "sd",
    '"path/to/IP-Adapter/models/image_encoder"': "image_encoder",
    '"IP-Adapter/models/image_encoder"': "image_encoder",
    '"IP-Adapter/models/ip-adapter_sd15.safetensors"': "adapter",
    '"IP-Adapter/models/ip-adapter-plus_sd15.safetensors"': "plus",
    '"ref.png"': "reference",
    '"my-adapter.safetensors"': "saved_adapter",
    '"control_v11p_sd15_canny"': "controlnet",
    '"edges.png"': "edges",
    '"dreamshaper_8.safetensors"': "single_file",
    '"add_detail.safetensors"': "lora",
    '"easynegative.safetensors"': "embedding",
    '"FLUX.1-dev"': "flux",
    '"clip-vit-large-patch14"': "flux_image_encoder",
    '"flux-ip-adapter-v2/ip_adapter.safetensors"': "flux_adapter",
}
# Literal text -> replacement. The fixture's VAE downsamples 2x and its UNet is sized for 8x8 latents
# (16 px images), where SD 1.5's 512 px images have 64x64 latents.
REWRITES = {
    "(1, 64, 64, 4)": "(1, 8, 8, 4)",
    "num_images=4, seed=0)": "num_images=4, seed=0, height=16, width=16)",   # the pipeline's default is 512 px
    # The tiny FLUX transformer has 2 double-stream blocks (FLUX.1: 19) and a 2x VAE.
    "scale=[0.5] * 19)": "scale=[0.5] * 2)",
    "num_inference_steps=28)": "num_inference_steps=2, height=32, width=32, max_sequence_length=16)",
}
# Name a block reads but the README never defines -> code defining it (run in the shared namespace).
# The IP-Adapter block runs the UNet on a CFG batch (uncond + cond) built from the latents and text of
# the "Loading a Stable Diffusion 1.5 folder" block, at a timestep: latents2, t, text2 are left to the reader.
PRELUDES = {
    "latents2": "latents2 = np.concatenate([latents] * 2)",
    "t": "t = 999",
    "text2": "text2 = np.concatenate([text] * 2)",
}

FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(1-based line of the block's first code line, dedented code) for each ```python block."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body")) + 1
        blocks.append((line, textwrap.dedent(match.group("body"))))
    return blocks


BLOCKS = python_blocks(README.read_text())


def substitute(code: str, files: dict[str, Path]) -> str:
    for literal, key in PATHS.items():
        code = code.replace(literal, repr(str(files[key])))
    for old, new in REWRITES.items():
        code = code.replace(old, new)
    return code


def free_names(code: str) -> set[str]:
    """Names the block reads but never assigns."""
    loads, stores = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else stores).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stores.add(node.name)
        elif isinstance(node, ast.alias):
            stores.add((node.asname or node.name).split(".")[0])
    return loads - stores


def prelude(code: str, namespace: dict) -> str:
    missing = free_names(code) - namespace.keys()
    return "".join(text + "\n" for name, text in PRELUDES.items() if name in missing)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    paths = sd_fixtures.build_pipeline_folder(root)
    paths["reference"] = sd_fixtures.reference_image(root / "ref.png")
    paths["saved_adapter"] = root / "my-adapter.safetensors"
    paths["controlnet"] = random_controlnet(fx.UNET, 1, root / "controlnet")
    paths["edges"] = control_png(root / "edges.png", 1)
    # Community checkpoints: the SD folder as one file, a one-layer kohya LoRA, a 2-vector A1111 embedding.
    paths["single_file"] = folder_to_single_file(paths["sd"], root / "dreamshaper_8.safetensors")
    rng, layer = np.random.default_rng(0), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    paths["lora"] = root / "add_detail.safetensors"
    save_file({f"{layer}.lora_down.weight": rng.standard_normal((2, 32)).astype(np.float32),
               f"{layer}.lora_up.weight": rng.standard_normal((32, 2)).astype(np.float32)}, paths["lora"])
    paths["embedding"] = root / "easynegative.safetensors"
    save_file({"emb_params": rng.standard_normal((2, fx.UNET["cross_attention_dim"])).astype(np.float32)},
              paths["embedding"])
    (root / "flux").mkdir()   # its own folder: the FLUX fixtures' file names are the SD ones'
    paths["flux"] = flux_fixtures.build_flux_folder(root / "flux")
    paths["flux_image_encoder"] = flux_fixtures.build_image_encoder(root / "flux")
    paths["flux_adapter"] = flux_fixtures.write_xlabs(root / "flux" / "flux-ip-adapter-v2.safetensors", 16)
    return paths


@pytest.fixture(scope="module")
def reader(files):
    """Runs the README's blocks in order in one namespace, each at most once."""

    class Reader:
        def __init__(self):
            self.namespace: dict = {"__name__": "readme"}
            self.outcome: dict[int, BaseException | None] = {}

        def run_through(self, index: int) -> None:
            for i in range(index + 1):
                if i in self.outcome:
                    continue
                line, code = BLOCKS[i]
                try:
                    exec(compile(prelude(code, self.namespace), f"<prelude of README.md block at line {line}>",
                                 "exec"), self.namespace)
                    # Blank lines in front: tracebacks give README.md's own line numbers.
                    exec(compile("\n" * (line - 1) + substitute(code, files), str(README), "exec"), self.namespace)
                    self.outcome[i] = None
                except BaseException as e:  # noqa: BLE001 - reported by the block's own test
                    self.outcome[i] = e
                    if i == index:
                        raise
            failed = [BLOCKS[i][0] for i in range(index) if self.outcome[i] is not None]
            assert not failed, f"earlier README blocks (lines {failed}) failed; this one depends on them"

    return Reader()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4, f"found only {len(BLOCKS)} ```python blocks in README.md"
    assert any("ipadapter_jax" in code for _, code in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(index, reader, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo block's paths are relative to the repository root
    reader.run_through(index)


def test_substitution_tables_are_used():
    text = "\n".join(code for _, code in BLOCKS)
    stale = [k for k in [*PATHS, *REWRITES] if k not in text]
    stale += [k for k in PRELUDES if not any(k in free_names(code) for _, code in BLOCKS)]
    assert not stale, f"substitutions no README block uses any more (update tests/test_readme.py): {stale}"


# --------------------------------------------------------------------------- the README stays true

def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def layout_modules(section: str) -> set[str]:
    """Package modules the Layout section lists: ``ipadapter_jax/part/`` heads and
    the ``name.py`` lines indented under them, or ``ipadapter_jax/file.py`` lines."""
    block = section.split("```")[1]
    listed, part = set(), None
    for line in block.splitlines():
        word = line.split()[0] if line.split() else ""
        if line.startswith("ipadapter_jax/"):
            part = word if word.endswith("/") else None
            if word.endswith(".py"):
                listed.add(word)
        elif part and line.startswith("  ") and word.endswith(".py"):
            listed.add(part + word)
        elif line and not line.startswith(" "):
            part = None
    return listed


def package_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / "ipadapter_jax").rglob("*.py")
            if "demo/model" not in p.as_posix() and "__pycache__" not in p.parts}


def test_layout_lists_every_module():
    listed, modules = layout_modules(_section("Layout")), package_modules()
    assert not modules - listed, f"package modules missing from README's Layout section: {sorted(modules - listed)}"
    assert not listed - modules, f"README's Layout section lists modules that do not exist: {sorted(listed - modules)}"


def test_layout_check_can_fail():
    section = "## Layout\n```\nipadapter_jax/io/   bottom\n  files.py   files\nipadapter_jax/__init__.py root\n```\n"
    assert layout_modules(section) == {"ipadapter_jax/io/files.py", "ipadapter_jax/__init__.py"}
    assert "ipadapter_jax/io/errors.py" in package_modules() - layout_modules(section)


# Words that say a feature is unfinished, and the shipped features the status must name as done.
UNFINISHED = ("not done", "not started", "in progress", "to come", "not yet", "unfinished", "todo", "planned")
SHIPPED = ("SDXL", "SD 2.x", "ControlNet", "single files", "LoRA", "textual inversion", "hub ids",
           "ipadapter-sample", "training", "families")


def status_problems(text: str) -> list[str]:
    status = text[text.index("Status:"):]
    status = status[:status.index("\n\n")]
    return ([f"says {w!r}" for w in UNFINISHED if w in status.lower()] +
            [f"does not name {w!r}" for w in SHIPPED if w.lower() not in status.lower()])


def test_status_is_current():
    problems = status_problems(README.read_text())
    assert not problems, f"README's status paragraph: {problems}"
    assert status_problems("Status: SDXL is in progress.\n\n")   # the check can fail
