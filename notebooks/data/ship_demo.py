"""Copy a small part of a finished demo run into notebooks/data/demo/, for notebooks 01-03.

    python notebooks/data/ship_demo.py DEMO_DIR [--steps 0 8 ...]

DEMO_DIR is the folder `tl-devinterp demo` wrote (`series/`, `report/`). Shipped: the analysis's config and
the results tables the notebooks read, and a sub-series of checkpoints: every step where the heads' refined
LLCs were estimated, the stage boundaries of the analysis, and any `--steps`. Checkpoint files are copied
byte for byte and the manifest keeps their sha256 (their fingerprints), the model config and the data spec,
so `CheckpointSeries.from_dir` loads them and `make_data(series.meta["data"])` rebuilds the demo's tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from tl_devinterp.series import MANIFEST, CheckpointSeries, read_manifest

OUT = Path(__file__).resolve().parent / "demo"
RESULTS = ["llc.csv", "metrics.csv", "head_classes.csv", "stages.csv"]  # what the notebooks read


def ship(demo_dir: Path, out: Path = OUT, extra_steps: list[int] | None = None) -> CheckpointSeries:
    series_dir, report = demo_dir / "series", demo_dir / "report"
    manifest = read_manifest(series_dir / MANIFEST)
    missing = [f for f in [*(report / "results" / r for r in RESULTS), report / "config.json"] if not f.is_file()]
    if missing:
        raise SystemExit(f"{demo_dir} is not a finished demo run: {[str(m) for m in missing]} missing. "
                         f"Run `tl-devinterp demo --out {demo_dir}` to the end first.")

    # the steps: where head LLCs exist, the stage boundaries, and the ones asked for
    llc = pd.read_csv(report / "results" / "llc.csv")
    stages = pd.read_csv(report / "results" / "stages.csv")
    steps = {*llc.loc[llc["scope"] == "head", "step"], *stages["start"], *stages["end"], *(extra_steps or [])}
    steps = sorted(int(s) for s in steps)
    unknown = [s for s in steps if str(s) not in manifest["checkpoints"]]
    if unknown:
        raise SystemExit(f"Steps {unknown} are not checkpoints of {series_dir}; its steps: "
                         f"{sorted(map(int, manifest['checkpoints']))}.")

    # remove the checkpoints an earlier shipment left (only files its manifest names), then copy
    if (out / MANIFEST).is_file():
        for name in read_manifest(out / MANIFEST)["checkpoints"].values():
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for s in steps:
        shutil.copyfile(series_dir / manifest["checkpoints"][str(s)], out / manifest["checkpoints"][str(s)])
    per_step = {"checkpoints", "sha256", "losses"}
    sub = {k: ({str(s): v[str(s)] for s in steps if str(s) in v} if k in per_step else v) for k, v in manifest.items()}
    (out / MANIFEST).write_text(json.dumps(sub, indent=2) + "\n")
    for name in RESULTS:
        shutil.copyfile(report / "results" / name, out / name)
    shutil.copyfile(report / "config.json", out / "config.json")

    # check: every shipped checkpoint loads and matches its recorded hash
    shipped = CheckpointSeries.from_dir(out)
    for s in shipped.steps:
        shipped.load(s)
    return shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path, help="the folder `tl-devinterp demo` wrote (series/, report/)")
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="more checkpoints to ship")
    args = parser.parse_args()
    shipped = ship(args.demo_dir, extra_steps=args.steps)
    size = sum(f.stat().st_size for f in OUT.iterdir()) / 1e6
    print(f"{OUT}: {shipped!r}, steps {shipped.steps}; {size:.2f} MB")


if __name__ == "__main__":
    main()
