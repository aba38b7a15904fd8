"""Execute notebooks top to bottom and save them in place with their outputs (`make notebooks`).

    python notebooks/execute.py [--timeout SECONDS] [NOTEBOOK ...]     # default: every notebooks/*.ipynb, 600 s a cell

Each runs in a fresh kernel whose working directory is a temporary folder (what a notebook trains or writes
stays out of the repository); a cell that raises stops that notebook with its error, and the file is left
as it was. tests/test_notebooks.py executes them the same way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def execute(path: str | Path, workdir: str | Path | None = None, timeout: int = 600) -> nbformat.NotebookNode:
    """The notebook at `path`, executed in `workdir` (default: a temporary folder); raises on a cell's error."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir or tmp)}}).execute()
    return nb


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=int, default=600, help="seconds a cell may run (default 600)")
    parser.add_argument("paths", nargs="*", help="notebooks (default: every notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    for path in args.paths or sorted(HERE.glob("*.ipynb")):
        print(f"executing {path}", flush=True)
        nb = execute(path, timeout=args.timeout)
        tmp = Path(path).with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)  # whole or not at all


if __name__ == "__main__":
    main(sys.argv[1:])
