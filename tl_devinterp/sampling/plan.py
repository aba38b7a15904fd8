"""The plan of a sampling run, measured before it starts: chains, coordinates, peak memory and time.

`plan_llcs` runs the sampler itself (`sample_llcs`) for a few steps on the caller's model and data, and
reads off what the real run will cost: the seconds before the first step (the one-time checks), the
seconds of one step of every chain, and the peak memory of the process while sampling (CPU: the resident
set's high-water mark, reset first; CUDA: the allocator's peak). A run of `num_burnin + num_draws ×
steps_between_draws` steps then takes about setup + steps × step seconds, and its peak memory is the
measured one, because the chain state, the stacked forward+backward and the diagnostics' rows do not grow
with the number of steps (only the [chains, draws] traces do). A plan whose peak does not fit the memory available is split
(fewer chains stacked per forward, `SGLDConfig.max_batched` halved) until it fits, or refused with the
numbers and the fix.

Memory model: each stack of chains holds, per chain, four rows of its d sampled coordinates (weights; w − w*,
then the drift; the gradient, then the noise; the MALA score's carried row) and a fifth while the backward
pass builds the gradient, plus the activations of one forward+backward per stacked chain, and w* of the
stack's parameters once; the model's own weights are shared and never copied (`sampling.chains`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidValueError
from ..models import model_device
from .diagnostics import SamplerWarning
from .llc import sample_llcs
from .restrict import Restriction
from .settings import SGLDConfig

PROBE_STEPS = 3
"""Steps a plan times (after the first, which pays the one-time checks)."""


@dataclass(frozen=True)
class SamplingPlan:
    """What one checkpoint's sampling costs, measured on a few steps (`plan_llcs`)."""

    restrictions: int
    chains: int  # restrictions x num_chains
    coordinates: int  # sampled coordinates, summed over chains
    steps: int  # num_burnin + num_draws × steps_between_draws
    max_batched: int  # chains stacked per forward+backward, as planned (<= the config's)
    setup_seconds: float  # before the first step: the fast-forward check, the unused-parameter probe, masks
    step_seconds: float  # one step of every chain
    peak_bytes: int  # the process's peak memory while sampling (CPU: resident set; CUDA: allocated)
    baseline_bytes: int  # the same before sampling (the model, the data, the interpreter)
    available_bytes: int | None  # what the device had free at the start (None: unknown)
    device: str

    @property
    def seconds(self) -> float:
        """Estimated wall time of one checkpoint's sampling."""
        return self.setup_seconds + self.steps * self.step_seconds

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes - self.baseline_bytes <= self.available_bytes

    def __str__(self) -> str:
        gib = 2.0**30
        free = "" if self.available_bytes is None else f" of {self.available_bytes / gib:.2f} GiB free"
        return (f"plan: {self.restrictions} restriction(s) x {self.chains // max(self.restrictions, 1)} chains = "
                f"{self.chains} chains, {self.coordinates:,} coordinates, {self.max_batched} stacked per forward; "
                f"peak memory {self.peak_bytes / gib:.2f} GiB ({(self.peak_bytes - self.baseline_bytes) / gib:.2f} "
                f"GiB for sampling{free}, {self.device}); {self.steps} steps x {self.step_seconds:.3g} s + "
                f"{self.setup_seconds:.3g} s setup = {_duration(self.seconds)} per checkpoint")

    def over(self, checkpoints: int, workers: int = 1) -> str:
        """The estimate for `checkpoints` checkpoints on `workers` parallel workers, in words."""
        rounds = math.ceil(checkpoints / max(workers, 1))
        return (f"{checkpoints} checkpoint(s): {_duration(checkpoints * self.seconds)} serial"
                + (f", {_duration(rounds * self.seconds)} on {workers} workers" if workers > 1 else ""))


def plan_llcs(model: nn.Module, data, restrictions: list[Restriction], config: SGLDConfig, *,
              loss_fn: Callable | None = None, probe_steps: int = PROBE_STEPS, split: bool = True) -> SamplingPlan:
    """Measure a run of `sample_llcs(model, data, restrictions, config)` on `probe_steps + 1` steps (the first
    pays the one-time checks); with `split`, halve `max_batched` until the peak fits the free memory, and
    raise `InvalidValueError` when even one chain at a time does not."""
    if probe_steps < 2:
        raise InvalidValueError(f"probe_steps must be >= 2 (step times are differences), got {probe_steps}.")
    device = model_device(model)
    available = available_memory(device)
    config = config.resolve(data)
    while True:
        plan = _probe(model, data, restrictions, config, loss_fn, probe_steps, device, available)
        if plan.fits or not split or config.max_batched == 1:
            break
        config = dataclasses.replace(config, max_batched=max(1, config.max_batched // 2))
    if not plan.fits:
        raise InvalidValueError(f"The sampling {plan} does not fit: sample fewer heads at once (--heads/--layers), "
                                f"fewer chains (num_chains), a smaller batch (batch_size), or use a larger device.")
    return plan


def _probe(model, data, restrictions, config: SGLDConfig, loss_fn, probe_steps: int, device, available) -> SamplingPlan:
    """One short run, timed at each step by the observe hook; the setup is what the run took beyond its steps."""
    probe = dataclasses.replace(config, num_burnin=0, num_draws=probe_steps + 1, draws_every=1, steps_between_draws=1)
    stamps: dict[int, float] = {}

    def observe(r: int, c: int, draw: int, weights) -> None:
        stamps[draw] = time.perf_counter()

    with warnings.catch_warnings(), peak_memory(device) as peak:
        warnings.simplefilter("ignore", SamplerWarning)  # a few steps' diagnostics say nothing
        start = time.perf_counter()
        sample_llcs(model, data, restrictions, probe, loss_fn=loss_fn, desc="plan", progress=False, observe=observe)
        wall = time.perf_counter() - start
    step = step_seconds(stamps)
    return SamplingPlan(
        restrictions=len(restrictions), chains=len(restrictions) * config.num_chains,
        coordinates=sum(r.d for r in restrictions) * config.num_chains,
        steps=config.num_burnin + config.num_draws * config.steps_between_draws,
        max_batched=config.max_batched, setup_seconds=max(wall - len(stamps) * step, 0.0), step_seconds=step,
        peak_bytes=peak["peak"], baseline_bytes=peak["baseline"], available_bytes=available, device=str(device))


def step_seconds(stamps: dict[int, float]) -> float:
    """The median seconds of one step, from `observe`'s stamps of each draw (`draws_every=1`, no thinning): its
    last call of a draw comes as the step's last stack has its losses, so consecutive draws are one step apart."""
    times = sorted(stamps[d + 1] - stamps[d] for d in range(len(stamps) - 1))
    return times[len(times) // 2]


# --------------------------------------------------------------------------------------------------
# Memory: the peak of a block, and what the device has free.


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[dict[str, int]]:
    """`{"baseline", "peak"}` bytes of the enclosed block, filled on exit: CUDA, the allocator's; else the
    process's resident set (Linux: its high-water mark, reset at entry; elsewhere the lifetime maximum)."""
    out: dict[str, int] = {}
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["baseline"] = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device)
        return
    resettable = _reset_peak_rss()
    out["baseline"] = _rss()
    yield out
    out["peak"] = _status_bytes("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors: CUDA's free memory, else the system's available memory (Linux), else None."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets the resident set's high-water mark (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def _rss() -> int:
    return _status_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration, ValueError):
        return None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
