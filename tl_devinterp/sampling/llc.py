"""The local learning coefficient (LLC) by SGLD around a checkpoint w* (design.md §4).

    Δw = −(ε/2)·[nβ·∇L_B(w) + γ·(w − w*)] + N(0, ε)       (drift and noise masked by a restriction)
    λ̂  = nβ · mean over chains and post-burn-in draws of [L_B(w_t) − L_B(w*)]

L_B(w*) is the checkpoint's loss on the same minibatch as the draw (pairing), which removes the batch
noise from λ̂. All chains (and, in `estimate_head_llcs`, all restrictions) see the same batch at each
step, so each batch's checkpoint loss is computed once. Sampling runs on a clone of the model whose
parameters are swapped per chain; parameters outside a restriction are constants with no gradient.

Hyperparameters of the papers: full-model LLC (ICL paper, 3M LM) ε=0.003, γ=300, nβ≈21.7 (batch 100),
20 chains × 200 draws; per-head rLLC ε=0.001, γ=200, nβ=30, 4 chains × 200 draws, batch 32. The defaults
here are the rLLC ones with fewer draws, sized for small models on a CPU; calibrate with `calibrate_llc`.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import nn
from tqdm.auto import tqdm

from ..models import clone_model, is_supported_model, token_cross_entropy
from ..store import fingerprint
from .restrict import Restriction, resolve_restriction

EXPLODE = 100.0
"""A chain has diverged when its loss exceeds L(w*) + EXPLODE·max(1, |L(w*)|) (or is NaN/inf)."""

DEFAULTS = dict(epsilon=1e-3, gamma=200.0, num_chains=4, num_draws=100, num_burnin=50, batch_size=32)


class LLCDivergenceError(RuntimeError):
    """An SGLD chain's loss became NaN/inf or exploded: the step size is too large for this model."""


def default_nbeta(batch_size: int) -> float:
    """nβ = n/log n for n = batch_size: the papers' "adaptive" β = 1/log n. The one source of this default."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for the default nbeta = n/log n, got {batch_size}.")
    return batch_size / math.log(batch_size)


@dataclass
class LLCResult:
    """One LLC estimate: summary, per-chain values, traces and the hyperparameters that produced it."""

    mean: float
    std: float  # across chains, ddof=1
    per_chain: np.ndarray  # [chains]
    loss_trace: Float[torch.Tensor, "chains draws"]  # L_B(w_t) at post-burn-in draws
    init_losses: Float[torch.Tensor, "draws"]  # L_B(w*) on the same batches
    init_loss: float  # mean of init_losses: the checkpoint's loss on the sampled data
    d: int  # number of sampled coordinates
    restrict: str
    epsilon: float
    gamma: float
    nbeta: float
    num_chains: int
    num_draws: int
    num_burnin: int
    batch_size: int
    seed: int
    final_params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # name -> [chains, ...]

    @property
    def se(self) -> float:
        """Standard error of the mean over chains."""
        return self.std / math.sqrt(self.num_chains)

    @property
    def llc_trace(self) -> Float[torch.Tensor, "chains draws"]:
        """nβ·(L_B(w_t) − L_B(w*)) per draw: the quantity λ̂ averages; flat when sampling is stable."""
        return self.nbeta * (self.loss_trace - self.init_losses)

    def hyperparameters(self) -> dict[str, Any]:
        names = ("restrict", "epsilon", "gamma", "nbeta", "num_chains", "num_draws", "num_burnin", "batch_size", "seed")
        return {k: getattr(self, k) for k in names}


# --------------------------------------------------------------------------------------------------
# Data: every accepted form becomes an endless stream of batches, the same for every chain.


def as_tensors(data) -> tuple[torch.Tensor, ...] | torch.utils.data.DataLoader:
    """`data` as a tuple of tensors sharing the first dimension, or the DataLoader itself."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if isinstance(data, torch.Tensor):
        return (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        if len({len(t) for t in data}) != 1:
            raise ValueError(f"The tensors in data have different lengths {[len(t) for t in data]}.")
        return tuple(data)
    if hasattr(data, "column_names"):  # a datasets.Dataset
        if "input_ids" not in data.column_names:
            raise ValueError(f"The dataset has no 'input_ids' column (columns: {data.column_names}).")
        try:
            return (torch.as_tensor(np.asarray(data.with_format("numpy")["input_ids"])),)
        except ValueError as e:
            raise ValueError("The dataset's input_ids have different lengths: chunk or pad them to one length.") from e
    raise TypeError(
        f"Cannot sample from data of type {type(data).__name__}: pass a datasets.Dataset with 'input_ids', "
        f"a token tensor [N, seq], a tuple of tensors (x, y), or a torch DataLoader."
    )


def batch_stream(data, batch_size: int, seed: int, device) -> Iterator[tuple[int | None, Any]]:
    """Endless `(key, batch)` pairs. Tensor data is split once (with `seed`) into fixed batches, visited in
    a new random order each epoch (the ragged tail is dropped); `key` names the batch, so per-batch results
    such as the checkpoint loss are computed once. A DataLoader is cycled as it is, with key None."""
    source = as_tensors(data)
    if isinstance(source, torch.utils.data.DataLoader):
        while True:
            for batch in source:
                yield None, _to(batch, device)
    n = len(source[0])
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the data ({n} rows); lower batch_size.")
    source = tuple(t.to(device) for t in source)
    g = torch.Generator().manual_seed(seed)
    chunks = torch.randperm(n, generator=g)[: n - n % batch_size].to(device).split(batch_size)
    while True:
        for k in torch.randperm(len(chunks), generator=g).tolist():
            yield k, source[0][chunks[k]] if len(source) == 1 else tuple(t[chunks[k]] for t in source)


def _to(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return type(batch)(_to(b, device) for b in batch)


def data_fingerprint(data) -> str:
    """A hash of the data's contents (of a DataLoader's TensorDataset; else its type and length)."""
    source = as_tensors(data)
    if isinstance(source, torch.utils.data.DataLoader):
        ds = source.dataset
        if not isinstance(ds, torch.utils.data.TensorDataset):
            return f"{type(ds).__name__}-{len(ds)}-bs{source.batch_size}"
        source = ds.tensors
    return fingerprint(*source)


# --------------------------------------------------------------------------------------------------
# The loss: explicit loss_fn, else the model's own `loss_fn`, else next-token cross-entropy.


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-token cross-entropy of a TransformerLens model on a token batch."""
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    return token_cross_entropy(model(tokens), tokens).mean()


def lm_loss_from_layer(model: nn.Module, resid: torch.Tensor, batch, layer: int) -> torch.Tensor:
    """`lm_loss` computed from the residual stream before block `layer` (blocks below it are skipped)."""
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    return token_cross_entropy(model(resid, start_at_layer=layer), tokens).mean()


def _starts_at_layer(model: nn.Module, batch) -> bool:
    """Whether the model can run from a cached residual stream (TL 4 bridges and HookedTransformer can)."""
    tokens = (batch[0] if isinstance(batch, (tuple, list)) else batch)[:1]
    try:
        with torch.no_grad():
            model(model(tokens, stop_at_layer=1), start_at_layer=1)
    except (NotImplementedError, TypeError, ValueError):
        return False
    return True


def resolve_loss(model: nn.Module, loss_fn: Callable | None) -> Callable[[nn.Module, Any], torch.Tensor]:
    """`loss_fn(model, batch)`. TransformerLens models default to `lm_loss`; another model's `loss_fn` may be a method `(batch)`, a function `(model, batch)`,
    or a criterion module applied as `criterion(model(x), y)` to batches `(x, y)`."""
    if loss_fn is not None:
        return loss_fn
    if is_supported_model(model):  # before `loss_fn`: TransformerLens models have one of another signature
        return lm_loss
    own = getattr(model, "loss_fn", None)
    if isinstance(own, nn.Module):
        return lambda m, batch: m.loss_fn(m(batch[0]), batch[1])
    if inspect.ismethod(own):
        return lambda m, batch: m.loss_fn(batch)
    if callable(own):
        return own
    raise TypeError(
        f"No loss for a {type(model).__name__}: pass loss_fn(model, batch) -> scalar, or give the model a "
        f"loss_fn attribute (e.g. model.loss_fn = torch.nn.MSELoss() for batches (x, y))."
    )


# --------------------------------------------------------------------------------------------------
# The sampler.


def _generator(seed: int, label: str, chain: int, device) -> torch.Generator:
    """Noise for (restriction, chain): the same in estimate_llc(restrict=h) and estimate_head_llcs."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{label}/{chain}".encode()).digest()[:8], "little")
    return torch.Generator(device=device or "cpu").manual_seed(key)


def resolve_batching(data, batch_size: int, nbeta: float | None) -> tuple[int, float]:
    """The batch size in use (a DataLoader's own, else `batch_size`) and nβ (default n/log n for it)."""
    loader = as_tensors(data)
    if isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size is not None:
        batch_size = loader.batch_size
    return batch_size, default_nbeta(batch_size) if nbeta is None else float(nbeta)


def _check_hyperparameters(epsilon, gamma, nbeta, num_chains, num_draws, num_burnin, batch_size) -> None:
    for name, v in dict(epsilon=epsilon, nbeta=nbeta).items():
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}.")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}.")
    if num_chains < 2:
        raise ValueError(f"num_chains must be >= 2 (the std across chains needs two), got {num_chains}.")
    if num_draws < 1 or num_burnin < 0 or batch_size < 1:
        raise ValueError(
            f"Need num_draws >= 1, num_burnin >= 0, batch_size >= 1; got {num_draws}, {num_burnin}, {batch_size}."
        )


def sample_llcs(
    model: nn.Module,
    data,
    restrictions: list[Restriction],
    *,
    epsilon: float,
    gamma: float,
    nbeta: float | None,
    num_chains: int,
    num_draws: int,
    num_burnin: int,
    batch_size: int,
    loss_fn: Callable | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    desc: str = "SGLD",
) -> list[LLCResult]:
    """One LLC estimate per restriction, in one pass over the batches (shared by every chain and
    restriction, with each batch's checkpoint loss computed once)."""
    batch_size, nbeta = resolve_batching(data, batch_size, nbeta)
    _check_hyperparameters(epsilon, gamma, nbeta, num_chains, num_draws, num_burnin, batch_size)

    sampler = clone_model(model).eval()
    if device is not None:
        sampler = sampler.to(device)
    device = next(sampler.parameters()).device
    params = dict(sampler.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    wstar = {n: p.detach().clone() for n, p in params.items()}
    loss = resolve_loss(sampler, loss_fn)
    names = [list(r.masks) for r in restrictions]
    masks = [[(i, m.to(device)) for i, m in enumerate(r.masks.values()) if m is not None] for r in restrictions]
    # chain state: the current values of the restriction's parameters, and the chain's noise generator
    states = [
        [([wstar[n].clone() for n in ns], _generator(seed, r.label, c, device)) for c in range(num_chains)]
        for r, ns in zip(restrictions, names, strict=True)
    ]
    trace = torch.empty(len(restrictions), num_chains, num_draws)
    init_losses = torch.empty(num_draws)
    batches = batch_stream(data, batch_size, seed, device)
    ref = limit = None  # the checkpoint loss on the first batch, and the loss a chain may not exceed
    noise_std = math.sqrt(epsilon)
    # With the LM loss, a restriction to blocks >= l shares the residual stream before block l:
    # computed once per batch at w*, each of its chains then runs only blocks l and up.
    starts = [r.first_layer for r in restrictions]
    if loss_fn is not None or not is_supported_model(sampler) or not any(starts):
        starts = [0] * len(restrictions)
    elif not _starts_at_layer(sampler, next(batch_stream(data, batch_size, seed, device))[1]):
        starts = [0] * len(restrictions)

    checkpoint_losses: dict[int, float] = {}  # batch key -> L_B(w*)
    for step in tqdm(range(num_burnin + num_draws), desc=desc, unit="step", leave=False):
        key, batch = next(batches)
        draw = step - num_burnin
        if draw >= 0 or limit is None:
            l_star = checkpoint_losses.get(key)
            if l_star is None:
                with torch.no_grad():
                    l_star = loss(sampler, batch).item()
                if key is not None:
                    checkpoint_losses[key] = l_star
            if limit is None:
                ref, limit = l_star, l_star + EXPLODE * max(1.0, abs(l_star))
            if draw >= 0:
                init_losses[draw] = l_star
        with torch.no_grad():
            tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
            resid = {layer: sampler(tokens, stop_at_layer=layer) for layer in set(starts) - {0}}
        for r, restriction in enumerate(restrictions):
            layer = starts[r]
            leaves = [params[n] for n in names[r]]
            stars = [wstar[n] for n in names[r]]
            sizes = [t.numel() for t in stars]
            for p in leaves:
                p.requires_grad_(True)
            for c, (w, gen) in enumerate(states[r]):
                for p, wn in zip(leaves, w, strict=True):  # swap the chain's values in
                    p.data = wn
                value = loss(sampler, batch) if layer == 0 else lm_loss_from_layer(sampler, resid[layer], batch, layer)
                grads = torch.autograd.grad(value, leaves)
                value = value.item()
                if not value < limit:  # also catches NaN
                    raise LLCDivergenceError(
                        f"SGLD chain {c} diverged at step {step} ({'burn-in' if draw < 0 else f'draw {draw}'}) "
                        f"of restriction {restriction.label!r}: loss {value:.4g} vs {ref:.4g} "
                        f"at the checkpoint. Lower epsilon (now {epsilon:g}) or raise gamma (now {gamma:g})."
                    )
                if draw >= 0:
                    trace[r, c, draw] = value
                with torch.no_grad():  # Δw = −(ε/2)·[nβ·g + γ·(w − w*)] + √ε·ξ, masked
                    delta = torch._foreach_sub(w, stars)
                    torch._foreach_mul_(delta, gamma)
                    torch._foreach_add_(delta, grads, alpha=nbeta)
                    torch._foreach_mul_(delta, -epsilon / 2)
                    noise = torch.randn(sum(sizes), generator=gen, device=device).split(sizes)
                    torch._foreach_add_(delta, [z.view_as(t) for z, t in zip(noise, w, strict=True)], alpha=noise_std)
                    for i, m in masks[r]:
                        delta[i].mul_(m)
                    torch._foreach_add_(w, delta)
            for p, star in zip(leaves, stars, strict=True):
                p.data = star
                p.requires_grad_(False)

    results = []
    for r, restriction in enumerate(restrictions):
        per_chain = (nbeta * (trace[r] - init_losses).mean(1)).double().numpy()
        results.append(
            LLCResult(
                mean=float(per_chain.mean()), std=float(per_chain.std(ddof=1)), per_chain=per_chain,
                loss_trace=trace[r].clone(), init_losses=init_losses.clone(), init_loss=float(init_losses.mean()),
                d=restriction.d, restrict=restriction.label, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin, batch_size=batch_size, seed=seed,
                final_params={n: torch.stack([w[i] for w, _ in states[r]]).cpu() for i, n in enumerate(names[r])},
            )
        )
    return results


def estimate_llc(
    model: nn.Module,
    data,
    *,
    epsilon: float = DEFAULTS["epsilon"],
    gamma: float = DEFAULTS["gamma"],
    nbeta: float | None = None,
    num_chains: int = DEFAULTS["num_chains"],
    num_draws: int = DEFAULTS["num_draws"],
    num_burnin: int = DEFAULTS["num_burnin"],
    batch_size: int = DEFAULTS["batch_size"],
    restrict=None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> LLCResult:
    """The LLC of `model` at its current weights, estimated by SGLD on `data`.

    `restrict` samples only some coordinates (a head "l1h3" or (1, 3), a layer "layer1", a component
    "embed", a name pattern "blocks.0.attn.*", or a list); `nbeta` defaults to `default_nbeta(batch_size)`.
    Raises `LLCDivergenceError` when a chain diverges. The caller's model is never changed.
    """
    restriction = resolve_restriction(model, restrict)
    return sample_llcs(
        model, data, [restriction], epsilon=epsilon, gamma=gamma, nbeta=nbeta, num_chains=num_chains,
        num_draws=num_draws, num_burnin=num_burnin, batch_size=batch_size, loss_fn=loss_fn, seed=seed,
        device=device, desc=f"LLC ({restriction.label})",
    )[0]
