"""The `tl-devinterp` command: one subcommand per job (train, analyze, demo).

A library error (bad input, damaged file, full disk, read-only folder, busy folder, diverged sampler) ends a
command with one line naming the problem, the file or option, and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings

from .errors import TLDevinterpError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-devinterp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_analyze, _add_demo):
        add(sub)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # our warnings as `tl-devinterp CMD: warning: ...`, for this command only
        warnings.showwarning = lambda message, *_, **__: print(
            f"tl-devinterp {args.command}: warning: {message}", file=sys.stderr)
        try:
            return args.run(args) or 0
        except TLDevinterpError as error:  # a user's mistake: one line; any other exception is a bug (traceback)
            print(f"tl-devinterp {args.command}: error: {_one_line(error)}", file=sys.stderr)
            raise SystemExit(2) from None


def _add_train(sub) -> None:
    from .training import PRESETS

    p = sub.add_parser("train", help="train a model and write a checkpoint series")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model, data and schedule (default: demo)")
    p.add_argument("--out", required=True, help="series directory to write (a rerun resumes it)")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of TrainConfig fields replacing the preset's, "
                   "e.g. interventions = [{hook = 'blocks.0.attn.hook_z', kind = 'zero', head = 1}]; flags win")
    p.add_argument("--n-steps", type=int, help="override the preset's number of training steps")
    p.add_argument("--lr", type=float, help="override the preset's learning rate")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace a series trained with another config")
    p.add_argument("--llc-every", type=int, default=0, metavar="N", help="estimate the LLC on the test split every N "
                   "steps (SGLD defaults), into the manifest's llc_during_training; the run is unchanged")
    p.set_defaults(run=_run_train)


def _run_train(args) -> None:
    from .options import read_config_file
    from .training import train

    overrides = read_config_file(args.config) if args.config else {}
    overrides.update({k: v for k, v in (("n_steps", args.n_steps), ("lr", args.lr), ("seed", args.seed))
                      if v is not None})
    series = train(args.out, args.preset, overwrite=args.overwrite, device=args.device, llc_every=args.llc_every,
                   **overrides)
    print(f"wrote {series} to {args.out}")


def _add_analyze(sub) -> None:
    import dataclasses
    import json
    import typing

    from .analysis import AnalysisConfig
    from .options import spec
    from .sampling import SGLDConfig

    p = sub.add_parser("analyze", help="LLCs, head scores, stages, essential dynamics and a report of a series",
                       description="Analyse a checkpoint series into REPORT_DIR (results/*.csv, figures/*.png, "
                       "report.html). A rerun into the same directory resumes where the last one stopped. "
                       "Options come from --config FILE (JSON or TOML, keys as below with _), then the flags.")
    p.add_argument("series", metavar="SERIES_DIR", help="a series directory written by `tl-devinterp train`, or "
                   "the output_dir of a transformers Trainer run (checkpoint-N folders)")
    p.add_argument("--data", action="append", metavar="FILE", help="a text file to analyse on, tokenized with the "
                   "model's tokenizer (repeatable; default: the series' own data)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory for results, figures and report")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of analysis options")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int, metavar="N", help="run the checkpoints on a local Dask cluster of N "
                   "single-thread processes (needs tl_devinterp[dask])")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run the checkpoints on the Dask cluster whose scheduler "
                   "is at ADDRESS, e.g. tcp://10.0.0.1:8786")
    hints = typing.get_type_hints(AnalysisConfig) | typing.get_type_hints(SGLDConfig)
    sgld = AnalysisConfig().sgld  # the analysis's own sampler defaults
    options = [(f, getattr(sgld, f.name)) for f in dataclasses.fields(SGLDConfig) if f.name != "seed"]
    options += [(f, f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(AnalysisConfig) if f.name != "sgld"]
    for f, default in options:
        kind, opts = hints[f.name], {}
        args = typing.get_args(kind)
        if kind is bool:
            opts["action"] = argparse.BooleanOptionalAction  # --calibrate / --no-calibrate
        elif typing.get_origin(kind) is dict:
            opts["type"] = json.loads
        elif list[str] in args:
            opts["nargs"] = "+"
        elif list[int] in args:
            opts["nargs"], opts["type"] = "+", int
        else:
            base = next((a for a in args if a is not type(None)), kind)
            opts["type"] = (lambda text, base=base: None if text.lower() == "none" else base(text)) if args else base
        option = spec(f)
        notes = "".join(f"; --{a.replace('_', '-')}: {note}" for a, note in option.aliases.items() if note)
        flags = [f"--{name.replace('_', '-')}" for name in (f.name, *option.aliases)]
        p.add_argument(*dict.fromkeys(flags), dest=f.name, default=argparse.SUPPRESS,
                       help=f"{option.help} (default: {json.dumps(default)}{notes})", **opts)
    p.set_defaults(run=_run_analyze)


def _run_analyze(args) -> None:
    from .analysis import AnalysisConfig, analyze
    from .parallel import dask_executor

    fixed = {"series", "out", "config", "data", "quiet", "workers", "scheduler", "run", "command"}
    overrides = {k: v for k, v in vars(args).items() if k not in fixed}
    with dask_executor(workers=args.workers, scheduler=args.scheduler) as executor:
        config = AnalysisConfig.from_file(args.config) if args.config else None
        result = analyze(args.series, args.out, config=config, data=args.data, progress=not args.quiet,
                         executor=executor,
                         **overrides)
    print(result.report)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train the demo series and analyse it (about 10 minutes on 2 CPU cores)")
    p.add_argument("--out", default="tl_devinterp_demo", help="directory for the series and the report "
                   "(default: ./tl_devinterp_demo; a rerun resumes)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few draws: about a minute")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> None:
    from .analysis import demo

    result = demo(args.out, quick=args.quick, progress=not args.quiet, device=args.device)
    print(f"Report: {result.report}")


def _one_line(error: BaseException) -> str:
    """The error's message, with the fix for a full disk or an unwritable folder, and its notes (the step)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        text = f"no space left on the device writing {error.filename}: free some space, or choose another folder."
    elif isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text = (f"cannot write {error.filename} ({error.strerror}): choose a writable folder, or fix its "
                f"permissions.")
    else:
        text = str(error)
    return " ".join([text, *getattr(error, "__notes__", [])]).replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
