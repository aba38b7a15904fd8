"""Posterior sampling around a checkpoint: LLCs (whole model, heads, layers, over series), observables,
susceptibilities and Bayesian influence; SGLD, SGNHT and RMSprop-SGLD."""

from ..errors import LLCDivergenceError
from .calibration import calibrate_llc, plot_calibration
from .diagnostics import SamplerDiagnostics, SamplerWarning, plot_trace
from .head_llcs import estimate_head_llcs
from .influence import BayesianInfluence, bayesian_influence, top_influences
from .llc import LLCResult, estimate_llc
from .llc_series import llc_over_series
from .observables import ObservableTraces, posterior_covariance, sample_observables
from .refine import contains_repeated_span, filter_dataset
from .restrict import Restriction, resolve_restriction
from .samplers import SAMPLERS, rmsprop_sgld_step, sgld_step, sgnht_step
from .settings import SGLDConfig, default_nbeta
from .susceptibility import susceptibilities, susceptibilities_over_series, susceptibility

__all__ = [
    "LLCDivergenceError", "LLCResult", "SGLDConfig", "SamplerDiagnostics", "SamplerWarning", "calibrate_llc",
    "plot_calibration", "contains_repeated_span", "default_nbeta", "estimate_head_llcs", "estimate_llc",
    "filter_dataset", "llc_over_series", "Restriction", "resolve_restriction", "sgld_step",
    "SAMPLERS", "sgnht_step", "rmsprop_sgld_step", "ObservableTraces", "posterior_covariance", "sample_observables",
    "susceptibilities", "susceptibilities_over_series", "susceptibility", "BayesianInfluence", "bayesian_influence",
    "top_influences", "plot_trace",
]
