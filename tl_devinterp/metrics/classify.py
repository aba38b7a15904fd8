"""Label each head by what it does, from its scores at one step."""

from __future__ import annotations

import pandas as pd
import torch

from ..errors import InvalidValueError

LABELS = {
    "prefix_matching": "induction",
    "previous_token": "previous-token",
    "duplicate_token": "duplicate-token",
    "copying": "copying",
}
"""Score -> label, in priority order: attention-pattern roles before copying (an OV property that
induction heads share)."""
DEFAULT_THRESHOLDS = {"prefix_matching": 0.3, "previous_token": 0.3, "duplicate_token": 0.3, "copying": 0.7}
"""A fresh model scores about the mean of 1/(q+1) over queries on the attention scores (≈ 0.02-0.06 at
64 positions) and 0 ± ~1.7/d_head on copying (measured std 0.2 at d_head 8, 0.1 at 16, 0.045 at 32);
a clean head scores near 1 on its own score."""


def classify_heads(
    scores: pd.DataFrame | dict[str, torch.Tensor], *, step: int | None = None,
    thresholds: dict[str, float] | None = None,
) -> pd.DataFrame:
    """One row per head: layer, head, label and the scores used.

    `scores` is a `metrics_over_series` frame (rows of `step`, default the last step, are used) or a dict
    metric -> `[n_layers, n_heads]` tensor. A head gets the first label in `LABELS` order whose score is at
    least its threshold (`thresholds` overrides `DEFAULT_THRESHOLDS` per score), else "other". Scores that
    are absent are not used.
    """
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    unknown = set(thresholds) - set(LABELS)
    if unknown:
        raise InvalidValueError(f"Unknown thresholds {sorted(unknown)}; known scores: {list(LABELS)}.")
    if isinstance(scores, pd.DataFrame):
        frame = scores[scores["metric"].isin(list(LABELS))]
        if frame.empty:
            raise InvalidValueError(f"scores has no head metric among {list(LABELS)}.")
        steps = sorted(frame["step"].unique())
        step = steps[-1] if step is None else step
        if step not in steps:
            raise InvalidValueError(f"Step {step} is not in scores; available steps: {steps}.")
        wide = frame[frame["step"] == step].pivot_table(index=["layer", "head"], columns="metric", values="value")
    else:
        if step is not None:
            raise InvalidValueError("step only applies to a scores frame; a dict holds one step already.")
        tables = {k: torch.as_tensor(v) for k, v in scores.items() if k in LABELS}
        if not tables:
            raise InvalidValueError(f"scores has no head metric among {list(LABELS)}; got {list(scores)}.")
        wide = pd.DataFrame({
            k: pd.Series(v.flatten().tolist(), index=pd.MultiIndex.from_product(
                [range(v.shape[0]), range(v.shape[1])], names=["layer", "head"]))
            for k, v in tables.items()
        })
    wide = wide.reset_index()
    wide.columns.name = None

    def label(row: pd.Series) -> str:
        for metric, name in LABELS.items():
            if metric in row and row[metric] >= thresholds[metric]:
                return name
        return "other"

    wide.insert(2, "label", wide.apply(label, axis=1))
    return wide.astype({"layer": "int64", "head": "int64"})
