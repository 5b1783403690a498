"""notebooks/quickstart.ipynb runs top to bottom (on the embedded demo model when
no real weights are configured): its code cells are executed in order. Its SDXL
cell runs on a small random SDXL folder (the tests' fixture) with a small image
encoder of the adapter's width."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import ipadapter_fixtures as fx
from test_sdxl_pipeline import build_sdxl_folder

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def small_sdxl(root: Path) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    paths = build_sdxl_folder(root)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=fx.CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=112, projection_dim=fx.CLIP_DIM, hidden_act="gelu")).save_pretrained(
        root / "image_encoder")
    return {"SDXL_MODEL": str(paths["sdxl"]), "SDXL_IMAGE_ENCODER": str(root / "image_encoder"),
            "SDXL_IP_ADAPTER": str(paths["adapter"]), "SDXL_STEPS": "3"}


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    for var in ("SD_MODEL", "IMAGE_ENCODER", "IP_ADAPTER", "CONTROLNET"):
        monkeypatch.delenv(var, raising=False)
    for var, value in small_sdxl(tmp_path / "sdxl").items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("QUICKSTART_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"quickstart cell {i}", "exec"), namespace)
    assert (tmp_path / "scale_grid.png").is_file()
    assert namespace["grid"].shape == (64, 192, 3)
    assert abs(namespace["controlled"].images[0] - namespace["results"][0.5]).mean() > 1e-3
    assert (tmp_path / "sdxl.png").is_file() and namespace["xl_out"].images.shape[0] == 1
