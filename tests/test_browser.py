"""report.html in a real headless Chromium: it loads offline, with no console errors, and every figure renders."""

import os
import re
import shutil

import pytest
from browser import CHROMIUM, Page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Chromium: apt-get install chromium"),
]


def check_page(path) -> list[str]:
    """Load `path`, assert it is clean and complete; returns the figure ids found."""
    declared = re.findall(r'<figure class="tl-figure" id="(fig-[\w-]+)" data-kind="(\w+)"', path.read_text())
    assert declared, "the report declares no figures"
    with Page(path) as page:
        page.settle(1.5)
        assert page.errors() == []
        assert all(u.startswith(("file:", "data:")) for u in page.requests()), page.requests()
        found = page.evaluate("""[...document.querySelectorAll('figure.tl-figure')].map(f => ({
            id: f.id, kind: f.dataset.kind,
            images: [...f.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 100),
            canvases: f.querySelectorAll('.circuitsvis canvas').length,
            rendered: f.querySelector('.circuitsvis') ? f.querySelector('.circuitsvis').children.length : 0,
            tokens: f.querySelectorAll('.tokens .tok').length}))""")
    assert [(f["id"], f["kind"]) for f in found] == declared
    for f in found:
        if f["kind"] == "png":
            assert f["images"] == [True], f  # the embedded PNG decoded
        elif f["kind"] == "attention":
            assert f["rendered"] > 0 and f["canvases"] > 0, f  # circuitsvis drew its heatmaps
        elif f["kind"] == "tokens":
            assert f["tokens"] > 1, f
    return [f["id"] for f in found]


def test_synthetic_report_loads_clean(tmp_path):
    from test_report import EXPECTED_FIGURES, synthetic_result

    from tl_devinterp.visualisation.report import analysis_report

    path = analysis_report(synthetic_result(tmp_path), tmp_path / "report.html")
    assert check_page(path) == [f"fig-{f}" for f in EXPECTED_FIGURES]


def test_page_helper_sees_errors(tmp_path):
    """The check can fail: a console error, an exception and a blocked network image are all caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://127.0.0.1:9/x.png"><script>console.error("boom"); nope();'
                   "</script></body></html>")
    with Page(bad) as page:
        page.settle(1.0)
        errors = page.errors()
    assert any("boom" in e for e in errors) and any("nope" in e for e in errors)
    assert any("x.png" in e or "ERR_" in e for e in errors), errors


@pytest.mark.slow
def test_demo_quick_report_in_browser(tmp_path, quick_series_dir, capsys):
    """`tl-devinterp demo --quick` end to end (its series copied in, so training resumes as finished)."""
    from tl_devinterp.cli import main

    shutil.copytree(quick_series_dir, tmp_path / "series")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    report = tmp_path / "report" / "report.html"
    assert capsys.readouterr().out.strip().endswith(str(report))
    ids = check_page(report)
    for fixed in ("fig-llc-stages", "fig-head-llcs", "fig-head-scores", "fig-essential-dynamics"):
        assert fixed in ids
    assert any(i.startswith("fig-attention-") for i in ids) and any(i.startswith("fig-loss-diff-") for i in ids)
