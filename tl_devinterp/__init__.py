"""tl_devinterp: developmental interpretability for TransformerLens models.

The package reads as the pipeline: checkpoint series -> sampling (LLC) -> metrics (hooks) ->
dynamics (essential dynamics, stages) -> visualisation and report -> command line.
"""

from .models import ModelConfig, build_model, clone_model, head_slices, head_weights
from .series import CheckpointSeries, SeriesError
from .store import ResultStore

# series: data and training
# sampling
from .sampling import LLCDivergenceError, LLCResult, default_nbeta, estimate_llc
# metrics
# dynamics
# visualisation

__all__ = [name for name in dir() if not name.startswith("_")]
