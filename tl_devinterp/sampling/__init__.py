"""LLC estimation by SGLD: whole model, restricted to weights (heads, layers), on sub-distributions, over series."""

from .calibration import calibrate_llc, plot_calibration
from .diagnostics import SamplerDiagnostics, SamplerWarning
from .heads import estimate_head_llcs
from .llc import LLCDivergenceError, LLCResult, SGLDConfig, default_nbeta, estimate_llc, sgld_step
from .over_series import llc_over_series
from .refine import contains_repeated_span, filter_dataset
from .restrict import Restriction, resolve_restriction

__all__ = [
    "LLCDivergenceError", "LLCResult", "SGLDConfig", "SamplerDiagnostics", "SamplerWarning", "calibrate_llc",
    "plot_calibration", "contains_repeated_span", "default_nbeta", "estimate_head_llcs", "estimate_llc",
    "filter_dataset", "llc_over_series", "Restriction", "resolve_restriction", "sgld_step",
]
