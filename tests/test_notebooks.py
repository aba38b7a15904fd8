"""The notebooks run top to bottom (on the quick preset) and are committed without outputs."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_head_llcs.ipynb", "02_stage_analysis.ipynb", "03_attention_across_stages.ipynb",
        "04_interventions.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path_factory):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path_factory.getbasetemp() / "notebooks"  # shared: later notebooks reuse the trained series
    workdir.mkdir(exist_ok=True)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    errors = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "it/s]" not in errors and "%|" not in errors  # no progress bars in saved outputs
    tables = [o["data"]["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    if path.stem.startswith("01"):  # the head LLC table: every head, finite values
        heads = next(t for t in tables if "llc_mean" in t)
        assert "NaN" not in heads and "inf" not in heads and len(heads.splitlines()) >= 5
    if path.stem.startswith("02"):  # the stage table: stages covering the run, typed A or B
        stages = next(t for t in tables if "start" in t and "type" in t)
        rows = [line.split() for line in stages.splitlines()[1:]]
        assert rows and all(r[-1] in ("A", "B") for r in rows) and int(rows[0][2]) == 0
    if path.stem.startswith("03"):
        assert html.count("CircuitsVis.render(") >= 2 and "https://unpkg" not in html  # offline views
    else:
        assert any("image/png" in o.get("data", {}) for o in outputs)  # figures were drawn
