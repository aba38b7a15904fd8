"""The local learning coefficient (LLC) by SGLD around a checkpoint w* (design.md §4).

    Δw = −(ε/2)·[nβ·∇L_B(w) + γ·(w − w*)] + N(0, ε)       (drift and noise masked by a restriction)
    λ̂  = nβ · mean over chains and post-burn-in draws of [L_B(w_t) − L_B(w*)]

L_B(w*) is the checkpoint's loss on the same minibatch as the draw (pairing), which removes the batch
noise from λ̂. All chains (and, in `estimate_head_llcs`, all restrictions) see the same batch at each
step, so each batch's checkpoint loss is computed once.

Sampling runs on the caller's model itself, never a copy: a chain's state is a plain tensor, evaluated
through `torch.func.functional_call` (`Objective.at`: one tensor per parameter slot, `tie_weights=False`),
so the model's parameters, buffers and hooks are untouched, also when sampling fails midway. Chains that
sample the same parameters (a restriction's chains, the heads of one layer) are stacked and evaluated in
one `torch.func.vmap`-ed forward+backward, `SGLDConfig.max_batched` at a time; each keeps its own noise
generator, so the numbers are those of the chains run one at a time (the path taken where vmap cannot
batch the model). The sampled set is `models.sampled_parameters`: each weight the forward uses, once.

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

from ..errors import InvalidTypeError, InvalidValueError, LLCDivergenceError, UnknownKeyError
from ..models import (
    eval_mode,
    hf_boot_hint,
    is_supported_model,
    mean_token_loss,
    parameter_slots,
    sampled_parameters,
)
from ..options import build, option, validate
from .batches import as_tensors, batch_stream, lm_batch
from .diagnostics import TRACES, ChainStats, SamplerDiagnostics, SamplerWarning, summarise
from .fast_forward import check_precision, precision_context, verified_fast_forward
from .restrict import Restriction, resolve_restriction
from .samplers import SAMPLERS, Chains

EXPLODE = 100.0
"""A chain has diverged when its loss exceeds L(w*) + EXPLODE·max(1, |L(w*)|) (or is NaN/inf)."""



def default_nbeta(batch_size: int) -> float:
    """nβ = n/log n for n = batch_size: the papers' "adaptive" β = 1/log n. The one source of this default."""
    if batch_size < 2:
        raise InvalidValueError(f"batch_size must be >= 2 for the default nbeta = n/log n, got {batch_size}.")
    return batch_size / math.log(batch_size)


@dataclass(frozen=True)
class SGLDConfig:
    """The sampler's hyperparameters, declared and validated once; every estimator takes one.

    `nbeta=None` means n/log n of the batch size in use (`resolve`); a DataLoader's own batch size wins.
    """

    epsilon: float = option(1e-3, "SGLD step size epsilon", gt=0)
    gamma: float = option(200.0, "localisation strength gamma", ge=0)
    nbeta: float | None = option(None, "inverse temperature n*beta (default: n/log n of the batch size)", gt=0)
    num_chains: int = option(4, "chains", ge=2, why="(the std across chains needs two)")
    num_draws: int = option(100, "draws per chain after burn-in", ge=1)
    num_burnin: int = option(50, "burn-in steps per chain", ge=0)
    batch_size: int = option(32, "minibatch size", ge=1)
    seed: int = option(0, "seed of the batches and the chains' noise", ge=0)
    sampler: str = option("sgld", "update rule: sgld, sgnht or rmsprop_sgld", choices=sorted(SAMPLERS))
    diffusion: float = option(0.01, "SGNHT's diffusion A (the thermostat's start)", gt=0)
    rmsprop_decay: float = option(0.999, "RMSprop-SGLD's running-mean decay alpha", ge=0, lt=1)
    rmsprop_delta: float = option(1.0, "RMSprop-SGLD's delta: preconditioner <= 1/delta", gt=0)
    draws_every: int = option(1, "observables on every k-th draw (thinning; 1 = every draw)", ge=1)
    max_batched: int = option(8, "chains evaluated together in one batched forward+backward (1: one at a time; "
                              "lower it if memory runs out)", ge=1)
    fast_forward: bool = option(True, "sample through sampling.fast_forward (plain torch from TL's weight views, "
                                "fused attention) where it reproduces the TL forward and no hook point holds a "
                                "hook; False: the TL forward")
    precision: str = option("fp32", "fp32, tf32 (TF32 matmuls) or bf16 (autocast): CUDA only, a CPU always "
                            "samples in float32")

    def __post_init__(self):
        validate(self)
        check_precision(self.precision)

    @classmethod
    def build(cls, config: SGLDConfig | None = None, **overrides: Any) -> SGLDConfig:
        """`config` (default: the defaults) with keyword overrides (other spellings too), naming any unknown one."""
        return dataclasses.replace(config or cls(), **build(cls, overrides))

    def resolve(self, data) -> SGLDConfig:
        """The batch size in use (a DataLoader's own) and nβ filled in."""
        loader = as_tensors(data)
        batch_size = self.batch_size
        if isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size is not None:
            batch_size = loader.batch_size
        nbeta = default_nbeta(batch_size) if self.nbeta is None else float(self.nbeta)
        return dataclasses.replace(self, batch_size=batch_size, nbeta=nbeta)

    def to_dict(self) -> dict[str, Any]:
        """The settings that determine the numbers (a stored result's key): all but `max_batched` and
        `fast_forward`, which only change how the same numbers are computed (to float rounding)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("max_batched", "fast_forward")}


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
    batched: bool = False  # its chains ran in batched (vmapped) forwards; False with max_batched=1 or where
    # the model has an op torch.func.vmap cannot batch (the chains then run one at a time, to the same numbers)
    forward: str = "model"  # "fast" (sampling.fast_forward) or why the model's own forward ran
    final_params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # name -> [chains, ...]
    trace: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # diagnostics.TRACES -> [chains, draws]

    @property
    def se(self) -> float:
        """Standard error of the mean over chains."""
        return self.std / math.sqrt(self.config.num_chains)

    @property
    def llc_trace(self) -> Float[torch.Tensor, "chains draws"]:
        """nβ·(L_B(w_t) − L_B(w*)) per draw: the quantity λ̂ averages; flat when sampling is stable."""
        return self.config.nbeta * (self.loss_trace - self.init_losses)

    def summary(self) -> dict[str, Any]:
        """The estimate under devinterp's summary keys (`llc/mean`, `llc/std`, `llc/trace`, `loss/trace`,
        `init_loss`) and as flat names (`llc_mean`, `llc_std`, `llc_se`, `llc_per_chain`); `result[key]` reads it."""
        llc, loss = self.llc_trace.double().numpy(), self.loss_trace.double().numpy()
        return {"llc/mean": self.mean, "llc/std": self.std, "llc/trace": llc, "loss/trace": loss,
                "init_loss": self.init_loss, "llc_mean": self.mean, "llc_std": self.std, "llc_se": self.se,
                "llc_per_chain": self.per_chain, "llc_trace": llc, "loss_trace": loss}

    def __getitem__(self, key: str):
        summary = self.summary()
        if key not in summary:
            raise UnknownKeyError(f"LLCResult has no {key!r}; keys: {sorted(summary)}.")
        return summary[key]

    def to_xarray(self):
        """The traces as an `xarray.Dataset` on dims (chain, draw): `llc` (nβ·(L_B(w_t) − L_B(w*))), `loss`
        (L_B(w_t)) and `init_loss` (L_B(w*), per draw), with the estimate and its settings as attributes."""
        import xarray as xr

        chains, draws = self.loss_trace.shape
        coords = {"chain": np.arange(chains), "draw": np.arange(draws)}
        attrs = {"llc_mean": self.mean, "llc_std": self.std, "llc_se": self.se, "d": self.d,
                 "restrict": self.restrict, "init_loss": self.init_loss, "forward": self.forward,
                 **{f"sgld_{k}": v for k, v in self.config.to_dict().items()}}
        return xr.Dataset({"llc": (("chain", "draw"), self.llc_trace.double().numpy()),
                           "loss": (("chain", "draw"), self.loss_trace.double().numpy()),
                           "init_loss": (("draw",), self.init_losses.double().numpy())}, coords=coords, attrs=attrs)

    def to_inference_data(self):
        """An ArviZ `InferenceData`: `llc` in its posterior group (for `arviz.summary`, `rhat`, `ess`,
        `plot_trace`), the losses in `sample_stats`, on dims (chain, draw)."""
        import arviz as az

        data = self.to_xarray()
        attrs = {k: v for k, v in data.attrs.items() if v is not None}  # netCDF-safe attributes
        return az.InferenceData(posterior=data[["llc"]].assign_attrs(attrs),
                                sample_stats=data[["loss", "init_loss"]].assign_attrs(attrs))


# --------------------------------------------------------------------------------------------------
# The loss: explicit loss_fn, else the model's own `loss_fn`, else next-token cross-entropy.


def lm_loss(model: nn.Module, batch, resid: torch.Tensor | None = None, layer: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of a TransformerLens model on a batch (`batches.lm_batch`: padding and
    labels of -100 left out); with `resid` and `layer`, computed from that residual stream before block `layer`."""
    tokens, keep = lm_batch(batch)
    logits = model(tokens) if layer is None else model(resid, start_at_layer=layer)
    return mean_token_loss(logits, tokens, keep)


def fast_lm_loss(forward: Callable) -> Callable:
    """`lm_loss` through a fast forward `forward(tokens, start_at_layer, resid)` (`sampling.fast_forward`)
    instead of the model's own."""

    def loss(model: nn.Module, batch, resid: torch.Tensor | None = None, layer: int | None = None) -> torch.Tensor:
        tokens, keep = lm_batch(batch)
        return mean_token_loss(forward(tokens, layer, resid), tokens, keep)

    return loss


def choose_forward(model: nn.Module, loss_fn: Callable | None, config: SGLDConfig, batch) -> tuple[Callable | None, str]:
    """(the fast forward, "fast") where it may replace the TL forward in the LM loss (`config.fast_forward`,
    the default loss, no hook on a hook point that it would skip, and `verified_fast_forward` finds equal logits
    and gradients on `batch`); else (None, why not). Attention is fused on a GPU and written out on a CPU,
    where vmap has no batching rule for the fused kernel."""
    if not config.fast_forward:
        return None, "model: fast_forward=False"
    if loss_fn is not None or not is_supported_model(model):
        return None, "model: a custom loss or a model TransformerLens does not describe"
    if any(h._forward_hooks or h._forward_pre_hooks or h._backward_hooks for h in model.hook_dict.values()):
        forward, problem = None, "hooks attached (the fast forward would skip them)"
    else:
        device = next(model.parameters()).device
        with eval_mode(model):
            forward, problem = verified_fast_forward(model, lm_batch(batch)[0], sdpa=device.type == "cuda")
    if forward is not None:
        return forward, "fast"
    warnings.warn(f"Sampling through the TransformerLens forward, not the fast forward (several times slower): "
                  f"{problem}.", SamplerWarning, stacklevel=3)  # once per reason, by Python's default filter
    return None, f"model: {problem}"


def skips_lower_blocks(model: nn.Module, batch) -> bool:
    """Whether `model(resid, start_at_layer=1)` really skips block 0: where a model runs the lower blocks
    anyway, a cached residual stream would save nothing."""
    tokens = lm_batch(batch)[0][:1]
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
    """`loss_fn(model, batch)` -> scalar. TransformerLens models default to `lm_loss`; another model's `loss_fn`
    may be a method `(batch)`, a function `(model, batch)`, or a criterion module applied as
    `criterion(model(x), y)` to batches `(x, y)`. A loss that returns per-example or per-token values
    (devinterp's `(model, input_ids) -> [batch, seq-1]`) or devinterp's `(loss, info)` pair is reduced to its mean."""
    if loss_fn is None and is_supported_model(model):  # before `loss_fn`: TransformerLens models have one of another signature
        return lm_loss
    own = getattr(model, "loss_fn", None)
    if loss_fn is not None:
        given = loss_fn
    elif isinstance(own, nn.Module):
        def given(m, batch):
            return m.loss_fn(m(batch[0]), batch[1])
    elif inspect.ismethod(own):
        def given(m, batch):
            return m.loss_fn(batch)
    elif callable(own):
        given = own
    else:
        raise InvalidTypeError(hf_boot_hint(model) or
            f"No loss for a {type(model).__name__}: pass loss_fn(model, batch) -> scalar, e.g. "
            f"loss_fn=lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]) for batches (x, y)."
        )

    def loss(m: nn.Module, batch, *extra) -> torch.Tensor:
        value = given(m, batch, *extra)
        if isinstance(value, (tuple, list)):  # devinterp's evaluate: (loss, {...})
            value = value[0]
        return value if value.ndim == 0 else value.mean()

    return loss


class Objective(nn.Module):
    """`loss(model, batch, *extra)` as a module, evaluated at any weights by `at`: the one place where the
    sampler runs the model, whatever the loss does with it, at `precision` (`fast_forward.precision_context`)."""

    def __init__(self, model: nn.Module, loss: Callable, precision: str = "fp32"):
        super().__init__()
        self.model, self.loss, self.precision = model, loss, precision
        self.slots = parameter_slots(model)
        self.device = next(model.parameters()).device

    def forward(self, batch, *extra):
        with precision_context(self.precision, self.device):
            return self.loss(self.model, batch, *extra)

    def at(self, weights: dict[str, torch.Tensor], batch, *extra) -> torch.Tensor:
        """The loss with the model's weights replaced by `weights` (canonical name -> tensor, every sampled
        parameter), through a functional call that leaves the model untouched (and works under vmap)."""
        return functional_call(self, {f"model.{s}": weights[n] for s, n in self.slots.items()}, (batch, *extra),
                               tie_weights=False, strict=False)


# --------------------------------------------------------------------------------------------------
# The sampler.


def _generator(seed: int, label: str, chain: int, device) -> torch.Generator:
    """Noise for (restriction, chain): the same in estimate_llc(restrict=h) and estimate_head_llcs."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{label}/{chain}".encode()).digest()[:8], "little")
    return torch.Generator(device=device).manual_seed(key)


def sample_llcs(model: nn.Module, data, restrictions: list[Restriction], config: SGLDConfig, *,
                loss_fn: Callable | None = None, desc: str = "SGLD", progress: bool = True,
                observe: Callable[[int, int, int, dict[str, torch.Tensor]], None] | None = None,
                sampling_forward: tuple[Callable | None, str] | None = None) -> list[LLCResult]:
    """One LLC estimate per restriction, in one pass over the batches (shared by every chain and
    restriction, with each batch's checkpoint loss computed once). Chains that sample the same parameters
    (a restriction's chains; the heads of one layer) run stacked, up to `config.max_batched` per batched call.

    `observe(restriction, chain, draw, weights)`, if given, is called without grad on every
    `config.draws_every`-th post-burn-in draw (draw counted in thinned draws), with the draw's weights
    (canonical name -> tensor, w* outside the restriction): the hook that observables use.
    `sampling_forward`: `choose_forward`'s choice where the caller made it already (observables evaluate
    through the same forward).

    The model samples in eval mode (no dropout), whatever mode it is in; its mode is restored on return.
    """
    with eval_mode(model):
        return _sample_llcs(model, data, restrictions, config, loss_fn=loss_fn, desc=desc, progress=progress,
                            observe=observe, sampling_forward=sampling_forward)


def _sample_llcs(model: nn.Module, data, restrictions: list[Restriction], config: SGLDConfig, *,
                 loss_fn: Callable | None, desc: str, progress: bool, observe, sampling_forward) -> list[LLCResult]:
    config = config.resolve(data)
    params = sampled_parameters(model)
    device = next(iter(params.values())).device
    w_star = {n: p.detach() for n, p in params.items()}
    batches = batch_stream(data, config.batch_size, config.seed, device)
    first = next(batch_stream(data, config.batch_size, config.seed, device))[1]  # for the one-time checks below
    forward, how = sampling_forward or choose_forward(model, loss_fn, config, first)
    objective = Objective(model, fast_lm_loss(forward) if forward else resolve_loss(model, loss_fn), config.precision)
    restrictions = _drop_unused(objective, w_star, restrictions, first)

    # With the LM loss, a restriction to blocks >= l shares the residual stream before block l: computed
    # once per batch at w*, its chains run only blocks l and up (where the model really skips the rest).
    starts = [r.first_layer for r in restrictions]
    if loss_fn is not None or not is_supported_model(model) or not any(starts) or not skips_lower_blocks(model, first):
        starts = [0] * len(restrictions)

    stacks = _stacks(restrictions, starts, w_star, config, device)
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
                raise InvalidValueError(f"{desc}: the checkpoint's own loss is {l_star} on the sampled data, so its weights "
                                        f"are damaged (NaN/inf); reload or retrain the checkpoint.")
            if key is not None:
                checkpoint_losses[key] = l_star
        if limit is None:
            reference, limit = l_star, l_star + EXPLODE * max(1.0, abs(l_star))
        if draw >= 0:
            init_losses[draw] = l_star
        with torch.no_grad():  # 2. the shared residual streams at w*
            extra = {layer: () if layer == 0 else (model(lm_batch(batch)[0], stop_at_layer=layer), layer) for layer in set(starts)}
        for stack in stacks:
            chains = stack.chains
            # 3. Every chain's loss and gradient in one batched call: its coordinates in its restriction's
            #    parameters, w* elsewhere.
            losses, grad = _losses_and_grads(objective, stack, w_star, batch, extra[stack.start])
            values = losses.double().cpu().numpy()
            if not (values < limit).all():  # also catches NaN
                g = int(np.argmin(values < limit))
                r, c = stack.members[g]
                raise LLCDivergenceError(
                    f"{desc}: SGLD chain {c} of restriction {restrictions[r].label!r} diverged at step {step} "
                    f"({'burn-in' if draw < 0 else f'draw {draw}'}): loss {values[g]:.4g} vs {reference:.4g} at "
                    f"the checkpoint. Lower epsilon (now {config.epsilon:g}) or raise gamma (now {config.gamma:g})."
                )
            if draw >= 0:
                trace[(*stack.index, draw)] = torch.from_numpy(values).float()
                if observe is not None and draw % config.draws_every == 0:
                    with torch.no_grad():
                        for (r, c), row in zip(stack.members, chains.weights, strict=True):
                            observe(r, c, draw // config.draws_every, w_star | stack.unflat(row))
            with torch.no_grad():
                # 4. Each chain's noise from its own generator; gradient and noise masked to its restriction.
                noise = torch.stack([torch.randn(stack.star.numel(), generator=g, device=device) for g in chains.generators])
                if stack.mask is not None:
                    grad, noise = grad * stack.mask, noise * stack.mask
                offset = chains.weights - stack.star  # 5. the state about to be left, for the diagnostics
                drift = step_rule(chains, stack.star, grad, noise, config)  # 6. the sampler's update
                if draw >= 0:
                    chains.stats.update(loss=values, offset=offset, grad=grad, drift=drift, noise=noise, config=config)

    per_step = {k: np.empty((len(restrictions), config.num_chains, config.num_draws)) for k in TRACES[1:]}
    finals, unflat, batched = {}, {}, {}
    for stack in stacks:
        for k, v in stack.chains.stats.traces().items():
            per_step[k][stack.index] = v
        finals.update(zip(stack.members, stack.chains.weights, strict=True))
        for r, _ in stack.members:
            unflat[r], batched[r] = stack.unflat, batched.get(r, True) and stack.batched
    results = []
    for r, restriction in enumerate(restrictions):
        increase = trace[r] - init_losses
        llcs = (config.nbeta * increase.mean(1)).double().numpy()
        traces = {"loss": trace[r].double().numpy()} | {k: v[r] for k, v in per_step.items()}
        diagnostics = summarise(traces, config.nbeta * increase.double().numpy(), loss_increase=float(increase.mean()),
                                d=restriction.d, gamma=config.gamma, label=f"{restriction.label} ({desc})")
        final = unflat[r](torch.stack([finals[r, c] for c in range(config.num_chains)]))
        results.append(LLCResult(
            mean=float(llcs.mean()), std=float(llcs.std(ddof=1)), per_chain=llcs, loss_trace=trace[r].clone(),
            init_losses=init_losses.clone(), init_loss=float(init_losses.mean()), d=restriction.d,
            restrict=restriction.label, config=config, diagnostics=diagnostics, note=restriction.note,
            batched=batched[r], forward=how, final_params={n: t.cpu() for n, t in final.items()}, trace=traces,
        ))
    return results


@dataclass
class _Stack:
    """Chains run together: (restriction, chain) pairs that sample the same parameters from the same start
    layer, each chain's coordinates one flat row (the parameters' coordinates concatenated)."""

    members: list[tuple[int, int]]  # (restriction, chain) of each row
    names: list[str]  # the parameters, in the restrictions' order (the noise's order)
    shapes: list[torch.Size]
    start: int  # the block the forward starts at
    star: Float[torch.Tensor, " coords"]  # w*
    mask: torch.Tensor | None  # [chains, coords]: the coordinates each chain moves (None: all)
    chains: Chains
    batched: bool | None  # whether vmap runs the stack; None until its first call tries

    @property
    def index(self) -> tuple[list[int], list[int]]:
        """(restrictions, chains) of the rows, to index [restriction, chain] arrays."""
        return [r for r, _ in self.members], [c for _, c in self.members]

    def unflat(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of `rows` ([coords] or [chains, coords]) as that parameter."""
        parts = rows.split([math.prod(s) for s in self.shapes], dim=-1)
        return {n: z.view(*rows.shape[:-1], *s) for n, z, s in zip(self.names, parts, self.shapes, strict=True)}


def _stacks(restrictions: list[Restriction], starts: list[int], w_star: dict[str, torch.Tensor], config: SGLDConfig,
            device) -> list[_Stack]:
    """Every (restriction, chain) pair in a stack with the pairs of the same parameters and start layer, at
    most `config.max_batched` per stack; each chain at w*, with its own generator."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, restriction in enumerate(restrictions):
        for c in range(config.num_chains):
            groups.setdefault((starts[r], tuple(restriction.masks)), []).append((r, c))
    stacks = []
    for (start, names), pairs in groups.items():
        star = torch.cat([w_star[n].flatten() for n in names])
        for i in range(0, len(pairs), config.max_batched):
            members = pairs[i:i + config.max_batched]
            masks = [restrictions[r].masks for r, _ in members]
            mask = None if all(m[n] is None for m in masks for n in names) else torch.stack([torch.cat([
                (torch.ones_like(w_star[n], dtype=torch.bool) if m[n] is None else m[n].to(device)).flatten() for n in names
            ]) for m in masks])
            chains = Chains(star.expand(len(members), -1).clone(),
                            [_generator(config.seed, restrictions[r].label, c, device) for r, c in members],
                            torch.tensor([float(restrictions[r].d) for r, _ in members], device=device),
                            ChainStats(len(members), mala=config.sampler == "sgld"))
            stacks.append(_Stack(members, list(names), [w_star[n].shape for n in names], start, star, mask, chains,
                                 None if len(members) > 1 else False))
    return stacks


def _losses_and_grads(objective: Objective, stack: _Stack, w_star: dict[str, torch.Tensor], batch,
                      extra: tuple) -> tuple[Float[torch.Tensor, " chains"], Float[torch.Tensor, "chains coords"]]:
    """L_B(w) and ∇L_B(w) of every chain of the stack: one vmapped forward+backward, or chain by chain
    where vmap cannot batch the model (found on the stack's first call, then kept; same numbers)."""

    def loss(row):  # one chain: its coordinates in the stack's parameters, w* elsewhere
        return objective.at(w_star | stack.unflat(row), batch, *extra)

    if stack.batched is not False:
        try:
            grad, losses = torch.func.vmap(torch.func.grad_and_value(loss))(stack.chains.weights)
            stack.batched = True
            return losses.detach(), grad
        except Exception:  # an op without a batching rule (or a real error, which the loop below raises again)
            if stack.batched:
                raise
            stack.batched = False
    losses, grads = [], []
    for row in stack.chains.weights:  # plain autograd, one chain's graph at a time
        row = row.detach().requires_grad_(True)
        value = loss(row)
        losses.append(value.detach())
        grads.append(torch.autograd.grad(value, row)[0])
    return torch.stack(losses), torch.stack(grads)


def _drop_unused(objective: Objective, w_star: dict[str, torch.Tensor], restrictions: list[Restriction],
                 batch) -> list[Restriction]:
    """One fwd+bwd at w*: a sampled parameter the forward does not use is named (`SamplerWarning`) and
    dropped, so d counts only coordinates the loss depends on."""
    wanted = sorted({n for r in restrictions for n in r.masks})
    leaves = {n: w_star[n].clone().requires_grad_(True) for n in wanted}
    loss = objective.at(w_star | leaves, batch)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    unused = {n for n, g in zip(leaves, grads, strict=True) if g is None}
    if not unused:
        return restrictions
    warnings.warn(f"Not sampled: the forward does not use the parameter(s) {sorted(unused)}.", SamplerWarning, stacklevel=3)
    out = []
    for r in restrictions:
        kept = {n: m for n, m in r.masks.items() if n not in unused}
        if not kept:
            raise InvalidValueError(f"restrict={r.label!r} selects only parameters the forward does not use: {sorted(r.masks)}.")
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
