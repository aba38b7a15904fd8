"""The local learning coefficient (LLC) by SGLD around a checkpoint w* (design.md §4).

    Δw = −(ε/2)·[nβ·∇L_B(w) + γ·(w − w*)] + N(0, ε)       (drift and noise masked by a restriction)
    λ̂  = nβ · mean over chains and post-burn-in draws of [L_B(w_t) − L_B(w*)]

L_B(w*) is the checkpoint's loss on the same minibatch as the draw (pairing), which removes the batch
noise from λ̂. All chains (and, in `estimate_head_llcs`, all restrictions) see the same batch at each
step, so each batch's checkpoint loss is computed once.

Sampling runs on the caller's model itself, never a copy: a chain's state is a set of plain tensors,
evaluated through `torch.func.functional_call` (one tensor per parameter slot, `tie_weights=False`), so
the model's parameters, buffers and hooks are untouched, also when sampling fails midway. The sampled set
is `models.sampled_parameters`: each weight the forward uses, once.

Hyperparameters of the papers: full-model LLC (ICL paper, 3M LM) ε=0.003, γ=300, nβ≈21.7 (batch 100),
20 chains × 200 draws; per-head rLLC ε=0.001, γ=200, nβ=30, 4 chains × 200 draws, batch 32. The defaults
here are the rLLC ones with fewer draws, sized for small models on a CPU; `calibrate_llc` checks them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..models import is_supported_model, parameter_slots, sampled_parameters, token_cross_entropy
from .batches import as_tensors, batch_stream
from .diagnostics import ChainStats, SamplerDiagnostics, SamplerWarning, norm, summarise
from .restrict import Restriction, resolve_restriction
from .samplers import SAMPLERS, Chain

EXPLODE = 100.0
"""A chain has diverged when its loss exceeds L(w*) + EXPLODE·max(1, |L(w*)|) (or is NaN/inf)."""


class LLCDivergenceError(RuntimeError):
    """An SGLD chain's loss became NaN/inf or exploded: the step size is too large for this model."""


def default_nbeta(batch_size: int) -> float:
    """nβ = n/log n for n = batch_size: the papers' "adaptive" β = 1/log n. The one source of this default."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for the default nbeta = n/log n, got {batch_size}.")
    return batch_size / math.log(batch_size)


@dataclass(frozen=True)
class SGLDConfig:
    """The sampler's hyperparameters, declared and validated once; every estimator takes one.

    `nbeta=None` means n/log n of the batch size in use (`resolve`); a DataLoader's own batch size wins.
    """

    epsilon: float = field(default=1e-3, metadata={"help": "SGLD step size epsilon"})
    gamma: float = field(default=200.0, metadata={"help": "localisation strength gamma"})
    nbeta: float | None = field(default=None, metadata={"help": "inverse temperature n*beta (default: n/log n "
                                                        "of the batch size)"})
    num_chains: int = field(default=4, metadata={"help": "chains"})
    num_draws: int = field(default=100, metadata={"help": "draws per chain after burn-in"})
    num_burnin: int = field(default=50, metadata={"help": "burn-in steps per chain"})
    batch_size: int = field(default=32, metadata={"help": "minibatch size"})
    seed: int = field(default=0, metadata={"help": "seed of the batches and the chains' noise"})
    sampler: str = field(default="sgld", metadata={"help": "update rule: sgld, sgnht or rmsprop_sgld"})
    diffusion: float = field(default=0.01, metadata={"help": "SGNHT's diffusion A (the thermostat's start)"})
    rmsprop_decay: float = field(default=0.999, metadata={"help": "RMSprop-SGLD's running-mean decay alpha"})
    rmsprop_delta: float = field(default=1.0, metadata={"help": "RMSprop-SGLD's delta: preconditioner <= 1/delta"})
    draws_every: int = field(default=1, metadata={"help": "observables on every k-th draw (thinning)"})

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"SGLDConfig.sampler={self.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}.")
        for name in ("epsilon", "gamma", "nbeta", "diffusion", "rmsprop_decay", "rmsprop_delta"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise TypeError(f"SGLDConfig.{name} must be a finite number, got {v!r}.")
            if v is not None:
                object.__setattr__(self, name, float(v))  # 1 and 1.0 are one setting (and one store key)
        for name in ("num_chains", "num_draws", "num_burnin", "batch_size", "seed", "draws_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"SGLDConfig.{name} must be an integer, got {v!r}.")
        if not self.epsilon > 0:
            raise ValueError(f"SGLDConfig.epsilon must be > 0, got {self.epsilon}.")
        if self.nbeta is not None and not self.nbeta > 0:
            raise ValueError(f"SGLDConfig.nbeta must be > 0 (or None for n/log n), got {self.nbeta}.")
        if self.gamma < 0:
            raise ValueError(f"SGLDConfig.gamma must be >= 0, got {self.gamma}.")
        if self.num_chains < 2:
            raise ValueError(f"SGLDConfig.num_chains must be >= 2 (the std across chains needs two), got {self.num_chains}.")
        if self.num_draws < 1 or self.num_burnin < 0 or self.batch_size < 1 or self.seed < 0:
            raise ValueError(
                f"SGLDConfig needs num_draws >= 1, num_burnin >= 0, batch_size >= 1, seed >= 0; got "
                f"{self.num_draws}, {self.num_burnin}, {self.batch_size}, {self.seed}."
            )
        if self.draws_every < 1:
            raise ValueError(f"SGLDConfig.draws_every must be >= 1 (1 = every draw), got {self.draws_every}.")
        if not (self.diffusion > 0 and 0 <= self.rmsprop_decay < 1 and self.rmsprop_delta > 0):
            raise ValueError(f"SGLDConfig needs diffusion > 0, 0 <= rmsprop_decay < 1, rmsprop_delta > 0; got "
                             f"{self.diffusion}, {self.rmsprop_decay}, {self.rmsprop_delta}.")

    @classmethod
    def build(cls, config: SGLDConfig | None = None, **overrides: Any) -> SGLDConfig:
        """`config` (default: the defaults) with keyword overrides, naming any unknown keyword."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"Unknown SGLD option(s) {unknown}; the options are {sorted(known)}.")
        return dataclasses.replace(config or cls(), **overrides)

    def resolve(self, data) -> SGLDConfig:
        """The batch size in use (a DataLoader's own) and nβ filled in."""
        loader = as_tensors(data)
        batch_size = self.batch_size
        if isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size is not None:
            batch_size = loader.batch_size
        nbeta = default_nbeta(batch_size) if self.nbeta is None else float(self.nbeta)
        return dataclasses.replace(self, batch_size=batch_size, nbeta=nbeta)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LLCResult:
    """One LLC estimate: summary, per-chain values, traces, diagnostics and the settings that produced it."""

    mean: float
    std: float  # across chains, ddof=1
    per_chain: np.ndarray  # [chains]
    loss_trace: Float[torch.Tensor, "chains draws"]  # L_B(w_t) at post-burn-in draws
    init_losses: Float[torch.Tensor, "draws"]  # L_B(w*) on the same batches
    init_loss: float  # mean of init_losses: the checkpoint's loss on the sampled data
    d: int  # number of sampled coordinates
    restrict: str
    config: SGLDConfig  # resolved: nbeta and batch_size as used
    diagnostics: SamplerDiagnostics
    note: str = ""  # e.g. K/V shared by the heads of a group
    final_params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # name -> [chains, ...]

    @property
    def se(self) -> float:
        """Standard error of the mean over chains."""
        return self.std / math.sqrt(self.config.num_chains)

    @property
    def llc_trace(self) -> Float[torch.Tensor, "chains draws"]:
        """nβ·(L_B(w_t) − L_B(w*)) per draw: the quantity λ̂ averages; flat when sampling is stable."""
        return self.config.nbeta * (self.loss_trace - self.init_losses)


# --------------------------------------------------------------------------------------------------
# The loss: explicit loss_fn, else the model's own `loss_fn`, else next-token cross-entropy.


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-token cross-entropy of a TransformerLens model on a token batch."""
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    return token_cross_entropy(model(tokens), tokens).mean()


def lm_loss_from_layer(model: nn.Module, batch, resid: torch.Tensor, layer: int) -> torch.Tensor:
    """`lm_loss` computed from the residual stream before block `layer`."""
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    return token_cross_entropy(model(resid, start_at_layer=layer), tokens).mean()


def skips_lower_blocks(model: nn.Module, batch) -> bool:
    """Whether `model(resid, start_at_layer=1)` really skips block 0 (native bridges and HookedTransformer
    do; HF bridges run the lower blocks anyway, so a cached residual stream would save nothing)."""
    tokens = (batch[0] if isinstance(batch, (tuple, list)) else batch)[:1]
    calls = []
    try:
        with torch.no_grad():
            resid = model(tokens, stop_at_layer=1)
            model.run_with_hooks(resid, start_at_layer=1,
                                 fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))])
    except (NotImplementedError, TypeError, ValueError, KeyError, AttributeError, RuntimeError):
        return False
    return not calls


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


class Objective(nn.Module):
    """`loss(model, batch, *extra)` as a module, so a functional call can swap the model's weights for a
    chain's tensors whatever the loss does with the model."""

    def __init__(self, model: nn.Module, loss: Callable):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch, *extra):
        return self.loss(self.model, batch, *extra)


# --------------------------------------------------------------------------------------------------
# The sampler.


def _generator(seed: int, label: str, chain: int, device) -> torch.Generator:
    """Noise for (restriction, chain): the same in estimate_llc(restrict=h) and estimate_head_llcs."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{label}/{chain}".encode()).digest()[:8], "little")
    return torch.Generator(device=device).manual_seed(key)


def sample_llcs(model: nn.Module, data, restrictions: list[Restriction], config: SGLDConfig, *,
                loss_fn: Callable | None = None, desc: str = "SGLD", progress: bool = True,
                observe: Callable[[int, int, int, dict[str, torch.Tensor]], None] | None = None) -> list[LLCResult]:
    """One LLC estimate per restriction, in one pass over the batches (shared by every chain and
    restriction, with each batch's checkpoint loss computed once).

    `observe(restriction, chain, draw, weights)`, if given, is called without grad on every
    `config.draws_every`-th post-burn-in draw (draw counted in thinned draws), with the draw's weights
    (canonical name -> tensor, w* outside the restriction): the hook that observables use.
    """
    config = config.resolve(data)
    params = sampled_parameters(model)
    device = next(iter(params.values())).device
    slots = parameter_slots(model)
    objective = Objective(model, resolve_loss(model, loss_fn))
    w_star = {n: p.detach() for n, p in params.items()}
    batches = batch_stream(data, config.batch_size, config.seed, device)
    first = next(batch_stream(data, config.batch_size, config.seed, device))[1]  # for the one-time checks below
    restrictions = _drop_unused(objective, slots, w_star, restrictions, first)

    # With the LM loss, a restriction to blocks >= l shares the residual stream before block l: computed
    # once per batch at w*, its chains run only blocks l and up (where the model really skips the rest).
    starts = [r.first_layer for r in restrictions]
    if loss_fn is not None or not is_supported_model(model) or not any(starts) or not skips_lower_blocks(model, first):
        starts = [0] * len(restrictions)
    objectives = {layer: Objective(model, lm_loss_from_layer) if layer else objective for layer in set(starts)}

    names = [list(r.masks) for r in restrictions]
    masks = [[r.masks[n] if r.masks[n] is None else r.masks[n].to(device) for n in ns] for r, ns in zip(restrictions, names)]
    stars = [[w_star[n] for n in ns] for ns in names]
    chains = [[Chain([w_star[n].clone().requires_grad_(True) for n in ns], _generator(config.seed, r.label, c, device),
                     r.d, ChainStats(mala=config.sampler == "sgld"))
               for c in range(config.num_chains)] for r, ns in zip(restrictions, names)]
    step_rule = SAMPLERS[config.sampler]
    trace = torch.empty(len(restrictions), config.num_chains, config.num_draws)
    init_losses = torch.empty(config.num_draws)
    checkpoint_losses: dict[int, float] = {}  # batch key -> L_B(w*)
    reference = limit = None  # the checkpoint's loss on the first batch, and the loss a chain may not exceed

    for step in tqdm(range(config.num_burnin + config.num_draws), desc=desc, unit="step", leave=False, disable=not progress):
        key, batch = next(batches)
        draw = step - config.num_burnin
        # 1. The checkpoint's loss on this batch (once per batch), the reference every draw is paired with.
        l_star = checkpoint_losses.get(key) if key is not None else None
        if l_star is None and (draw >= 0 or limit is None):
            with torch.no_grad():
                l_star = objective(batch).item()
            if not math.isfinite(l_star):
                raise ValueError(f"{desc}: the checkpoint's own loss is {l_star} on the sampled data, so its weights "
                                 f"are damaged (NaN/inf); reload or retrain the checkpoint.")
            if key is not None:
                checkpoint_losses[key] = l_star
        if limit is None:
            reference, limit = l_star, l_star + EXPLODE * max(1.0, abs(l_star))
        if draw >= 0:
            init_losses[draw] = l_star
        with torch.no_grad():  # 2. the shared residual streams at w*
            extra = {layer: () if layer == 0 else (model(_tokens(batch), stop_at_layer=layer), layer) for layer in objectives}
        for r, restriction in enumerate(restrictions):
            for c, chain in enumerate(chains[r]):
                # 3. The chain's loss and gradient: its tensors in the restriction's slots, w* elsewhere.
                values = dict(w_star) | dict(zip(names[r], chain.weights, strict=True))
                loss = functional_call(objectives[starts[r]], {f"model.{s}": values[n] for s, n in slots.items()},
                                       (batch, *extra[starts[r]]), tie_weights=False, strict=False)
                grad = torch.autograd.grad(loss, chain.weights)
                value = loss.item()
                if not value < limit:  # also catches NaN
                    raise LLCDivergenceError(
                        f"{desc}: SGLD chain {c} of restriction {restriction.label!r} diverged at step {step} "
                        f"({'burn-in' if draw < 0 else f'draw {draw}'}): loss {value:.4g} vs {reference:.4g} at the "
                        f"checkpoint. Lower epsilon (now {config.epsilon:g}) or raise gamma (now {config.gamma:g})."
                    )
                if draw >= 0:
                    trace[r, c, draw] = value
                    if observe is not None and draw % config.draws_every == 0:
                        with torch.no_grad():
                            observe(r, c, draw // config.draws_every, values)
                with torch.no_grad():  # 4. gradient and noise, masked to the restriction
                    sizes = [t.numel() for t in chain.weights]
                    flat = torch.randn(sum(sizes), generator=chain.generator, device=device)
                    noise = [z.view_as(t) for z, t in zip(flat.split(sizes), chain.weights, strict=True)]
                    grad = list(grad)
                    for i, m in enumerate(masks[r]):
                        if m is not None:
                            grad[i], noise[i] = grad[i] * m, noise[i] * m
                    if draw >= 0:  # 5. diagnostics of the state about to be left (norms only: cheap)
                        distance = norm(torch._foreach_sub(chain.weights, stars[r]))  # ‖w − w*‖
                        grad_norm = norm(grad)  # ‖∇L_B(w)‖
                    drift = step_rule(chain, stars[r], grad, noise, config)  # 6. the sampler's update
                    if draw >= 0:
                        chain.stats.update(loss=value, distance=distance, grad_norm=grad_norm, drift=drift, noise=noise,
                                           config=config)

    results = []
    for r, restriction in enumerate(restrictions):
        loss_increase = float((trace[r] - init_losses).mean())
        per_chain = (config.nbeta * (trace[r] - init_losses).mean(1)).double().numpy()
        diagnostics = summarise([ch.stats for ch in chains[r]], config.nbeta * (trace[r] - init_losses).numpy(),
                                loss_increase=loss_increase, init_loss=float(init_losses.mean()), d=restriction.d,
                                gamma=config.gamma, label=f"{restriction.label} ({desc})")
        results.append(LLCResult(
            mean=float(per_chain.mean()), std=float(per_chain.std(ddof=1)), per_chain=per_chain,
            loss_trace=trace[r].clone(), init_losses=init_losses.clone(), init_loss=float(init_losses.mean()),
            d=restriction.d, restrict=restriction.label, config=config, diagnostics=diagnostics, note=restriction.note,
            final_params={n: torch.stack([ch.weights[i].detach() for ch in chains[r]]).cpu() for i, n in enumerate(names[r])},
        ))
    return results


def _tokens(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _drop_unused(objective: Objective, slots: dict[str, str], w_star: dict[str, torch.Tensor],
                 restrictions: list[Restriction], batch) -> list[Restriction]:
    """One fwd+bwd at w*: a sampled parameter the forward does not use is named (`SamplerWarning`) and
    dropped, so d counts only coordinates the loss depends on."""
    wanted = sorted({n for r in restrictions for n in r.masks})
    leaves = {n: w_star[n].clone().requires_grad_(True) for n in wanted}
    values = dict(w_star) | leaves
    loss = functional_call(objective, {f"model.{s}": values[n] for s, n in slots.items()}, (batch,),
                           tie_weights=False, strict=False)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    unused = {n for n, g in zip(leaves, grads, strict=True) if g is None}
    if not unused:
        return restrictions
    warnings.warn(f"Not sampled: the forward does not use the parameter(s) {sorted(unused)}.", SamplerWarning, stacklevel=3)
    out = []
    for r in restrictions:
        kept = {n: m for n, m in r.masks.items() if n not in unused}
        if not kept:
            raise ValueError(f"restrict={r.label!r} selects only parameters the forward does not use: {sorted(r.masks)}.")
        d = sum(w_star[n].numel() if m is None else int(m.sum()) for n, m in kept.items())
        out.append(dataclasses.replace(r, masks=kept, d=d))
    return out


def estimate_llc(model: nn.Module, data, config: SGLDConfig | None = None, *, restrict=None,
                 loss_fn: Callable | None = None, progress: bool = True, **options) -> LLCResult:
    """The LLC of `model` at its current weights, estimated by SGLD on `data`.

    `config` holds the hyperparameters (`SGLDConfig`); keyword `options` (epsilon=..., num_chains=...)
    override its fields. `restrict` samples only some coordinates (a head "l1h3" or (1, 3), a KV group
    "l1g0", an MLP "l1.mlp", a layer "layer1", a component "embed", a name pattern "blocks.0.attn.*", or
    a list). Raises `LLCDivergenceError` when a chain diverges; warns (`SamplerWarning`) when the
    diagnostics say the estimate is untrustworthy. The caller's model is left exactly as it was.
    """
    config = SGLDConfig.build(config, **options)
    restriction = resolve_restriction(model, restrict)
    return sample_llcs(model, data, [restriction], config, loss_fn=loss_fn, desc="SGLD",
                       progress=progress)[0]
