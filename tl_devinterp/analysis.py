"""Everything about one checkpoint series, computed, saved and shown: `analyze(series, out_dir)`.

The pipeline of the package, run in order: the LLC at every checkpoint (and each head's refined LLC at
every checkpoint, or at the `head_steps` where the curves change most), the task's metrics (for token tasks
head scores and behavioural metrics), head classes, stages from the LLC curve, essential dynamics, then at each
stage boundary the attention of chosen heads and the per-position loss change on a sample sequence. The
series' task (`tl_devinterp.tasks`, from its manifest's data spec; a token task for given tokens or text)
supplies the data, the sampler's loss, the metrics and essential dynamics' probes; heads are skipped for a
model without them. Per-checkpoint results go through `ResultStore`s under `OUT/store/`, so a rerun after an
interruption recomputes nothing that finished. Writes `OUT/results/*.csv`, `OUT/figures/*.png`,
`OUT/report.html` and the settings that produced them, `OUT/config.json`: all staged whole first, then
published together, config.json last (`_publish`). `AnalysisConfig` holds every option and its default; the command line and config
files (JSON or TOML) set the same fields, all validated before any work.

Stored results are keyed by each checkpoint's content, so they are never reused for other weights; when OUT
holds the analysis of another series, its results, figures and report are moved to `OUT/previous-N/`
(and the move is announced) before this one is written. One `analyze` at a time works in a folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import data_form, pack_texts, text_files
from .dynamics import EDResult, Stage, essential_dynamics, find_stages, stages_frame
from .dynamics.stages import check_stage_options, stage_se
from .dynamics.trajectories import HeadClusters, cluster_heads
from .errors import (
    InvalidOptionError,
    InvalidTypeError,
    InvalidValueError,
    NotAFolderError,
    SeriesError,
    TLDevinterpError,
)
from .files import atomic_write, folder_lock
from .metrics import classify_heads
from .metrics.classify import LABELS as HEAD_LABELS
from .models import all_heads, bos_token_id, check_device, check_head, head_name, parse_head
from .options import alias_table, build, option, read_config_file, validate
from .results import head_rows, model_curve, model_rows
from .sampling import llc_over_series
from .sampling.batches import as_tensors, lm_batch
from .sampling.calibration import Calibration, calibrate_llc, combine
from .sampling.diagnostics import SamplerWarning
from .sampling.plan import plan_llcs
from .sampling.restrict import resolve_restriction
from .sampling.settings import FIXED, SGLDConfig
from .series import CheckpointSeries
from .store import StoreWarning
from .tasks import Task, TokenTask, make_task
from .tasks.base import index_batch
from .visualisation.attention import AttentionView, attention_view
from .visualisation.report import analysis_report, prior_share, proxy_headline

AUTO_SCOPE_HEADS = 48
"""Above this many heads (GPT-2 small has 144), `analyze` by default estimates fewer head LLCs (`auto_scope`)."""

SGLD_OPTIONS = ({f.name for f in dataclasses.fields(SGLDConfig)} | set(alias_table(SGLDConfig)) | set(FIXED)) - {"seed"}
"""The sampler's options (and their other spellings), given flat to `analyze` and the command line;
`AnalysisConfig.seed` is its seed."""


@dataclass
class AnalysisConfig:
    """Every option of `analyze` and its default: fewer SGLD draws than the papers (4 chains x 200) and every
    head's LLC at every checkpoint (`demo` sets head_steps=10 to fit about 10 minutes on 2 CPU cores); a model
    of more than `AUTO_SCOPE_HEADS` heads gets the heads of 3 layers at 3 checkpoints (`head_scope`). For a
    careful run raise the draws after checking the sampler with `calibrate_llc`.

    The flags of `tl-devinterp analyze` (`--num-draws 200`) and the keys of a `--config` file are these
    field names and those of `SGLDConfig` (all but its seed), which go into `sgld`.
    """

    # data: the series' own data (its manifest's spec) unless `analyze(..., data=...)` is given
    n_test_seqs: int = option(256, "test sequences for behavioural metrics and essential dynamics", ge=1,
                              aliases=("n_sequences",))
    seq_len: int | None = option(None, "tokens per sequence cut from text data, BOS included (default: the model's "
                               "context, at most 128)", ge=2,
                                 why="(BOS and one token)")
    sample_index: int = option(0, "the test sequence shown in the token and attention pictures", ge=0)
    seed: int = option(0, "seed of sampling, probes and positions", ge=0)
    device: str | None = option(None, "torch device, e.g. cuda")
    # SGLD: the full model's LLC at every checkpoint, the heads' refined LLCs at `head_steps` of them; its
    # fields are options too (`--num-draws 200`, or "num_draws" in a config file), its seed is `seed`
    sgld: SGLDConfig = option(SGLDConfig(num_chains=3, num_draws=60, num_burnin=20), "the sampler's settings")
    head_steps: int | None = option(None, "checkpoints where every head's refined LLC is estimated: none = all "
                                  "(default); n = the first, the last and the n-2 where loss, LLC and head scores "
                                  "change most; 0 = none", ge=0)
    heads: list[str] | None = option(None, "heads whose refined LLCs are estimated, e.g. l0h1 l11h7 (default: every "
                                     "head of `layers`)")
    layers: list[int] | None = option(None, "layers whose heads' refined LLCs are estimated (default: all)")
    auto_scope: bool = option(True, f"a model of more than {AUTO_SCOPE_HEADS} heads, given no heads, layers or "
                              f"head_steps: the heads of its first, middle and last layers at head_steps=3 "
                              f"checkpoints (--no-auto-scope: every head at every checkpoint)")
    calibrate: bool = option(False, "first run calibrate_llc's ladder (gamma 1, nbeta up until "
                             "the LLC stops moving, epsilon from its measured discretisation bias) on 3 checkpoints and use the setting it recommends, if any "
                             "(results/calibration.csv); else the settings above")
    calibrate_steps: int = option(50_000, "calibrate_llc's budget: SGLD steps per chain per checkpoint", ge=1)
    # head scores and classes
    n_probe_seqs: int = option(64, "probe sequences of the head scores (metrics' n_seqs)", ge=1, aliases=("n_seqs",))
    thresholds: dict[str, float] = option({}, "classify_heads thresholds as JSON, e.g. '{\"prefix_matching\": 0.2}'")
    n_clusters: int = option(3, "cluster_heads: groups of heads by their rLLC and score trajectories (0: none)",
                            ge=0)
    # dynamics
    n_components: int = option(3, "essential dynamics: principal components", ge=2)
    ed_sigma: float | None = option(None, "essential dynamics: smoothing width in checkpoints (default: its own)",
                                   gt=0)
    stage_z: float = option(4.0, "find_stages: standard errors by which a boundary's turn or change of speed must "
                          "exceed the noise")
    stage_ratio: float = option(3.0, "find_stages: speed-up or slow-down of the LLC (|dLLC/dlog t|) that makes a "
                              "boundary")
    stage_min_width: float = option(0.1, "find_stages: closest two bends of the LLC fit, in log-step units")
    stage_min_change: float = option(0.02, "find_stages: smallest change of a stage, fraction of the LLC's range")
    attention_heads: list[str] | None = option(None, "heads for the attention pictures, e.g. l0h1 l1h3 (default: "
                                             "the top previous-token and induction heads)")

    def stage_options(self) -> dict[str, float]:
        """The `stage_*` fields as `find_stages` keywords: `find_stages(steps, llc, se, **config.stage_options())`."""
        return dict(z=self.stage_z, ratio=self.stage_ratio, min_width=self.stage_min_width,
                    min_change=self.stage_min_change)

    def __post_init__(self):
        """Each option's type and range (`options.validate`), then what involves other modules: the stage
        options (`find_stages`' own check), the heads, the thresholds' names and the device."""
        validate(self)
        check_stage_options(**self.stage_options(), prefix="stage_", owner="AnalysisConfig")
        if self.heads is not None:
            self.heads = [head_name(*parse_head(h)) for h in self.heads]
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise InvalidOptionError(f"The 'layers' option of AnalysisConfig must be a non-empty list of layer indices "
                                     f">= 0 or None; got {self.layers}.")
        if self.attention_heads is not None:
            self.attention_heads = [head_name(*parse_head(h)) for h in self.attention_heads]
        unknown = sorted(set(self.thresholds) - set(HEAD_LABELS))
        if unknown:
            raise InvalidValueError(f"Unknown thresholds {unknown}; classify_heads reads scores {list(HEAD_LABELS)}.")
        check_device(self.device)

    @classmethod
    def quick(cls, **overrides: Any) -> AnalysisConfig:
        """Few draws, head LLCs at 3 checkpoints, small probes: a rough analysis in about a minute."""
        return cls.from_dict({**dict(num_chains=2, num_draws=20, num_burnin=10, head_steps=3, n_test_seqs=64,
                                     n_probe_seqs=16), **overrides}, source="the arguments")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "the config") -> AnalysisConfig:
        """Options by name (or another spelling); the sampler's may be given flat (`num_draws`) or as an
        `sgld` table. `calibration`, the choice `analyze` records beside the options in its config.json, is
        a record, not an option: read back, it is left out (`calibrate` in the same file calibrates again)."""
        d = dict(d)
        if not isinstance(d.pop("calibration", None), dict | None):
            raise InvalidOptionError(f"The 'calibration' entry of {source} is the record analyze writes (a table of "
                                     f"settings or null); got another value. Remove it.")
        d = build(cls, d, source=source, extra=SGLD_OPTIONS)
        sampler = {k: d.pop(k) for k in list(d) if k in SGLD_OPTIONS}
        try:
            if sampler or "sgld" in d:
                nested = d.get("sgld", {})
                nested = dataclasses.asdict(nested) if isinstance(nested, SGLDConfig) else nested
                if not isinstance(nested, dict):
                    raise InvalidOptionError(f"The 'sgld' option of AnalysisConfig must be a table of SGLDConfig "
                                             f"options; got {nested!r}.")
                default = cls.__dataclass_fields__["sgld"].default_factory()
                d["sgld"] = SGLDConfig.build(default, **{**nested, **sampler})
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (in {source})") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AnalysisConfig:
        """A JSON (`.json`) or TOML (`.toml`) file of option: value pairs."""
        return cls.from_dict(read_config_file(path), source=str(path))


@dataclass
class AnalysisResult:
    """What `analyze` computed (the frames are also in `out_dir/results/` as CSV)."""

    llc: pd.DataFrame  # step, scope ("model" | "head"), layer, head, llc_mean, llc_std, llc_se, d, init_loss
    metrics: pd.DataFrame  # step, metric, layer, head, value
    head_classes: pd.DataFrame  # layer, head, label, scores (at the last checkpoint)
    stages: list[Stage]
    ed: EDResult | None
    loss_differences: pd.DataFrame  # step_from, step_to, position, token, loss_diff (sample sequence)
    attention: list[tuple[int, AttentionView]]  # (boundary step, view of the chosen heads)
    sample_tokens: list[str]
    out_dir: Path
    title: str = "tl_devinterp report"
    report: Path | None = None
    calibration: Calibration | None = None  # the sweep and its choice, with `calibrate=True`
    head_clusters: HeadClusters | None = None  # heads grouped by trajectory (cluster_heads)


def analyze(
    series: CheckpointSeries | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: AnalysisConfig | dict | str | os.PathLike | None = None,
    data: Any = None,
    progress: bool = True,
    executor: Executor | None = None,
    **overrides: Any,
) -> AnalysisResult:
    """Analyse a checkpoint series (or a series directory) into `out_dir`; see the module docstring.

    `series` is a `CheckpointSeries`, a series directory written by `tl_devinterp.train`, or a transformers
    Trainer output_dir (`checkpoint-{N}/` folders). `config` is an `AnalysisConfig`, a dict of its fields or
    a JSON/TOML file; `overrides` replace single fields (`analyze(s, out, num_draws=200)`). `data` replaces
    the series' own data, and is needed for series that do not record theirs: a token tensor `[n, seq]`, a
    dataset with `input_ids`, or text (a dataset with a `text` column, or text file paths) that the
    model's tokenizer cuts into `seq_len`-token rows. Rerunning into the same `out_dir` resumes: finished
    checkpoints are read back, not recomputed. With an `executor`
    (e.g. `distributed.Client(...).get_executor()`), the per-checkpoint passes run as parallel jobs, with the
    same results (see `tl_devinterp.parallel`); it is how the work runs, not part of the analysis.
    """
    config = _as_config(config, overrides)
    series = _as_series(series, config)
    task, train_data, test_data = task_data(series, data, config, progress)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotAFolderError(f"--out {out} is a file; give a directory for the report.")
    with folder_lock(out, "analyze"):
        return _analyze(series, out, config, task, train_data, test_data, progress, executor)


def _analyze(series: CheckpointSeries, out: Path, config: AnalysisConfig, task: Task, train_data, test_data,
             progress: bool, executor: Executor | None) -> AnalysisResult:
    """`analyze` once its inputs are checked and it holds `out`'s lock."""
    _publish(out)  # a run stopped while publishing its outputs: finish that first
    _keep_apart(out, series)
    store = out / "store"
    say = (lambda msg: tqdm.write(f"[analyze] {msg}", file=sys.stderr)) if progress else (lambda msg: None)
    sgld = dataclasses.replace(_task_sampler(config.sgld, task), seed=config.seed)
    calibration = None
    if config.calibrate:
        calibration = _calibrate(series, train_data, sgld, task, config.calibrate_steps, progress)
        say(f"calibration chose {calibration.choice} {calibration.reason} (rule: sampling.calibration)")
        sgld = calibration.config(sgld) if calibration.choice else sgld

    # LLCs: every head at every checkpoint in one pass (sharing batches), or the model everywhere first and
    # the heads where the curves say development happens
    run = dict(store_dir=store, device=config.device, progress=progress, executor=executor, loss_fn=task.sampler_loss)
    head_list, n_head_steps = head_scope(config, *_shape(series)) if task.has_heads else ([], None)
    if n_head_steps is not None and config.head_steps is None:
        say(f"auto_scope: {len(head_list)} heads (layers {sorted({layer for layer, _ in head_list})}) at "
            f"{n_head_steps} checkpoints; --heads, --layers, --head-steps or --no-auto-scope choose others")
    n_head_steps = config.head_steps if n_head_steps is None else n_head_steps
    every = n_head_steps is None and bool(head_list)
    # the plan, from a few timed steps at the last checkpoint; a plan that does not fit is split
    sgld = _plan(series, train_data, sgld, head_list, every, n_head_steps, task, config.device, say)
    say(f"{series}: LLC at every checkpoint" + (f", with {len(head_list)} heads'" if every else ""))
    llc = llc_over_series(series, train_data, sgld, heads=head_list if every else False, **run)
    say("the task's metrics" + (" (head scores and behavioural metrics)" if isinstance(task, TokenTask) else ""))
    metrics = task.metrics_over_series(series, train_data, test_data, store_dir=store, n_seqs=config.n_probe_seqs,
                                       seed=config.seed, executor=executor, progress=progress)
    head_metrics = metrics[metrics["head"].notna()]
    classes = (classify_heads(metrics, thresholds=config.thresholds)
               if head_metrics["metric"].isin(list(HEAD_LABELS)).any() else _NO_CLASSES)
    head_steps = transition_steps(series.steps, n_head_steps, llc, metrics) if head_list else []
    if head_steps and n_head_steps is not None:
        say(f"head LLCs at steps {head_steps}")
        llc = pd.concat([llc, llc_over_series(series, train_data, sgld, heads=head_list, model=False, steps=head_steps,
                                              **run)])
    llc = llc.sort_values(["step", "scope", "layer", "head"], ignore_index=True)
    n_heads = len(head_rows(llc)[["layer", "head"]].drop_duplicates())
    clusters = (cluster_heads([llc, head_metrics], n_clusters=config.n_clusters,
                              classes=classes if not classes.empty else None)
                if config.n_clusters and n_heads >= 2 else None)

    steps, values, se = model_curve(llc)  # stages against max(chains' SE, scatter): see stage_se
    stages = find_stages(steps, values, stage_se(steps, values, se), **config.stage_options())
    say(f"stages: {', '.join(f'{s.start}-{s.end} {s.type}' for s in stages)}; essential dynamics")
    probes, proxy = task.probes(test_data, config.n_test_seqs)
    ed = essential_dynamics(series, probes, proxy=proxy, n_components=config.n_components, sigma=config.ed_sigma,
                            seed=config.seed, device=config.device, store_dir=store, executor=executor,
                            progress=progress)

    sample = index_batch(test_data, config.sample_index)
    sample_labels = task.labels(sample)
    boundaries = sorted({s.start for s in stages} | {stages[-1].end})
    losses, attention = {}, []
    for step in tqdm(boundaries, desc="stage boundaries", unit="ckpt", disable=not progress):
        model = series.load(step)
        positions, labels, losses[step] = task.position_losses(model, sample)
        if task.has_heads:
            chosen = config.attention_heads or top_heads(metrics) or [head_name(*h) for h in all_heads(model)][:8]
            view_input = task.model_inputs(model, index_batch(sample, None))
            attention.append((step, attention_view(model, sample, chosen, labels=sample_labels, inputs=view_input)))
    loss_differences = pd.concat([
        pd.DataFrame({"step_from": a, "step_to": b, "position": positions, "token": labels,
                      "loss_diff": losses[b] - losses[a]})
        for a, b in zip(boundaries[:-1], boundaries[1:])
    ], ignore_index=True)

    result = AnalysisResult(llc=llc, metrics=metrics, head_classes=classes, stages=stages, ed=ed,
                            loss_differences=loss_differences, attention=attention, sample_tokens=sample_labels,
                            out_dir=out, title=f"tl_devinterp report: {series!r}",
                            calibration=calibration, head_clusters=clusters)
    # the outputs, with the record of the settings that produced them, staged whole and then published
    staging = out / STAGING
    prior = "{}/{}".format(*prior_share(model_rows(llc)))  # beside the stages: how many of their LLCs were prior-dominated
    frames = {"llc": llc, "metrics": metrics, "head_classes": classes,
              "stages": stages_frame(stages).assign(prior_dominated_llcs=prior),
              "essential_dynamics": ed.frame(), "loss_differences": loss_differences,
              "head_clusters": clusters.assignments if clusters else pd.DataFrame()}
    if calibration is not None:
        frames["calibration"] = calibration.table.drop(columns="llc_trace", errors="ignore")
    record = dataclasses.asdict(config) | ({"calibration": calibration.choice} if calibration is not None else {})
    try:
        (staging / "results").mkdir(parents=True, exist_ok=True)
        for name, frame in frames.items():
            atomic_write(staging / "results" / f"{name}.csv", frame.to_csv(index=False))
        analysis_report(result, staging / "report.html", figures_dir=staging / "figures")
        atomic_write(staging / "config.json", json.dumps(record, indent=2))
        files = sorted(str(f.relative_to(staging)) for f in staging.rglob("*") if f.is_file())
        atomic_write(staging / OUTPUTS, json.dumps(files, indent=2))  # the staged set is whole: publish it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # e.g. a full disk: the published outputs stay as they were
        raise
    _publish(out)
    result.report = out / "report.html"
    say(f"report: {result.report}")
    headline = proxy_headline(llc)
    if headline:
        warnings.warn(headline, SamplerWarning, stacklevel=3)
    return result


STAGING = ".tl_devinterp-staging"
"""The folder (in OUT) where an analysis's outputs are written before they are published."""
OUTPUTS = ".tl_devinterp-outputs.json"
"""The files (relative to OUT) the last published analysis wrote; its presence in STAGING marks them whole."""


def _publish(out: Path) -> None:
    """Publish the outputs staged in `out/STAGING`: remove the settings record (config.json), replace each
    output, remove the outputs of the last analysis that this one did not write, then put config.json in place
    last, with the list of files. config.json therefore never stands beside numbers other settings produced:
    a crash leaves either the old outputs with their config.json, or the staged set to finish publishing
    (which the next `analyze` in `out` does first), with no config.json meanwhile. A staging folder without
    its list was interrupted while being written, and is removed."""
    staging = out / STAGING
    if not (staging / OUTPUTS).exists():
        if staging.exists():
            shutil.rmtree(staging)
        return
    new = json.loads((staging / OUTPUTS).read_text())
    if (staging / "config.json").exists():
        (out / "config.json").unlink(missing_ok=True)
    for name in _published(out):  # only files our own record lists: never a user's
        if name not in new:
            (out / name).unlink(missing_ok=True)
    for name in sorted(new, key=lambda n: n == "config.json"):
        if (staging / name).exists():  # else moved before a crash
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out / name)
    os.replace(staging / OUTPUTS, out / OUTPUTS)
    shutil.rmtree(staging)


def _published(out: Path) -> list[str]:
    """The files the last published analysis in `out` wrote (none recorded: none known)."""
    try:
        return [str(n) for n in json.loads((out / OUTPUTS).read_text())]
    except (OSError, ValueError, TypeError):
        return []


def demo(out_dir: str | os.PathLike = "tl_devinterp_demo", *, quick: bool = False, progress: bool = True,
         device: str | None = None) -> AnalysisResult:
    """Train the demo series (`train(preset="demo")`, or `"quick"`) into `out_dir/series` and analyse it into
    `out_dir/report`. Both steps resume when rerun. To fit about 10 minutes on 2 CPU cores, the heads'
    refined LLCs are estimated at the 10 checkpoints where the curves change most (`head_steps=10`; every
    checkpoint costs about 3 times as long); on a GPU (`device="cuda"`) at every checkpoint."""
    from .training import train

    out = Path(out_dir)
    series = train(out / "series", "quick" if quick else "demo", progress=progress, device=device)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    config = (AnalysisConfig.quick(device=device) if quick
              else AnalysisConfig(device=device, head_steps=None if on_gpu else 10))
    return analyze(series, out / "report", config=config, progress=progress)


# --------------------------------------------------------------------------------------------------
def _as_config(config, overrides: dict[str, Any]) -> AnalysisConfig:
    if config is None:
        config = AnalysisConfig()
    elif isinstance(config, dict):
        config = AnalysisConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        config = AnalysisConfig.from_file(config)
    elif not isinstance(config, AnalysisConfig):
        raise InvalidTypeError(f"config must be an AnalysisConfig, a dict or a config file path; got {type(config).__name__}.")
    return AnalysisConfig.from_dict({**dataclasses.asdict(config), **overrides}, source="the arguments")


def _as_series(series, config: AnalysisConfig) -> CheckpointSeries:
    if isinstance(series, (str, os.PathLike)):
        path = Path(series)
        if not path.is_dir():
            raise SeriesError(f"{path} is not a directory. Give a series directory written by `tl-devinterp train` "
                              f"(it holds manifest.json), e.g. `tl-devinterp train --out {path}` first, or the "
                              f"output_dir of a transformers Trainer run (checkpoint-N folders).")
        trainer_run = not (path / "manifest.json").exists() and any(path.glob("checkpoint-*/config.json"))
        series = (CheckpointSeries.from_hf_checkpoints(path, device=config.device) if trainer_run
                  else CheckpointSeries.from_dir(path))
    if not isinstance(series, CheckpointSeries):
        raise InvalidTypeError(f"series must be a CheckpointSeries or a series directory; got {type(series).__name__}.")
    series.verify()  # every checkpoint's file checked before any estimate (calibration included)
    need = max(4, config.n_components + 1)  # find_stages needs 4 points, PCA n_components + 1
    if len(series) < need:
        raise SeriesError(f"The series has {len(series)} checkpoints; an analysis needs at least {need} "
                          f"(stages and essential dynamics are curves over checkpoints). Save more checkpoints.")
    if config.heads or config.layers:  # they must exist before minutes of sampling, not after
        head_scope(config, *_shape(series))
    if config.attention_heads:
        model = series.load(series.steps[0])
        for h in config.attention_heads:
            check_head(model, *parse_head(h))
    return series


def head_scope(config: AnalysisConfig, n_layers: int, n_heads: int) -> tuple[list[tuple[int, int]], int | None]:
    """(the heads whose refined LLCs `analyze` estimates, head_steps where `auto_scope` sets it, else None):
    `config.heads`, else every head of `config.layers` (default all); a model of more than `AUTO_SCOPE_HEADS`
    heads given none of heads, layers or head_steps gets its first, middle and last layers at 3 checkpoints."""
    auto = (config.auto_scope and n_layers * n_heads > AUTO_SCOPE_HEADS and config.heads is None
            and config.layers is None and config.head_steps is None)
    layers = sorted({0, n_layers // 2, n_layers - 1}) if auto else config.layers or list(range(n_layers))
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise InvalidValueError(f"layers={config.layers}: the model has {n_layers} layers (0-indexed); drop {bad}.")
    heads = [parse_head(h) for h in config.heads] if config.heads else [(layer, h) for layer in layers for h in range(n_heads)]
    bad = [head_name(*h) for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise InvalidValueError(f"heads {bad} do not exist: the model has {n_layers} layers of {n_heads} heads (0-indexed).")
    return heads, (3 if auto else None)


def _plan(series: CheckpointSeries, data, sgld: SGLDConfig, heads: list[tuple[int, int]], together: bool,
          head_steps: int | None, task: Task, device: str | None, say: Callable[[str], None]) -> SGLDConfig:
    """Say what the LLC passes will cost (`plan_llcs` at the last checkpoint: the model and `heads` in one pass
    when `together`, else each pass alone), and return `sgld` with the `max_batched` that fits."""
    model = series.load(series.steps[-1])
    model = model.to(device) if device is not None else model
    whole = [resolve_restriction(model, None)]
    parts = [resolve_restriction(model, h) for h in heads]
    passes = [("model and heads", whole + parts)] if together else [("model", whole)] + [("heads", parts)] * bool(parts)
    for what, restrictions in passes:
        try:
            plan = plan_llcs(model, data, restrictions, sgld, loss_fn=task.sampler_loss)
        except TLDevinterpError as e:  # e.g. a diverging sampler: say where, as the passes themselves do
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"(at checkpoint step {series.steps[-1]})")
            raise
        say(f"{what}: {plan}; {plan.over(len(series) if what != 'heads' else min(head_steps or 0, len(series)))}")
        sgld = dataclasses.replace(sgld, max_batched=min(sgld.max_batched, plan.max_batched))
    return sgld


def _shape(series: CheckpointSeries) -> tuple[int, int]:
    """(layers, heads per layer) of the series' models: from its manifest, else its first model."""
    cfg = series.meta.get("model_config")
    if cfg and "n_heads" in cfg:
        return cfg["n_layers"], cfg["n_heads"]
    model = series.load(series.steps[0])
    return model.cfg.n_layers, model.cfg.n_heads


def _keep_apart(out: Path, series: CheckpointSeries) -> None:
    """When `out` holds the analysis of another series, move its results, figures and report to
    `out/previous-N/` and say so (its stored per-checkpoint results stay: they are keyed by weights);
    then record which series `out` is about (each step's fingerprint in `out/series.json`)."""
    record = out / "series.json"
    ours = {str(s): series.fingerprint(s) for s in series.steps}
    try:
        theirs = json.loads(record.read_text())["fingerprints"] if record.exists() else None
    except (ValueError, KeyError, TypeError):
        theirs = {}  # damaged: treat as another series
    outputs = [out / n for n in ("results", "figures", "report.html", "config.json", "series.json", OUTPUTS)]
    if theirs is None and not (out / "results").exists():
        other = False  # a new folder
    else:
        common = set(ours) & set(theirs or {})
        other = not common or any(ours[s] != theirs[s] for s in common)
    if other:
        aside = next(out / f"previous-{k}" for k in range(1, 10**6) if not (out / f"previous-{k}").exists())
        aside.mkdir()
        for path in outputs:
            if path.exists():
                os.replace(path, aside / path.name)
        warnings.warn(f"{out} held the analysis of another series (other checkpoint weights); its results, figures "
                      f"and report are now in {aside}, and none of its numbers is used for this series.",
                      StoreWarning, stacklevel=3)
    atomic_write(record, json.dumps({"series": repr(series), "fingerprints": ours}, indent=2))



def task_data(series: CheckpointSeries, data, config: AnalysisConfig, progress: bool = True) -> tuple[Task, Any, Any]:
    """(task, train data for sampling and the task's statistics, test data cut to `n_test_seqs`): the series'
    own task from its manifest's spec, or a token task on `data` (tokens, or text the model's tokenizer cuts;
    padded data as `without_padding` reads them: train keeps its attention_mask, test is cut to real tokens)."""
    spec = series.meta.get("data")
    if data is None and not spec:
        raise InvalidValueError("The series records no data spec (it was not written by tl_devinterp.train): pass data= "
                                "(a token tensor [n, seq], a dataset with input_ids or text, or text files), or --data "
                                "FILE.txt on the command line.")
    sampled = None
    if data is None:
        task = make_task(spec)
    else:
        if spec and not isinstance(make_task(spec), TokenTask):
            raise InvalidValueError(f"data= replaces a token series' data; this series' task is {spec.get('kind')!r}, "
                                    f"whose data come from its spec: drop data= (--data).")
        tokenizer, bos, n_ctx = _tokenizer(series)
        form = data_form(data)
        if form in ("text dataset", "text files"):
            if tokenizer is None:
                raise InvalidValueError("Text data needs the models' tokenizer and this series has none: pass token data "
                                        "(a tensor [n, seq] or a dataset with input_ids).")
            texts = data if form == "text dataset" else text_files(data)
            seq_len = config.seq_len or min(n_ctx, 128)
            data = pack_texts(texts, tokenizer, seq_len, test_fraction=0, bos=bos, progress=progress)["train"]
        data, sampled = without_padding(data)
        task = TokenTask.of_tokens(data, data, tokenizer=tokenizer, bos=bos)
    train, test = task.data()
    if sampled is not None:
        train = sampled  # sampling and the n-gram statistics read the real tokens of each row, by its attention_mask
    test = index_batch(test, slice(0, config.n_test_seqs))
    n_test = len(test) if isinstance(test, torch.Tensor) else len(test[0])
    if not 0 <= config.sample_index < n_test:
        raise InvalidValueError(f"sample_index={config.sample_index} is out of range: {n_test} test sequences.")
    return task, train, test


def without_padding(data) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """(`data`'s token rows holding no padding: each row cut to the shortest row's real length, as the metrics,
    probes and pictures need a [n, seq] tensor of real tokens; the data as sampling reads it, `input_ids` with
    the `attention_mask` and `labels` that leave targets out, or None where none does). Rows of equal real
    length padded on the right thus give the numbers of the unpadded rows."""
    if data_form(data) not in ("dataset", "mapping"):
        return data, None
    source = as_tensors(data)
    if not isinstance(source, dict):
        return data, None
    tokens, keep = lm_batch(source)  # (refuses left padding, with the fix)
    if keep is None:
        return tokens, None
    real = int(source["attention_mask"].sum(1).min()) if "attention_mask" in source else tokens.shape[1]
    return tokens[:, :real], source


def _tokenizer(series: CheckpointSeries):
    """(tokenizer or None, BOS id, context length) of the series' models: from its manifest where it records
    them, else from its first model (loaded and dropped)."""
    spec, model_config = series.meta.get("data"), series.meta.get("model_config")
    if spec and model_config:
        task = make_task(spec)
        return task.tokenizer, task.bos, model_config["n_ctx"]
    model = series.load(series.steps[0])
    return getattr(model, "tokenizer", None), bos_token_id(model), model.cfg.n_ctx


def _task_sampler(sgld: SGLDConfig, task: Task) -> SGLDConfig:
    """The task's own sampler settings (`Task.sampler_defaults`) for each option left at analyze's default."""
    default = AnalysisConfig.__dataclass_fields__["sgld"].default_factory()
    own = {k: v for k, v in task.sampler_defaults.items() if getattr(sgld, k) == getattr(default, k)}
    return SGLDConfig.build(sgld, **own)


def _calibrate(series: CheckpointSeries, data, sgld: SGLDConfig, task: Task, max_steps: int,
               progress: bool) -> Calibration:
    """`calibrate_llc` at 3 checkpoints (a third of the way through the series' index, two thirds, the last),
    combined into one setting (`calibration.combine`); none if any checkpoint has none."""
    steps = sorted({series.steps[round(f * (len(series) - 1))] for f in (1 / 3, 2 / 3, 1)})
    return combine({step: calibrate_llc(series.load(step), data, sgld, loss_fn=task.sampler_loss, max_steps=max_steps,
                                        progress=progress)
                    for step in tqdm(steps, desc="calibration checkpoints", unit="ckpt", disable=not progress)})


def transition_steps(steps: list[int], n: int | None, llc: pd.DataFrame, metrics: pd.DataFrame) -> list[int]:
    """None: every checkpoint. Else the first, the last, and the n - 2 checkpoints reached by the largest
    change: the sum over the loss, the model's LLC and each head score of |change since the previous
    checkpoint| / the curve's range, so development, not the spacing of the schedule, draws them."""
    if n is None or n >= len(steps):
        return list(steps)
    if n <= 2:
        return [steps[0], steps[-1]][:n]
    curves = metrics.assign(curve=metrics["metric"].astype(str) + metrics["layer"].astype(str) + metrics["head"].astype(str))
    curves = curves.pivot_table(index="step", columns="curve", values="value")
    curves["llc"] = model_rows(llc).set_index("step")["llc_mean"]
    curves = curves.reindex(steps)
    spread = (curves.max() - curves.min()).replace(0, np.nan)
    change = (curves.diff().abs() / spread).sum(axis=1).to_numpy()[1:-1]  # the change arriving at each inner step
    inner = np.argsort(-change, kind="stable")[: n - 2] + 1
    return sorted({steps[0], steps[-1], *(steps[i] for i in inner)})


_NO_CLASSES = pd.DataFrame(columns=["layer", "head", "label"])
"""The head classes of a task without head scores."""


def top_heads(metrics: pd.DataFrame) -> list[str]:
    """The highest previous-token and induction (prefix-matching) heads at the last checkpoint."""
    last = metrics[metrics["step"] == metrics["step"].max()]
    heads = []
    for name in ("previous_token", "prefix_matching"):
        rows = last[last["metric"] == name].sort_values("value", ascending=False)
        for r in rows.itertuples():
            h = head_name(int(r.layer), int(r.head))
            if h not in heads:
                heads.append(h)
                break
    return heads
