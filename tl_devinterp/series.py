"""A checkpoint series: an ordered map training step -> model, loaded lazily one model at a time.

Sources: a directory our trainer wrote (safetensors + `manifest.json`), TransformerLens's own training
loop output (`model_{step}.pt` state dicts), models already in memory, and TransformerLens pretrained
checkpoints (`checkpoint_index` / `checkpoint_value`, which need a hub). Nothing is unpickled:
safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .models import ModelConfig, build_model, check_model, tl_parameter_names

MANIFEST = "manifest.json"
FORMAT = "tl_devinterp.series/1"


class SeriesError(ValueError):
    """A checkpoint series cannot be read as given; the message names the file and the fix."""


class CheckpointSeries:
    """Ordered training steps, each loadable as a TransformerLens model.

    `series.load(step)` builds the model for that step from its source, so only the models a caller
    keeps are in memory. Iterating yields `(step, model)` in step order.
    """

    def __init__(self, steps: Sequence[int], loader: Callable[[int], nn.Module], *, meta: dict | None = None):
        steps = [int(s) for s in steps]
        if not steps:
            raise SeriesError("The checkpoint series is empty: give at least one checkpoint.")
        if len(set(steps)) != len(steps):
            raise SeriesError(f"Duplicate steps in the series: {sorted(steps)}.")
        self.steps: list[int] = sorted(steps)
        self._loader = loader
        self.meta: dict[str, Any] = meta or {}

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"CheckpointSeries({len(self)} checkpoints, steps {self.steps[0]}..{self.steps[-1]})"

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        for step in self.steps:
            yield step, self.load(step)

    def load(self, step: int) -> nn.Module:
        if step not in self.steps:
            raise KeyError(f"Step {step} is not in the series; available steps: {self.steps}.")
        model = self._loader(step)
        model.eval()
        return model

    def subset(self, steps: Sequence[int]) -> CheckpointSeries:
        """The same series restricted to `steps`."""
        for s in steps:
            if s not in self.steps:
                raise KeyError(f"Step {s} is not in the series; available steps: {self.steps}.")
        return CheckpointSeries(steps, self._loader, meta=self.meta)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> CheckpointSeries:
        """A series written by `tl_devinterp.train` (one safetensors file per step + manifest.json)."""
        path = Path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.exists():
            hint = (
                " It holds model_{step}.pt files: use CheckpointSeries.from_tl_save_dir(path, config)."
                if path.is_dir() and any(path.glob("model_*.pt"))
                else ""
            )
            raise SeriesError(f"{manifest_file} not found: {path} is not a series written by tl_devinterp.{hint}")
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as e:
            raise SeriesError(f"{manifest_file} is not valid JSON ({e}); the series directory is damaged.") from e
        if manifest.get("format") != FORMAT:
            raise SeriesError(f"{manifest_file} has format {manifest.get('format')!r}; expected {FORMAT!r}.")
        try:
            config = ModelConfig.from_dict(manifest["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise SeriesError(f"{manifest_file}: bad or missing 'model_config' ({e}).") from e
        files = {int(s): path / f for s, f in manifest.get("checkpoints", {}).items()}
        if not files:
            raise SeriesError(f"{manifest_file} lists no checkpoints: the series is empty.")
        absent = [str(f) for f in files.values() if not f.exists()]
        if absent:
            raise SeriesError(
                f"The manifest {manifest_file} lists checkpoints whose files are missing: {absent}. "
                f"Restore them, or remove their entries from the manifest."
            )

        return cls(sorted(files), partial(_load_file, partial(build_model, config), _read_safetensors, files),
                   meta=manifest)

    @classmethod
    def from_tl_save_dir(cls, path: str | os.PathLike, config: Any) -> CheckpointSeries:
        """The `save_dir` of TransformerLens's training loop: `model_{step}.pt` state dicts.

        `config` is the architecture they were saved from: a `ModelConfig` (or its dict), or a TL config
        (`TransformerBridgeConfig` / `HookedTransformerConfig`). State dicts in HookedTransformer layout
        (`blocks.0.attn.W_Q`) are converted for a bridge.
        """
        path = Path(path)
        if not path.is_dir():
            raise SeriesError(f"{path} is not a directory of model_{{step}}.pt checkpoints.")
        files = {}
        for f in path.glob("model_*.pt"):
            m = re.fullmatch(r"model_(\d+)\.pt", f.name)
            if m:
                files[int(m.group(1))] = f
        if not files:
            raise SeriesError(f"No model_{{step}}.pt files in {path}: the series is empty.")
        return cls(sorted(files), partial(_load_file, _builder(config), _read_torch, files), meta={"source": str(path)})

    @classmethod
    def from_models(cls, models: Sequence[nn.Module], steps: Sequence[int]) -> CheckpointSeries:
        """Models already in memory, with the training step of each."""
        models, steps = list(models), [int(s) for s in steps]
        if len(models) != len(steps):
            raise SeriesError(f"Got {len(models)} models but {len(steps)} steps; give one step per model.")
        for m in models:
            check_model(m)
        shapes = [_shapes(m) for m in models]
        for s, sh in zip(steps[1:], shapes[1:]):
            if sh != shapes[0]:
                raise SeriesError(
                    f"The model at step {s} has a different architecture from the one at step {steps[0]} "
                    f"({_shape_diff(shapes[0], sh)}); a series holds one architecture."
                )
        return cls(steps, _InMemory(dict(zip(steps, models))))

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        checkpoint_indices: Sequence[int] | None = None,
        checkpoint_values: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> CheckpointSeries:
        """TransformerLens pretrained training checkpoints (e.g. Pythia, `attn-only-2l`); needs a hub.

        Give `checkpoint_values` (training steps) or `checkpoint_indices` (positions in the model
        family's checkpoint list); with neither, every available checkpoint. Extra keyword arguments go
        to TransformerLens's loader.
        """
        if checkpoint_indices is not None and checkpoint_values is not None:
            raise ValueError("Give checkpoint_indices or checkpoint_values, not both.")
        labels = _checkpoint_labels(model_name)
        if checkpoint_values is None:
            idx = range(len(labels)) if checkpoint_indices is None else checkpoint_indices
            checkpoint_values = [labels[i] for i in idx]
        unknown = [v for v in checkpoint_values if v not in labels]
        if unknown:
            raise SeriesError(f"{model_name} has no checkpoints {unknown}; available: {labels}.")

        return cls(checkpoint_values, partial(_load_pretrained, model_name, **kwargs), meta={"source": model_name})


# --------------------------------------------------------------------------------------------------
def _builder(config: Any) -> Callable[[], nn.Module]:
    if isinstance(config, (ModelConfig, dict)):
        return partial(build_model, config)
    kind = type(config).__name__
    if kind == "TransformerBridgeConfig":
        from transformer_lens.model_bridge import TransformerBridge

        return partial(TransformerBridge.boot_native, config)
    if kind == "HookedTransformerConfig":
        from transformer_lens import HookedTransformer

        return partial(HookedTransformer, config)
    raise TypeError(
        f"config must be a ModelConfig, a dict of its fields, or a TransformerLens config; got {kind}."
    )


def _load_file(build: Callable[[], nn.Module], read: Callable[[Path], dict], files: dict[int, Path],
               step: int) -> nn.Module:
    """Build a model and load the step's file into it. Loaders are partials of module-level functions, not
    closures, so that a series pickles and its checkpoints can be loaded on another process or machine."""
    model = build()
    _load_state(model, read(files[step]), files[step])
    return model


class _InMemory:
    """The loader of `from_models`. It pickles (to ship a series to parallel workers) through cloudpickle,
    since TransformerBridge models hold local classes that plain pickle refuses."""

    def __init__(self, models: dict[int, nn.Module]):
        self.models = models

    def __call__(self, step: int) -> nn.Module:
        return self.models[step]

    def __reduce__(self):
        try:
            import cloudpickle
        except ImportError:
            raise ImportError("Shipping in-memory models to workers needs cloudpickle (pip install "
                              "'tl_devinterp[dask]'), or save them and use CheckpointSeries.from_dir.") from None
        return _unpickle_models, (cloudpickle.dumps(self.models),)


def _unpickle_models(blob: bytes) -> _InMemory:
    import pickle

    return _InMemory(pickle.loads(blob))


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise SeriesError(f"Checkpoint {file} is corrupt or unreadable ({e}). Re-save or remove it.") from e


def _read_torch(file: Path) -> dict[str, torch.Tensor]:
    """A state dict, refusing anything but tensors (no arbitrary unpickling)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only raises UnpicklingError for code objects; others for damage
        raise SeriesError(
            f"Checkpoint {file} could not be loaded safely ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"We load only plain state dicts (torch.load(weights_only=True)); re-save it with "
            f"torch.save(model.state_dict(), path)."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SeriesError(f"Checkpoint {file} is not a state dict of tensors (got {type(state).__name__}).")
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    if any(".W_Q" in k or k == "embed.W_E" for k in state) and "embed.W_E" not in model.state_dict():
        try:  # HookedTransformer layout (blocks.0.attn.W_Q [n_heads, d_model, d_head]) for a bridge
            from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
        except ImportError:  # TL 3.x has no converter, but has HookedTransformer
            raise SeriesError(
                f"Checkpoint {file} is in HookedTransformer layout, which this TransformerLens cannot convert for a "
                f"TransformerBridge. Pass a HookedTransformerConfig as the series' config to load it into a "
                f"HookedTransformer, or use transformer_lens>=4."
            ) from None
        state = convert_tl_checkpoint(dict(state), model.cfg)
    own = model.state_dict()
    missing = sorted(set(tl_parameter_names(model)) - set(state))  # buffers (masks, zero biases) may be absent
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise SeriesError(
            f"Checkpoint {file} does not match the series' architecture: "
            + "; ".join(filter(None, [
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shapes differ ({', '.join(wrong[:3])})" if wrong else "",
            ]))
            + ". Check the model config given for the series."
        )
    model.load_state_dict(state, strict=False)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shape_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) ^ set(b)) or [k for k in a if a[k] != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys[:3])


def _checkpoint_labels(model_name: str) -> list[int]:
    try:  # TL 4.x
        from transformer_lens.tools.model_registry.checkpoints import get_checkpoint_labels
    except ImportError:  # TL 3.x
        from transformer_lens.loading_from_pretrained import get_checkpoint_labels
    labels, _ = get_checkpoint_labels(model_name)
    return [int(v) for v in labels]


def _load_pretrained(model_name: str, step: int, **kwargs: Any) -> nn.Module:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover
        TransformerBridge = None
    if TransformerBridge is not None and hasattr(TransformerBridge, "boot_transformers"):
        if hasattr(TransformerBridge, "boot_tl_legacy") and model_name.startswith(("NeelNanda/", "ArthurConmy/")):
            return TransformerBridge.boot_tl_legacy(model_name, checkpoint_value=step, **kwargs)
        return TransformerBridge.boot_transformers(model_name, checkpoint_value=step, **kwargs)
    from transformer_lens import HookedTransformer  # pragma: no cover - TL 3.x

    return HookedTransformer.from_pretrained(model_name, checkpoint_value=step, **kwargs)
