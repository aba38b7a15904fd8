"""Train a TransformerLens model and write a checkpoint series (safetensors + JSON manifest).

Checkpoints follow the papers' schedule: log-spaced early, where structure forms fast, plus linear later.
Batches are a function of (seed, step), and the optimizer state is saved beside the latest checkpoint, so
a stopped run restarts from its last checkpoint and continues exactly. Files are written to temporary names
and renamed, the manifest last, so the directory is always a readable series.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import make_data, spec_tokenizer, token_tensor
from .models import ModelConfig, build_model, token_cross_entropy
from .series import FORMAT, MANIFEST, CheckpointSeries, SeriesError


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the manifest)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: dict[str, Any] = field(default_factory=dict)  # a tl_devinterp.data.make_data spec
    n_steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    n_log_checkpoints: int = 20
    n_linear_checkpoints: int = 20
    extra_steps: list[int] = field(default_factory=list)  # more checkpoints, e.g. dense inside a transition
    eval_batches: int = 4
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        if not self.extra_steps:  # manifests written before the field existed still match (and resume)
            del d["extra_steps"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d.get("model", {}))
        return cls(**d)


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
    # A language model on the Python standard library's source.
    "stdlib": TrainConfig(
        model=ModelConfig(n_layers=2, n_heads=8, d_model=128, n_ctx=128, d_vocab=2048, attn_only=True),
        data=dict(kind="stdlib", vocab_size=2048, seq_len=128, seed=0, repeat_fraction=0.5, min_len=8, max_len=32),
        n_steps=5000, batch_size=32, lr=1e-3, n_log_checkpoints=20, n_linear_checkpoints=20,
    ),
}


def checkpoint_schedule(n_steps: int, n_log: int, n_linear: int, extra_steps: Sequence[int] = ()) -> list[int]:
    """Steps 0 and n_steps, `n_log` log-spaced steps early, `n_linear` evenly spaced ones and `extra_steps`
    (deduplicated)."""
    outside = [s for s in extra_steps if not 0 <= s <= n_steps]
    if outside:
        raise ValueError(f"extra_steps {outside} lie outside the run's steps 0..{n_steps}; drop them or raise n_steps.")
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
    **overrides: Any,
) -> CheckpointSeries:
    """Train from a preset (`demo`, `quick`, `stdlib`) or a `TrainConfig` and return the written series.

    `overrides` replace TrainConfig fields (e.g. `n_steps=500`). Rerunning into the same `out_dir` with
    the same config resumes from the last checkpoint; a different config is refused unless `overwrite`.
    """
    if (preset is None) == (config is None):
        raise ValueError(f"Give exactly one of preset (one of {sorted(PRESETS)}) or config.")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; known presets: {sorted(PRESETS)}.")
        config = PRESETS[preset]
    config = dataclasses.replace(config, **overrides)
    if config.data.get("seq_len") != config.model.n_ctx:
        raise ValueError(f"data seq_len ({config.data.get('seq_len')}) must equal the model's n_ctx ({config.model.n_ctx}).")
    out = Path(out_dir)
    manifest = _start(out, config, overwrite)
    tokenizer = spec_tokenizer(config.data)
    if tokenizer is not None and manifest.get("tokenizer") is None:  # the series carries its tokenizer
        tokenizer.save(str(out / "tokenizer.json"))
        manifest["tokenizer"] = "tokenizer.json"
        _write_json(out / MANIFEST, manifest)
    data = make_data(config.data)
    train_tokens, test_tokens = token_tensor(data["train"]), token_tensor(data["test"])
    vocab = int(max(train_tokens.max(), test_tokens.max())) + 1
    if vocab > config.model.d_vocab:
        raise ValueError(f"The data uses {vocab} token ids but the model's d_vocab is {config.model.d_vocab}.")

    model = build_model(config.model, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = checkpoint_schedule(config.n_steps, config.n_log_checkpoints, config.n_linear_checkpoints,
                                   config.extra_steps)
    start = max(map(int, manifest["checkpoints"]), default=-1)
    if start >= 0:
        _restore(out, manifest, model, opt)

    def batch(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        return train_tokens[torch.randint(len(train_tokens), (config.batch_size,), generator=g)].to(device)

    recent: list[float] = []
    bar = tqdm(desc="training", unit="step", disable=not progress, initial=max(start, 0), total=config.n_steps)
    for step in range(max(start, 0), config.n_steps + 1):  # the last pass only saves step n_steps
        if step in schedule and step > start:
            test_loss = _evaluate(model, test_tokens, config, device)
            train_loss = float(np.mean(recent)) if recent else test_loss
            _save(out, manifest, step, model, opt, train_loss, test_loss)
            recent.clear()
            bar.set_postfix(train=f"{train_loss:.3f}", test=f"{test_loss:.3f}")
        if step == config.n_steps:
            break
        tokens = batch(step)
        loss = token_cross_entropy(model(tokens), tokens).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # linear warmup, a function of the step alone
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        opt.step()
        recent.append(loss.item())
        bar.update()
    bar.close()
    manifest["complete"] = True
    _write_json(out / MANIFEST, manifest)
    (out / "optimizer.safetensors").unlink(missing_ok=True)
    return CheckpointSeries.from_dir(out)


@torch.no_grad()
def _evaluate(model, tokens: torch.Tensor, config: TrainConfig, device) -> float:
    was = model.training
    model.eval()
    n = min(len(tokens), config.eval_batches * config.batch_size)
    losses = [token_cross_entropy(model(t.to(device)), t.to(device)).mean().item()
              for t in tokens[:n].split(config.batch_size)]
    model.train(was)
    return float(np.mean(losses))


def _start(out: Path, config: TrainConfig, overwrite: bool) -> dict[str, Any]:
    file = out / MANIFEST
    fresh = {"format": FORMAT, "model_config": config.model.to_dict(), "train_config": config.to_dict(),
             "data": config.data, "tokenizer": None, "seed": config.seed, "checkpoints": {}, "losses": {}, "complete": False}
    if file.exists():
        old = json.loads(file.read_text())
        if old.get("train_config") == config.to_dict():
            return old
        if not overwrite:
            raise SeriesError(
                f"{out} already holds a series trained with a different configuration. "
                f"Choose another output directory, or pass overwrite=True (--overwrite) to replace it."
            )
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise SeriesError(f"{out} exists and is not empty; choose an empty or new directory, or pass overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(file, fresh)
    return fresh


def _save(out: Path, manifest: dict, step: int, model, opt, train_loss: float, test_loss: float) -> None:
    name = f"step_{step:09d}.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(out / name, lambda tmp: save_file(state, str(tmp)))
    _atomic(out / "optimizer.safetensors", lambda tmp: save_file(_optimizer_tensors(model, opt), str(tmp)))
    manifest["checkpoints"][str(step)] = name
    manifest["losses"][str(step)] = {"train": train_loss, "test": test_loss}
    _write_json(out / MANIFEST, manifest)


def _optimizer_tensors(model, opt) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors keyed by parameter name (safetensors holds tensors only)."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def _restore(out: Path, manifest: dict, model, opt) -> None:
    last = max(map(int, manifest["checkpoints"]))
    model.load_state_dict(load_file(str(out / manifest["checkpoints"][str(last)])), strict=False)
    opt_file = out / "optimizer.safetensors"
    if not opt_file.exists():
        return  # a complete run, or one stopped before its first optimizer save: fresh optimizer state
    saved = load_file(str(opt_file))
    for name, p in model.named_parameters():
        state = {k.split("::")[1]: v for k, v in saved.items() if k.split("::")[0] == name}
        if state:
            opt.state[p] = state


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))
