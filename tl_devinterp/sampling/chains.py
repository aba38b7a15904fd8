"""The chains of `sample_llcs` (sampling.llc): their stacks, each stack's losses and gradients in one batched
forward+backward, their noise, and the parameters they sample.

Chains that sample the same parameters from the same start layer are stacked (`Stack`, at most
`SGLDConfig.max_batched` a stack) and evaluated in one `torch.func.vmap`-ed forward+backward
(`losses_and_grads`); each keeps its own noise generator, so the numbers are those of the chains run one at
a time. A chain's state holds its restriction's d coordinates only, placed into w* (held once per stack)
inside the forward.

Memory per chain of d coordinates: its weights, a work row (w − w*, then the drift), the gradient (written
into a buffer of the stack where it samples whole parameters), and the MALA score's carried row: four rows
of d floats, none allocated anew per step, plus a fifth while the backward pass builds the gradient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from ..errors import InvalidValueError
from .diagnostics import ChainStats, SamplerWarning
from .objective import Objective, once_per_weights
from .restrict import Restriction
from .samplers import MALA, Chains
from .settings import SGLDConfig


def _generator(seed: int, label: str, chain: int, device) -> torch.Generator:
    """Noise for (restriction, chain): the same in estimate_llc(restrict=h) and estimate_head_llcs."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{label}/{chain}".encode()).digest()[:8], "little")
    return torch.Generator(device=device).manual_seed(key)


@dataclass
class Stack:
    """Chains run together: (restriction, chain) pairs that sample as many coordinates of the same parameters
    from the same start layer. Each chain's state is one row of its restriction's coordinates only (d of
    them, not the parameters' D): `coords` says where they sit in the parameters' flat concatenation, which
    holds w* once for the whole stack (`star_full`)."""

    members: list[tuple[int, int]]  # (restriction, chain) of each row
    names: list[str]  # the parameters, in the restrictions' order
    shapes: list[torch.Size]
    start: int  # the block the forward starts at
    star_full: Float[torch.Tensor, " D"]  # w* of the parameters, flat
    coords: torch.Tensor | None  # [chains, d] positions in star_full of each row's coordinates (None: all D)
    star: Float[torch.Tensor, "chains d"]  # each row's coordinates at w*
    chains: Chains
    batched: bool | None  # whether vmap runs the stack; None until its first call tries
    work: Float[torch.Tensor, "chains d"]  # each step's w − w*, then its drift (`sampling.llc`)
    grad: Float[torch.Tensor, "chains d"] | None  # the gradient's buffer where the stack samples whole parameters

    @property
    def index(self) -> tuple[list[int], list[int]]:
        """(restrictions, chains) of the rows, to index [restriction, chain] arrays."""
        return [r for r, _ in self.members], [c for _, c in self.members]

    def full(self, i: int) -> Float[torch.Tensor, " D"]:
        """Row i's weights of the stack's parameters, flat: its coordinates, w* elsewhere."""
        return _place(self.star_full, self.coords[i] if self.coords is not None else None, self.chains.weights[i])

    def unflat(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of `rows` ([D] or [chains, D]) as that parameter."""
        return _unflat(self.names, self.shapes, rows)


@dataclass
class Final:
    """A restriction's chains at their last step: [chains, d] coordinates, and where they sit."""

    names: list[str]
    shapes: list[torch.Size]
    star_full: torch.Tensor  # shared with the other restrictions of its stack
    coords: torch.Tensor | None  # [d] (None: all)
    rows: torch.Tensor  # [chains, d]

    def params(self) -> dict[str, torch.Tensor]:
        full = torch.stack([_place(self.star_full, self.coords, row) for row in self.rows])
        return {n: t.cpu() for n, t in _unflat(self.names, self.shapes, full).items()}


def _place(star_full: torch.Tensor, coords: torch.Tensor | None, row: torch.Tensor) -> torch.Tensor:
    """w* with `row` written at `coords` (a new tensor, differentiable in `row`; vmap batches it)."""
    return row if coords is None else star_full.scatter(0, coords, row)


def _unflat(names: list[str], shapes: list[torch.Size], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = rows.split([math.prod(s) for s in shapes], dim=-1)
    return {n: z.view(*rows.shape[:-1], *s) for n, z, s in zip(names, parts, shapes, strict=True)}


def build_stacks(restrictions: list[Restriction], starts: list[int], w_star: dict[str, torch.Tensor], config: SGLDConfig,
            device) -> list[Stack]:
    """Every (restriction, chain) pair in a stack with the pairs of the same parameters, start layer and number
    of coordinates, at most `config.max_batched` per stack; each chain at w*, with its own generator."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, restriction in enumerate(restrictions):
        for c in range(config.num_chains):
            groups.setdefault((starts[r], tuple(restriction.masks), restriction.d), []).append((r, c))
    coords: dict[int, torch.Tensor | None] = {}  # restriction -> its coordinates' positions, shared by its chains
    stacks = []
    for (start, names, _), pairs in groups.items():
        star_full = torch.cat([w_star[n].flatten() for n in names])
        offsets = dict(zip(names, np.cumsum([0] + [w_star[n].numel() for n in names])[:-1].tolist(), strict=True))
        for r in {r for r, _ in pairs}:
            masks = restrictions[r].masks
            coords[r] = None if all(masks[n] is None for n in names) else torch.cat([
                offsets[n] + (torch.arange(w_star[n].numel(), device=device) if masks[n] is None
                              else masks[n].to(device).flatten().nonzero().squeeze(1)) for n in names])
        for i in range(0, len(pairs), config.max_batched):
            members = pairs[i:i + config.max_batched]
            index = None if coords[members[0][0]] is None else torch.stack([coords[r] for r, _ in members])
            star = star_full.expand(len(members), -1) if index is None else star_full[index]
            chains = Chains(star.clone(), [_generator(config.seed, restrictions[r].label, c, device) for r, c in members],
                            torch.tensor([float(restrictions[r].d) for r, _ in members], device=device),
                            ChainStats(len(members), mala=config.sampler in MALA))
            stacks.append(Stack(members, list(names), [w_star[n].shape for n in names], start, star_full, index,
                                star, chains, None if len(members) > 1 else False, torch.empty_like(chains.weights),
                                torch.empty_like(chains.weights) if index is None else None))
    return stacks


def losses_and_grads(objective: Objective, stack: Stack, w_star: dict[str, torch.Tensor], batch,
                     extra: tuple) -> tuple[Float[torch.Tensor, " chains"], Float[torch.Tensor, "chains d"]]:
    """L_B(w) and ∇L_B(w) on each chain's coordinates, for every chain of the stack: one vmapped
    forward+backward, or chain by chain where vmap cannot batch the model (found on the stack's first call,
    then kept; same numbers). Where the stack samples whole parameters, they are differentiated as they are
    and the gradient is written into the stack's `grad` buffer (not concatenated into a new tensor per step)."""

    def loss(row, coords):  # one chain: its coordinates placed in the stack's parameters, w* elsewhere
        return objective.at(w_star | stack.unflat(_place(stack.star_full, coords, row)), batch, *extra)

    def loss_of_parts(parts):  # one chain sampling whole parameters: a tensor per parameter
        return objective.at(w_star | dict(zip(stack.names, parts, strict=True)), batch, *extra)

    weights, whole = stack.chains.weights, stack.coords is None
    if stack.batched is not False:
        try:
            if whole:
                grads, losses = torch.func.vmap(torch.func.grad_and_value(loss_of_parts))(tuple(stack.unflat(weights).values()))
                grad = torch.cat([g.flatten(1) for g in grads], dim=1, out=stack.grad)
            else:
                grad, losses = torch.func.vmap(torch.func.grad_and_value(loss))(weights, stack.coords)
            stack.batched = True
            return losses.detach(), grad
        except Exception:  # an op without a batching rule (or a real error, which the loop below raises again)
            if stack.batched:
                raise
            stack.batched = False
    losses, grads = [], []
    for i, row in enumerate(weights):  # plain autograd, one chain's graph at a time
        if whole:
            parts = [p.detach().requires_grad_(True) for p in stack.unflat(row).values()]
            value = loss_of_parts(parts)
            torch.cat([g.flatten() for g in torch.autograd.grad(value, parts, materialize_grads=True)], out=stack.grad[i])
        else:
            row = row.detach().requires_grad_(True)
            value = loss(row, stack.coords[i])
            grads.append(torch.autograd.grad(value, row)[0])
        losses.append(value.detach())
    return torch.stack(losses), stack.grad if whole else torch.stack(grads)


def chain_noise(stack: Stack, out: torch.Tensor | None = None) -> Float[torch.Tensor, "chains d"]:
    """N(0, 1) on each chain's coordinates, from its own generator (into `out`, [chains, d], where given)."""
    if out is None or not out.is_contiguous():  # a row's numbers depend on its layout
        out = torch.empty_like(stack.chains.weights)
    for row, generator in zip(out, stack.chains.generators, strict=True):
        row.normal_(generator=generator)
    return out


def split_batch(batch, k: int) -> list:
    """A batch (a tensor or a tuple of tensors) as k equal micro-batches along its rows."""
    if isinstance(batch, torch.Tensor):
        return list(batch.tensor_split(k))
    return [type(batch)(parts) for parts in zip(*(t.tensor_split(k) for t in batch))]


def drop_unused(objective: Objective, w_star: dict[str, torch.Tensor], restrictions: list[Restriction],
                 batch, cache: bool = False) -> list[Restriction]:
    """One fwd+bwd at w* (with `cache`, the fast forward's LM loss: once per checkpoint, `once_per_weights`):
    a sampled parameter the forward does not use is named (`SamplerWarning`) and dropped, so d counts only
    coordinates the loss depends on."""

    def probe() -> frozenset[str]:
        leaves = {n: w.clone().requires_grad_(True) for n, w in w_star.items()}
        grads = torch.autograd.grad(objective.at(leaves, batch), list(leaves.values()), allow_unused=True)
        return frozenset(n for n, g in zip(leaves, grads, strict=True) if g is None)

    if cache:
        unused = once_per_weights(objective.model, "unused parameters", probe)
    else:  # a custom loss may use other parameters at each call
        unused = probe()
    unused = unused & {n for r in restrictions for n in r.masks}
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
