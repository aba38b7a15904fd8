"""Fault injection: retrained series, crashes between writes, damaged checkpoints and stores, concurrent
writers, full disks, read-only folders and bad options. Each case ends in a clear error or the right result,
with nothing lost."""

import codecs
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import tl_devinterp.files as files_module
import tl_devinterp.sampling.llc_series as llc_module
import tl_devinterp.training as training
from tl_devinterp.analysis import AnalysisConfig, analyze
from tl_devinterp.cli import main
from tl_devinterp.dynamics import essential_dynamics
from tl_devinterp.errors import FolderInUseError
from tl_devinterp.files import TMP_SUFFIX, atomic_write, file_sha256, folder_lock
from tl_devinterp.metrics import metrics_over_series
from tl_devinterp.sampling import llc_over_series
from tl_devinterp.series import CheckpointSeries, SeriesError, SeriesWarning
from tl_devinterp.store import REUSABLE, ResultStore, StoreWarning
from tl_devinterp.training import PRESETS, train

TINY = dict(n_steps=4, data={**PRESETS["quick"].data, "n_train": 200, "n_test": 32})  # 5 checkpoints, ~0.3 s
LLC = dict(num_chains=2, num_draws=3, num_burnin=1, batch_size=8)
FAST = dict(LLC, head_steps=0, n_test_seqs=16, n_probe_seqs=4, n_components=2, n_clusters=0)


def tiny_series(path, **kw):
    return train(path, "quick", progress=False, **{**TINY, **kw})


def tokens_of(series):
    return torch.randint(0, 32, (16, 32), generator=torch.Generator().manual_seed(0))


def weights(series):
    return {s: series.load(s).state_dict() for s in series.steps}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for step in a:
        assert all(torch.equal(a[step][k], b[step][k]) for k in a[step]), step


def cli(argv, capsys):
    """Exit status and stderr of `tl-devinterp argv`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


# --- 1. stale results ---------------------------------------------------------------------------------------
def test_a_retrained_series_never_gets_the_old_results(tmp_path):
    a, b = tiny_series(tmp_path / "a"), tiny_series(tmp_path / "b", seed=1)  # same steps, other weights
    tokens = tokens_of(a)
    first = llc_over_series(a, tokens, store_dir=tmp_path / "store", **LLC)
    with pytest.warns(StoreWarning, match="other weights; recomputing step 1"):  # step 0: same init, reused
        retrained = llc_over_series(b, tokens, store_dir=tmp_path / "store", **LLC)
    fresh = llc_over_series(b, tokens, **LLC)
    pd.testing.assert_frame_equal(retrained, fresh)  # B's own numbers, not A's
    assert not np.allclose(retrained.init_loss, first.init_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both series' entries are kept: A is read back, nothing recomputed
        pd.testing.assert_frame_equal(llc_over_series(a, tokens, store_dir=tmp_path / "store", **LLC), first)


def test_a_checkpoint_replaced_in_place_is_recomputed(tmp_path):
    """Same folder, same file names, new weights (a retrain with --overwrite): the store sees the new content."""
    series = tiny_series(tmp_path / "s")
    tokens = tokens_of(series)
    before = metrics_over_series(series, tokens=tokens, store_dir=tmp_path / "store", n_seqs=4, seq_len=16)
    series = tiny_series(tmp_path / "s", seed=1, overwrite=True)
    with pytest.warns(StoreWarning, match="other weights"):
        after = metrics_over_series(series, tokens=tokens, store_dir=tmp_path / "store", n_seqs=4, seq_len=16)
    assert not np.allclose(before.value, after.value)


def test_identical_checkpoints_at_different_steps_are_reported(tmp_path):
    series = tiny_series(tmp_path / "s")
    same = CheckpointSeries.from_models([series.load(0), series.load(0)], [0, 10])
    with pytest.warns(StoreWarning, match="steps 0 and 10 have identical weights"):
        metrics_over_series(same, tokens=tokens_of(series), store_dir=tmp_path / "store", n_seqs=4, seq_len=16)


@pytest.mark.slow
def test_analyze_into_a_folder_of_another_series_keeps_them_apart(tmp_path):
    a = tiny_series(tmp_path / "a")
    b = tiny_series(tmp_path / "b", seed=1)
    out = tmp_path / "out"
    first = analyze(a, out, progress=False, **FAST)
    with pytest.warns(StoreWarning, match="held the analysis of another series"):
        second = analyze(b, out, progress=False, **FAST)
    clean = analyze(b, tmp_path / "clean", progress=False, **FAST)
    pd.testing.assert_frame_equal(second.llc, clean.llc)  # never the old numbers
    pd.testing.assert_frame_equal(second.metrics, clean.metrics)
    pd.testing.assert_frame_equal(pd.read_csv(out / "previous-1" / "results" / "llc.csv"),  # A's results kept apart
                                  pd.read_csv(pd.io.common.StringIO(first.llc.to_csv(index=False))))
    assert (out / "previous-1" / "report.html").exists()


# --- 2. training: one atomic commit per checkpoint -----------------------------------------------------------
class Crash(BaseException):
    pass


def crash_after(monkeypatch, n):
    """Make the trainer's n-th write or removal (0-based) its last: the process 'dies' right after it."""
    count = [0]

    def counted(real):
        def f(*args, **kwargs):
            real(*args, **kwargs)
            count[0] += 1
            if count[0] > n:
                raise Crash
        return f

    monkeypatch.setattr(training, "atomic_write", counted(files_module.atomic_write))
    monkeypatch.setattr(training, "remove_file", counted(files_module.remove_file))
    return count


@pytest.mark.slow
def test_resume_is_exact_after_a_crash_between_any_two_writes(tmp_path, monkeypatch):
    """Equal sha256 of every checkpoint file (recorded and actual) means bit-identical weights."""
    reference = tiny_series(tmp_path / "ref")
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    n_events = crash_after(monkeypatch, 10**9)
    tiny_series(tmp_path / "count")
    total = n_events[0]
    # a fresh manifest; weights, optimizer, manifest per checkpoint; each superseded optimizer; the end
    assert total == 1 + 3 * len(reference) + (len(reference) - 1) + 2
    for n in range(total):
        d = tmp_path / f"crash{n}"
        crash_after(monkeypatch, n)
        with pytest.raises(Crash):
            tiny_series(d)
        monkeypatch.undo()
        resumed = tiny_series(d)
        assert all(file_sha256(d / f) == manifest["sha256"][s] for s, f in resumed.meta["checkpoints"].items())
        got = json.loads((d / "manifest.json").read_text())
        assert got["sha256"] == manifest["sha256"] and got["losses"] == manifest["losses"], n
        assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir()), n


def test_optimizer_state_from_a_later_step_is_never_used(tmp_path, monkeypatch):
    """The issue's case: a crash after the optimizer state of step k is written, before the manifest names it."""
    reference = weights(tiny_series(tmp_path / "ref"))
    crash_after(monkeypatch, 1 + 3 * 2 + 1 + 1)  # step 2's weights and optimizer written, manifest not
    with pytest.raises(Crash):
        tiny_series(tmp_path / "s")
    monkeypatch.undo()
    assert CheckpointSeries.from_dir(tmp_path / "s").steps == [0, 1]
    assert_same_weights(weights(tiny_series(tmp_path / "s")), reference)


# --- 3. --overwrite ------------------------------------------------------------------------------------------
def test_overwrite_removes_only_the_series_files(tmp_path):
    d = tmp_path / "s"
    tiny_series(d)
    (d / "notes.txt").write_text("my notes")
    (d / "plots").mkdir()
    with pytest.raises(SeriesError, match=r"did not write \(notes.txt, plots\)"):
        tiny_series(d, seed=1, overwrite=True)
    assert (d / "notes.txt").read_text() == "my notes" and len(CheckpointSeries.from_dir(d)) == 5  # untouched
    (d / "notes.txt").unlink()
    (d / "plots").rmdir()
    series = tiny_series(d, seed=1, overwrite=True)
    assert json.loads((d / "manifest.json").read_text())["seed"] == 1 and len(series) == 5


def test_a_failed_train_does_not_block_the_corrected_retry(tmp_path, monkeypatch):
    d = tmp_path / "s"
    with pytest.raises(ValueError, match="d_vocab"):  # checked before the folder is touched
        tiny_series(d, model=training.ModelConfig(**{**PRESETS["quick"].model.to_dict(), "d_vocab": 8}))
    assert not d.exists()
    crash_after(monkeypatch, 0)  # dies after writing the fresh manifest, before any checkpoint
    with pytest.raises(Crash):
        tiny_series(d, lr=1.0)
    monkeypatch.undo()
    assert len(tiny_series(d)) == 5  # another config, no --overwrite needed: nothing was saved


def test_training_options_are_checked_first(tmp_path):
    with pytest.raises(ValueError, match="'seed' option of TrainConfig must be >= 0"):
        tiny_series(tmp_path / "s", seed=-1)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['n_step'\] of TrainConfig"):
        tiny_series(tmp_path / "s", n_step=3)
    assert not (tmp_path / "s").exists()


# --- 4. damaged checkpoints and manifests ---------------------------------------------------------------------
@pytest.fixture()
def series_dir(tmp_path, quick_tiny_dir):
    d = tmp_path / "s"
    shutil.copytree(quick_tiny_dir, d)
    return d


@pytest.fixture(scope="module")
def quick_tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "s"
    tiny_series(d)
    return d


def edit_manifest(d, edit):
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_flipped_tensor_bytes_are_refused(series_dir):
    f = series_dir / "step_000000002.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # a byte of the last tensor's data; the file still parses
    f.write_bytes(bytes(data))
    series = CheckpointSeries.from_dir(series_dir)
    series.load(1)
    with pytest.raises(SeriesError, match=r"step_000000002.safetensors \(step 2\) is corrupt or was replaced"):
        series.load(2)


def test_swapped_and_duplicated_manifest_entries_are_refused(series_dir):
    original = (series_dir / "manifest.json").read_text()
    edit_manifest(series_dir, lambda m: m["checkpoints"].update({"1": m["checkpoints"]["2"], "2": m["checkpoints"]["1"]}))
    with pytest.raises(SeriesError, match="step 1 names step_000000002.safetensors.*swapped"):
        CheckpointSeries.from_dir(series_dir)
    # swapped consistently (files renamed too): the step stored inside each file tells
    (series_dir / "manifest.json").write_text(original)
    a, b = series_dir / "step_000000001.safetensors", series_dir / "step_000000002.safetensors"
    a.rename(series_dir / "tmp")
    b.rename(a)
    (series_dir / "tmp").rename(b)
    edit_manifest(series_dir, lambda m: m["sha256"].update({"1": m["sha256"]["2"], "2": m["sha256"]["1"]}))
    with pytest.raises(SeriesError, match="holds step 2 but its manifest lists it as step 1"):
        CheckpointSeries.from_dir(series_dir).load(1)
    (series_dir / "manifest.json").write_text(original.replace('"checkpoints": {', '"checkpoints": {"1": "x", ', 1))
    with pytest.raises(SeriesError, match=r"duplicate entries \['1'\]"):
        CheckpointSeries.from_dir(series_dir)
    (series_dir / "manifest.json").write_text(original)
    edit_manifest(series_dir, lambda m: m["checkpoints"].update({"3": "ckpt.safetensors", "4": "./ckpt.safetensors"}))
    with pytest.raises(SeriesError, match="one file for several steps"):
        CheckpointSeries.from_dir(series_dir)


def test_a_manifest_path_outside_the_folder_is_refused(series_dir, tmp_path):
    shutil.copy(series_dir / "step_000000001.safetensors", tmp_path / "outside.safetensors")
    edit_manifest(series_dir, lambda m: m["checkpoints"].update({"1": "../outside.safetensors"}))
    with pytest.raises(SeriesError, match="outside the series folder"):
        CheckpointSeries.from_dir(series_dir)


def test_a_list_shaped_or_odd_manifest_is_refused(series_dir):
    (series_dir / "manifest.json").write_text("[1, 2]")
    with pytest.raises(SeriesError, match="holds a JSON list"):
        CheckpointSeries.from_dir(series_dir)
    (series_dir / "manifest.json").write_text(json.dumps({"format": "tl_devinterp.series/1", "checkpoints": [1]}))
    with pytest.raises(SeriesError, match="'checkpoints' must map steps"):
        CheckpointSeries.from_dir(series_dir)


def test_a_nan_checkpoint_is_refused_naming_the_step(series_dir):
    f = series_dir / "step_000000003.safetensors"
    state = load_file(f)
    state["blocks.0.attn.q.weight"][0, 0] = float("nan")
    save_file(state, f, metadata={"step": "3"})
    edit_manifest(series_dir, lambda m: m["sha256"].pop("3"))
    series = CheckpointSeries.from_dir(series_dir)
    with pytest.raises(SeriesError, match=r"step 3 has NaN or inf weights \(blocks.0.attn.q.weight\)"):
        series.load(3)
    with pytest.raises(SeriesError, match="step 3"):
        llc_over_series(series, tokens_of(series), **LLC)


# --- 5. damaged store entries, concurrent writers ------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "cut", "record"])
def test_damaged_store_entries_are_named_and_recomputed(quick_tiny_dir, tmp_path, damage):
    series = CheckpointSeries.from_dir(quick_tiny_dir)
    kw = dict(tokens=tokens_of(series), store_dir=tmp_path, n_seqs=4, seq_len=16)
    first = metrics_over_series(series, **kw)
    csv = sorted(tmp_path.rglob("step_000000002-*.csv"))[0]
    if damage == "empty":
        csv.write_text("")
    elif damage == "cut":
        csv.write_text(csv.read_text()[: len(csv.read_text()) // 2])  # cut mid-row
    else:
        csv.with_suffix(".json").write_text("{")
    bad = csv if damage != "record" else csv.with_suffix(".json")
    with pytest.warns(StoreWarning, match=f"{bad.name} is damaged.*recomputing step 2"):
        again = metrics_over_series(series, **kw)
    pd.testing.assert_frame_equal(again, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics_over_series(series, **kw)  # repaired


def test_a_damaged_feature_array_is_recomputed(quick_tiny_dir, tmp_path):
    series = CheckpointSeries.from_dir(quick_tiny_dir)
    first = essential_dynamics(series, tokens_of(series), n_components=2, sigma=1.0, store_dir=tmp_path)
    npy = sorted(tmp_path.rglob("step_000000003-*.npy"))[0]
    npy.write_bytes(npy.read_bytes()[:-8])
    with pytest.warns(StoreWarning, match=f"{npy.name} is damaged"):
        again = essential_dynamics(series, tokens_of(series), n_components=2, sigma=1.0, store_dir=tmp_path)
    np.testing.assert_array_equal(again.scores, first.scores)


def test_two_writers_and_a_reader_never_see_a_partial_file(tmp_path):
    store, weights = ResultStore(tmp_path, "x", {}), "ab" * 8
    frame = pd.DataFrame({"value": np.arange(2000.0)})
    errors, reads = [], [0]

    def write():
        try:
            for _ in range(40):
                store.save(5, weights, frame)
        except Exception as e:  # noqa: BLE001 - any failure of a writer fails the test
            errors.append(e)

    def read():
        while any(t.is_alive() for t in writers):
            if store.status(5, weights) == REUSABLE:
                pd.testing.assert_frame_equal(store.load(5, weights), frame)
                reads[0] += 1

    writers = [threading.Thread(target=write) for _ in range(2)]
    for t in writers:
        t.start()
    read()
    for t in writers:
        t.join()
    assert not errors and reads[0] > 0
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))  # no temporary file left behind


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_leaves_no_file_under_its_name(tmp_path, monkeypatch, code):
    (tmp_path / "f.csv").write_text("old")

    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files_module.os, "fsync", full)
    with pytest.raises(OSError, match="f.csv") as e:
        atomic_write(tmp_path / "f.csv", "new")
    assert e.value.errno == code and (tmp_path / "f.csv").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.csv"]


def test_a_second_analyze_of_one_folder_is_refused(quick_tiny_dir, tmp_path, capsys):
    with folder_lock(tmp_path / "out", "analyze"):
        with pytest.raises(FolderInUseError, match=f"in use by tl_devinterp analyze \\(pid {os.getpid()}\\)"):
            analyze(quick_tiny_dir, tmp_path / "out", progress=False, **FAST)
        code, err = cli(["analyze", str(quick_tiny_dir), "--out", str(tmp_path / "out"), "--quiet"], capsys)
        assert code == 2 and "in use" in err


# --- 6. the command line: one line, exit 2 -------------------------------------------------------------------
def one_line_error(code, err, *patterns):
    assert code == 2 and err.count("\n") == 1 and err.startswith("tl-devinterp"), err
    for p in patterns:
        assert p in err, err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_cli_disk_full_and_unwritable_folder(tmp_path, monkeypatch, capsys, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]) if args else None)

    monkeypatch.setattr(files_module.tempfile, "mkstemp", lambda **kw: refuse(kw["dir"]))
    out = tmp_path / "s"
    status, err = cli(["train", "--preset", "quick", "--n-steps", "2", "--out", str(out)], capsys)
    one_line_error(status, err, "manifest.json", "no space left" if code == errno.ENOSPC else "writable folder")
    assert not (out / "manifest.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_read_only_output_folder(quick_tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        status, err = cli(["analyze", str(quick_tiny_dir), "--out", str(out), "--quiet"], capsys)
    finally:
        out.chmod(0o755)
    one_line_error(status, err, "writable folder")


def test_cli_errors_of_train(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    one_line_error(*cli(["train", "--preset", "quick", "--out", str(tmp_path)], capsys), "mine.txt")
    one_line_error(*cli(["train", "--preset", "quick", "--seed", "-1", "--out", str(tmp_path / "s")], capsys), "seed")


@pytest.mark.parametrize("args, pattern", [
    (["--seed", "-1"], "'seed' option of AnalysisConfig must be >= 0"),
    (["--n-components", "1"], "'n_components' option of AnalysisConfig must be >= 2"),
    (["--attention-heads", "l9h9"], "L9H9"),
    (["--num-chains", "1"], "'num_chains' option of SGLDConfig must be >= 2"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "device="),
    (["--device", "potato"], "not a torch device"),
])
def test_cli_analyze_options_are_checked_before_any_work(quick_tiny_dir, tmp_path, monkeypatch, capsys, args, pattern):
    calls = []
    monkeypatch.setattr(llc_module, "sample_llcs", lambda *a, **k: calls.append(1))
    one_line_error(*cli(["analyze", str(quick_tiny_dir), "--out", str(tmp_path / "out"), *args], capsys), pattern)
    assert not calls and not (tmp_path / "out").exists()


def test_cli_analyze_damaged_inputs(series_dir, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text('{"num_draws": 3,')
    one_line_error(*cli(["analyze", str(series_dir), "--out", str(tmp_path / "o"), "--config", str(config)], capsys),
                   "c.json", "cannot be parsed")
    config.write_text('{"num_draws": "3"}')
    one_line_error(*cli(["analyze", str(series_dir), "--out", str(tmp_path / "o"), "--config", str(config)], capsys),
                   "'num_draws' option of SGLDConfig must be an integer", "c.json")
    (series_dir / "manifest.json").write_text("[]")
    one_line_error(*cli(["analyze", str(series_dir), "--out", str(tmp_path / "o")], capsys), "manifest.json",
                   "JSON list")


def test_cli_divergence_names_the_checkpoint(quick_tiny_dir, tmp_path, capsys):
    status, err = cli(["analyze", str(quick_tiny_dir), "--out", str(tmp_path / "o"), "--quiet", "--epsilon", "1e6",
                       "--head-steps", "0", "--num-chains", "2", "--num-draws", "2"], capsys)
    one_line_error(status, err, "diverged", "Lower epsilon", "at checkpoint step ")


def test_wrong_types_name_the_option():
    with pytest.raises(TypeError, match=r"'attention_heads' option of AnalysisConfig must be a list of strings or None; got 'l0h0'.*\['l0h0'\]"):
        AnalysisConfig(attention_heads="l0h0")
    with pytest.raises(TypeError, match="'num_draws' option of SGLDConfig must be an integer; got 2.5"):
        AnalysisConfig.from_dict({"num_draws": 2.5})
    with pytest.raises(TypeError, match="'thresholds' option of AnalysisConfig must be a mapping"):
        AnalysisConfig.from_dict({"thresholds": {"induction": "high"}})
    assert AnalysisConfig.from_dict({"epsilon": 1}).sgld.epsilon == 1.0
    assert isinstance(AnalysisConfig.from_dict({"epsilon": 1}).sgld.epsilon, float)


def test_the_config_analyze_writes_reads_back(tmp_path):
    """`analyze --calibrate` writes its options and the calibration's choice to config.json (notebook 01 reads
    it back). Catches: `Unknown option(s) ['calibration']` on reading the file analyze wrote; the record read
    as an option (it changes nothing); a malformed record passed silently."""
    import dataclasses
    import json

    config = AnalysisConfig.from_dict({"calibrate": True, "num_draws": 7})
    record = dataclasses.asdict(config) | {"calibration": {"epsilon": 1e-4, "gamma": 30.0, "nbeta": 100.0}}
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert AnalysisConfig.from_file(tmp_path / "config.json") == config
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config) | {"calibration": None}))
    assert AnalysisConfig.from_file(tmp_path / "config.json") == config
    (tmp_path / "bad.json").write_text(json.dumps({"calibration": "fast"}))
    with pytest.raises(ValueError, match=r"^The 'calibration' entry of .*bad.json is the record analyze writes .* Remove it\.$"):
        AnalysisConfig.from_file(tmp_path / "bad.json")


# --- 7. series: one file per step, one architecture, every file verified before any work -----------------------
def test_two_files_for_one_step_are_refused_naming_both(quick_tiny_dir, tmp_path):
    """Catches: `model_050.pt` and `model_50.pt` (or `checkpoint-050/` and `checkpoint-50/`) silently reduced
    to one step 50, chosen by directory order."""
    series = CheckpointSeries.from_dir(quick_tiny_dir)
    for name in ("model_050.pt", "model_50.pt"):
        torch.save(series.load(1).state_dict(), tmp_path / name)
    with pytest.raises(SeriesError, match=r"model_050.pt and model_50.pt both hold step 50: remove or rename one"):
        CheckpointSeries.from_tl_save_dir(tmp_path, PRESETS["quick"].model)
    run = tmp_path / "run"
    for name in ("checkpoint-050", "checkpoint-50"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
        (run / name / "model.safetensors").write_bytes(b"")
    with pytest.raises(SeriesError, match=r"checkpoint-050 and checkpoint-50 both hold step 50"):
        CheckpointSeries.from_hf_checkpoints(run)


def test_models_of_other_configurations_are_not_one_series():
    """Catches: 2 heads of 16 and 4 heads of 8 in one width have equal tensor shapes and were accepted as one
    series, mixing per-head indexings."""
    from tl_devinterp.models import ModelConfig, build_model

    cfg = dict(n_layers=1, d_model=32, n_ctx=16, d_vocab=32)
    two, four = build_model(ModelConfig(n_heads=2, **cfg)), build_model(ModelConfig(n_heads=4, **cfg))
    with pytest.raises(SeriesError, match=r"step 10 has a different architecture.*n_heads: 2 vs 4.*one configuration"):
        CheckpointSeries.from_models([two, four], [0, 10])
    assert len(CheckpointSeries.from_models([two, build_model(ModelConfig(n_heads=2, seed=1, **cfg))], [0, 10])) == 2


def test_a_series_without_checksums_is_analysed_with_a_warning(series_dir, quick_tiny_dir):
    """Catches: a series from before checksums were recorded, with a flipped byte in a tensor, analysed in full
    with no word that nothing verified its weights."""
    edit_manifest(series_dir, lambda m: m.pop("sha256"))
    series = CheckpointSeries.from_dir(series_dir)
    with pytest.warns(SeriesWarning, match=r"manifest.json records no checksums for steps 0, 1, 2, 3, 4: nothing "
                                           r"verified their weights"):
        metrics_over_series(series, tokens=tokens_of(series), n_seqs=4, seq_len=16, progress=False)
    with warnings.catch_warnings():  # a series with its checksums: quiet
        warnings.simplefilter("error")
        CheckpointSeries.from_dir(quick_tiny_dir).verify()


@pytest.mark.parametrize("damage", ["flip", "header", "shape"])
def test_every_checkpoint_is_checked_before_the_first_estimate(series_dir, monkeypatch, damage):
    """Catches: a damaged last checkpoint found only when the run reaches it (minutes of estimates in), or not
    at all where its manifest records no checksum (a tensor of another shape, a cut header)."""
    f = series_dir / "step_000000004.safetensors"
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x40
        f.write_bytes(bytes(data))
        pattern = "step_000000004.safetensors \\(step 4\\) is corrupt or was replaced"
    else:
        edit_manifest(series_dir, lambda m: m["sha256"].pop("4"))
        if damage == "header":
            f.write_bytes(f.read_bytes()[:40])
            pattern = "step_000000004.safetensors is corrupt or unreadable"
        else:
            state = load_file(f)
            state["blocks.0.attn.q.weight"] = state["blocks.0.attn.q.weight"][:-1]
            save_file(state, f, metadata={"step": "4"})
            pattern = "step_000000004.safetensors does not match the series' architecture.*blocks.0.attn.q.weight"
    calls = []
    monkeypatch.setattr(llc_module, "sample_llcs", lambda *a, **k: calls.append(1))
    series = CheckpointSeries.from_dir(series_dir)
    with pytest.raises(SeriesError, match=pattern):
        llc_over_series(series, tokens_of(series), **LLC)
    with pytest.raises(SeriesError, match=pattern):
        analyze(series_dir, series_dir.parent / "out", progress=False, **FAST)
    assert not calls


def test_a_cut_trainer_checkpoint_is_found_before_the_first_estimate(hf_run, tmp_path, monkeypatch):
    """Catches: a transformers Trainer run whose last checkpoint's weights were cut (a full disk while it saved)
    found only when the run reaches it."""
    run = shutil.copytree(hf_run("gpt2"), tmp_path / "run")
    weights = run / "checkpoint-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    calls = []
    monkeypatch.setattr(llc_module, "sample_llcs", lambda *a, **k: calls.append(1))
    series = CheckpointSeries.from_hf_checkpoints(run)
    with pytest.raises(SeriesError, match="checkpoint-8/model.safetensors is corrupt or unreadable"):
        llc_over_series(series, tokens_of(series), **LLC)
    assert not calls


# --- 8. training: files it did not write, a second trainer, a run that explodes ------------------------------
def test_train_deletes_only_what_its_manifest_names(tmp_path, monkeypatch):
    """Catches: a resume or --overwrite deleting a user's `step_000000005.safetensors` or `.mybackup.tl-tmp`
    because the names look like the trainer's; while a crashed run's own uncommitted files still go."""
    d = tmp_path / "s"
    crash_after(monkeypatch, 1 + 3 * 2 + 1 + 1)  # step 2's weights and optimizer written, manifest not
    with pytest.raises(Crash):
        tiny_series(d)
    monkeypatch.undo()
    assert (d / "step_000000002.safetensors").exists()  # uncommitted, declared in the manifest's `writing`
    mine = {"step_000000005.safetensors": b"my weights", ".mybackup.tl-tmp": b"my backup"}
    for name, data in mine.items():
        (d / name).write_bytes(data)
    resumed = tiny_series(d)
    assert len(resumed) == 5 and all((d / n).read_bytes() == data for n, data in mine.items())
    assert not list(d.glob("optimizer_*")) and not list(d.glob(f".step_*{TMP_SUFFIX}"))
    with pytest.raises(SeriesError, match=r"did not write \(.mybackup.tl-tmp, step_000000005.safetensors\)"):
        tiny_series(d, seed=1, overwrite=True)
    assert all((d / n).read_bytes() == data for n, data in mine.items()) and len(CheckpointSeries.from_dir(d)) == 5


def test_a_second_trainer_on_one_folder_is_refused(tmp_path, capsys):
    """Catches: two trainers in one folder, the second's start deleting the first one's uncommitted writes."""
    d = tmp_path / "s"
    with folder_lock(d, "train"):
        with pytest.raises(FolderInUseError, match=f"in use by tl_devinterp train \\(pid {os.getpid()}\\)"):
            tiny_series(d)
        one_line_error(*cli(["train", "--preset", "quick", "--n-steps", "2", "--out", str(d)], capsys), "in use")
    assert not (d / "manifest.json").exists()
    assert len(tiny_series(d)) == 5  # free again


def test_training_that_explodes_stops_naming_the_step(tmp_path, capsys):
    """Catches: `train --lr 1e6` finishing normally with a test loss of 1e13 (3.7 at initialisation)."""
    d = tmp_path / "s"
    with pytest.raises(training.TrainingDivergedError, match=r"diverged at step 1: the test loss is .*e\+1\d, "
                       r"against 3.7\d at initialisation.*learning rate \(lr=1e\+06\).*--lr 100000.*steps 0\) are kept"):
        tiny_series(d, lr=1e6)
    assert CheckpointSeries.from_dir(d).steps == [0]  # the checkpoint before it is kept
    status, err = cli(["train", "--preset", "quick", "--n-steps", "4", "--lr", "1e6", "--out", str(tmp_path / "cli")],
                      capsys)
    one_line_error(status, err.splitlines(keepends=True)[-1], "diverged at step 1", "lr=1e+06")  # after the bar


# --- 9. text data: its encoding read, or refused --------------------------------------------------------------
def test_text_data_in_other_encodings_is_decoded_or_refused(tmp_path):
    """Catches: binary, Latin-1 and UTF-16 `--data` files decoded as UTF-8 with replacement characters (1,627
    U+FFFD and 13 NULs in one case) and tokenised as if they were text."""
    from tl_devinterp.data import text_files
    from tl_devinterp.errors import InvalidValueError

    text = "def f(x):\n    return x  # café, naïve, 数据\n"
    for name, data in {"utf8.txt": text.encode(), "bom8.txt": text.encode("utf-8-sig"),
                       "utf16.txt": text.encode("utf-16"), "utf16be.txt": codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
                       "utf32.txt": text.encode("utf-32"), "utf16le-nobom.txt": text[:-9].encode("utf-16-le")}.items():
        (tmp_path / name).write_bytes(data)
        assert text_files(tmp_path / name)["text"][0] in (text, text[:-9]), name
    (tmp_path / "latin1.txt").write_bytes("café naïve\n".encode("latin-1"))
    with pytest.raises(InvalidValueError, match=r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 3\).*iconv -f "
                                                r"latin1 -t utf-8 .*latin1.txt > latin1.utf8.txt"):
        text_files([tmp_path / "utf8.txt", tmp_path / "latin1.txt"])
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InvalidValueError, match="model.bin (holds binary data|is not UTF-8 text)"):
        text_files(tmp_path / "model.bin")
    (tmp_path / "nul.txt").write_bytes(b"text\x00with a NUL" * 3)
    with pytest.raises(InvalidValueError, match=r"nul.txt holds binary data \(3 NUL"):
        text_files(tmp_path / "nul.txt")


# --- 10. analyze killed (kill -9) anywhere: the rerun's outputs are byte-identical, or it is refused ----------
def published(out, staging=True):
    """Every file `analyze` leaves in `out` but its per-checkpoint store and lock: {relative path: bytes};
    `staging=False`: what a reader sees, without the outputs staged but not published yet."""
    skip = {"store"} | (set() if staging else {".tl_devinterp-staging"})
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] not in skip and p.name != files_module.LOCK}


def killed(pattern, n, *args, before=False, hold=None, **kwargs):
    """Run `analyze(*args, **kwargs)` in a forked child that dies by SIGKILL right after (or `before`) the n-th
    file whose path matches `pattern` lands (`os.replace`, which every write and publication goes through); with
    `hold` (a path) it waits there until that file exists, then goes on. Returns the child's pid and status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real, seen = os.replace, [0]

            def replace(src, dst, *a, **k):
                hit = re.search(pattern, str(dst)) is not None
                seen[0] += hit
                if hit and before and seen[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst, *a, **k)
                if hit and seen[0] == n:
                    if hold is None:
                        os.kill(os.getpid(), signal.SIGKILL)
                    (Path(hold).parent / "reached").touch()
                    while not Path(hold).exists():
                        time.sleep(0.05)

            os.replace = replace
            analyze(*args, progress=False, **kwargs)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - any failure of the child is its exit status
            os._exit(1)
    return pid


def died(pid):
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.slow
def test_analyze_killed_anywhere_resumes_byte_identical(quick_tiny_dir, tmp_path):
    """Catches: outputs cut or mixed by a kill -9 during the LLC, the metrics, essential dynamics, the staging
    or the publication of the outputs; a rerun with other settings killed midway leaving its settings
    (config.json) beside the old numbers; two `analyze` in one folder at once."""
    first, other = dict(FAST), dict(FAST, seed=1)
    staged = r"\.tl_devinterp-staging/"
    points = {"LLC": (r"store/llc-.*/step_\d+-\w+\.json$", 2), "metrics": (r"store/metrics-.*\.json$", 1),
              "essential dynamics": (r"store/ed-features-.*\.json$", 3), "staging": (staged + r"figures/", 1),
              "publication": (r"/out[^/]*/results/\w+\.csv$", 2)}
    # 1. two analyses at once: the second is refused, the first finishes as if alone (the reference)
    out = tmp_path / "out-first"
    pid = killed(points["LLC"][0], 1, quick_tiny_dir, out, hold=tmp_path / "go", **first)
    while not (tmp_path / "reached").exists():
        time.sleep(0.05)
    with pytest.raises(FolderInUseError, match="in use by tl_devinterp analyze"):
        analyze(quick_tiny_dir, out, progress=False, **other)
    (tmp_path / "go").touch()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    analyze(quick_tiny_dir, tmp_path / "out-other", progress=False, **other)
    reference = {"first": published(out), "other": published(tmp_path / "out-other")}
    assert reference["first"]["config.json"] != reference["other"]["config.json"]
    assert reference["first"]["results/llc.csv"] != reference["other"]["results/llc.csv"]

    def consistent(out):
        """config.json, where present, stands beside the outputs of its own settings, and nothing else."""
        now = published(out, staging=False)
        if "config.json" in now:
            assert now in (reference["first"], reference["other"]), sorted(now)

    # 2. an analysis killed at each point in turn (each run resuming the last); the last rerun completes it
    out = tmp_path / "out"
    for point, (pattern, n) in points.items():
        assert died(killed(pattern, n, quick_tiny_dir, out, **first)), point  # the kill point was reached
        consistent(out)
    assert "config.json" not in published(out)  # killed while publishing: no settings record meanwhile
    analyze(quick_tiny_dir, out, progress=False, **first)
    assert published(out) == reference["first"]
    # 3. a rerun with other settings killed midway, then finished
    for point in ("LLC", "staging", "publication"):
        pattern, n = points[point]
        assert died(killed(pattern, n, quick_tiny_dir, out, **other)), point
        consistent(out)
        if point != "publication":
            assert published(out, staging=False) == reference["first"], point  # old settings and numbers
    analyze(quick_tiny_dir, out, progress=False, **other)
    assert published(out) == reference["other"]


def test_new_settings_never_stand_beside_old_numbers(quick_tiny_dir, tmp_path):
    """Catches: `analyze` writing config.json at its start and the results at its end, so a rerun with new
    settings killed midway left the new settings beside the old numbers."""
    out = tmp_path / "out"
    analyze(quick_tiny_dir, out, progress=False, **FAST)
    before = published(out)
    assert died(killed(r"store/llc-.*\.json$", 1, quick_tiny_dir, out, **dict(FAST, seed=1, num_draws=4)))
    assert published(out, staging=False) == before  # config.json still records the settings of these numbers


@pytest.fixture()
def small_disk(tmp_path, monkeypatch):
    """`fill(leave)`: a folder on a real 4 MiB tmpfs (mounted when we may, as root) filled up to `leave` free
    bytes; where mounting is not allowed, writes of report.html fail with ENOSPC at their fsync instead."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0

    def fill(leave):
        if mounted:
            st = os.statvfs(disk)
            (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
        else:
            real = os.fsync

            def fsync(fd):
                if "report.html" in os.readlink(f"/proc/self/fd/{fd}"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real(fd)

            monkeypatch.setattr(os, "fsync", fsync)

    yield disk, fill
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_leaves_the_published_report_whole(quick_tiny_dir, small_disk, capsys):
    """Catches: report.html and the figures written with write_text / write_bytes: a full disk mid-write left a
    cut page where a complete one was (and half-staged outputs taking the space)."""
    disk, fill = small_disk
    out = disk / "out"
    analyze(quick_tiny_dir, out, progress=False, **FAST)
    before = published(out)
    pages = sum(-(-len(data) // 4096) for name, data in before.items() if name != "report.html")
    assert len(before["report.html"]) > 1 << 20  # the page needs far more than the 256 KiB of slack below
    fill(4096 * pages + (256 << 10))  # room for the staged results and figures, not for the page
    status, err = cli(["analyze", str(quick_tiny_dir), "--out", str(out), "--quiet", *(
        f"--{k.replace('_', '-')}={v}" for k, v in FAST.items())], capsys)
    one_line_error(status, err.splitlines(keepends=True)[-1], "no space left on the device writing",
                   "report.html", "free some space")
    assert published(out) == before  # nothing staged left behind, the published page whole
    assert not list(out.rglob(f"*{TMP_SUFFIX}"))
