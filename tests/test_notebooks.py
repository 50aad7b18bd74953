"""Every notebook runs green in quick mode, is stored without outputs and opens with a parameters cell."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_seven_notebooks_exist():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_clean_with_a_question_and_parameters(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first, params = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and "**Question:**" in first.source
    assert params.cell_type == "code" and "parameters" in params.metadata.get("tags", [])
    assert "quick" in params.source and "seed" in params.source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: stored outputs"
    assert nb.cells[-1].cell_type == "code" and "assert " in nb.cells[-1].source  # ends asserting its conclusion


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec named ``capsim`` for this interpreter, in a folder of its own (no hand registration)."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernel")
    install(kernel_name="capsim", display_name="capsim (test)", prefix=str(prefix))
    return prefix / "share" / "jupyter"


#: notebooks that time the real kernels and assert on what they measured (01: batching pays on this machine):
#: ``make test`` runs them alone, after the rest, so no other test shares the cores they time
EXCLUSIVE = {"01_measure_kernels"}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.exclusive) if p.stem in EXCLUSIVE else p
                                  for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_runs_in_quick_mode(path, kernel, tmp_path, monkeypatch):
    import papermill

    monkeypatch.setenv("JUPYTER_PATH", str(kernel))
    monkeypatch.setenv("CAPSIM_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), kernel_name="capsim", cwd=str(ROOT), progress_bar=False,
                               parameters={"out_dir": str(tmp_path / "out")}, log_output=False)
    done = nbformat.read(out, as_version=4)
    figures = sum(1 for c in done.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {}))
    assert figures >= 2, f"{path.name} drew {figures} figures"
    assert "conclusion holds" in "".join(o.get("text", "") for o in done.cells[-1].outputs)
