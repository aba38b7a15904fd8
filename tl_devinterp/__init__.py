"""tl_devinterp: developmental interpretability for TransformerLens models.

The package reads as the pipeline: checkpoint series -> sampling (LLC) -> metrics (hooks) ->
dynamics (essential dynamics, stages) -> visualisation and report -> command line.
"""

# series: models, data, training, checkpoint series
from .analysis import AnalysisConfig, AnalysisResult, analyze, demo

# dynamics
from .compare import SeriesComparison, compare_series
from .data import (
    make_data,
    markov_tokens,
    pack_texts,
    plant_repeats,
    repeated_random_tokens,
    stdlib_texts,
    text_files,
    train_tokenizer,
)
from .dynamics import (
    EDResult,
    HeadClusters,
    Stage,
    cluster_heads,
    essential_dynamics,
    evolute_cusps,
    find_stages,
    osculating_circles,
    stages_frame,
)
from .errors import FolderInUseError, LLCDivergenceError, SeriesError, TLDevinterpError, WorkersLostError
from .interventions import Intervention
from .llc_callback import LLCCallback, llc_now

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
from .models import ModelConfig, build_model, clone_model, head_masks, head_weights, mlp_masks, parse_head

# sampling
from .sampling import (
    BayesianInfluence,
    LLCResult,
    ObservableTraces,
    SamplerDiagnostics,
    SamplerWarning,
    SGLDConfig,
    bayesian_influence,
    calibrate_llc,
    contains_repeated_span,
    default_nbeta,
    estimate_head_llcs,
    estimate_llc,
    filter_dataset,
    llc_over_series,
    plot_calibration,
    plot_trace,
    sample_observables,
    susceptibilities,
    susceptibilities_over_series,
    top_influences,
)
from .series import CheckpointSeries
from .store import ResultStore
from .training import PRESETS, TrainConfig, train

# visualisation, report, analysis
from .visualisation.attention import AttentionView, attention_patterns, attention_view
from .visualisation.dynamics import plot_essential_dynamics, plot_llc_stages
from .visualisation.head_plots import plot_head_clusters, plot_head_llcs, plot_head_scores
from .visualisation.report import analysis_report
from .visualisation.susceptibilities import plot_susceptibilities
from .visualisation.token_html import loss_difference_html

__all__ = [
    # errors: every error raised on purpose is a TLDevinterpError
    "TLDevinterpError", "SeriesError", "LLCDivergenceError", "FolderInUseError", "WorkersLostError",
    # series
    "ModelConfig", "build_model", "clone_model", "head_masks", "head_weights", "mlp_masks", "parse_head",
    "make_data", "markov_tokens", "pack_texts", "plant_repeats", "repeated_random_tokens", "stdlib_texts", "text_files",
    "train_tokenizer", "PRESETS", "TrainConfig", "train", "LLCCallback", "llc_now", "Intervention", "CheckpointSeries", "ResultStore",
    # sampling
    "LLCResult", "SGLDConfig", "SamplerDiagnostics", "SamplerWarning", "calibrate_llc", "contains_repeated_span", "default_nbeta",
    "estimate_head_llcs", "estimate_llc", "filter_dataset", "llc_over_series", "plot_calibration", "plot_trace",
    "BayesianInfluence", "ObservableTraces", "sample_observables", "susceptibilities", "susceptibilities_over_series",
    "bayesian_influence", "top_influences",
    # metrics
    "bigram_score", "bigram_table", "classify_heads", "copying_scores", "duplicate_token_scores",
    "frequent_ngrams", "icl_score", "loss_difference", "metrics_over_series", "ngram_scores", "per_token_loss",
    "prefix_matching_scores", "previous_token_scores",
    # dynamics
    "EDResult", "Stage", "essential_dynamics", "evolute_cusps", "find_stages", "osculating_circles", "stages_frame",
    "HeadClusters", "cluster_heads",
    # visualisation, report, analysis
    "AttentionView", "attention_patterns", "attention_view", "plot_essential_dynamics", "plot_llc_stages",
    "plot_head_llcs", "plot_head_scores", "plot_head_clusters", "plot_susceptibilities", "analysis_report",
    "loss_difference_html", "AnalysisConfig", "AnalysisResult", "analyze", "demo", "SeriesComparison", "compare_series",
]
