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
    from .train import PRESETS

    p = sub.add_parser("train", help="train a model and write a checkpoint series")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model, data and schedule (default: demo)")
    p.add_argument("--out", required=True, help="series directory to write (a rerun resumes it)")
    p.add_argument("--n-steps", type=int, help="override the preset's number of training steps")
    p.add_argument("--lr", type=float, help="override the preset's learning rate")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace a series trained with another config")
    p.set_defaults(run=_run_train)


def _run_train(args) -> None:
    from .train import train

    overrides = {k: v for k, v in (("n_steps", args.n_steps), ("lr", args.lr), ("seed", args.seed)) if v is not None}
    series = train(args.out, args.preset, overwrite=args.overwrite, device=args.device, **overrides)
    print(f"wrote {series} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
