"""The notebooks run top to bottom and are committed without outputs (the settings' notebooks, EXECUTED, with
their outputs); 01-03 read the part of a demo run shipped
in notebooks/data/demo (written by notebooks/data/ship_demo.py), 04 trains the quick preset, 05-08 the settings'
-quick presets."""

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from tl_devinterp.series import CheckpointSeries

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
DEMO = Path(__file__).parent.parent / "notebooks" / "data" / "demo"


EXECUTED = ("05_icl_regression.ipynb", "06_sparse_regression.ipynb", "07_tms.ipynb", "08_bursty_classification.ipynb", "09_known_answers.ipynb")
"""The settings' notebooks, committed with their outputs (what a reader of the repository sees)."""


def test_notebooks_exist_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_head_llcs.ipynb", "02_stage_analysis.ipynb", "03_attention_across_stages.ipynb",
        "04_interventions.ipynb", *EXECUTED]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        if path.name not in EXECUTED:
            assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", EXECUTED[:2])  # 07 and 08 join once committed with their outputs
def test_settings_notebooks_are_committed_executed(name):
    """Catches: a settings notebook committed unexecuted, half-executed (a cell skipped or run twice) or with an
    error, or without its figures."""
    nb = nbformat.read(Path(__file__).parent.parent / "notebooks" / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)) or not any(counts)  # in order, or counts stripped
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1


def test_shipped_demo_loads():
    """The shipped sub-series loads with its recorded hashes, keeps the data spec, holds every step with head
    LLCs, and stays small."""
    series = CheckpointSeries.from_dir(DEMO)
    for step in series.steps:
        series.load(step)  # checks the file against the manifest's sha256
    assert series.meta["data"]["kind"] and series.meta["model_config"]
    llc = pd.read_csv(DEMO / "llc.csv")
    assert set(llc.loc[llc["scope"] == "head", "step"]) <= set(series.steps)
    assert {"previous_token", "prefix_matching"} <= set(pd.read_csv(DEMO / "metrics.csv")["metric"])
    assert sum(f.stat().st_size for f in DEMO.iterdir()) < 3.5e6


def _ship_demo():
    spec = importlib.util.spec_from_file_location("ship_demo", DEMO.parent / "ship_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ship


def test_ship_demo_subsets_and_replaces(tmp_path):
    """ship_demo copies the head-LLC steps and stage boundaries (plus extras) with a manifest restricted to
    them and their original hashes, and a second shipment removes the checkpoints of the first."""
    demo = tmp_path / "run"  # a demo run's layout, made from the shipped files
    (demo / "report" / "results").mkdir(parents=True)
    shutil.copytree(DEMO, demo / "series", ignore=shutil.ignore_patterns("*.csv", "config.json"))
    for name in ("metrics.csv", "head_classes.csv", "stages.csv"):
        shutil.copy(DEMO / name, demo / "report" / "results" / name)
    shutil.copy(DEMO / "config.json", demo / "report" / "config.json")
    llc = pd.read_csv(DEMO / "llc.csv")
    steps = sorted(CheckpointSeries.from_dir(DEMO).steps)
    heads_at, extra = steps[1:3], steps[-2]
    llc[(llc["scope"] == "model") | llc["step"].isin(heads_at)].to_csv(demo / "report" / "results" / "llc.csv",
                                                                        index=False)
    ship, out = _ship_demo(), tmp_path / "shipped"

    shipped = ship(demo, out, extra_steps=[extra])
    stages = pd.read_csv(DEMO / "stages.csv")
    assert shipped.steps == sorted({*heads_at, extra, *stages["start"], *stages["end"]})
    original = json.loads((DEMO / "manifest.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sha256"] == {str(s): original["sha256"][str(s)] for s in shipped.steps}
    assert manifest["data"] == original["data"]
    assert len(list(out.glob("*.safetensors"))) == len(shipped.steps)

    again = ship(demo, out)  # without the extra step: its file goes
    assert extra not in again.steps and len(list(out.glob("*.safetensors"))) == len(again.steps)


def _numbers(text: str) -> list[float]:
    out = []
    for token in text.split():
        try:
            out.append(float(token))
        except ValueError:
            pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path_factory):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path_factory.getbasetemp() / "notebooks"  # 04 trains there
    workdir.mkdir(exist_ok=True)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    errors = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "it/s]" not in errors and "%|" not in errors  # no progress bars in saved outputs
    tables = [o["data"]["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    model_llc = pd.read_csv(DEMO / "llc.csv").query("scope == 'model'")
    if not path.stem.startswith("04"):
        assert "TqdmWarning" not in errors
    if path.stem.startswith("09"):  # the known-answer notebook: the good setting within 10% of Aoyagi's λ = 8
        text = "".join(o.get("text", "") for o in outputs)
        found = re.search(r"λ = 8\.0, λ̂ = ([0-9.]+)", text)
        assert found and abs(float(found.group(1)) / 8 - 1) < 0.1, text[:500]
    if path.stem.startswith("01"):  # the head rLLC table: every head, finite values at >= 3 checkpoints
        config = CheckpointSeries.from_dir(DEMO).meta["model_config"]
        table = next(t for t in tables if "class" in t and "L0H0" in t)
        values: dict[str, list[float]] = {}
        for line in table.splitlines():
            if re.match(r"L\d+H\d+\s", line):
                values.setdefault(line.split()[0], []).extend(_numbers(line))
        assert len(values) == config["n_layers"] * config["n_heads"]
        assert all(len(v) >= 3 and all(map(math.isfinite, v)) for v in values.values())
    if path.stem.startswith("02"):  # the stage table covers the run, typed A or B; the head-formation table
        stages = next(t for t in tables if "start" in t and "type" in t)
        rows = [line.split() for line in stages.splitlines()[1:]]
        assert rows and all(r[-1] in ("A", "B") for r in rows)
        assert int(rows[0][2]) == model_llc["step"].min() and int(rows[-1][3]) == model_llc["step"].max()
        assert all(int(a[3]) == int(b[2]) for a, b in zip(rows[:-1], rows[1:]))  # no gaps between stages
        formation = next(t for t in tables if "step_50" in t)
        assert "previous_token" in formation and "prefix_matching" in formation
    if path.stem.startswith("03"):
        assert html.count("CircuitsVis.render(") >= 2 and "https://unpkg" not in html  # offline views
    else:
        assert any("image/png" in o.get("data", {}) for o in outputs)  # figures were drawn
    if path.stem.startswith("07"):  # the closed forms and the planted k-gons' LLCs against the paper's
        assert any("0.06874" in t and "0.04819" in t for t in tables)
        assert any("paper" in t and "5+" in t for t in tables)
    if path.stem.startswith("08"):  # ICL and IWL accuracies over training, the heads' induction scores
        assert any("icl_accuracy" in t and "iwl_accuracy" in t for t in tables)
        assert any("prefix_matching" in t for t in tables)
