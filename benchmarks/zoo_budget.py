"""Where each calibration's budget went, from the run tables `known_answers --runs DIR` keeps: the README's
account of the zoo cases that got no recommendation.

    python benchmarks/zoo_budget.py DIR [NAME ...]

Prints, per case (DIR/NAME.csv; default: every table in DIR), the SGLD steps per chain spent on ε probes, on
runs from w* (a rung's first run), on continuing chains that had not mixed or moved to a finer ε, and on more
draws for an undecided comparison between rungs, with the total and the last rung reached; then each purpose's
share over all the cases.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

KINDS = ["probes", "from w*", "continued", "more draws"]


def kind(run: pd.Series) -> str:
    """A run's purpose, read off its row: more draws continue chains with no burn-in."""
    if run["probe"]:
        return "probes"
    if not run["continued"]:
        return "from w*"
    return "more draws" if run["steps"] == run["num_draws"] else "continued"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="a folder written by `python -m tl_devinterp.sampling.known_answers --runs`")
    parser.add_argument("names", nargs="*", help="cases (default: every NAME.csv in the folder)")
    args = parser.parse_args()
    files = [Path(args.runs) / f"{name}.csv" for name in args.names] or sorted(Path(args.runs).glob("*.csv"))
    rows = []
    for file in files:
        table = pd.read_csv(file)
        if "probe" not in table and not args.names:  # (a zoo table kept in the same folder)
            continue
        if "steps" not in table:
            raise SystemExit(f"{file}: no `steps` column (written before the run tables recorded each run's cost); "
                             f"rerun known_answers with --runs.")
        spent = table.groupby(table.apply(kind, axis=1))["steps"].sum()
        rows.append(dict(model=file.stem, **{k: int(spent.get(k, 0)) for k in KINDS}, total=int(table["steps"].sum()),
                         top_nbeta=float(table["nbeta"].max())))
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="{:.4g}".format))
    total = table[KINDS].sum()
    print("all: " + ", ".join(f"{k} {total[k]:,} ({total[k] / total.sum():.1%})" for k in KINDS))


if __name__ == "__main__":
    main()
