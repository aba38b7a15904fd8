"""tl_devinterp: developmental interpretability for TransformerLens models.

The package reads as the pipeline: checkpoint series -> sampling (LLC) -> metrics (hooks) ->
dynamics (essential dynamics, stages) -> visualisation and report -> command line.
"""

from .models import ModelConfig, build_model, clone_model, head_slices, head_weights
from .series import CheckpointSeries, SeriesError
from .store import ResultStore

# series: data and training
from .data import make_data, markov_tokens, pack_texts, plant_repeats, repeated_random_tokens, stdlib_texts, train_tokenizer
from .training import PRESETS, TrainConfig, train
# sampling
from .sampling import (
    LLCDivergenceError, LLCResult, calibrate_llc, contains_repeated_span, default_nbeta, estimate_head_llcs,
    estimate_llc, filter_dataset, llc_over_series, plot_calibration,
)
# metrics
from .metrics import (
    bigram_score,
    bigram_table,
    classify_heads,
    copying_scores,
    duplicate_token_scores,
    frequent_ngrams,
    icl_score,
    loss_difference,
    metrics_over_series,
    ngram_scores,
    per_token_loss,
    prefix_matching_scores,
    previous_token_scores,
)
# dynamics
from .dynamics import EDResult, Stage, essential_dynamics, evolute_cusps, find_stages, osculating_circles, stages_frame
# visualisation
from .visualisation.dynamics import plot_essential_dynamics, plot_llc_stages
from .visualisation.attention import AttentionView, attention_patterns, attention_view
from .visualisation.heads import plot_head_llcs, plot_head_scores
from .visualisation.report import analysis_report
from .visualisation.tokens import loss_difference_html
# analysis
from .analysis import AnalysisConfig, AnalysisResult, analyze, demo

__all__ = [name for name in dir() if not name.startswith("_")]
