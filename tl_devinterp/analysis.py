"""Everything about one checkpoint series, computed, saved and shown: `analyze(series, out_dir)`.

The pipeline of the package, run in order: the LLC at every checkpoint (and each head's refined LLC at
some), head scores and behavioural metrics, head classes, stages from the LLC curve, essential dynamics,
then at each stage boundary the attention of chosen heads and the per-token loss change on a sample
sequence. Per-checkpoint results go through `ResultStore`s under `OUT/store/`, so a rerun after an
interruption recomputes nothing that finished. Writes `OUT/results/*.csv`, `OUT/figures/*.png` and
`OUT/report.html`. `AnalysisConfig` holds every option and its default; the command line and config
files (JSON or TOML) set the same fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .data import BOS, make_data, spec_tokenizer, token_tensor
from .dynamics import EDResult, Stage, essential_dynamics, find_stages, stages_frame
from .metrics import classify_heads, metrics_over_series, per_token_loss
from .metrics.classify import LABELS as HEAD_LABELS
from .models import head_name, parse_head
from .sampling import llc_over_series
from .sampling.calibration import Calibration, calibrate_llc, choose_setting, judge
from .sampling.llc import SGLDConfig, default_nbeta
from .series import CheckpointSeries, SeriesError
from .visualisation.attention import AttentionView, attention_view
from .visualisation.report import analysis_report


def _opt(default: Any, help: str) -> Any:
    """A config field with its help text (shown by `tl-devinterp analyze --help`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class AnalysisConfig:
    """Every option of `analyze` and its default, sized so that the demo series (30 checkpoints of a 2-layer,
    4-head model) is analysed in about 5 minutes on 2 CPU cores: fewer SGLD draws than the papers (4 chains x
    200), head LLCs at 4 checkpoints. For a careful run raise them after checking the sampler with
    `calibrate_llc`.

    The flags of `tl-devinterp analyze` (`--num-draws 200`) and the keys of a `--config` file are these
    field names.
    """

    # data: the series' own data (its manifest's spec) unless `analyze(..., data=...)` is given
    n_sequences: int = _opt(256, "test sequences for behavioural metrics and essential dynamics")
    sample_index: int = _opt(0, "the test sequence shown in the token and attention pictures")
    seed: int = _opt(0, "seed of sampling, probes and positions")
    device: str | None = _opt(None, "torch device, e.g. cuda")
    # SGLD: the full model's LLC at every checkpoint, the heads' refined LLCs at `head_steps` of them
    epsilon: float = _opt(SGLDConfig.epsilon, "SGLD step size")
    gamma: float = _opt(SGLDConfig.gamma, "SGLD localization strength")
    nbeta: float | None = _opt(None, "effective inverse temperature n*beta (default: n/log n of the batch size)")
    num_chains: int = _opt(3, "SGLD chains")
    num_draws: int = _opt(60, "SGLD draws per chain after burn-in")
    num_burnin: int = _opt(20, "SGLD burn-in steps per chain")
    batch_size: int = _opt(SGLDConfig.batch_size, "SGLD minibatch size")
    head_steps: int | None = _opt(None, "checkpoints where every head's refined LLC is estimated: none = all "
                                  "(default); n = the first, the last and the n-2 where loss, LLC and head scores "
                                  "change most; 0 = none")
    calibrate: bool = _opt(False, "first sweep epsilon x gamma x nbeta (calibrate_llc) on 3 checkpoints and use "
                           "the recommended setting (results/calibration.csv); else the settings above")
    # head scores and classes
    n_seqs: int = _opt(64, "probe sequences of the head scores")
    thresholds: dict[str, float] = _opt({}, "classify_heads thresholds as JSON, e.g. '{\"prefix_matching\": 0.2}'")
    # dynamics
    n_components: int = _opt(3, "essential dynamics: principal components")
    ed_sigma: float | None = _opt(None, "essential dynamics: smoothing width in checkpoints (default: its own)")
    stage_sigma: float = _opt(0.1, "find_stages: smoothing width in log-step units")
    stage_min_prominence: float = _opt(0.05, "find_stages: depth of a boundary, fraction of max |dLLC/dlog t|")
    stage_z: float = _opt(4.0, "find_stages: standard errors by which the slope must move into a boundary")
    attention_heads: list[str] | None = _opt(None, "heads for the attention pictures, e.g. l0h1 l1h3 (default: "
                                             "the top previous-token and induction heads)")

    def __post_init__(self):
        for name in ("n_sequences", "num_chains", "num_draws", "batch_size", "n_seqs", "n_components"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.head_steps is not None and self.head_steps < 0:
            raise ValueError(f"head_steps must be >= 0 (0: no head LLCs) or None (all), got {self.head_steps}.")
        if self.attention_heads is not None:
            self.attention_heads = [head_name(*parse_head(h)) for h in self.attention_heads]
        unknown = sorted(set(self.thresholds) - set(HEAD_LABELS))
        if unknown:
            raise ValueError(f"Unknown thresholds {unknown}; classify_heads reads scores {list(HEAD_LABELS)}.")

    @classmethod
    def quick(cls, **overrides: Any) -> AnalysisConfig:
        """Few draws, head LLCs at 3 checkpoints, small probes: a rough analysis in about a minute."""
        return cls(**{**dict(num_chains=2, num_draws=20, num_burnin=10, head_steps=3, n_sequences=64, n_seqs=16),
                      **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "the config") -> AnalysisConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} in {source}; valid options: {sorted(known)}.")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AnalysisConfig:
        """A JSON (`.json`) or TOML (`.toml`) file of option: value pairs."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} not found.")
        if path.suffix == ".json":
            d = json.loads(path.read_text())
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ValueError(f"Reading {path} needs Python >= 3.11 (tomllib); use a JSON config.") from None
            d = tomllib.loads(path.read_text())
        else:
            raise ValueError(f"Config file {path} must end in .json or .toml.")
        if not isinstance(d, dict):
            raise ValueError(f"Config file {path} must hold a table of option: value pairs.")
        return cls.from_dict(d, source=str(path))


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


def analyze(
    series: CheckpointSeries | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: AnalysisConfig | dict | str | os.PathLike | None = None,
    data: Any = None,
    progress: bool = True,
    **overrides: Any,
) -> AnalysisResult:
    """Analyse a checkpoint series (or a series directory) into `out_dir`; see the module docstring.

    `config` is an `AnalysisConfig`, a dict of its fields or a JSON/TOML file; `overrides` replace single
    fields (`analyze(s, out, num_draws=200)`). `data` (token tensor `[n, seq]` or dataset with `input_ids`)
    replaces the series' own data, and is needed for series that do not record theirs. Rerunning into the
    same `out_dir` resumes: finished checkpoints are read back, not recomputed.
    """
    config = _as_config(config, overrides)
    series = _as_series(series, config)
    train_tokens, test_tokens, labels_of = _data(series, data, config)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory for the report.")
    store, results = out / "store", out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    say = (lambda msg: tqdm.write(f"[analyze] {msg}", file=sys.stderr)) if progress else (lambda msg: None)
    sgld = SGLDConfig(epsilon=config.epsilon, gamma=config.gamma, nbeta=config.nbeta, num_chains=config.num_chains,
                      num_draws=config.num_draws, num_burnin=config.num_burnin, batch_size=config.batch_size,
                      seed=config.seed)
    calibration = None
    if config.calibrate:
        calibration = _calibrate(series, train_tokens, sgld, progress)
        say(f"calibration chose {calibration.choice} (rule: sampling.calibration)")
        sgld = calibration.config(sgld) if calibration.choice else sgld
        calibration.table.drop(columns="llc_trace").to_csv(results / "calibration.csv", index=False)
        (out / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "calibration": calibration.choice},
                                                    indent=2))

    say(f"{series}: LLC at every checkpoint")
    llc = llc_over_series(series, train_tokens, sgld, heads=False, store_dir=store, device=config.device,
                          progress=progress)
    say("head scores and behavioural metrics")
    metrics = metrics_over_series(series, tokens=test_tokens, data=train_tokens, store_dir=store,
                                  n_seqs=config.n_seqs, seed=config.seed, progress=progress)
    classes = classify_heads(metrics, thresholds=config.thresholds)
    head_steps = _head_steps(series.steps, config.head_steps, llc, metrics)
    if head_steps:
        say(f"head LLCs at steps {head_steps}")
        heads = llc_over_series(series, train_tokens, sgld, heads=True, steps=head_steps, store_dir=store,
                                device=config.device, progress=progress)
        llc = pd.concat([llc, heads[heads["scope"] == "head"]])
    llc = llc.sort_values(["step", "scope", "layer", "head"], ignore_index=True)

    model_llc = llc[llc["scope"] == "model"]
    stages = find_stages(model_llc["step"].to_numpy(), model_llc["llc_mean"].to_numpy(), model_llc["llc_se"].to_numpy(),
                         sigma=config.stage_sigma, z=config.stage_z, min_prominence=config.stage_min_prominence)
    say(f"stages: {', '.join(f'{s.start}-{s.end} {s.type}' for s in stages)}; essential dynamics")
    ed = essential_dynamics(series, test_tokens, n_components=config.n_components, sigma=config.ed_sigma,
                            seed=config.seed, device=config.device, store_dir=store, progress=progress)

    sample = test_tokens[config.sample_index]
    sample_labels = labels_of(sample)
    heads = config.attention_heads or _top_heads(metrics)
    boundaries = sorted({s.start for s in stages} | {stages[-1].end})
    losses, attention = {}, []
    for step in tqdm(boundaries, desc="stage boundaries", unit="ckpt", disable=not progress):
        model = series.load(step)
        losses[step] = per_token_loss(model, sample[None])[0].numpy()
        attention.append((step, attention_view(model, sample, heads, labels=sample_labels)))
    loss_differences = pd.concat([
        pd.DataFrame({"step_from": a, "step_to": b, "position": np.arange(1, len(sample)),
                      "token": sample_labels[1:], "loss_diff": losses[b] - losses[a]})
        for a, b in zip(boundaries[:-1], boundaries[1:])
    ], ignore_index=True)

    result = AnalysisResult(llc=llc, metrics=metrics, head_classes=classes, stages=stages, ed=ed,
                            loss_differences=loss_differences, attention=attention, sample_tokens=sample_labels,
                            out_dir=out, title=f"tl_devinterp report: {series!r}", calibration=calibration)
    for name, frame in (("llc", llc), ("metrics", metrics), ("head_classes", classes),
                        ("stages", stages_frame(stages)), ("essential_dynamics", ed.frame()),
                        ("loss_differences", loss_differences)):
        frame.to_csv(results / f"{name}.csv", index=False)
    result.report = analysis_report(result, out / "report.html", figures_dir=out / "figures")
    say(f"report: {result.report}")
    return result


def demo(out_dir: str | os.PathLike = "tl_devinterp_demo", *, quick: bool = False, progress: bool = True,
         device: str | None = None) -> AnalysisResult:
    """Train the demo series (`train(preset="demo")`, or `"quick"`) into `out_dir/series` and analyse it into
    `out_dir/report`. Both steps resume when rerun."""
    from .training import train

    out = Path(out_dir)
    series = train(out / "series", "quick" if quick else "demo", progress=progress, device=device)
    config = AnalysisConfig.quick(device=device) if quick else AnalysisConfig(device=device)
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
        raise TypeError(f"config must be an AnalysisConfig, a dict or a config file path; got {type(config).__name__}.")
    return AnalysisConfig.from_dict({**dataclasses.asdict(config), **overrides}, source="the overrides")


def _as_series(series, config: AnalysisConfig) -> CheckpointSeries:
    if isinstance(series, (str, os.PathLike)):
        path = Path(series)
        if not path.is_dir():
            raise SeriesError(f"{path} is not a directory. Give a series directory written by `tl-devinterp train` "
                              f"(it holds manifest.json), e.g. `tl-devinterp train --out {path}` first.")
        series = CheckpointSeries.from_dir(path)
    if not isinstance(series, CheckpointSeries):
        raise TypeError(f"series must be a CheckpointSeries or a series directory; got {type(series).__name__}.")
    need = max(4, config.n_components + 1)  # find_stages needs 4 points, PCA n_components + 1
    if len(series) < need:
        raise SeriesError(f"The series has {len(series)} checkpoints; an analysis needs at least {need} "
                          f"(stages and essential dynamics are curves over checkpoints). Save more checkpoints.")
    return series


def _data(series: CheckpointSeries, data, config: AnalysisConfig):
    """(train tokens for sampling and n-gram statistics, test tokens, tokens -> labels)."""
    spec = series.meta.get("data")
    if data is not None:
        train = test = token_tensor(data)
    elif spec:
        splits = make_data(spec)
        train, test = token_tensor(splits["train"]), token_tensor(splits["test"])
    else:
        raise ValueError("The series records no data spec (it was not written by tl_devinterp.train): pass "
                         "data=, a token tensor [n, seq] or a dataset with input_ids (--data is not available "
                         "on the command line; use the Python API).")
    test = test[: config.n_sequences]
    if not 0 <= config.sample_index < len(test):
        raise ValueError(f"sample_index={config.sample_index} is out of range: {len(test)} test sequences.")
    if spec and spec.get("kind") == "stdlib":
        tokenizer = spec_tokenizer(spec)
        return train, test, lambda t: [tokenizer.decode([i]) if i != BOS else "<bos>" for i in t.tolist()]
    return train, test, lambda t: ["<bos>" if i == BOS else str(i) for i in t.tolist()]


def _calibrate(series: CheckpointSeries, data, sgld: SGLDConfig, progress: bool) -> Calibration:
    """`calibrate_llc` at 3 checkpoints (a third of the way through the series' index, two thirds, the last);
    the chosen setting must pass the rule at all of them."""
    steps = sorted({series.steps[round(f * (len(series) - 1))] for f in (1 / 3, 2 / 3, 1)})
    tables = [calibrate_llc(series.load(step), data, sgld, progress=progress).table.assign(step=step)
              for step in tqdm(steps, desc="calibration checkpoints", unit="ckpt", disable=not progress)]
    table = judge(pd.concat(tables, ignore_index=True).drop(columns=["eps_change", "acceptable", "stable"]))
    return Calibration(table, choose_setting(table, default_nbeta=default_nbeta(sgld.batch_size)))


def _head_steps(steps: list[int], n: int | None, llc: pd.DataFrame, metrics: pd.DataFrame) -> list[int]:
    """None: every checkpoint. Else the first, the last, and the n - 2 checkpoints reached by the largest
    change: the sum over the loss, the model's LLC and each head score of |change since the previous
    checkpoint| / the curve's range, so development, not the spacing of the schedule, draws them."""
    if n is None or n >= len(steps):
        return list(steps)
    if n <= 2:
        return [steps[0], steps[-1]][:n]
    curves = metrics.assign(curve=metrics["metric"].astype(str) + metrics["layer"].astype(str) + metrics["head"].astype(str))
    curves = curves.pivot_table(index="step", columns="curve", values="value")
    curves["llc"] = llc[llc["scope"] == "model"].set_index("step")["llc_mean"]
    curves = curves.reindex(steps)
    spread = (curves.max() - curves.min()).replace(0, np.nan)
    change = (curves.diff().abs() / spread).sum(axis=1).to_numpy()[1:-1]  # the change arriving at each inner step
    inner = np.argsort(-change, kind="stable")[: n - 2] + 1
    return sorted({steps[0], steps[-1], *(steps[i] for i in inner)})


def _top_heads(metrics: pd.DataFrame) -> list[str]:
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
