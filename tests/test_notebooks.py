"""Every walkthrough notebook executes headless (nbclient) at quick settings."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_theory", "02_synthetic", "03_markov", "04_tofu_results"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch, tofu_data_dir):
    monkeypatch.setenv("NPO_SIM_NB_OUT", str(tmp_path))
    monkeypatch.setenv("NPO_TOFU_DIR", str(tofu_data_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("NPO_SIM_NB_SMOKE", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # every notebook shows at least one figure or result
    assert any(o.output_type in ("display_data", "stream", "execute_result")
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
