"""LLC estimation by SGLD: whole model, restricted to weights (heads, layers), on sub-distributions, over series."""

from .calibration import calibrate_llc, plot_calibration
from .heads import estimate_head_llcs
from .llc import LLCDivergenceError, LLCResult, default_nbeta, estimate_llc
from .over_series import llc_over_series
from .refine import contains_repeated_span, filter_dataset
from .restrict import resolve_restriction

__all__ = [
    "LLCDivergenceError", "LLCResult", "calibrate_llc", "plot_calibration", "contains_repeated_span", "default_nbeta", "estimate_head_llcs",
    "estimate_llc", "filter_dataset", "llc_over_series", "resolve_restriction",
]
