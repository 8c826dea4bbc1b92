"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SPARKDL_LAKEHOUSE", str(tmp_path / "lakehouse"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel gets its own SparkSession: a second JVM beside the test session's.
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Each plot is drawn in its own cell: the training curves, and the ROC/confusion matrix
    # drawn with pyplot in the kernel (training must not have switched the inline backend off).
    for tag in ("curves", "roc"):
        cell = next(c for c in nb.cells if tag in c.get("metadata", {}).get("tags", []))
        assert any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])), f"the {tag} cell shows no plot"
    assert (tmp_path / "lakehouse" / "models" / "flights_delay" / "v1" / "_COMMITTED").exists()
