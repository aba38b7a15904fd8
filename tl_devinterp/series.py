"""A checkpoint series: an ordered map training step -> model, loaded lazily one model at a time.

Sources: a directory our trainer wrote (safetensors + `manifest.json`), TransformerLens's own training
loop output (`model_{step}.pt` state dicts), models already in memory, TransformerLens pretrained
checkpoints (`checkpoint_index` / `checkpoint_value`) and hub revisions (both need a hub or its cache), and
a transformers `Trainer` output (`checkpoint-{N}/`). Nothing is unpickled: safetensors, or
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
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

        def load(step: int) -> nn.Module:
            model = build_model(config)
            _load_state(model, _read_safetensors(files[step]), files[step])
            return model

        return cls(sorted(files), load, meta=manifest)

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
        build = _builder(config)

        def load(step: int) -> nn.Module:
            model = build()
            _load_state(model, _read_torch(files[step]), files[step])
            return model

        return cls(sorted(files), load, meta={"source": str(path)})

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
        by_step = dict(zip(steps, models))
        return cls(steps, by_step.__getitem__)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        checkpoint_indices: Sequence[int] | None = None,
        checkpoint_values: Sequence[int] | None = None,
        *,
        revisions: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> CheckpointSeries:
        """TransformerLens pretrained training checkpoints (e.g. Pythia, `attn-only-2l`), or any hub
        revisions of a model; needs a hub or its local cache.

        Give `checkpoint_values` (training steps) or `checkpoint_indices` (positions in the model
        family's checkpoint list); with neither, every available checkpoint. Or give `revisions`, the hub
        branches, tags or commits holding the checkpoints (Pythia's `step1000`, stanford-crfm's
        `checkpoint-1000`), each step read from its name, or from `checkpoint_values` in the same order.
        Extra keyword arguments go to TransformerLens's loader.
        """
        if checkpoint_indices is not None and checkpoint_values is not None:
            raise ValueError("Give checkpoint_indices or checkpoint_values, not both.")
        if revisions is not None:
            if checkpoint_indices is not None:
                raise ValueError("Give revisions (with checkpoint_values as their steps) or checkpoint_indices, "
                                 "not both.")
            return cls._from_hub_revisions(model_name, revisions, checkpoint_values, **kwargs)
        labels = _checkpoint_labels(model_name)
        if checkpoint_values is None:
            idx = range(len(labels)) if checkpoint_indices is None else checkpoint_indices
            checkpoint_values = [labels[i] for i in idx]
        unknown = [v for v in checkpoint_values if v not in labels]
        if unknown:
            raise SeriesError(f"{model_name} has no checkpoints {unknown}; available: {labels}.")

        def load(step: int) -> nn.Module:
            return _load_pretrained(model_name, step, **kwargs)

        return cls(checkpoint_values, load, meta={"source": model_name})

    # ----------------------------------------------------------------------------------------------
    # Hugging Face checkpoints: each step is booted fresh with `TransformerBridge.boot_transformers`
    # (loading new weights into a reused bridge would leave its split q/k/v stale).

    @classmethod
    def from_hf_checkpoints(
        cls, run_dir: str | os.PathLike, tokenizer: Any = None, *, device: str | torch.device | None = None
    ) -> CheckpointSeries:
        """A transformers `Trainer` output directory: one `checkpoint-{N}/` folder per saved step N.

        Each folder holds `config.json` and the weights (`model.safetensors`, sharded or not, or
        `pytorch_model.bin`, read with `torch.load(weights_only=True)`); the optimizer, scheduler, RNG state
        and training arguments beside them are never read. `tokenizer` is a name/path for `AutoTokenizer`, or
        a tokenizer it loaded; default: the one saved in `run_dir` or its checkpoints. Models are
        loaded on `device` (default CPU). `meta["fingerprints"][step]` is a hash of that step's weight files,
        computed when first read.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise SeriesError(f"{run_dir} is not a directory; give the output_dir of a transformers Trainer run.")
        folders = {int(m.group(1)): f for f in run_dir.iterdir()
                   if f.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", f.name))}
        if not folders:
            raise SeriesError(f"No checkpoint-{{N}} folders in {run_dir}: it is not a Trainer output_dir (save "
                              f"checkpoints with TrainingArguments(save_strategy='steps', save_steps=...)).")
        weights = {step: _hf_weight_files(folder) for step, folder in folders.items()}
        tokenizer = _hf_tokenizer(tokenizer, [run_dir, *(folders[s] for s in sorted(folders, reverse=True))])
        from transformer_lens.model_bridge import TransformerBridge

        def load(step: int) -> nn.Module:
            folder, files = folders[step], weights[step]
            hf_model = _hf_model_from_bin(folder, files[0]) if files[0].suffix == ".bin" else None  # else transformers
            return TransformerBridge.boot_transformers(str(folder), hf_model=hf_model, tokenizer=tokenizer,
                                                       device=device or "cpu")  # reads the safetensors itself

        fingerprints = _Lazy(sorted(folders), lambda step: _file_digest(weights[step]))
        meta = {"source": str(run_dir), "fingerprints": fingerprints}
        return cls(sorted(folders), load, meta=meta)

    @classmethod
    def _from_hub_revisions(
        cls, model_name: str, revisions: Sequence[str], steps: Sequence[int] | None, **kwargs: Any
    ) -> CheckpointSeries:
        """`from_pretrained(model_name, revisions=...)`: one hub revision (branch, tag or commit) per step."""
        revisions = [str(r) for r in revisions]
        if steps is None:
            steps = [_revision_step(r) for r in revisions]
        elif len(steps) != len(revisions):
            raise SeriesError(f"Got {len(revisions)} revisions but {len(steps)} checkpoint_values; give one step "
                              f"per revision.")
        by_step = dict(zip((int(s) for s in steps), revisions))
        from transformer_lens.model_bridge import TransformerBridge

        def load(step: int) -> nn.Module:
            return TransformerBridge.boot_transformers(model_name, revision=by_step[step], **kwargs)

        meta = {"source": model_name, "revisions": by_step,
                "fingerprints": _Lazy(sorted(by_step), lambda step: _hub_commit(model_name, by_step[step]))}
        return cls(steps, load, meta=meta)


# --------------------------------------------------------------------------------------------------
def _builder(config: Any) -> Callable[[], nn.Module]:
    if isinstance(config, (ModelConfig, dict)):
        return lambda: build_model(config)
    kind = type(config).__name__
    if kind == "TransformerBridgeConfig":
        from transformer_lens.model_bridge import TransformerBridge

        return lambda: TransformerBridge.boot_native(config)
    if kind == "HookedTransformerConfig":
        from transformer_lens import HookedTransformer

        return lambda: HookedTransformer(config)
    raise TypeError(
        f"config must be a ModelConfig, a dict of its fields, or a TransformerLens config; got {kind}."
    )


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


# --------------------------------------------------------------------------------------------------
# Hugging Face sources


class _Lazy(Mapping):
    """A read-only dict whose values are computed when first read (hashes of large files, hub look-ups)."""

    def __init__(self, keys, compute: Callable[[Any], Any]):
        self._keys, self._compute = list(keys), functools.cache(compute)

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._compute(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of one saved transformers model, safetensors preferred; SeriesError if none."""
    if not (folder / "config.json").is_file():
        raise SeriesError(f"{folder} has no config.json: it is not a checkpoint saved by transformers.")
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            if single.endswith(".bin"):
                raise SeriesError(f"{folder} holds a sharded pytorch_model.bin; re-save it as safetensors "
                                  f"(model.save_pretrained(folder)) to load it here.")
            return [folder / s for s in shards]
    raise SeriesError(f"{folder} has no model.safetensors or pytorch_model.bin: the checkpoint's weights are "
                      f"missing. Remove the folder or save the model into it again.")


def _hf_model_from_bin(folder: Path, file: Path) -> nn.Module:
    """A transformers model from `pytorch_model.bin`, unpickled with `weights_only=True` only."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    if model_class is None:
        raise SeriesError(f"{folder}/config.json names no transformers model class in 'architectures' "
                          f"({config.architectures}); re-save the model with save_pretrained.")
    model, info = model_class.from_pretrained(None, config=config, state_dict=_read_torch(file),
                                              output_loading_info=True)
    if info["missing_keys"]:
        raise SeriesError(f"Checkpoint {file} lacks weights {sorted(info['missing_keys'])[:5]}; it is incomplete.")
    return model.eval()


def _hf_tokenizer(tokenizer: Any, folders: list[Path]) -> Any:
    """`tokenizer` as given, loaded from a name/path, or the first of `folders` that holds one."""
    if tokenizer is None:
        tokenizer = next((f for f in folders if (f / "tokenizer_config.json").is_file()), None)
        if tokenizer is None:
            raise SeriesError(f"No tokenizer saved in {folders[0]} or its checkpoints: pass tokenizer= (a "
                              f"transformers tokenizer or its name/path), or tokenizer.save_pretrained({folders[0]}).")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _file_digest(files: list[Path]) -> str:
    """sha256 of the files' contents, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(2**20):
                h.update(block)
    return h.hexdigest()[:16]


def _revision_step(revision: str) -> int:
    """The training step in a revision's name: Pythia's `step143000`, stanford-crfm's `checkpoint-400000`."""
    numbers = re.findall(r"\d+", revision)
    if not numbers:
        raise SeriesError(f"Cannot read a training step from revision {revision!r}: pass checkpoint_values=[...], "
                          f"one step per revision.")
    return int(numbers[-1])


def _hub_commit(model_name: str, revision: str) -> str:
    """The commit a hub revision resolves to (from the local cache when offline)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model_name, "config.json", revision=revision)).parent.name
