"""A checkpoint series: an ordered map training step -> model, loaded lazily one model at a time.

Sources: a directory our trainer wrote (safetensors + `manifest.json`), TransformerLens's own training
loop output (`model_{step}.pt` state dicts), models already in memory, TransformerLens pretrained
checkpoints (`checkpoint_index` / `checkpoint_value`) and hub revisions (both need a hub or its cache), and
a transformers `Trainer` output (`checkpoint-{N}/`). Nothing is unpickled: safetensors, or
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import (
    InvalidTypeError,
    InvalidValueError,
    MissingDependencyError,
    SeriesError,
    UnknownKeyError,
)
from .files import file_sha256, fingerprint
from .models import ModelConfig, build_model, tl_parameter_names
from .tasks import make_task

MANIFEST = "manifest.json"
FORMAT = "tl_devinterp.series/1"



class SeriesWarning(UserWarning):
    """A series' weights could not be verified (its source records no checksums)."""


class CheckpointSeries:
    """Ordered training steps, each loadable as a TransformerLens model.

    `series.load(step)` builds the model for that step from its source, so only the models a caller
    keeps are in memory. Iterating yields `(step, model)` in step order.
    """

    def __init__(self, steps: Sequence[int], loader: Callable[[int], nn.Module], *, meta: dict | None = None,
                 fingerprint: Callable[[int], str] | None = None, verify: Callable[[int], bool] | None = None):
        steps = [int(s) for s in steps]
        if not steps:
            raise SeriesError("The checkpoint series is empty: give at least one checkpoint.")
        if len(set(steps)) != len(steps):
            raise SeriesError(f"Duplicate steps in the series: {sorted(steps)}.")
        self.steps: list[int] = sorted(steps)
        self._loader = loader
        self._fingerprint = fingerprint
        self._verify = verify  # checks a step's file without loading it; True when a recorded checksum matched
        self._fingerprints: dict[int, str] = {}  # content hashes of loaded models, when no `fingerprint` is given
        self.meta: dict[str, Any] = meta or {}

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"CheckpointSeries({len(self)} checkpoints, steps {self.steps[0]}..{self.steps[-1]})"

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        for step in self.steps:
            yield step, self.load(step)

    def load(self, step: int) -> nn.Module:
        """The model at `step`; NaN or inf weights are refused, naming the step."""
        self._check_step(step)
        model = self._loader(step)
        params = dict(model.named_parameters())
        bad = [name for name, own in tl_parameter_names(model).items() if not torch.isfinite(params[own]).all()]
        if bad:
            raise SeriesError(
                f"The checkpoint at step {step} has NaN or inf weights ({', '.join(bad[:3])}): training diverged "
                f"there or the file is damaged. Leave the step out (series.subset(...)) or retrain from an earlier one."
            )
        if self._fingerprint is None and step not in self._fingerprints:
            self._fingerprints[step] = _state_fingerprint(model)
        model.eval()
        return model

    def fingerprint(self, step: int) -> str:
        """A hash of the checkpoint's contents: results are reused only for the weights they were computed for.

        The source's own (the sha256 recorded in a manifest, a file's hash) or a hash of the loaded model's
        tensors, taken when the step is loaded (here, if it was not loaded before; the model is not kept).
        """
        known = self.known_fingerprint(step)
        if known is not None:
            return known
        self.load(step)
        return self._fingerprints[step]

    def known_fingerprint(self, step: int) -> str | None:
        """The step's fingerprint without loading it: the source's own hash, or the hash taken when the step was
        loaded before; None otherwise (a loader of the caller's, not yet loaded: `fingerprint` loads it)."""
        self._check_step(step)
        return self._fingerprints.get(step) if self._fingerprint is None else self._fingerprint(step)

    def verify(self, steps: Sequence[int] | None = None) -> None:
        """Check every checkpoint's file before any work is spent on the series: its header, its tensors' names
        and shapes, the step stored in it and the checksum its manifest records. A damaged file is a
        SeriesError naming it, now rather than when a run reaches it; a `SeriesWarning` says which steps
        have no recorded checksum (nothing could verify their weights). Sources without files (models in
        memory, the hub) have nothing to check."""
        if self._verify is None:
            return
        unverified = [s for s in (self.steps if steps is None else steps) if not self._verify(s)]
        if unverified:
            where = getattr(self._verify, "source", "The series")
            warnings.warn(f"{where} records no checksums for steps {_steps_text(unverified)}: nothing verified their "
                          f"weights (a damaged tensor would go unnoticed). Retrain the series with this tl_devinterp, "
                          f"which records them.", SeriesWarning, stacklevel=2)

    def subset(self, steps: Sequence[int]) -> CheckpointSeries:
        """The same series restricted to `steps`."""
        for s in steps:
            self._check_step(s)
        sub = CheckpointSeries(steps, self._loader, meta=self.meta, fingerprint=self._fingerprint, verify=self._verify)
        sub._fingerprints = self._fingerprints
        return sub

    def _check_step(self, step: int) -> None:
        if step not in self.steps:
            raise UnknownKeyError(f"Step {step} is not in the series; available steps: {self.steps}.")

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
        manifest = read_manifest(manifest_file)
        try:
            config = ModelConfig.from_dict(manifest["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise SeriesError(f"{manifest_file}: bad or missing 'model_config' ({e}).") from e
        files = _checkpoint_files(path, manifest, manifest_file)
        recorded = manifest.get("sha256", {})  # absent in series written before checksums were recorded

        build = partial(make_task(manifest["data"]).build_model, config) if manifest.get("data") else partial(
            build_model, config)  # the task's model (a TL model, or e.g. the toy model of superposition)
        return cls(sorted(files), partial(_load_checked, build, files, recorded), meta=manifest,
                   fingerprint=partial(_recorded_hash, files, recorded),
                   verify=_FileCheck(build, _safetensors_header, files, recorded, manifest_file))

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
        files = _one_per_step(path, r"model_(\d+)\.pt")
        if not files:
            raise SeriesError(f"No model_{{step}}.pt files in {path}: the series is empty.")
        return cls(sorted(files), partial(_load_file, _builder(config), _read_torch, files), meta={"source": str(path)},
                   fingerprint=partial(_files_hash, {step: [file] for step, file in files.items()}),
                   verify=_FileCheck(_builder(config), _torch_header, files, None, path))

    @classmethod
    def from_models(cls, models: Sequence[nn.Module], steps: Sequence[int]) -> CheckpointSeries:
        """Models already in memory, with the training step of each: TransformerLens models, or any torch
        module (e.g. `tasks.tms.TMS`), whose LLCs, stages and essential dynamics need only its loss."""
        models, steps = list(models), [int(s) for s in steps]
        if len(models) != len(steps):
            raise SeriesError(f"Got {len(models)} models but {len(steps)} steps; give one step per model.")
        for m in models:
            if not isinstance(m, nn.Module):
                raise InvalidTypeError(f"from_models takes torch modules (TransformerLens models, or any module with a "
                                       f"loss, e.g. tasks.tms.TMS); got a {type(m).__name__}.")
        shapes, configs = [_shapes(m) for m in models], [_architecture(m) for m in models]
        for s, sh, cfg in zip(steps[1:], shapes[1:], configs[1:]):
            differ = _shape_diff(shapes[0], sh) if sh != shapes[0] else ", ".join(
                f"{k}: {configs[0][k]} vs {cfg[k]}" for k in cfg if cfg[k] != configs[0][k])
            if differ:  # equal shapes can hide other head counts (2 heads of 16 vs 4 of 8 in one width)
                raise SeriesError(
                    f"The model at step {s} has a different architecture from the one at step {steps[0]} "
                    f"({differ}); a series holds one architecture: pass models of one configuration."
                )
        models = _InMemory(dict(zip(steps, models)))
        return cls(steps, models, fingerprint=models.fingerprint)  # hashed on each call: a model in memory may change

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
            raise InvalidValueError("Give checkpoint_indices or checkpoint_values, not both.")
        if revisions is not None:
            if checkpoint_indices is not None:
                raise InvalidValueError("Give revisions (with checkpoint_values as their steps) or checkpoint_indices, "
                                        "not both.")
            return cls._from_hub_revisions(model_name, revisions, checkpoint_values, **kwargs)
        labels = _checkpoint_labels(model_name)
        if checkpoint_values is None:
            idx = range(len(labels)) if checkpoint_indices is None else checkpoint_indices
            checkpoint_values = [labels[i] for i in idx]
        unknown = [v for v in checkpoint_values if v not in labels]
        if unknown:
            raise SeriesError(f"{model_name} has no checkpoints {unknown}; available: {labels}.")

        return cls(checkpoint_values, partial(_load_pretrained, model_name, **kwargs), meta={"source": model_name})

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
        loaded on `device` (default CPU). `series.fingerprint(step)` is the sha256 of that step's weight
        files (all shards), computed when first asked for.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise SeriesError(f"{run_dir} is not a directory; give the output_dir of a transformers Trainer run.")
        folders = _one_per_step(run_dir, r"checkpoint-(\d+)", folders=True)
        if not folders:
            raise SeriesError(f"No checkpoint-{{N}} folders in {run_dir}: it is not a Trainer output_dir (save "
                              f"checkpoints with TrainingArguments(save_strategy='steps', save_steps=...)).")
        weights = {step: _hf_weight_files(folder) for step, folder in folders.items()}
        tokenizer = _hf_tokenizer(tokenizer, [run_dir, *(folders[s] for s in sorted(folders, reverse=True))])
        return cls(sorted(folders), partial(_boot_hf_checkpoint, folders, weights, tokenizer, device),
                   meta={"source": str(run_dir)}, fingerprint=partial(_files_hash, weights),
                   verify=partial(_check_headers, weights))

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
        return cls(steps, partial(_boot_revision, model_name, by_step, kwargs),
                   meta={"source": model_name, "revisions": by_step}, fingerprint=partial(_hub_commit_at, model_name, by_step))


# --------------------------------------------------------------------------------------------------
def _one_per_step(folder: Path, pattern: str, *, folders: bool = False) -> dict[int, Path]:
    """step -> the entry of `folder` whose name matches `pattern` (its group: the step); two names of one step
    (`model_050.pt` beside `model_50.pt`) are refused, naming both, rather than one chosen by directory order."""
    found: dict[int, Path] = {}
    for f in sorted(folder.iterdir()):
        m = re.fullmatch(pattern, f.name)
        if m and f.is_dir() == folders:
            step = int(m.group(1))
            if step in found:
                raise SeriesError(f"{found[step]} and {f.name} both hold step {step}: remove or rename one of them "
                                  f"(a step has one checkpoint).")
            found[step] = f
    return found


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
    raise InvalidTypeError(
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

    def fingerprint(self, step: int) -> str:
        return _state_fingerprint(self.models[step])

    def __reduce__(self):
        try:
            import cloudpickle
        except ImportError:
            raise MissingDependencyError("Shipping in-memory models to workers needs cloudpickle (pip install "
                                         "'tl_devinterp[dask]'), or save them and use CheckpointSeries.from_dir.") from None
        return _unpickle_models, (cloudpickle.dumps(self.models),)


def _unpickle_models(blob: bytes) -> _InMemory:
    import pickle

    return _InMemory(pickle.loads(blob))


def _load_checked(build: Callable[[], nn.Module], files: dict[int, Path], recorded: dict[str, str],
                  step: int) -> nn.Module:
    """A step of a series we wrote, its file checked against the recorded sha256 and the step stored in it."""
    model = build()
    _load_state(model, load_checkpoint_state(files[step], sha256=recorded.get(str(step)), step=step), files[step])
    return model


def _recorded_hash(files: dict[int, Path], recorded: dict[str, str], step: int) -> str:
    return recorded.get(str(step)) or file_sha256(files[step])


def _files_hash(files: dict[int, list[Path]], step: int) -> str:
    """The sha256 of a step's weight files (all shards), each hashed once per process."""
    if len(files[step]) == 1:
        return file_sha256(files[step][0])
    return hashlib.sha256("".join(file_sha256(f) for f in files[step]).encode()).hexdigest()


def read_manifest(file: Path) -> dict[str, Any]:
    """A series manifest as a dict, refusing damage: invalid JSON, duplicate keys, another shape or format."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise InvalidValueError(f"duplicate entries {repeated}")
        return dict(pairs)

    try:
        manifest = json.loads(file.read_text(), object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        what = f"is not valid JSON ({e})" if isinstance(e, json.JSONDecodeError) else f"is damaged ({e})"
        raise SeriesError(f"{file} {what}: restore it, or retrain the series.") from e
    if not isinstance(manifest, dict):
        raise SeriesError(f"{file} holds a JSON {type(manifest).__name__}, not the object of a series manifest: "
                          f"restore it, or retrain the series.")
    if manifest.get("format") != FORMAT:
        raise SeriesError(f"{file} has format {manifest.get('format')!r}; expected {FORMAT!r}.")
    for key in ("checkpoints", "sha256"):
        if not isinstance(manifest.get(key, {}), dict):
            raise SeriesError(f"{file}: {key!r} must map steps to {'file names' if key == 'checkpoints' else 'sha256'} "
                              f"(got a {type(manifest[key]).__name__}); restore the manifest.")
    return manifest


def _checkpoint_files(path: Path, manifest: dict[str, Any], manifest_file: Path) -> dict[int, Path]:
    """step -> checkpoint file, each inside the series folder, present, and listed once under its own step."""
    files: dict[int, Path] = {}
    for key, name in manifest.get("checkpoints", {}).items():
        if not re.fullmatch(r"\d+", key) or not isinstance(name, str):
            raise SeriesError(f"{manifest_file}: bad checkpoint entry {key!r}: {name!r}; entries map a step to a "
                              f"file name in the folder. Restore the manifest.")
        step, file = int(key), path / name
        if path.resolve() not in file.resolve().parents:
            raise SeriesError(f"{manifest_file}: step {step}'s checkpoint {name!r} lies outside the series folder "
                              f"{path}; a manifest names files inside its folder. Fix the entry.")
        own = re.fullmatch(r"step_(\d+)\.safetensors", file.name)
        if own and int(own.group(1)) != step:
            raise SeriesError(f"{manifest_file}: step {step} names {name}, the file of step {int(own.group(1))}: "
                              f"entries are swapped or edited. Restore the manifest.")
        files[step] = file
    if not files:
        raise SeriesError(f"{manifest_file} lists no checkpoints: the series is empty.")
    by_file: dict[Path, list[int]] = {}
    for step, file in files.items():
        by_file.setdefault(file.resolve(), []).append(step)
    shared = {str(f): s for f, s in by_file.items() if len(s) > 1}
    if shared:
        raise SeriesError(f"{manifest_file} lists one file for several steps ({shared}): entries are duplicated. "
                          f"Restore the manifest.")
    absent = [str(f) for f in files.values() if not f.exists()]
    if absent:
        raise SeriesError(
            f"The manifest {manifest_file} lists checkpoints whose files are missing: {absent}. "
            f"Restore them, or remove their entries from the manifest."
        )
    return files


def load_checkpoint_state(file: Path, *, sha256: str | None = None, step: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors checkpoint, checked against the sha256 and the step its manifest records."""
    _check_sha256(file, sha256, step)
    return _read_safetensors(file, step, lambda f, k: f.get_tensor(k))


def _check_sha256(file: Path, sha256: str | None, step: int | None) -> None:
    if sha256 is not None and file_sha256(file) != sha256:
        raise SeriesError(f"Checkpoint {file} (step {step}) is corrupt or was replaced: its sha256 differs from "
                          f"the one its manifest records. Restore it, or retrain the series.")


def _read_safetensors(file: Path, step: int | None, read: Callable[[Any, str], Any]) -> dict[str, Any]:
    """`read(f, name)` of each tensor of a safetensors file, checking the step stored in its header."""
    try:
        with safe_open(str(file), framework="pt") as f:
            saved = (f.metadata() or {}).get("step")
            state = {k: read(f, k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError, ValueError) as e:
        raise SeriesError(f"Checkpoint {file} is corrupt or unreadable ({e}). Re-save or remove it.") from e
    if step is not None and saved is not None and saved != str(step):
        raise SeriesError(f"Checkpoint {file} holds step {saved} but its manifest lists it as step {step}: entries "
                          f"are swapped or edited. Restore the manifest.")
    return state


def _safetensors_header(file: Path, step: int) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes from a safetensors header (no tensor data is read)."""
    return _read_safetensors(file, step, lambda f, k: tuple(f.get_slice(k).get_shape()))


def _torch_header(file: Path, step: int) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes of a `torch.save`d state dict, memory-mapped (read weights-only, data not read)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file mmap can map: _read_torch says why
        state = _read_torch(file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SeriesError(f"Checkpoint {file} is not a state dict of tensors (got {type(state).__name__}).")
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_headers(files: dict[int, list[Path]], step: int) -> bool:
    """`series.verify`'s check of a Trainer checkpoint: each weight file's header reads (a cut or damaged file
    is named now); transformers checks the shapes against config.json when it boots the model."""
    for file in files[step]:
        (_safetensors_header if file.suffix == ".safetensors" else _torch_header)(file, step)
    return True  # a Trainer records no checksums: nothing to warn about


class _FileCheck:
    """`series.verify`'s check of one step's file: its recorded sha256 (when there is one), its header, and its
    tensors' names and shapes against the series' architecture (built once, then only its shapes are kept)."""

    def __init__(self, build: Callable[[], nn.Module], header: Callable[[Path, int], dict], files: dict[int, Path],
                 recorded: dict[str, str] | None, source: Path):
        self.build, self.header, self.files, self.recorded, self.source = build, header, files, recorded, source
        self.expected: tuple[dict[str, tuple[int, ...]], set[str]] | None = None

    def __call__(self, step: int) -> bool:
        """Whether the file was checked against a recorded checksum (always, for sources that record none:
        `recorded` None); a SeriesError naming it when it is damaged."""
        file, sha256 = self.files[step], (self.recorded or {}).get(str(step))
        _check_sha256(file, sha256, step)
        shapes = self.header(file, step)
        if not any(".W_Q" in k or k == "embed.W_E" for k in shapes):  # HookedTransformer layout: checked on load
            if self.expected is None:
                model = self.build()
                self.expected = _shapes(model), set(tl_parameter_names(model))
            _check_shapes(shapes, *self.expected, file)
        return sha256 is not None or self.recorded is None


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
    _check_shapes({k: tuple(v.shape) for k, v in state.items()}, _shapes(model), set(tl_parameter_names(model)), file)
    model.load_state_dict(state, strict=False)


def _check_shapes(shapes: dict[str, tuple[int, ...]], own: dict[str, tuple[int, ...]], required: set[str],
                  file: Path) -> None:
    """A SeriesError naming `file` when its tensors do not fit the model (`own` shapes, `required` names)."""
    missing = sorted(required - set(shapes))  # buffers (masks, zero biases) may be absent
    unexpected = sorted(set(shapes) - set(own))
    wrong = [f"{k}: file {shapes[k]} vs model {own[k]}" for k in own if k in shapes and shapes[k] != own[k]]
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


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:8])) + (f", ... ({len(steps)} in all)" if len(steps) > 8 else "")


def _state_fingerprint(model: nn.Module) -> str:
    """A hash of a model's tensors in name order."""
    state = model.state_dict()
    return fingerprint(*(state[k] for k in sorted(state)))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


_ARCHITECTURE = ("n_layers", "n_heads", "d_head", "d_model", "d_mlp", "d_vocab", "n_ctx", "n_key_value_heads",
                 "attn_only", "normalization_type", "act_fn", "positional_embedding_type", "rotary_dim",
                 "parallel_attn_mlp", "gated_mlp")


def _architecture(model: nn.Module) -> dict[str, Any]:
    """The configuration fields that fix how a model's tensors are indexed (heads, layers, widths)."""
    cfg = getattr(model, "cfg", None)
    return {k: getattr(cfg, k, None) for k in _ARCHITECTURE}


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


def _boot_hf_checkpoint(folders: dict[int, Path], weights: dict[int, list[Path]], tokenizer: Any,
                        device: str | torch.device | None, step: int) -> nn.Module:
    """A Trainer checkpoint booted fresh (transformers reads its safetensors; a .bin is read weights-only)."""
    from transformer_lens.model_bridge import TransformerBridge

    folder, files = folders[step], weights[step]
    hf_model = _hf_model_from_bin(folder, files[0]) if files[0].suffix == ".bin" else None
    return TransformerBridge.boot_transformers(str(folder), hf_model=hf_model, tokenizer=tokenizer, device=device or "cpu")


def _boot_revision(model_name: str, by_step: dict[int, str], kwargs: dict[str, Any], step: int) -> nn.Module:
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(model_name, revision=by_step[step], **kwargs)


def _hub_commit_at(model_name: str, by_step: dict[int, str], step: int) -> str:
    return _hub_commit(model_name, by_step[step])
