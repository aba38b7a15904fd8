"""LLC estimation by SGLD: whole model, restricted to weights (heads, layers), on sub-distributions, over series."""

from .llc import LLCDivergenceError, LLCResult, default_nbeta, estimate_llc
from .restrict import resolve_restriction
