"""The notebooks run, top to bottom, offline on this CPU (each asserts what it shows)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"strategies_side_by_side.ipynb",
                                           "displaced_tradeoff.ipynb"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARAFLOW_NOTEBOOK_OUT", str(tmp_path))
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    errors = [o for cell in book.cells for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert any(tmp_path.iterdir())
