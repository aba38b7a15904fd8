"""Train a TransformerLens model and write a checkpoint series (safetensors + JSON manifest).

Checkpoints follow the papers' schedule: log-spaced early, where structure forms fast, plus linear later.
Batches are a function of (seed, step), and each checkpoint is committed with its optimizer state: weights
and optimizer files under new names, then the manifest naming them (with the weights' sha256), the one write
that makes the checkpoint part of the series. A run stopped at any point restarts from its last committed
checkpoint and continues exactly. Files are written whole or not at all (`store.atomic_write`), so the
directory is always a readable series. The manifest also declares, before they are written, the files in
flight (`writing`): a resume or `overwrite` removes only files the manifest lists or declares, never one
because of its name. One trainer at a time works in a folder (`store.folder_lock`). A loss that turns NaN or
grows tenfold over its value at initialisation stops the run (`TrainingDivergedError`), keeping the
checkpoints before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from .errors import InvalidValueError, SeriesError, TrainingDivergedError
from .files import LOCK, TMP_SUFFIX, atomic_write, folder_lock, remove_file
from .interventions import Intervener, Intervention, as_interventions
from .llc_callback import llc_now
from .models import ModelConfig, check_device
from .options import build, option, validate
from .series import FORMAT, MANIFEST, CheckpointSeries, load_checkpoint_state, read_manifest
from .tasks import Task, make_task
from .tasks.base import batch_rows, batch_to, index_batch

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the manifest)."""

    model: ModelConfig = option(ModelConfig(), "the architecture (a ModelConfig or a table of its options)")
    data: dict[str, Any] = option({}, "a task's spec (tl_devinterp.tasks.make_task)")
    n_steps: int = option(3000, "training steps", ge=1)
    batch_size: int = option(32, "sequences per step", ge=1)
    lr: float = option(1e-3, "learning rate", ge=0)
    weight_decay: float = option(0.0, "weight decay", ge=0)
    optimizer: str = option("adamw", "adamw, or sgd (plain SGD, as the toy model of superposition's paper trains)",
                            choices=sorted(OPTIMIZERS))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", ge=0)
    lr_schedule: str = option("constant", "after the warm-up: constant, or linear (down to 0 at n_steps; with "
                              "warmup_steps = n_steps / 2 the one-cycle schedule of Hoogland et al. 2024)",
                              choices=("constant", "linear"))
    n_log_checkpoints: int = option(20, "log-spaced checkpoints", ge=0)
    n_linear_checkpoints: int = option(20, "linearly spaced checkpoints", ge=0)
    extra_steps: list[int] = option([], "more checkpoints, e.g. dense inside a transition")
    eval_batches: int = option(4, "test batches of each checkpoint's logged loss", ge=1)
    seed: int = option(0, "seed of initialisation and batches", ge=0)
    interventions: list[Intervention] = option([], "see tl_devinterp.interventions")

    def __post_init__(self):
        if isinstance(self.model, dict):  # a config file's table
            self.model = ModelConfig.from_dict(self.model)
        self.interventions = as_interventions(self.interventions)
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, interventions=[]))
        d["model"] = self.model.to_dict()
        for name, default in (("extra_steps", []), ("optimizer", "adamw"), ("lr_schedule", "constant")):
            if d[name] == default:  # manifests written before the field existed still match (and resume)
                del d[name]
        del d["interventions"]
        if self.interventions:  # only when present, so plain runs keep their manifests (and resume)
            d["interventions"] = [i.to_dict() for i in self.interventions]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "the arguments") -> TrainConfig:
        return cls(**build(cls, d, source=source))


def _markov(d_vocab: int, seq_len: int, n_train: int, **kw) -> dict[str, Any]:
    return dict(kind="markov", d_vocab=d_vocab, seq_len=seq_len, n_train=n_train, n_test=512, seed=0, **kw)


PRESETS: dict[str, TrainConfig] = {
    # Global bigrams (Dirichlet(1) rows) with an in-context repeat in every sequence. Stages: a uniform
    # plateau, bigram statistics (loss 4.84 -> 4.46), then previous-token + induction heads (~1300-2000 steps).
    "demo": TrainConfig(
        model=ModelConfig(n_layers=2, n_heads=4, d_model=64, n_ctx=64, d_vocab=128, attn_only=True),
        data=_markov(128, 64, 20000, alpha=1.0, repeat_fraction=1.0, min_len=12, max_len=30),
        n_steps=3000, batch_size=32, lr=1e-3, n_log_checkpoints=16, n_linear_checkpoints=14,
    ),
    # Seconds on a CPU, for tests and `demo --quick`.
    "quick": TrainConfig(
        model=ModelConfig(n_layers=2, n_heads=2, d_model=32, n_ctx=32, d_vocab=32, attn_only=True),
        data=_markov(32, 32, 2000, alpha=0.1, repeat_fraction=1.0, min_len=4, max_len=12),
        n_steps=200, batch_size=16, lr=3e-3, n_log_checkpoints=6, n_linear_checkpoints=4,
    ),
    # In-context linear regression (tasks.regression; Hoogland et al. 2024, its code's L2H4Minf run), for a GPU: the
    # paper's data (D=4, K=16, Gaussian tasks, noise 0.125), model (2 pre-LN blocks, 4 heads, d_model 64, ReLU MLPs
    # of 64, final LN: 53,248 parameters here, with TL's attention biases; ~50k there), Adam at lr 0.003 on a one-cycle
    # schedule (linear up over the first half, down to 0 at the end), 500k steps of 256, and the LLC checkpoint
    # grid of its analysis (100 log-spaced + 200 linear). One difference: 4M fixed training contexts, each seen
    # ~32 times, where the paper draws fresh ones every step. The -quick variant trains in about a minute on 2 CPU
    # cores and shows LR1 and LR2.
    "icl-regression": TrainConfig(
        model=ModelConfig(n_layers=2, n_heads=4, d_model=64, n_ctx=32, d_vocab=5, attn_only=False, d_mlp=64,
                          act_fn="relu"),
        data=dict(kind="icl-regression", D=4, K=16, noise=0.125, n_train=4_000_000, n_test=2048, seed=0),
        n_steps=500_000, batch_size=256, lr=3e-3, warmup_steps=250_000, lr_schedule="linear",
        n_log_checkpoints=100, n_linear_checkpoints=200,
    ),
    "icl-regression-quick": TrainConfig(
        model=ModelConfig(n_layers=2, n_heads=2, d_model=32, n_ctx=16, d_vocab=4, attn_only=False, d_mlp=32),
        data=dict(kind="icl-regression", D=3, K=8, noise=0.125, n_train=20_000, n_test=512, seed=0),
        n_steps=1500, batch_size=64, lr=3e-3, n_log_checkpoints=12, n_linear_checkpoints=8,
    ),
    # Sparse-attention regression (tasks.regression; Zucchet et al. 2025): the target is a linear map of the
    # first of T tokens; a plateau, then attention to it emerges suddenly, later for longer sequences.
    "sparse-regression": TrainConfig(
        model=ModelConfig(n_layers=1, n_heads=4, d_model=64, n_ctx=128, d_vocab=16, attn_only=True,
                          normalization_type=None),
        data=dict(kind="sparse-regression", D=16, T=128, relevant=0, n_train=100_000, n_test=1024, seed=0),
        n_steps=20_000, batch_size=128, lr=1e-3, n_log_checkpoints=30, n_linear_checkpoints=40,
    ),
    "sparse-regression-quick": TrainConfig(
        model=ModelConfig(n_layers=1, n_heads=2, d_model=32, n_ctx=16, d_vocab=8, attn_only=True,
                          normalization_type=None),
        data=dict(kind="sparse-regression", D=8, T=16, relevant=0, n_train=20_000, n_test=512, seed=0),
        n_steps=600, batch_size=64, lr=1e-3, n_log_checkpoints=8, n_linear_checkpoints=12,
    ),
    # A language model on the Python standard library's source.
    "stdlib": TrainConfig(
        model=ModelConfig(n_layers=2, n_heads=8, d_model=128, n_ctx=128, d_vocab=2048, attn_only=True),
        data=dict(kind="stdlib", vocab_size=2048, seq_len=128, seed=0, repeat_fraction=0.5, min_len=8, max_len=32),
        n_steps=5000, batch_size=32, lr=1e-3, n_log_checkpoints=20, n_linear_checkpoints=20,
    ),
    # Bursty few-shot classification (Reddy 2023; Singh et al. 2023, 2024): Gaussian-cluster exemplars, labels as
    # tokens, a 2-layer attention-only model; in-context vs in-weights learning, induction heads. tasks.bursty.
    "bursty-classification": TrainConfig(
        model=ModelConfig(n_layers=2, n_heads=8, d_model=128, n_ctx=17, d_vocab=63 + 32, attn_only=True),
        data=dict(kind="bursty-classification", K=4096, L=32, D=63, N=8, B=4, p_bursty=0.9, alpha=0.0, epsilon=0.1,
                  n_train=200_000, n_test=512, n_eval=512),
        n_steps=50_000, batch_size=128, lr=1e-3, n_log_checkpoints=30, n_linear_checkpoints=20,
    ),
    # About a minute on a CPU: with 4096 classes in-weights learning stays at chance and an induction head forms
    # (ICL accuracy 0.5 -> 0.97 between steps ~160 and ~370 for seed 0).
    "bursty-classification-quick": TrainConfig(
        model=ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=9, d_vocab=16 + 8, attn_only=True),
        data=dict(kind="bursty-classification", K=4096, L=8, D=16, N=4, B=2, p_bursty=0.9, alpha=0.0, epsilon=0.1,
                  n_train=40_000, n_test=128, n_eval=256),
        n_steps=800, batch_size=64, lr=3e-3, n_log_checkpoints=10, n_linear_checkpoints=4,
    ),
    # The toy model of superposition (6 features, 2 dimensions) with the paper's SGD (Chen et al. 2023: 1000
    # samples, batch 20, lr 0.005, 4500 epochs): k-gon plateaus and the drops between them. tasks.tms.
    "tms": TrainConfig(
        data=dict(kind="tms", n_features=6, n_hidden=2, n_train=1000), optimizer="sgd",
        n_steps=225_000, batch_size=20, lr=0.005, n_log_checkpoints=40, n_linear_checkpoints=20,
    ),
    # About a minute on a CPU: a larger step reaches the 5+-gon by step ~2000.
    "tms-quick": TrainConfig(
        data=dict(kind="tms", n_features=6, n_hidden=2, n_train=1000, n_test=5000), optimizer="sgd",
        n_steps=6000, batch_size=20, lr=0.05, n_log_checkpoints=16, n_linear_checkpoints=6,
    ),
}


# The icl-regression-quick run continued to 12,000 steps (its first 1500 are the quick run's, weight for weight):
# about 7 minutes on 2 shared CPU cores, past LR2 into a type-B stage (LLC falling while the LayerNorm weights shrink).
PRESETS["icl-regression-long"] = dataclasses.replace(PRESETS["icl-regression-quick"], n_steps=12_000,
                                                     n_log_checkpoints=12, n_linear_checkpoints=24)


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of update `step` (0-based): up linearly over `warmup_steps`, then `lr`, or with
    `lr_schedule="linear"` down linearly to 0 at `n_steps`."""
    if config.lr_schedule == "linear" and step >= config.warmup_steps:
        return config.lr * (config.n_steps - step) / max(1, config.n_steps - config.warmup_steps)
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


def checkpoint_schedule(n_steps: int, n_log: int, n_linear: int, extra_steps: Sequence[int] = ()) -> list[int]:
    """Steps 0 and n_steps, `n_log` log-spaced steps early, `n_linear` evenly spaced ones and `extra_steps`
    (deduplicated)."""
    outside = [s for s in extra_steps if not 0 <= s <= n_steps]
    if outside:
        raise InvalidValueError(f"extra_steps {outside} lie outside the run's steps 0..{n_steps}; drop them or raise n_steps.")
    log = np.geomspace(1, n_steps, n_log) if n_log else []
    lin = np.linspace(0, n_steps, n_linear + 1) if n_linear else []
    return sorted({0, n_steps, *map(int, np.round(log)), *map(int, np.round(lin)), *map(int, extra_steps)})


def train(
    out_dir: str | os.PathLike,
    preset: str | None = None,
    config: TrainConfig | None = None,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    llc_every: int = 0,
    llc_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> CheckpointSeries:
    """Train from a preset (`PRESETS`: `demo`, `quick`, `stdlib`, `icl-regression`, `sparse-regression` and their
    `-quick` variants, `icl-regression-long`) or a `TrainConfig` and return the written series.

    `overrides` replace TrainConfig fields (e.g. `n_steps=500`, `interventions=[Intervention(...)]`: with
    the same seed, batches and initialisation as the run without them, so the pair is a controlled
    experiment). Rerunning into the same `out_dir` with
    the same config resumes from the last checkpoint; a different config is refused unless `overwrite`.
    `llc_every=N` estimates the LLC on the test split every N steps (`llc_callback.llc_now`, SGLD options
    `llc_options`), without changing the run, into the manifest's `llc_during_training` {step: {llc, llc_se}}.
    """
    if isinstance(llc_every, bool) or not isinstance(llc_every, int) or llc_every < 0:
        raise InvalidValueError(f"llc_every must be an integer >= 0 (0: never), got {llc_every!r}.")
    if (preset is None) == (config is None):
        raise InvalidValueError(f"Give exactly one of preset (one of {sorted(PRESETS)}) or config.")
    if preset is not None:
        if preset not in PRESETS:
            raise InvalidValueError(f"Unknown preset {preset!r}; known presets: {sorted(PRESETS)}.")
        config = PRESETS[preset]
    config = dataclasses.replace(config, **build(TrainConfig, overrides))
    late = [i.to_dict() for i in config.interventions if i.start >= config.n_steps]
    if late:
        raise InvalidValueError(f"Interventions {late} start at or after n_steps={config.n_steps}: they would never act.")
    check_device(device)
    task = make_task(config.data)  # the spec checked, before any data is made
    if config.interventions and not task.has_heads:
        raise InvalidValueError(f"interventions act on a transformer's hook points; the {task.kind!r} task's model has "
                                f"none. Drop the interventions.")
    task.check_model(config.model)
    train_data, test_data = task.data()
    out = Path(out_dir)  # every check passed: only now is the folder touched
    with folder_lock(out, "train"):  # a second trainer would take this one's uncommitted files for leftovers
        _train(out, config, overwrite, task, train_data, test_data, device, progress, llc_every, llc_options)
    return CheckpointSeries.from_dir(out)


def _train(out: Path, config: TrainConfig, overwrite: bool, task: Task, train_data, test_data, device, progress: bool,
           llc_every: int, llc_options: dict[str, Any] | None) -> None:
    """`train` once its inputs are checked and it holds the folder's lock."""
    tokenizer = task.tokenizer
    schedule = checkpoint_schedule(config.n_steps, config.n_log_checkpoints, config.n_linear_checkpoints,
                                   config.extra_steps)
    manifest = _start(out, config, overwrite, ["tokenizer.json"] * (tokenizer is not None) + _files(schedule[0]))
    if tokenizer is not None and manifest.get("tokenizer") is None:  # the series carries its tokenizer
        atomic_write(out / "tokenizer.json", tokenizer.to_str())
        manifest["tokenizer"] = "tokenizer.json"
        _write_json(out / MANIFEST, manifest)

    model = task.build_model(config.model, device)
    model.train()
    intervener = Intervener(model, config.interventions, device=device, inputs=task.model_inputs)
    opt = OPTIMIZERS[config.optimizer](model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = max(map(int, manifest["checkpoints"]), default=-1)
    if start >= 0:
        _restore(out, manifest, model, opt)

    def batch(step: int):
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        rows = torch.randint(batch_rows(train_data), (config.batch_size,), generator=g)
        return batch_to(index_batch(train_data, rows), device)

    recent: list[float] = []
    with tqdm(desc="training", unit="step", disable=not progress, initial=max(start, 0), total=config.n_steps) as bar:
        for step in range(max(start, 0), config.n_steps + 1):  # the last pass only saves step n_steps
            if step in schedule and step > start:
                test_loss = _evaluate(model, task, test_data, config, device)
                _check_loss(out, manifest, config, step, test_loss, "test")
                train_loss = float(np.mean(recent)) if recent else test_loss
                later = [s for s in schedule if s > step]
                _save(out, manifest, step, model, opt, train_loss, test_loss, _files(later[0]) if later else [])
                recent.clear()
                bar.set_postfix(train=f"{train_loss:.3f}", test=f"{test_loss:.3f}")
            if step == config.n_steps:
                break
            b = batch(step)
            with intervener(step, b):  # the interventions active at this step, for its whole update
                loss = task.loss(model, b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for group in opt.param_groups:  # a function of the step alone: a resumed run continues exactly
                    group["lr"] = learning_rate(config, step)
                opt.step()
            recent.append(loss.item())
            _check_loss(out, manifest, config, step, recent[-1], "training")
            if llc_every and (step + 1) % llc_every == 0:  # the weights after step + 1 updates
                estimate = llc_now(model, test_data, loss_fn=task.sampler_loss, **(llc_options or {}))
                manifest.setdefault("llc_during_training", {})[str(step + 1)] = estimate
                bar.set_postfix(llc=f"{estimate['llc']:.3g}")
            bar.update()
    manifest["complete"] = True
    optimizer = manifest.pop("optimizer", None)  # a complete series needs no optimizer state
    manifest["writing"] = [optimizer] if optimizer else []
    _write_json(out / MANIFEST, manifest)
    if optimizer:
        remove_file(out / optimizer)


DIVERGED = 10.0
"""A loss this many times the test loss at initialisation (about ln d_vocab for a language model) means
training diverged."""


def _check_loss(out: Path, manifest: dict, config: TrainConfig, step: int, loss: float, kind: str) -> None:
    """Stop a diverged run, naming the step and the likely cause, before it writes another checkpoint."""
    init = manifest["losses"].get("0", {}).get("test", loss)
    if math.isfinite(loss) and (init <= 0 or loss <= DIVERGED * init):  # a zero loss at init has no scale
        return
    kept = sorted(map(int, manifest["checkpoints"]))
    raise TrainingDivergedError(
        f"Training diverged at step {step}: the {kind} loss is {loss:.3g}, against {init:.3g} at initialisation. "
        f"The likely cause is too high a learning rate (lr={config.lr:g}): lower it (e.g. --lr {config.lr / 10:g}) "
        f"and retrain with --overwrite. "
        + (f"The checkpoints saved before it (steps {kept[0]}{f' to {kept[-1]}' if len(kept) > 1 else ''}) are kept "
           f"in {out}." if kept else f"No checkpoint was saved in {out}.")
    )


@torch.no_grad()
def _evaluate(model, task: Task, data, config: TrainConfig, device) -> float:
    was = model.training
    model.eval()
    n = min(batch_rows(data), config.eval_batches * config.batch_size)
    losses = [task.loss(model, batch_to(index_batch(data, slice(i, min(i + config.batch_size, n))), device)).item()
              for i in range(0, n, config.batch_size)]
    model.train(was)
    return float(np.mean(losses))


def _start(out: Path, config: TrainConfig, overwrite: bool, writing: list[str]) -> dict[str, Any]:
    """The manifest to continue: the folder's own when it holds this config's series, else a fresh one
    declaring the files about to be written (`writing`).

    Another config's series is replaced only with `overwrite` (or when it saved no checkpoint), and only
    the files it lists or declares are removed: a folder holding anything else is refused, naming those files.
    """
    file = out / MANIFEST
    old = read_manifest(file) if file.exists() else None
    if old is not None and old.get("train_config") == config.to_dict():
        listed = _listed(old)
        for f in sorted(out.iterdir()):  # a stopped run's leftovers: the files it declared, not committed
            if f.is_file() and _ours(f.name, old) and f.name not in listed:
                remove_file(f)
        old.setdefault("sha256", {})
        return old
    if old is not None and old["checkpoints"] and not overwrite:
        raise SeriesError(
            f"{out} already holds a series trained with a different configuration. "
            f"Choose another output directory, or pass overwrite=True (--overwrite) to replace it."
        )
    present = sorted(out.iterdir()) if out.is_dir() else []
    foreign = [f.name for f in present if not (f.is_file() and (f.name == LOCK or _ours(f.name, old)))]
    if foreign:
        raise SeriesError(
            f"{out} holds files tl_devinterp did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); " + (
                "--overwrite removes only the files its manifest lists: move the others away, or choose another "
                "output directory." if old is not None else "choose an empty or new directory.")
        )
    for f in present:  # only the series' own files (the lock file stays: another process may hold it)
        if f.name != LOCK:
            remove_file(f)
    out.mkdir(parents=True, exist_ok=True)
    fresh = {"format": FORMAT, "model_config": config.model.to_dict(), "train_config": config.to_dict(),
             "data": config.data, "tokenizer": None, "seed": config.seed, "checkpoints": {}, "sha256": {},
             "losses": {}, "complete": False, "writing": writing}
    _write_json(file, fresh)
    return fresh


def _listed(manifest: dict) -> set[str]:
    """The files a series' manifest names, itself included."""
    return {MANIFEST, *manifest["checkpoints"].values(), manifest.get("tokenizer"), manifest.get("optimizer")} - {None}


def _ours(name: str, manifest: dict | None) -> bool:
    """Whether the trainer wrote (or was writing) the file `name`: one its manifest lists or declares in
    `writing` (the record of writes in flight), or the temporary file of such a write. Never a guess from a
    name's pattern: a user's `step_000000005.safetensors` is theirs."""
    own = {MANIFEST} | (_listed(manifest) | set(manifest.get("writing", [])) if manifest is not None else set())
    tmp = re.fullmatch(rf"\.(.+)\.\w+{re.escape(TMP_SUFFIX)}", name)  # atomic_write's .NAME.RANDOM.tl-tmp
    return name in own or (tmp is not None and tmp.group(1) in own)


def _files(step: int) -> list[str]:
    """The files of checkpoint `step`: weights and optimizer state."""
    return [f"step_{step:09d}.safetensors", f"optimizer_{step:09d}.safetensors"]


def _save(out: Path, manifest: dict, step: int, model, opt, train_loss: float, test_loss: float,
          following: list[str]) -> None:
    """Commit checkpoint `step`: weights and optimizer state under new names (declared in the manifest's
    `writing` before), then the manifest that names them and declares the superseded optimizer state (removed
    next) and the `following` checkpoint's files. A crash anywhere leaves the last commit whole, and the
    manifest names every file a resume may remove."""
    name, optimizer = _files(step)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = save(state, metadata={"step": str(step)})
    atomic_write(out / name, weights)
    atomic_write(out / optimizer, save(_optimizer_tensors(model, opt), metadata={"step": str(step)}))
    previous = manifest.get("optimizer")
    manifest["checkpoints"][str(step)] = name
    manifest["sha256"][str(step)] = hashlib.sha256(weights).hexdigest()
    manifest["optimizer"] = optimizer
    manifest["losses"][str(step)] = {"train": train_loss, "test": test_loss}
    manifest["writing"] = [previous] * bool(previous and previous != optimizer) + following
    _write_json(out / MANIFEST, manifest)  # the commit
    if previous and previous != optimizer:
        remove_file(out / previous)


def _optimizer_tensors(model, opt) -> dict[str, torch.Tensor]:
    """The optimizer's state as flat tensors keyed by parameter name (safetensors holds tensors only)."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            if value is not None:  # SGD without momentum keeps momentum_buffer None
                out[f"{name}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def _restore(out: Path, manifest: dict, model, opt) -> None:
    """Weights and optimizer state of the last committed checkpoint, verified against the manifest."""
    last = max(map(int, manifest["checkpoints"]))
    file = out / manifest["checkpoints"][str(last)]
    model.load_state_dict(load_checkpoint_state(file, sha256=manifest["sha256"].get(str(last)), step=last), strict=False)
    if not manifest.get("optimizer"):
        return  # a complete run, or one from before optimizer states were committed: fresh optimizer state
    saved = load_checkpoint_state(out / manifest["optimizer"], step=last)
    for name, p in model.named_parameters():
        state = {k.split("::")[1]: v for k, v in saved.items() if k.split("::")[0] == name}
        if state:
            opt.state[p] = state


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2))
