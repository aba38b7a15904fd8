"""Per-head and whole-model LLCs at real size on this CPU: GPT-2 small (124M, 12 layers x 12 heads) and
Pythia-160m, randomly initialised from their transformers configs, saved locally and booted with
`TransformerBridge.boot_transformers` (nothing is downloaded).

    OMP_NUM_THREADS=1 python benchmarks/bench_real_size.py [--models gpt2 pythia] [--toy] [--no-devinterp]

Measured in one run per model, with a small batch (default 4 x 64 tokens), 2 chains:
  (1) the bare forward+backward of the whole model (the HF model itself) and of blocks l..11 from the
      cached residual stream (plain torch: `sampling.fast_forward`), one step each, and the peak memory;
  (2) one layer's heads (12 heads x 2 chains, layer `--layer`): our time per chain-step / the bare step of
      blocks l..11, and the process's peak memory; the whole model the same against the bare full step;
  (3) setup: the seconds before the first chain-step (fast-forward check, unused-parameter probe, head
      masks) / the bare full step;
  (4) the plan (`sampling.plan.plan_llcs`, 3 timed steps) against the measured run: time and peak memory
      within 30% (target);
  (5) devinterp 2.0.1 (if installed: the `bench` extra) on the plain HF model, whole model, same chains,
      draws and batch: its wall time / ours.
The machine may be shared: the load average is printed beside the ratios, which are measured in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hf_models import boot, tiny_tokenizer  # noqa: E402

from tl_devinterp.models import mean_token_loss  # noqa: E402
from tl_devinterp.sampling import SamplerWarning, SGLDConfig, resolve_restriction  # noqa: E402
from tl_devinterp.sampling.fast_forward import fast_forward  # noqa: E402
from tl_devinterp.sampling.llc import sample_llcs  # noqa: E402
from tl_devinterp.sampling.plan import peak_memory, plan_llcs, step_seconds  # noqa: E402

GIB = 2.0**30


def hf_config(name: str, toy: bool):
    import transformers as tf

    if name == "gpt2":  # GPT-2 small: GPT2Config's defaults
        return tf.GPT2Config(**(dict(n_layer=4, n_head=4, n_embd=64, vocab_size=512) if toy else {}))
    if name == "pythia":  # EleutherAI/pythia-160m's config
        size = (dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vocab_size=512)
                if toy else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                 vocab_size=50304))
        return tf.GPTNeoXConfig(**size, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True)
    raise SystemExit(f"unknown model {name!r}: choose gpt2 or pythia")


def build(name: str, toy: bool, folder: Path):
    """(the plain HF model in eval mode, its bridge booted from a local save)."""
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(hf_config(name, toy)).eval()
    hf.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return hf, boot(folder)


def timed(f, repeats: int = 3) -> float:
    """The median wall time of `f()` over `repeats` calls, after one untimed call."""
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(model, tokens, restrictions, config) -> tuple[float, float, dict]:
    """(wall seconds, seconds before the first step, peak memory) of one `sample_llcs` call."""
    stamps = {}
    with warnings.catch_warnings(), peak_memory("cpu") as peak:
        warnings.simplefilter("ignore", SamplerWarning)
        start = time.perf_counter()
        sample_llcs(model, tokens, restrictions, config, progress=False,
                    observe=lambda r, c, d, w: stamps.__setitem__(d, time.perf_counter()))  # a step's last stack
        wall = time.perf_counter() - start
    return wall, wall - len(stamps) * step_seconds(stamps), peak  # setup: the time beyond the steps


def devinterp_wall(hf, tokens, config) -> float | None:
    try:
        from datasets import Dataset
        from devinterp.slt.llc import llc
    except ImportError:
        return None
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llc(hf, dataset, {}, lr=config.epsilon, n_beta=config.nbeta, localization=config.gamma,
            num_chains=config.num_chains, num_draws=config.num_draws, batch_size=config.batch_size, num_burnin_steps=0,
            init_seed=0, device="cpu", output_path=tempfile.mkdtemp() + "/samples.zarr")
    return time.perf_counter() - start


def bench(name: str, args) -> list[bool]:
    print(f"\n=== {name}{' (toy size)' if args.toy else ''}: load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        hf, model = build(name, args.toy, Path(folder))
    cfg = model.cfg
    layer = min(args.layer, cfg.n_layers - 1)
    tokens = torch.randint(0, cfg.d_vocab, (8 * args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = tokens[: args.batch]
    config = SGLDConfig(num_chains=args.chains, num_draws=args.draws, num_burnin=0, batch_size=args.batch,
                        epsilon=1e-4, gamma=1000.0).resolve(tokens)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"{n_params / 1e6:.0f}M parameters, {cfg.n_layers} layers x {cfg.n_heads} heads; batch {args.batch} x "
          f"{args.seq} tokens; {args.chains} chains x {args.draws} draws; layer {layer}'s heads", flush=True)

    # (1) the bare steps
    def hf_step():
        hf.zero_grad(set_to_none=True)
        mean_token_loss(hf(batch).logits, batch).backward()

    fast = fast_forward(model, sdpa=False)
    with torch.no_grad():
        resid = model(batch, stop_at_layer=layer)
    params = [p for p in model.parameters() if p.requires_grad]

    def blocks_step():
        grads = torch.autograd.grad(mean_token_loss(fast(batch, layer, resid), batch), params, allow_unused=True)
        del grads

    with peak_memory("cpu") as bare_peak:
        bare_full = timed(hf_step)
    hf.zero_grad(set_to_none=True)
    bare_blocks = timed(blocks_step)
    print(f"(1) bare forward+backward: whole model {bare_full:.3g} s, blocks {layer}..{cfg.n_layers - 1} "
          f"{bare_blocks:.3g} s; peak {bare_peak['peak'] / GIB:.2f} GiB", flush=True)

    ok = []
    if args.setup_only:  # (3) alone: the first call on a checkpoint (cold one-time checks), then a second one
        heads = [resolve_restriction(model, (cfg.n_layers - 1, h)) for h in range(cfg.n_heads)]
        short = SGLDConfig.build(config, num_draws=3)
        for call in ("first", "second"):
            start = time.perf_counter()
            restrictions = [resolve_restriction(model, (cfg.n_layers - 1, h)) for h in range(cfg.n_heads)]
            masks = time.perf_counter() - start
            _, setup, _ = run(model, tokens, restrictions, short)
            print(f"(3) setup of the {call} call on this checkpoint: {masks + setup:.3g} s ({masks:.3g} s head masks) "
                  f"= {(masks + setup) / bare_full:.1f} bare whole-model steps", flush=True)
        return ok
    heads = [resolve_restriction(model, (layer, h)) for h in range(cfg.n_heads)]
    whole = [resolve_restriction(model, None)]
    for what, restrictions, bare in (("layer's heads", heads, bare_blocks), ("whole model", whole, bare_full)):
        plan = plan_llcs(model, tokens, restrictions, config, split=False)
        wall, setup, peak = run(model, tokens, restrictions, config)
        rows = len(restrictions) * config.num_chains
        per_chain_step = (wall - setup) / config.num_draws / rows
        t_err, m_err = plan.seconds / wall - 1, plan.peak_bytes / peak["peak"] - 1
        print(f"(2) {what}: {rows} chains, {plan.coordinates:,} coordinates; per chain-step {per_chain_step:.3g} s = "
              f"{per_chain_step / bare:.2f}x the bare step of the same blocks; peak {peak['peak'] / GIB:.2f} GiB "
              f"({peak['peak'] / bare_peak['peak']:.2f}x the bare step's)")
        print(f"(3)   setup {max(setup, 0):.3g} s = {max(setup, 0) / bare_full:.1f} bare whole-model steps"
              + (" (within the step times' noise)" if setup <= 0 else ""))
        print(f"(4)   plan {plan.seconds:.3g} s, {plan.peak_bytes / GIB:.2f} GiB vs measured {wall:.3g} s, "
              f"{peak['peak'] / GIB:.2f} GiB: time {t_err:+.0%}, memory {m_err:+.0%} (target within 30%)  "
              f"{'PASS' if abs(t_err) <= 0.3 and abs(m_err) <= 0.3 else 'FAIL'}", flush=True)
        ok.append(abs(t_err) <= 0.3 and abs(m_err) <= 0.3)
        if what == "whole model":
            ours = wall
    dev = devinterp_wall(hf, tokens, config) if args.devinterp else None
    if dev is not None:
        print(f"(5) whole model, {config.num_chains} chains x {config.num_draws} draws: devinterp 2.0.1 {dev:.3g} s / "
              f"ours {ours:.3g} s = {dev / ours:.2f}x")
    print(f"load average after: {os.getloadavg()}", flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "pythia"])
    ap.add_argument("--toy", action="store_true", help="4 layers x 4 heads, d_model 64: checks the script in seconds")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-devinterp", dest="devinterp", action="store_false")
    ap.add_argument("--setup-only", action="store_true", help="only (1) and the setup of a first and a second call")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    ok = [x for name in args.models for x in bench(name, args)]
    print(f"\nplans within 30% of the measured time and memory: {sum(ok)}/{len(ok)}")


if __name__ == "__main__":
    main()
