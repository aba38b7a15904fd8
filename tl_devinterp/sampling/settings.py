"""The sampler's settings, declared once (`SGLDConfig`), and the papers' default inverse temperature.

Every estimator (LLC, head LLCs, observables, susceptibilities, calibration, the callback during training)
takes one `SGLDConfig`; its options are `options.option` fields, so the command line, config files and
devinterp's spellings all reach the same validator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidOptionError, InvalidValueError
from ..options import build, option, validate
from .batches import as_tensors
from .fast_forward import check_precision
from .samplers import SAMPLERS


def default_nbeta(batch_size: int) -> float:
    """nβ = n/log n for n = batch_size: the papers' "adaptive" β = 1/log n. The one source of this default."""
    if batch_size < 2:
        raise InvalidValueError(f"batch_size must be >= 2 for the default nbeta = n/log n, got {batch_size}.")
    return batch_size / math.log(batch_size)


FIXED = {"noise_level": (1.0, "devinterp's scale of the SGLD noise; ours is the Langevin noise, unscaled")}
"""devinterp's SGLD options our sampler has no counterpart for: accepted at the value that means our sampler,
refused at any other (`SGLDConfig.build`)."""


@dataclass(frozen=True)
class SGLDConfig:
    """The sampler's hyperparameters, declared and validated once; every estimator takes one.

    `nbeta=None` means n/log n of the batch size in use (`resolve`); a DataLoader's own batch size wins.
    """

    epsilon: float = option(1e-3, "SGLD step size epsilon", gt=0, aliases={"lr": None})
    gamma: float = option(200.0, "localisation strength gamma", ge=0,
                          aliases={"localization": "devinterp's default is 0 (no pull to w*); ours is 200"})
    nbeta: float | None = option(None, "inverse temperature n*beta (default: n/log n of the batch size)", gt=0,
                                 aliases={"n_beta": None})
    num_chains: int = option(4, "chains", ge=2, why="(the std across chains needs two)")
    num_draws: int = option(100, "draws per chain after burn-in", ge=1)
    num_burnin: int = option(50, "burn-in steps per chain", ge=0, aliases={
        "num_burnin_steps": "devinterp's default is 0; ours is 50, and our estimate averages only the draws "
                            "after burn-in"})
    batch_size: int = option(32, "minibatch size", ge=1)
    seed: int = option(0, "seed of the batches and the chains' noise", ge=0)
    sampler: str = option("sgld", "update rule: sgld, sgnht or rmsprop_sgld", choices=sorted(SAMPLERS),
                          aliases={"sampling_method": None})  # devinterp's class (SGLD, SGNHT): `build` names it
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
    # devinterp's chain options; at their defaults they change nothing (nor a stored result's key)
    steps_between_draws: int = option(1, "SGLD steps per draw after burn-in: lambda-hat averages every k-th step",
                                      ge=1, aliases={"num_steps_bw_draws": None})
    gradient_accumulation_steps: int = option(1, "micro-batches of batch_size per step: a step sees batch_size x k "
                                              "rows, as one batch of that size would", ge=1)
    weight_decay: float = option(0.0, "adds weight_decay*w to the drift (a Gaussian prior at 0 besides the "
                                 "localisation)", ge=0)
    init_noise: float = option(0.0, "chains start at w* + init_noise*N(0, 1) on the sampled coordinates", ge=0)
    bounding_box_size: float | None = option(None, "chains kept within w* +- this in every coordinate (None: no "
                                             "box)", gt=0)

    def __post_init__(self):
        validate(self)
        check_precision(self.precision)

    @classmethod
    def build(cls, config: SGLDConfig | None = None, **overrides: Any) -> SGLDConfig:
        """`config` (default: the defaults) with keyword overrides (other spellings too, devinterp's
        `optimizer_kwargs` / `sampling_method_kwargs` dicts and sampler classes as well), naming any unknown one."""
        flat = dict(overrides)
        for nested in ("optimizer_kwargs", "sampling_method_kwargs"):  # devinterp's SGLD keywords, as a dict
            for key, value in (flat.pop(nested, None) or {}).items():
                if key in flat:
                    raise InvalidOptionError(f"The SGLD option {key!r} is given twice (in {nested} and as a keyword); "
                                             f"give it once.")
                flat[key] = value
        for key, (value, meaning) in FIXED.items():
            given = flat.pop(key, value)
            if given != value:
                raise InvalidOptionError(f"The {key!r} option of SGLDConfig must be {value} ({meaning}); got "
                                         f"{given!r}. Drop it.")
        values = build(cls, flat)
        if "sampler" in values and not isinstance(values["sampler"], str):  # devinterp's class: SGLD, SGNHT
            values["sampler"] = getattr(values["sampler"], "__name__", values["sampler"])
        if isinstance(values.get("sampler"), str):
            values["sampler"] = values["sampler"].lower()
        return dataclasses.replace(config or cls(), **values)

    def resolve(self, data) -> SGLDConfig:
        """The batch size in use (a DataLoader's own) and nβ filled in."""
        loader = as_tensors(data)
        batch_size = self.batch_size
        if isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size is not None:
            batch_size = loader.batch_size
        nbeta = default_nbeta(batch_size * self.gradient_accumulation_steps) if self.nbeta is None else float(self.nbeta)
        return dataclasses.replace(self, batch_size=batch_size, nbeta=nbeta)

    def to_dict(self) -> dict[str, Any]:
        """The settings that determine the numbers (a stored result's key): all but `max_batched` and
        `fast_forward`, which only change how the same numbers are computed (to float rounding); devinterp's
        chain options only where they are not at their defaults (results stored before they existed still match)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in _CHAIN_OPTIONS}
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("max_batched", "fast_forward") and not (k in defaults and v == defaults[k])}


_CHAIN_OPTIONS = ("steps_between_draws", "gradient_accumulation_steps", "weight_decay", "init_noise",
                  "bounding_box_size")
