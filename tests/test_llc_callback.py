"""LLC during training: `LLCCallback` in a real transformers Trainer run, and `train(..., llc_every=N)`."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SGLD = dict(num_chains=2, num_draws=4, num_burnin=1, batch_size=8, epsilon=1e-4, gamma=1000.0)


def _trainer_run(out: Path, callback_options: dict | None):
    """A CPU Trainer run of a tiny GPT-2 on random tokens (6 steps, loss logged every step, TensorBoard on),
    with an LLCCallback every 2 steps if `callback_options` is given; returns (trainer, final weights)."""
    import datasets
    import transformers as tf
    from hf_models import VOCAB, hf_model

    from tl_devinterp import LLCCallback

    ids = torch.randint(2, VOCAB, (48, 16), generator=torch.Generator().manual_seed(0))
    args = tf.TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2, seed=0,
        report_to=["tensorboard"], logging_steps=1, save_strategy="no",
        use_cpu=True, disable_tqdm=True)
    model = hf_model("gpt2")  # with GPT-2's dropout 0.1: training draws from the global RNG
    trainer = tf.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(
        {"input_ids": ids[:32].tolist(), "labels": ids[:32].tolist()}), data_collator=tf.default_data_collator)
    if callback_options is not None:
        trainer.add_callback(LLCCallback(ids[32:], every=2, **callback_options).attach(trainer))
    trainer.train()
    return trainer, {k: v.clone() for k, v in model.state_dict().items()}


def test_llc_callback_logs_without_touching_training(tmp_path):
    """Catches: the callback changing training (weights moved by sampling, dropout or data-order RNG drawn,
    .grad or the optimizer touched, the step's own loss log swallowed by the callback's), estimates missing from the log history or the TensorBoard file, refined
    LLCs of chosen parameter sets not logged under their own keys."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, w_plain = _trainer_run(tmp_path / "plain", None)
    with_llc, w_llc = _trainer_run(tmp_path / "llc", dict(restrict=["transformer.h.1.attn.*"], **SGLD))
    loss = lambda t: [(h["step"], h["loss"]) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert loss(plain) == loss(with_llc) and len(loss(plain)) == 6
    assert all(torch.equal(w_plain[k], w_llc[k]) for k in w_plain)
    llcs = [h for h in with_llc.state.log_history if "llc" in h]
    assert [h["step"] for h in llcs] == [2, 4, 6]
    assert all(h["llc_se"] > 0 and "llc/transformer.h.1.attn.*" in h for h in llcs)
    events = EventAccumulator(str(next((tmp_path / "llc").rglob("events.out.tfevents.*")).parent)).Reload()
    assert [e.step for e in events.Scalars("train/llc")] == [2, 4, 6]


def test_llc_callback_needs_its_trainer():
    """Catches: an unattached callback failing deep inside the Trainer with an unrelated error."""
    from tl_devinterp import LLCCallback

    cb = LLCCallback(torch.zeros(8, 4, dtype=torch.long), every=1)
    with pytest.raises(ValueError, match="attach"):
        cb.on_step_end(None, type("S", (), {"global_step": 1})(), type("C", (), {})(), model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        LLCCallback(torch.zeros(8, 4), every=0)


def test_train_llc_every_keeps_the_run(tmp_path):
    """Catches: `train(llc_every=N)` changing the run (the checkpoints' hashes) or not recording the estimates
    at every N-th step; a bad N accepted."""
    from tl_devinterp import train

    plain = train(tmp_path / "plain", "quick", n_steps=12, progress=False)
    with_llc = train(tmp_path / "llc", "quick", n_steps=12, progress=False, llc_every=5, llc_options=SGLD)
    assert plain.meta["sha256"] == with_llc.meta["sha256"] and plain.meta["losses"] == with_llc.meta["losses"]
    estimates = with_llc.meta["llc_during_training"]
    assert sorted(estimates, key=int) == ["5", "10"] and all(e["llc_se"] > 0 for e in estimates.values())
    with pytest.raises(ValueError, match="llc_every must be an integer >= 0"):
        train(tmp_path / "bad", "quick", llc_every=-1)


def test_missing_logger_names_the_extra(monkeypatch):
    """Catches: a Trainer reporting to W&B/TensorBoard without the package failing later with a raw import
    error instead of the extra to install."""
    import importlib.util

    from tl_devinterp import LLCCallback

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    trainer = type("T", (), {"args": type("A", (), {"report_to": ["wandb"]})()})()
    with pytest.raises(ImportError, match=r"pip install 'tl_devinterp\[wandb\]'"):
        LLCCallback(torch.zeros(8, 4, dtype=torch.long), every=1).attach(trainer)
