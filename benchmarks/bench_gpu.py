"""Benchmark LLC sampling on a GPU: per chain-step times of our estimators against a bare TL step, devinterp
2.0.1 and a plain-torch stacked-chains limit, at fp32/tf32/bf16, at the demo's and the paper's scale.

    python benchmarks/bench_gpu.py [--repeats 3] [--draws 8]      # on a CUDA machine (e.g. one H100)
    python benchmarks/bench_gpu.py --dry-run                      # CPU, tiny sizes: every code path once

Scales: demo 2L4H d_model 64 ctx 64 vocab 128; paper 2L8H d_model 256 ctx 1024 vocab 5000; attention-only,
batch 32, random induction sequences. Columns, each a median over repeats of the time of one chain-step
(one chain of one restriction, forward + backward + update):
  (a) bare TL forward+backward of the model (no sampler);
  (b) our `estimate_llc` (full model, 4 chains) and `estimate_head_llcs` (all heads, 4 chains each), through
      the library API, whatever path it takes; the call's wall time over draws x chains x restrictions, so
      one-time setup is included (conservative);
  (c) devinterp 2.0.1's `llc` (SGLD), full model and every head by masks, fp32 only (its one mode); skipped
      where devinterp is not installed (`pip install -e '.[bench]'`);
  (d) the limit: `torch.func.vmap` of `grad` of our fast forward over 4 and 32 stacked weight sets plus an SGLD
      update of the stacks, in plain torch.
Targets: all heads >= 10x faster than devinterp at both scales, within 2x of the 32-chain limit; the paper's
per-head protocol (16 heads x 4 chains x 200 draws) <= 60 s per checkpoint, extrapolated from `--draws`.
Precision: λ̂ at tf32 and bf16 minus λ̂ at fp32 with the same seed (same batches and noise), full model
and every head at demo scale, in units of fp32's standard error; a precision is acceptable within 1 SE.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from bench_llc import Copyable
from torch.func import functional_call, grad, vmap

from tl_devinterp.data import repeated_random_tokens
from tl_devinterp.models import (
    ModelConfig,
    all_heads,
    build_model,
    head_masks,
    parameter_slots,
    sampled_parameters,
)
from tl_devinterp.sampling import default_nbeta, estimate_head_llcs, estimate_llc
from tl_devinterp.sampling.fast_forward import PRECISIONS, fast_forward, precision_context
from tl_devinterp.sampling.objective import lm_loss

SCALES = {
    "demo": ModelConfig(n_layers=2, n_heads=4, d_model=64, n_ctx=64, d_vocab=128, attn_only=True),
    "paper": ModelConfig(n_layers=2, n_heads=8, d_model=256, n_ctx=1024, d_vocab=5000, attn_only=True),
}
DRY = {"tiny": ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, d_vocab=32, attn_only=True)}
PAPER_DRAWS, CHAINS, BATCH = 200, 4, 32


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median wall time of `fn()` over `repeats` calls (after one warm-up call), synchronising a GPU."""
    times = []
    for _ in range(repeats + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def ours(model, tokens, precision, draws, device, repeats) -> dict[str, float]:
    """Per chain-step times of a full-model and an all-heads estimate through the library API."""
    hp = dict(num_chains=CHAINS, num_draws=draws, num_burnin=0, batch_size=BATCH, progress=False, precision=precision)
    n_heads = len(all_heads(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few draws from an untrained model: the diagnostics complain
        full = timed(lambda: estimate_llc(model, tokens, **hp), device, repeats)
        heads = timed(lambda: estimate_head_llcs(model, tokens, **hp), device, repeats)
    return {"ours full": full / (draws * CHAINS), "ours heads": heads / (draws * CHAINS * n_heads)}


def bare(model, tokens, precision, device, repeats) -> float:
    """One TL forward+backward on a batch of the sampler's size."""
    batch = tokens[:BATCH].to(device)

    def step():
        model.zero_grad(set_to_none=True)
        lm_loss(model, batch).backward()

    with precision_context(precision, device):
        return timed(step, device, repeats)


def limit(model, tokens, precision, n_chains, device, repeats) -> float:
    """Per chain-step time of vmap(grad) of the fast forward over `n_chains` stacked weight sets, plus the
    SGLD update of the stacks: what batched chains could reach in plain torch."""
    forward = fast_forward(model, sdpa=device.type == "cuda")  # as the sampler: vmap batches no fused CPU kernel
    slots = parameter_slots(model)
    star = {n: p.detach() for n, p in sampled_parameters(model).items()}
    stacked = {n: p.expand(n_chains, *p.shape).clone() for n, p in star.items()}
    batch = tokens[:BATCH].to(device)
    eps, gamma, nbeta = 1e-3, 200.0, default_nbeta(BATCH)

    class Objective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return lm_loss(forward, x)

    objective = Objective()

    def loss(weights):
        return functional_call(objective, {f"model.{s}": weights[n] for s, n in slots.items()}, (batch,),
                               tie_weights=False, strict=False)

    batched = vmap(grad(loss))

    def step():
        g = batched(stacked)
        with torch.no_grad():
            for n, w in stacked.items():  # w <- w - (eps/2)(nβ g + γ(w - w*)) + sqrt(eps) ζ
                w.add_(-eps / 2 * (nbeta * g[n] + gamma * (w - star[n])) + math.sqrt(eps) * torch.randn_like(w))

    with precision_context(precision, device), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = timed(step, device, repeats) / n_chains
    fallbacks = {str(w.message).split("for ")[1].split(".")[0] for w in caught if "batching rule" in str(w.message)}
    if fallbacks:
        print(f"    note: vmap falls back to a loop for {sorted(fallbacks)}", flush=True)
    return t


def precision_bias(model, tokens, device, draws) -> list[dict]:
    """λ̂ at each precision against fp32 with the same seed (same batches and noise, so the difference is the
    precision's bias, not sampling noise), in units of fp32's standard error: full model and every head."""
    hp = dict(num_chains=CHAINS, num_draws=draws, num_burnin=draws // 2, batch_size=BATCH, progress=False)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for precision in PRECISIONS:
            full = estimate_llc(model, tokens, **hp, precision=precision)
            heads = estimate_head_llcs(model, tokens, **hp, precision=precision)
            rows.append({"precision": precision, "all": (full.mean, full.se)}
                        | {f"l{r.layer}h{r.head}": (r.llc_mean, r.llc_se) for r in heads.itertuples()})
    reference = rows[0]
    return [{k: (v[0] - reference[k][0]) / reference[k][1] for k, v in r.items() if k != "precision"}
            | {"precision": r["precision"]} for r in rows[1:]]


def devinterp_times(model, tokens, device, draws) -> dict[str, float]:
    """Per chain-step times of devinterp 2.0.1's SGLD `llc`, full model and every head by masks (fp32)."""
    try:
        from datasets import Dataset
        from devinterp.slt.llc import llc
    except ImportError:
        return {}
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    hp = dict(lr=1e-3, n_beta=default_nbeta(BATCH), localization=200.0, num_chains=CHAINS, num_draws=draws,
              batch_size=BATCH, num_burnin_steps=0, init_seed=0, device=str(device))

    def run(masks=None):
        masks = None if masks is None else {"inner." + k: v for k, v in masks.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            llc(Copyable(model), dataset, {}, param_masks=masks, output_path=tempfile.mkdtemp() + "/samples.zarr",
                **hp)

    heads = all_heads(model)
    try:
        full = timed(run, device, 1)
        total = sum(timed(lambda h=h: run(head_masks(model, *h)), device, 1, warmup=False) for h in heads)
    except Exception as e:  # noqa: BLE001 - a third-party failure is reported, not fatal
        print(f"    devinterp failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return {}
    return {"devinterp full": full / (draws * CHAINS), "devinterp heads": total / (draws * CHAINS * len(heads))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draws", type=int, default=8, help="draws per estimate timed (the protocol is extrapolated)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, one repeat: exercise every code path")
    args = ap.parse_args()
    if args.dry_run:
        device, scales, args.repeats, args.draws = torch.device("cpu"), DRY, 1, 2
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here; run it on a GPU machine (or --dry-run to check the script).")
    else:
        device, scales = torch.device("cuda"), SCALES
        print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)

    rows, biases = [], []
    for scale, cfg in scales.items():
        model = build_model(cfg, device)
        tokens = repeated_random_tokens(4 * BATCH, cfg.n_ctx // 2, cfg.d_vocab, bos=None)
        n_heads = len(all_heads(model))
        print(f"\n{scale}: {cfg.n_layers}L{cfg.n_heads}H d_model {cfg.d_model} ctx {cfg.n_ctx} vocab {cfg.d_vocab}; "
              f"batch {BATCH}; {CHAINS} chains; {args.draws} draws per estimate; {args.repeats} repeats", flush=True)
        dev = devinterp_times(model, tokens, device, args.draws)
        for precision in PRECISIONS:
            row = {"scale": scale, "precision": precision, "bare TL": bare(model, tokens, precision, device, args.repeats)}
            row |= ours(model, tokens, precision, args.draws, device, args.repeats)
            row |= dev
            for n in (4, 32):
                row[f"limit x{n}"] = limit(model, tokens, precision, n, device, args.repeats)
            row["protocol s"] = row["ours heads"] * PAPER_DRAWS * CHAINS * n_heads
            rows.append(row)
            print(f"  {precision}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in row.items()
                                                 if isinstance(v, float) and k != "protocol s"), flush=True)

        if scale != "paper":  # the bias of each precision, where whole estimates are cheap
            for r in precision_bias(model, tokens, device, 4 * args.draws if args.dry_run else 100):
                worst = max((k for k in r if k not in ("precision", "all")), key=lambda k: abs(r[k]))
                biases.append((scale, r["precision"], r["all"], worst, r[worst]))

    columns = ["bare TL", "ours full", "ours heads", "devinterp full", "devinterp heads", "limit x4", "limit x32"]
    print("\nper chain-step, ms (median)")
    print(f"{'scale':<7}{'prec':<6}" + "".join(f"{c:>16}" for c in columns) + f"{'protocol s':>12}")
    for r in rows:
        cells = "".join(f"{r[c] * 1e3:>16.3f}" if c in r else f"{'-':>16}" for c in columns)
        print(f"{r['scale']:<7}{r['precision']:<6}{cells}{r['protocol s']:>12.1f}")

    def line(name, value, target, ok):
        print(f"{name:<66} {value:>10} {target:>8}  {'PASS' if ok else 'FAIL'}")

    print(f"\n{'measure (devinterp at fp32, its one mode)':<66} {'value':>10} {'target':>8}")
    for r in rows:
        tag = f"{r['scale']} {r['precision']}"
        if "devinterp heads" in r:
            speed = r["devinterp heads"] / r["ours heads"]
            line(f"{tag}: all heads, devinterp / ours", f"{speed:.1f}x", ">= 10", speed >= 10)
        gap = r["ours heads"] / r["limit x32"]
        line(f"{tag}: all heads, ours / limit (32 stacked chains)", f"{gap:.2f}x", "<= 2", gap <= 2)
        if r["scale"] == "paper":
            line(f"{tag}: per-head protocol, s per checkpoint", f"{r['protocol s']:.0f}", "<= 60", r["protocol s"] <= 60)


    print(f"\n{'bias of λ̂ against fp32, same seed, in fp32 SEs (accept within 1)':<66} {'value':>10} {'target':>8}")
    for scale, precision, full, worst, value in biases:
        line(f"{scale} {precision}: full model", f"{full:+.2f}", "|.| <= 1", abs(full) <= 1)
        line(f"{scale} {precision}: worst head ({worst})", f"{value:+.2f}", "|.| <= 1", abs(value) <= 1)


if __name__ == "__main__":
    main()
