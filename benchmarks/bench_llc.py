"""Benchmark the LLC engine on a 2-layer attention-only model, against a bare training loop and devinterp 2.0.1.

Run in the benchmark venv (devinterp is not a dependency of the library):

    python3 -m venv /tmp/venv-bench && /tmp/venv-bench/bin/pip install torch==2.13.0 \
        && /tmp/venv-bench/bin/pip install -e '.[bench]'
    /tmp/venv-bench/bin/python benchmarks/bench_llc.py [--repeats 4] [--threads 1]

Measured in one run, with the same model, data, hyperparameters and step counts for both libraries
(no burn-in: devinterp 2.0.1 averages every step, burn-in included):
  (a) our wall time per chain-step / a bare forward+backward loop on the same batches, on a full-model run
      of 4 chains x 200 draws (target <= 1.10), and on all per-head LLCs (8 heads x 4 chains, stacked per
      layer, layer 1's from the cached residual stream; target <= 0.45)
  (b) devinterp / ours wall time for one full-model LLC (target >= 1.0) and for all per-head LLCs
      (target >= 1.2); the standard error of the estimates at equal steps, measured as the spread over
      repeats with different seeds (chains share batches in both libraries, so the std across chains
      misses batch noise); the time to equal precision, time × SE², for per-head values (target >= 2);
      and whether both libraries' means agree within 3 combined standard errors.
Timings are medians over repeats. On a shared machine, absolute times move; ratios much less.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

from tl_devinterp.data import repeated_random_tokens
from tl_devinterp.models import ModelConfig, build_model, clone_model, head_masks
from tl_devinterp.sampling import default_nbeta, estimate_head_llcs, estimate_llc
from tl_devinterp.sampling.batches import batch_stream
from tl_devinterp.sampling.objective import lm_loss


class Copyable(nn.Module):
    """A bridge that devinterp can deep-copy (a bridge cannot be deep-copied after a forward pass)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, tokens):
        return self.inner(tokens)

    def named_parameters(self, *args, **kwargs):  # the bridge's own names, stable across copies
        for name, p in self.inner.named_parameters():
            yield "inner." + name, p

    def __deepcopy__(self, memo):
        return Copyable(clone_model(self.inner))


def trained_model(cfg: ModelConfig, tokens: torch.Tensor, steps: int) -> nn.Module:
    """A briefly trained model, so the LLC is measured near a minimum as in practice."""
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for (_, batch), _ in zip(batch_stream(tokens, 32, 0, None), range(steps), strict=False):
        opt.zero_grad()
        lm_loss(model, batch).backward()
        opt.step()
    return model


def step_overhead(model, tokens, hp, draws: int, repeats: int, heads: list | None = None) -> tuple[list[float], list[float]]:
    """Per chain-step (wall, CPU) time ratios of a full-model `estimate_llc` (or of `estimate_head_llcs` of
    `heads`, per head) over a bare forward+backward loop on the same batches, alternating the two, one pair
    per repeat."""
    bare_model = clone_model(model)
    stream = batch_stream(tokens, hp["batch_size"], 0, None)
    batches = [next(stream)[1] for _ in range(draws)]  # what estimate_llc(seed=0) visits
    run = dict(hp, num_draws=draws, num_burnin=0, seed=0, progress=False)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(hp["num_chains"]):
            for batch in batches:
                bare_model.zero_grad()
                lm_loss(bare_model, batch).backward()
        w1, c1 = time.perf_counter(), time.process_time()
        if heads is None:
            estimate_llc(model, tokens, **run)
        else:
            estimate_head_llcs(model, tokens, heads=heads, **run)
        w2, c2 = time.perf_counter(), time.process_time()
        per = 1 if heads is None else len(heads)
        wall.append((w2 - w1) / (w1 - w0) / per)
        cpu.append((c2 - c1) / (c1 - c0) / per)
    return wall, cpu


def devinterp_llc(model, dataset, hp, seed, masks=None) -> tuple[float, float]:
    from devinterp.slt.llc import llc

    wrapped = Copyable(clone_model(model))
    masks = None if masks is None else {"inner." + k: v for k, v in masks.items()}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = llc(
            wrapped, dataset, {}, lr=hp["epsilon"], n_beta=hp["nbeta"], localization=hp["gamma"],
            num_chains=hp["num_chains"], num_draws=hp["num_draws"], batch_size=hp["batch_size"],
            num_burnin_steps=0, init_seed=seed, param_masks=masks, device="cpu",
            output_path=tempfile.mkdtemp() + "/samples.zarr",
        )
    return float(out.llc_mean), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draws", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from datasets import Dataset

    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, d_vocab=64, attn_only=True)
    tokens = repeated_random_tokens(512, 10, cfg.d_vocab)
    model = trained_model(cfg, tokens, steps=200)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    hp = dict(epsilon=1e-3, gamma=200.0, nbeta=default_nbeta(32), num_chains=4, num_draws=args.draws, batch_size=32)
    ours_hp = dict(hp, num_burnin=0)
    heads = [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    print(f"model {cfg.n_layers}L x {cfg.n_heads}H attn-only d_model={cfg.d_model}; batch {hp['batch_size']} x "
          f"{tokens.shape[1]} tokens; {hp['num_chains']} chains x {hp['num_draws']} draws; {args.threads} thread(s); "
          f"{args.repeats} repeats")

    # (a) per chain-step cost, on a full-model run of the papers' length (200 draws) and on all heads
    print(f"load average before: {os.getloadavg()}", flush=True)
    wall_ratios, cpu_ratios = step_overhead(model, tokens, hp, draws=200, repeats=args.repeats)
    head_wall, head_cpu = step_overhead(model, tokens, hp, draws=100, repeats=args.repeats, heads=heads)
    ours_full_t, dev_full_t, ours_heads_t, dev_heads_t = [], [], [], []
    ours_full, dev_full, ours_heads, dev_heads = [], [], [], []
    for rep in range(args.repeats):
        start = time.perf_counter()
        ours_full.append(estimate_llc(model, tokens, seed=rep, progress=False, **ours_hp).mean)
        ours_full_t.append(time.perf_counter() - start)
        est, t = devinterp_llc(model, dataset, hp, seed=1000 * (rep + 1))
        dev_full.append(est)
        dev_full_t.append(t)

        start = time.perf_counter()
        ours_heads.append(estimate_head_llcs(model, tokens, seed=rep, progress=False, **ours_hp).llc_mean.to_numpy())
        ours_heads_t.append(time.perf_counter() - start)
        row, total = [], 0.0
        for layer, h in heads:
            est, t = devinterp_llc(model, dataset, hp, seed=1000 * (rep + 1), masks=head_masks(model, layer, h))
            row.append(est)
            total += t
        dev_heads.append(np.array(row))
        dev_heads_t.append(total)
        print(f"  repeat {rep}: ours full {ours_full_t[-1]:.1f}s heads {ours_heads_t[-1]:.1f}s | "
              f"devinterp full {dev_full_t[-1]:.1f}s heads {dev_heads_t[-1]:.1f}s", flush=True)

    start = time.perf_counter()  # our heads one by one, once: what sharing the pass saves
    for layer, h in heads:
        estimate_llc(model, tokens, restrict=(layer, h), seed=0, progress=False, **ours_hp)
    one_by_one_t = time.perf_counter() - start

    med = statistics.median
    R = args.repeats
    step_ratio = med(wall_ratios)
    full_speed = med(dev_full_t) / med(ours_full_t)
    heads_speed = med(dev_heads_t) / med(ours_heads_t)
    se_full = (np.std(ours_full, ddof=1), np.std(dev_full, ddof=1))  # SE of one estimate: spread over seeds
    oh, dh = np.stack(ours_heads), np.stack(dev_heads)  # [repeats, heads]
    se_heads = (np.sqrt(oh.var(0, ddof=1).mean()), np.sqrt(dh.var(0, ddof=1).mean()))  # pooled over heads
    prec_full = (med(dev_full_t) * se_full[1] ** 2) / (med(ours_full_t) * se_full[0] ** 2)
    prec_heads = (med(dev_heads_t) * se_heads[1] ** 2) / (med(ours_heads_t) * se_heads[0] ** 2)
    gap_full = abs(np.mean(ours_full) - np.mean(dev_full)) / math.hypot(*se_full) * math.sqrt(R)
    gaps = np.abs(oh.mean(0) - dh.mean(0)) / np.sqrt((oh.var(0, ddof=1) + dh.var(0, ddof=1)) / R)

    def line(name, value, target, ok):
        print(f"{name:<58} {value:>12} {target:>10}  {'PASS' if ok else 'FAIL'}")

    print(f"\n{'measure':<58} {'value':>12} {'target':>10}")
    line("(a) full model: ours per chain-step / bare fwd+bwd step (wall)", f"{step_ratio:.3f}", "<= 1.10", step_ratio <= 1.10)
    print(f"{'    the same in CPU time (robust to a shared machine)':<58} {med(cpu_ratios):>12.3f}")
    line("(a) all heads: ours per head chain-step / bare step (wall)", f"{med(head_wall):.3f}", "<= 0.45",
         med(head_wall) <= 0.45)
    print(f"{'    the same in CPU time':<58} {med(head_cpu):>12.3f}")
    line("(b) full model: devinterp time / ours", f"{full_speed:.2f}x", ">= 1.0", full_speed >= 1.0)
    line("(b) all heads: devinterp time / ours", f"{heads_speed:.2f}x", ">= 1.2", heads_speed >= 1.2)
    print(f"{'    full-model SE at equal steps: ours / devinterp':<58} {se_full[0]:.3g} / {se_full[1]:.3g}")
    print(f"{'    per-head SE at equal steps (pooled): ours / devinterp':<58} {se_heads[0]:.3g} / {se_heads[1]:.3g}")
    print(f"{'    full model: time to equal precision, devinterp / ours':<58} {prec_full:>11.2f}x")
    line("(b) per head: time to equal precision, devinterp / ours", f"{prec_heads:.2f}x", ">= 2", prec_heads >= 2)
    line("(b) full model agrees (|diff| / combined SE of means)", f"{gap_full:.2f}", "<= 3", gap_full <= 3)
    line("(b) heads agreeing within 3 combined SE", f"{int((gaps <= 3).sum())}/{len(gaps)}", "all", bool((gaps <= 3).all()))
    print(f"{'    means: ours full / devinterp full':<58} {np.mean(ours_full):.3f} / {np.mean(dev_full):.3f}")
    print(f"{'    our heads one by one / all heads in one pass (time)':<58} {one_by_one_t / med(ours_heads_t):>11.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
