"""Models whose learning coefficient is known in closed form: reduced-rank regressions and deep linear networks
at a true parameter of rank r, with noise-free data, so that L(w*) = 0 and λ is Aoyagi's.

- Reduced-rank regression y = B A x, A: H×M, B: N×H, true rank r: λ of Aoyagi & Watanabe (2005), `rrr_lambda`.
- Deep linear network y = W_L ⋯ W_1 x, widths H_0 (input) … H_L (output), true product of rank r: λ of
  Aoyagi (2024), `dln_lambda` (for two layers it is `rrr_lambda`).

A case (`known_answer`) is the network at a random rank-r truth (bias-free `nn.Linear` layers in an
`nn.Sequential`), n Gaussian inputs x ~ N(0, I) with targets y = f(x; w*), and a loss: "mean" (torch's
`MSELoss`, averaged over batch and outputs) or "sum" (squared error summed over the batch). The empirical
input covariance is full rank (n ≥ H_0), so K(w) = ‖(W − W*)Σ^{1/2}‖²_F has the same λ as the population.
λ̂ = nβ·E[L_B(w) − L_B(w*)] tends to λ as nβ grows for either loss; the loss's scale only moves the nβ at
which it does (the mean loss needs batch × outputs times the nβ of the sum).

`zoo()` lists the cases the calibration and the diagnostics are validated on; `python -m
tl_devinterp.sampling.known_answers` prints the calibration's accuracy on each (the README's table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidValueError


def rrr_lambda(M: int, H: int, N: int, r: int) -> float:
    """λ of reduced-rank regression y = BAx (A: H×M, B: N×H) at a truth of rank r (Aoyagi & Watanabe 2005)."""
    if not 0 <= r <= min(M, H, N):
        raise InvalidValueError(f"rank r must be in [0, min(M, H, N)] = [0, {min(M, H, N)}], got {r}.")
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        lam = (2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2) / 8
        return lam + (1 / 8 if (M + H + N + r) % 2 else 0)
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    return M * N / 2


def dln_lambda(widths: Sequence[int], r: int) -> float:
    """λ of the deep linear network with layer widths H_0 (input), …, H_L (output) at a truth whose product
    has rank r (Aoyagi 2024, Theorem 1): with Δ_i = H_i − r, Σ the set of the ℓ + 1 smallest Δ (ℓ ≥ 1) with
    max_Σ Δ < min_{not Σ} Δ, Σ_Σ Δ ≥ ℓ·max_Σ Δ and Σ_Σ Δ < ℓ·min_{not Σ} Δ; S = Σ_Σ Δ, a = S − (⌈S/ℓ⌉ − 1)·ℓ:
    λ = (−r² + r(H_0 + H_L))/2 + a(ℓ − a)/(4ℓ) − ℓ(ℓ − 1)/4·(S/ℓ)² + ½·Σ_{i<j in Σ} Δ_i Δ_j."""
    widths = [int(h) for h in widths]
    if len(widths) < 3:
        raise InvalidValueError(f"a deep linear network needs >= 3 widths (input, hidden..., output), got {widths}.")
    if not 0 <= r <= min(widths):
        raise InvalidValueError(f"rank r must be in [0, min(widths)] = [0, {min(widths)}], got {r}.")
    delta = sorted(h - r for h in widths)
    for ell in range(1, len(delta)):
        sigma, rest = delta[:ell + 1], delta[ell + 1:]
        S = sum(sigma)
        if rest and not (max(sigma) < min(rest) and S < ell * min(rest)):
            continue
        if S < ell * max(sigma):
            continue
        a = S - (math.ceil(S / ell) - 1) * ell
        pairs = sum(sigma[i] * sigma[j] for i in range(len(sigma)) for j in range(i + 1, len(sigma)))
        return ((-r * r + r * (widths[0] + widths[-1])) / 2 + a * (ell - a) / (4 * ell)
                - ell * (ell - 1) / 4 * (S / ell) ** 2 + pairs / 2)
    raise AssertionError(f"no index set satisfies Aoyagi's conditions for widths {widths}, r = {r}")  # never: Σ = all


def mse_mean(model: nn.Module, batch) -> torch.Tensor:
    """torch's `MSELoss`: the squared error averaged over the batch and the outputs."""
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def sse_sum(model: nn.Module, batch) -> torch.Tensor:
    """The squared error summed over the batch and the outputs."""
    x, y = batch
    return nn.functional.mse_loss(model(x), y, reduction="sum")


LOSSES = {"mean": mse_mean, "sum": sse_sum}


@dataclass
class KnownAnswer:
    """A network at a true parameter, its noise-free data, its loss and its learning coefficient."""

    name: str
    model: nn.Sequential
    data: tuple[torch.Tensor, torch.Tensor]  # x [n, H_0], y [n, H_L]
    loss_fn: object  # (model, batch) -> scalar: mse_mean or sse_sum
    llc: float  # the true λ
    widths: tuple[int, ...]
    rank: int
    loss: str  # "mean" | "sum"

    @property
    def d(self) -> int:
        """Number of parameters (the regular bound: λ ≤ d/2)."""
        return sum(p.numel() for p in self.model.parameters())


def known_answer(widths: Sequence[int], rank: int, *, loss: str = "sum", n: int = 1024, seed: int = 0) -> KnownAnswer:
    """The deep linear network of `widths` (two layers: reduced-rank regression) at a random truth of rank
    `rank`: W_1 = [A; 0] (A: r×H_0), W_i = diag(I_r, 0) in between, W_L = [B, 0] (B: H_L×r); n inputs
    x ~ N(0, I), y = W_L ⋯ W_1 x."""
    widths = tuple(int(h) for h in widths)
    if loss not in LOSSES:
        raise InvalidValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}.")
    if n < widths[0]:
        raise InvalidValueError(f"n = {n} inputs must be >= the input width {widths[0]} (a full-rank input covariance).")
    llc = dln_lambda(widths, rank)  # also checks widths and rank
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            w = torch.zeros_like(layer.weight)
            if i == 0:
                w[:rank] = torch.randn(rank, widths[0], generator=g) / math.sqrt(widths[0])
            elif i == len(layers) - 1:
                w[:, :rank] = torch.randn(widths[-1], rank, generator=g)
            else:
                w[:rank, :rank] = torch.eye(rank)
            layer.weight.copy_(w)
    model = nn.Sequential(*layers)
    x = torch.randn(n, widths[0], generator=g)
    with torch.no_grad():
        y = model(x)
    name = ("rrr" if len(widths) == 3 else "dln") + "_" + "x".join(map(str, widths)) + f"_r{rank}_{loss}"
    return KnownAnswer(name, model, (x, y), LOSSES[loss], llc, widths, rank, loss)


ZOO = [  # (widths, rank): reduced-rank regressions, deep linear networks of depth 3-4, up to ~1e5 parameters
    ((5, 3, 5), 0), ((5, 3, 5), 1), ((4, 3, 8), 0), ((4, 3, 5, 4), 1), ((3, 4, 5, 3), 2), ((10, 8, 6, 4), 2),
    ((8, 6, 4, 6, 8), 2), ((40, 30, 40), 5), ((100, 200, 200, 100), 10),
]


def zoo(losses: Sequence[str] = ("sum", "mean"), *, n: int = 1024) -> list[KnownAnswer]:
    """Every `ZOO` shape with every loss of `losses`."""
    return [known_answer(widths, rank, loss=loss, n=n) for widths, rank in ZOO for loss in losses]


def accuracy_table(cases: Sequence[KnownAnswer], *, batch_size: int = 64, max_steps: int = 300_000,
                   progress: bool = False, echo: bool = False, runs: str | None = None, csv: str | None = None):
    """`calibrate_llc` (its defaults; batch size and budget as given) on each case: the recommended setting,
    the λ̂ of its run, its error against λ, the SGLD steps per chain spent and the seconds taken (one thread).
    One row per case (pandas); `echo` prints each row as it is measured; `runs`, a folder, gets each case's
    calibration runs (`Calibration.table` without the traces) as NAME.csv, to read where a budget went; `csv`, a
    file, the table so far after each case (a stopped run keeps the cases it finished)."""
    import time

    import pandas as pd

    from ..files import atomic_write
    from .calibration import calibrate_llc
    from .settings import SGLDConfig

    rows = []
    for case in cases:
        start = time.perf_counter()
        cal = calibrate_llc(case.model, case.data, SGLDConfig(batch_size=batch_size), loss_fn=case.loss_fn,
                            max_steps=max_steps, progress=progress)
        if runs is not None:
            Path(runs).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(runs) / f"{case.name}.csv", cal.table.drop(columns="llc_trace").to_csv(index=False))
        rows.append(dict(model=case.name, d=case.d, llc=case.llc, llc_hat=cal.llc, error_pct=100 * (cal.llc / case.llc - 1),
                         nbeta=(cal.choice or {}).get("nbeta", math.nan),
                         epsilon=(cal.choice or {}).get("epsilon", math.nan),
                         steps=cal.steps, seconds=round(time.perf_counter() - start), reason=cal.reason))
        table = pd.DataFrame(rows)
        if csv is not None:
            atomic_write(csv, table.to_csv(index=False))
        if echo:
            print(table.tail(1).to_string(index=False, header=len(rows) == 1, float_format=FORMAT), flush=True)
    return pd.DataFrame(rows)


FORMAT = "{:.4g}".format


if __name__ == "__main__":  # the README's zoo table: python -m tl_devinterp.sampling.known_answers [names...]
    import argparse

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description="calibrate_llc on the known-answer zoo; prints its accuracy")
    parser.add_argument("names", nargs="*", help="cases to run (default: all), e.g. rrr_5x3x5_r1_sum")
    parser.add_argument("--max-steps", type=int, default=300_000, help="SGLD steps per chain per case")
    parser.add_argument("--csv", help="also write the table to this CSV file (rewritten after each case)")
    parser.add_argument("--runs", help="a folder for each case's calibration runs (NAME.csv)")
    args = parser.parse_args()
    cases = [c for c in zoo() if not args.names or c.name in args.names]
    table = accuracy_table(cases, max_steps=args.max_steps, echo=True, runs=args.runs, csv=args.csv)
    print(table.to_string(index=False, float_format=FORMAT))
