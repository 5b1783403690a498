"""notebooks/quickstart.ipynb runs top to bottom (on the embedded demo model when
no real weights are configured): its code cells are executed in order."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    for var in ("SD_MODEL", "IMAGE_ENCODER", "IP_ADAPTER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QUICKSTART_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"quickstart cell {i}", "exec"), namespace)
    assert (tmp_path / "scale_grid.png").is_file()
    assert namespace["grid"].shape == (64, 192, 3)
