"""The `tl-devinterp` command: one subcommand per job (train, analyze, demo)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-devinterp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train,):
        add(sub)
    args = parser.parse_args(argv)
    return args.run(args) or 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a checkpoint series")
    p.set_defaults(run=lambda args: print("not yet", file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
