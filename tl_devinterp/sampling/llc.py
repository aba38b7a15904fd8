"""The local learning coefficient (LLC) by SGLD around a checkpoint w* (docs/design.md, "The estimator").

    Δw = −(ε/2)·[nβ·∇L_B(w) + γ·(w − w*)] + N(0, ε)       (drift and noise masked by a restriction)
    λ̂  = nβ · mean over chains and post-burn-in draws of [L_B(w_t) − L_B(w*)]

L_B(w*) is the checkpoint's loss on the same minibatch as the draw (pairing), which removes the batch
noise from λ̂. All chains (and, in `estimate_head_llcs`, all restrictions) see the same batch at each
step, so each batch's checkpoint loss is computed once.

Sampling runs on the caller's model itself, never a copy: a chain's state is a plain tensor, evaluated
through `torch.func.functional_call` (`Objective.at`: one tensor per parameter slot, `tie_weights=False`),
so the model's parameters, buffers and hooks are untouched, also when sampling fails midway. Chains that
sample the same parameters (a restriction's chains, the heads of one layer) are stacked (`sampling.chains`)
and evaluated in one `torch.func.vmap`-ed forward+backward, `SGLDConfig.max_batched` at a time; each keeps its own noise
generator, so the numbers are those of the chains run one at a time (the path taken where vmap cannot
batch the model). The sampled set is `models.sampled_parameters`: each weight the forward uses, once.

Memory is proportional to what is sampled: a chain's state holds its restriction's d coordinates only
(a GPT-2-small head: 196,800, not its layer's 2,361,600), placed into w* inside the forward; the diagnostics
keep per-step numbers and one [chains, d] tensor for the MALA score; w* is held once per stack. A step
allocates nothing of the chains' size: w − w*, the drift, the noise and the MALA row are written in place
into four rows per chain (`sampling.chains`), so a stack of k chains costs about 4–5·k·d floats plus the
activations of k forward+backward passes (`sampling.plan` measures it before a run).

Hyperparameters of the papers: full-model LLC (ICL paper, 3M LM) ε=0.003, γ=300, nβ≈21.7 (batch 100),
20 chains × 200 draws; per-head rLLC ε=0.001, γ=200, nβ=30, 4 chains × 200 draws, batch 32. The defaults
here are the rLLC ones with fewer draws, sized for small models on a CPU; `calibrate_llc` checks them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import nn
from tqdm.auto import tqdm

from ..errors import (
    InvalidValueError,
    LLCDivergenceError,
    UnknownKeyError,
)
from ..models import (
    eval_mode,
    is_supported_model,
    sampled_parameters,
)
from .batches import as_tensors, batch_stream, lm_batch
from .chains import Final, Stack, build_stacks, chain_noise, drop_unused, losses_and_grads, split_batch
from .diagnostics import TRACES, SamplerDiagnostics, summarise
from .objective import (
    Objective,
    choose_forward,
    fast_lm_loss,
    resolve_loss,
    skips_lower_blocks,
)
from .restrict import Restriction, resolve_restriction
from .samplers import SAMPLERS, drift_
from .settings import SGLDConfig

EXPLODE = 100.0
"""A chain has diverged when its loss exceeds L(w*) + EXPLODE·max(1, |L(w*)|, d/(2nβ)) (or is NaN/inf): 100
times the loss's scale, or 100 times the largest increase a chain in equilibrium has on average (nβ·E[L − L*] =
λ ≤ d/2), which is what matters where L(w*) ≈ 0 and nβ is small."""



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
    final: Final | None = field(repr=False, default=None)  # the chains' last coordinates (final_params)
    trace: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # diagnostics.TRACES -> [chains, draws]

    @property
    def final_params(self) -> dict[str, torch.Tensor]:
        """Name -> [chains, *shape]: the chains' last weights of each parameter the restriction touches (w*
        outside it), built on demand from the [chains, d] coordinates the result keeps."""
        return {} if self.final is None else self.final.params()

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
        (L_B(w_t)) and the other per-draw sampler metrics of `trace` (‖w − w*‖, ‖∇L‖, acceptance, ...), and
        `init_loss` (L_B(w*), per draw), with the estimate and its settings as attributes."""
        import xarray as xr

        chains, draws = self.loss_trace.shape
        coords = {"chain": np.arange(chains), "draw": np.arange(draws)}
        attrs = {"llc_mean": self.mean, "llc_std": self.std, "llc_se": self.se, "d": self.d,
                 "restrict": self.restrict, "init_loss": self.init_loss, "forward": self.forward,
                 **{f"sgld_{k}": v for k, v in self.config.to_dict().items()}}
        per_draw = {"llc": self.llc_trace.double().numpy(), **self.trace, "loss": self.loss_trace.double().numpy()}
        return xr.Dataset({k: (("chain", "draw"), np.asarray(v)) for k, v in per_draw.items()}
                          | {"init_loss": (("draw",), self.init_losses.double().numpy())}, coords=coords, attrs=attrs)

    def to_inference_data(self):
        """An ArviZ `InferenceData`: `llc` in its posterior group (for `arviz.summary`, `rhat`, `ess`,
        `plot_trace`), the losses and sampler metrics in `sample_stats`, on dims (chain, draw)."""
        import arviz as az

        data = self.to_xarray()
        attrs = {k: v for k, v in data.attrs.items() if v is not None}  # netCDF-safe attributes
        return az.InferenceData(posterior=data[["llc"]].assign_attrs(attrs),
                                sample_stats=data.drop_vars("llc").assign_attrs(attrs))


# --------------------------------------------------------------------------------------------------
# The sampler.


def sample_llcs(model: nn.Module, data, restrictions: list[Restriction], config: SGLDConfig, *,
                loss_fn: Callable | None = None, desc: str = "SGLD", progress: bool = True,
                observe: Callable[[int, int, int, dict[str, torch.Tensor]], None] | None = None,
                sampling_forward: tuple[Callable | None, str] | None = None,
                init: list[LLCResult] | None = None) -> list[LLCResult]:
    """One LLC estimate per restriction, in one pass over the batches (shared by every chain and
    restriction, with each batch's checkpoint loss computed once). Chains that sample the same parameters
    (a restriction's chains; the heads of one layer) run stacked, up to `config.max_batched` per batched call.

    `observe(restriction, chain, draw, weights)`, if given, is called without grad on every
    `config.draws_every`-th post-burn-in draw (draw counted in thinned draws), with the draw's weights
    (canonical name -> tensor, w* outside the restriction): the hook that observables use.
    `sampling_forward`: `choose_forward`'s choice where the caller made it already (observables evaluate
    through the same forward). `init`: one earlier result per restriction whose chains' last states the
    chains start from (instead of w*).

    The model samples in eval mode (no dropout), whatever mode it is in; its mode is restored on return.
    """
    with eval_mode(model):
        return _sample_llcs(model, data, restrictions, config, loss_fn=loss_fn, desc=desc, progress=progress,
                            observe=observe, sampling_forward=sampling_forward, init=init)


def _sample_llcs(model: nn.Module, data, restrictions: list[Restriction], config: SGLDConfig, *,
                 loss_fn: Callable | None, desc: str, progress: bool, observe, sampling_forward,
                 init: list[LLCResult] | None = None) -> list[LLCResult]:
    """Plan (settings, the objective and its forward, the chains' stacks), run (the chain loop), summarise
    (one LLCResult per restriction)."""
    config = config.resolve(data)
    plan = _plan(model, data, restrictions, config, loss_fn, sampling_forward, init)
    trace, init_losses = _run(model, plan, config, desc, progress, observe)
    return _summarise(plan, trace, init_losses, config, desc)


@dataclass
class _Plan:
    """What the chain loop runs: the objective and how it runs the model, the restrictions left after
    dropping unused parameters, each one's first block, the chains' stacks, the batches."""

    objective: Objective
    how: str
    restrictions: list[Restriction]
    starts: list[int]
    stacks: list[Stack]
    batches: Any
    loader: bool
    w_star: dict[str, torch.Tensor]


def _plan(model: nn.Module, data, restrictions: list[Restriction], config: SGLDConfig, loss_fn: Callable | None,
          sampling_forward, init: list[LLCResult] | None = None) -> _Plan:
    params = sampled_parameters(model)
    device = next(iter(params.values())).device
    w_star = {n: p.detach() for n, p in params.items()}
    accumulate = config.gradient_accumulation_steps
    loader = isinstance(as_tensors(data), torch.utils.data.DataLoader)  # a loader's batches are taken k at a time
    batches = batch_stream(data, config.batch_size * (1 if loader else accumulate), config.seed, device)
    first = next(batch_stream(data, config.batch_size, config.seed, device))[1]  # for the one-time checks below
    forward, how = sampling_forward or choose_forward(model, loss_fn, config, first)
    objective = Objective(model, fast_lm_loss(forward) if forward else resolve_loss(model, loss_fn), config.precision)
    restrictions = drop_unused(objective, w_star, restrictions, first, cache=loss_fn is None and forward is not None)

    # With the LM loss, a restriction to blocks >= l shares the residual stream before block l: computed
    # once per batch at w*, its chains run only blocks l and up (where the model really skips the rest).
    starts = [r.first_layer for r in restrictions]
    if loss_fn is not None or not is_supported_model(model) or not any(starts) or not skips_lower_blocks(model, first):
        starts = [0] * len(restrictions)

    stacks = build_stacks(restrictions, starts, w_star, config, device)
    if init is not None:  # chains start where an earlier run's chains ended (checked once per restriction)
        finals = [_final_of(earlier, restriction, config.num_chains, w_star)
                  for earlier, restriction in zip(init, restrictions, strict=True)]
        for stack in stacks:
            for i, (r, c) in enumerate(stack.members):
                stack.chains.weights[i] = finals[r][c]
    if config.init_noise:  # chains start at w* + init_noise·N(0, 1) on their coordinates
        for stack in stacks:
            stack.chains.weights.add_(chain_noise(stack), alpha=config.init_noise)
    return _Plan(objective, how, restrictions, starts, stacks, batches, loader, w_star)


def _final_of(earlier: LLCResult, restriction: Restriction, chains: int,
              w_star: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last states [chains, d] of `earlier`'s chains, checked to be states of these coordinates at this w*."""
    final = getattr(earlier, "final", None)
    if final is None or earlier.restrict != restriction.label or final.rows.shape[1] != restriction.d:
        raise InvalidValueError(f"init must be an LLCResult of the same restriction ({restriction.label!r}, d = "
                                f"{restriction.d}); got {type(earlier).__name__} of "
                                f"{getattr(earlier, 'restrict', None)!r}. Pass the result of an earlier estimate_llc.")
    if chains > len(final.rows):
        raise InvalidValueError(f"init has {len(final.rows)} chains, this run {chains}; run as many chains as the "
                                f"result it starts from, or fewer.")
    if not torch.equal(final.star_full.cpu(), torch.cat([w_star[n].flatten() for n in final.names]).cpu()):
        raise InvalidValueError("init comes from a run at other weights (w* differs): its chains' states are not "
                                "near this checkpoint. Pass a result of this model at these weights.")
    return final.rows.to(next(iter(w_star.values())).device)


def _run(model: nn.Module, plan: _Plan, config: SGLDConfig, desc: str, progress: bool,
         observe) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain loop: (each restriction's loss trace [restrictions, chains, draws], the checkpoint's loss at
    each draw [draws]); the chains' statistics stay on their stacks."""
    objective, restrictions, starts, stacks, batches = (plan.objective, plan.restrictions, plan.starts, plan.stacks,
                                                        plan.batches)
    loader, w_star = plan.loader, plan.w_star
    accumulate, thin = config.gradient_accumulation_steps, config.steps_between_draws
    step_rule = SAMPLERS[config.sampler]
    trace = torch.empty(len(restrictions), config.num_chains, config.num_draws)
    init_losses = torch.empty(config.num_draws)
    checkpoint_losses: dict[int, float] = {}  # batch key -> L_B(w*)
    reference = limit = None  # the checkpoint's loss on the first batch, and the loss a chain may not exceed

    for step in tqdm(range(config.num_burnin + config.num_draws * thin), desc=desc, unit="step", leave=False,
                     disable=not progress):
        # A step's batch: `accumulate` micro-batches of batch_size (the rows of one batch of batch_size × k).
        key, batch = next(batches)
        micro = (split_batch(batch, accumulate) if not loader else [batch, *(next(batches)[1] for _ in range(accumulate - 1))]
                 ) if accumulate > 1 else [batch]
        since = step - config.num_burnin  # steps after burn-in; every `thin`-th is a draw
        draw, recorded = since // thin, since >= 0 and since % thin == 0
        # 1. The checkpoint's loss on this batch (once per batch), the reference every draw is paired with.
        l_star = checkpoint_losses.get(key) if key is not None else None
        if l_star is None and (recorded or limit is None):
            with torch.no_grad():
                l_star = sum(objective(b).item() for b in micro) / len(micro)
            if not math.isfinite(l_star):
                raise InvalidValueError(f"{desc}: the checkpoint's own loss is {l_star} on the sampled data, so its weights "
                                        f"are damaged (NaN/inf); reload or retrain the checkpoint.")
            if key is not None:
                checkpoint_losses[key] = l_star
        if limit is None:
            d = max(r.d for r in restrictions)
            reference, limit = l_star, l_star + EXPLODE * max(1.0, abs(l_star), d / (2 * config.nbeta))
        if recorded:
            init_losses[draw] = l_star
        with torch.no_grad():  # 2. the shared residual streams at w*
            extra = [{layer: () if layer == 0 else (model(lm_batch(b)[0], stop_at_layer=layer), layer) for layer in set(starts)}
                     for b in micro]
        for stack in stacks:
            chains = stack.chains
            # 3. Every chain's loss and gradient in one batched call: its coordinates in its restriction's
            #    parameters, w* elsewhere (averaged over the micro-batches).
            losses, grad = losses_and_grads(objective, stack, w_star, micro[0], extra[0][stack.start])
            if len(micro) > 1:
                grad = grad.clone()  # (a stack's gradient buffer is rewritten by the next call)
                for b, e in zip(micro[1:], extra[1:]):
                    more_losses, more_grad = losses_and_grads(objective, stack, w_star, b, e[stack.start])
                    losses = losses + more_losses
                    grad.add_(more_grad)
                losses, grad = losses / len(micro), grad.div_(len(micro))
            values = losses.double().cpu().numpy()
            if not (values < limit).all():  # also catches NaN
                g = int(np.argmin(values < limit))
                r, c = stack.members[g]
                raise LLCDivergenceError(
                    f"{desc}: SGLD chain {c} of restriction {restrictions[r].label!r} diverged at step {step} "
                    f"({'burn-in' if draw < 0 else f'draw {draw}'}): loss {values[g]:.4g} vs {reference:.4g} at "
                    f"the checkpoint. Lower epsilon (now {config.epsilon:g}) or raise gamma (now {config.gamma:g})."
                )
            if recorded:
                trace[(*stack.index, draw)] = torch.from_numpy(values).float()
                if observe is not None and draw % config.draws_every == 0:
                    with torch.no_grad():
                        for i, (r, c) in enumerate(stack.members):
                            observe(r, c, draw // config.draws_every, w_star | stack.unflat(stack.full(i)))
            with torch.no_grad():  # 4.-7. in place, in the stack's rows: no new tensor of the chains' size
                pull = grad if not config.weight_decay else grad.add(  # devinterp's weight decay: + weight_decay·w
                    chains.weights, alpha=config.weight_decay / config.nbeta)
                offset = torch.sub(chains.weights, stack.star, out=stack.work)  # 4. the state about to be left
                state = chains.stats.measure(offset, grad, pull, config) if since >= 0 else None
                drift = drift_(offset, pull, config)  # 5. ∇U(w), over w − w*
                noise = chain_noise(stack, out=grad)  # 6. each chain's own noise, over ∇L_B (read by now)
                step_rule(chains, drift, noise, config)  # 7. the sampler's update
                if config.bounding_box_size is not None:  # devinterp's box: w* ± bounding_box_size
                    box = config.bounding_box_size
                    torch.clamp(chains.weights, stack.star - box, stack.star + box, out=chains.weights)
                if state is not None:  # every step after burn-in (MALA scores consecutive states); thinned below
                    chains.stats.update(loss=values, state=state, drift=drift, noise=noise, config=config)
    return trace, init_losses


def _summarise(plan: _Plan, trace: torch.Tensor, init_losses: torch.Tensor, config: SGLDConfig,
               desc: str) -> list[LLCResult]:
    """One LLCResult per restriction: λ̂ per chain, the diagnostics, each chain's final state."""
    restrictions, stacks, thin = plan.restrictions, plan.stacks, config.steps_between_draws
    per_step = {k: np.empty((len(restrictions), config.num_chains, config.num_draws)) for k in TRACES[1:]}
    finals, batched = {}, {}
    for stack in stacks:
        for k, v in stack.chains.stats.traces().items():
            per_step[k][stack.index] = v[:, ::thin]  # the draws' steps
        for i, (r, c) in enumerate(stack.members):
            finals[r, c] = (stack, i)
            batched[r] = batched.get(r, True) and stack.batched
    results = []
    for r, restriction in enumerate(restrictions):
        increase = trace[r] - init_losses
        llcs = (config.nbeta * increase.mean(1)).double().numpy()
        traces = {"loss": trace[r].double().numpy()} | {k: v[r] for k, v in per_step.items()}
        diagnostics = summarise(traces, config.nbeta * increase.double().numpy(), loss_increase=float(increase.mean()),
                                d=restriction.d, gamma=config.gamma, label=f"{restriction.label} ({desc})",
                                nbeta=config.nbeta, epsilon=config.epsilon if config.sampler == "sgld" else math.nan)
        stack = finals[r, 0][0]
        final = Final(stack.names, stack.shapes, stack.star_full,
                       None if stack.coords is None else stack.coords[finals[r, 0][1]],
                       torch.stack([finals[r, c][0].chains.weights[finals[r, c][1]] for c in range(config.num_chains)]))
        results.append(LLCResult(
            mean=float(llcs.mean()), std=float(llcs.std(ddof=1)), per_chain=llcs, loss_trace=trace[r].clone(),
            init_losses=init_losses.clone(), init_loss=float(init_losses.mean()), d=restriction.d,
            restrict=restriction.label, config=config, diagnostics=diagnostics, note=restriction.note,
            batched=batched[r], forward=plan.how, final=final, trace=traces,
        ))
    return results


def estimate_llc(model: nn.Module, data, config: SGLDConfig | None = None, *, restrict=None,
                 loss_fn: Callable | None = None, progress: bool = True, init: LLCResult | None = None,
                 **options) -> LLCResult:
    """The LLC of `model` at its current weights, estimated by SGLD on `data`.

    `config` holds the hyperparameters (`SGLDConfig`); keyword `options` (epsilon=..., num_chains=...)
    override its fields. `restrict` samples only some coordinates (a head "l1h3" or (1, 3), a KV group
    "l1g0", an MLP "l1.mlp", a layer "layer1", a component "embed", a name pattern "blocks.0.attn.*", or
    a list). Raises `LLCDivergenceError` when a chain diverges; warns (`SamplerWarning`) when the
    diagnostics say the estimate is untrustworthy. The caller's model is left exactly as it was.
    `init`, an earlier result of this model, weights and restriction, starts each chain where that run's
    chain of the same index ended (a continuation, or a warm start at another nβ) instead of at w*.
    """
    config = SGLDConfig.build(config, **options)
    restriction = resolve_restriction(model, restrict)
    return sample_llcs(model, data, [restriction], config, loss_fn=loss_fn, desc="SGLD",
                       progress=progress, init=None if init is None else [init])[0]
