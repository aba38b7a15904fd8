"""The cost of the LLC during training: a transformers Trainer run of a small GPT-2 (2 layers, 4 heads,
d_model 64, context 64, vocab 256; batch 16, CPU) with and without `LLCCallback`, measured in one run.

    python benchmarks/bench_llc_callback.py [--steps 200] [--every 50] [--threads 1]

Prints the wall time of both runs, the overhead (with / without), and one estimate's cost in training steps,
for the SGLD defaults (4 chains x (50 burn-in + 100 draws), batch 32) and for a light setting
(2 chains x (20 + 40)). The cost of an estimate is about chains x steps x (batch 32 / batch 16) forward+backward
passes, so it scales with those settings and not with the model's training length.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch


def run(steps: int, every: int | None, options: dict, out: str) -> tuple[float, list[dict]]:
    import datasets
    import transformers as tf

    from tl_devinterp import LLCCallback

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (steps * 16 + 256, 64), generator=g)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=256))
    args = tf.TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-3,
                                seed=0, report_to=[], logging_strategy="no", save_strategy="no", use_cpu=True,
                                disable_tqdm=True)
    train = ids[256:].tolist()
    trainer = tf.Trainer(model=model, args=args, data_collator=tf.default_data_collator,
                         train_dataset=datasets.Dataset.from_dict({"input_ids": train, "labels": train}))
    if every:
        trainer.add_callback(LLCCallback(ids[:256], every=every, **options).attach(trainer))
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, [h for h in trainer.state.log_history if "llc" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    warnings.filterwarnings("ignore")
    settings = {"defaults": {}, "light": dict(num_chains=2, num_burnin=20, num_draws=40)}
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = run(a.steps, None, {}, tmp)
        print(f"training alone: {a.steps} steps in {base:.1f} s ({1e3 * base / a.steps:.1f} ms/step)")
        for name, options in settings.items():
            took, logged = run(a.steps, a.every, options, tmp)
            per_estimate = (took - base) / len(logged)
            print(f"LLCCallback every {a.every} steps, {name} SGLD: {took:.1f} s, ratio with/without "
                  f"{took / base:.2f}; one estimate = {per_estimate / (base / a.steps):.0f} training steps "
                  f"({per_estimate:.1f} s); last llc {logged[-1]['llc']:.2f} +- {logged[-1]['llc_se']:.2f}")


if __name__ == "__main__":
    main()
