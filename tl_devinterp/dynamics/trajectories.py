"""Heads grouped by how they develop: hierarchical clustering of per-head trajectories over training.

Wang et al. (2024) group attention heads by their refined-LLC curves over training (differentiation and
specialization); head scores over training tell the same story in behaviour. Each head becomes one vector:
its curve of every chosen quantity (rLLC, previous-token score, ...) over the checkpoints where all heads
have it, normalised, each quantity's block scaled by 1/sqrt(its number of steps) so that every quantity
weighs the same whatever its number of checkpoints. Ward linkage on Euclidean distances builds the tree,
cut into `n_clusters` groups; a cross-table relates the groups to the heads' classes (`classify_heads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy.cluster.hierarchy import fcluster, linkage

from ..errors import InvalidValueError
from ..metrics.classify import LABELS, classify_heads
from ..models import head_name
from ..results import head_rows, long_form

NORMALISE = ("quantity", "head", None)


@dataclass
class HeadClusters:
    """The result of `cluster_heads`: plain frames plus scipy's linkage matrix."""

    curves: pd.DataFrame  # layer, head, quantity, step, value, normalised
    assignments: pd.DataFrame  # layer, head, name, cluster (1..n_clusters), label (head class or NA)
    linkage: Float[np.ndarray, "n_heads_minus_1 4"]  # over the heads in `assignments` order
    table: pd.DataFrame  # cluster x head class: number of heads


def cluster_heads(
    frame: pd.DataFrame | Sequence[pd.DataFrame],
    *,
    quantities: Sequence[str] | None = None,
    n_clusters: int = 3,
    normalise: str | None = "quantity",
    classes: pd.DataFrame | None = None,
) -> HeadClusters:
    """Cluster heads by their trajectories over training.

    `frame` is an LLC frame (`llc_over_series`: its `scope == "head"` rows give quantity `"rllc"`), a metrics
    frame (`metrics_over_series`: per-head rows, quantity = metric), or a list of both. `quantities` picks some
    (default: all per-head ones). `normalise`: `"quantity"` divides each quantity by its largest |value|
    over heads and steps (flat heads stay flat), `"head"` min-max scales each head's curve (shape only), None
    keeps raw values. `classes` (`layer, head, label`) defaults to `classify_heads` of the metrics frame.
    """
    if normalise not in NORMALISE:
        raise InvalidValueError(f"normalise must be one of {NORMALISE}, got {normalise!r}.")
    if n_clusters < 1:
        raise InvalidValueError(f"n_clusters must be >= 1, got {n_clusters}.")
    frames = [frame] if isinstance(frame, pd.DataFrame) else list(frame)
    curves = pd.concat([_long(f) for f in frames], ignore_index=True)
    if quantities is not None:
        missing = sorted(set(quantities) - set(curves["quantity"]))
        if missing:
            raise InvalidValueError(f"No per-head rows of {missing}; the frames hold {sorted(set(curves['quantity']))}.")
        curves = curves[curves["quantity"].isin(list(quantities))]
    if curves.empty:
        raise InvalidValueError("No per-head trajectories: pass an LLC frame with head rows (scope == 'head') or a metrics "
                                "frame with head scores.")

    # 1. one block per quantity: heads x steps where every head has a value, normalised
    blocks, kept = [], []
    for quantity, g in curves.groupby("quantity", sort=True):
        wide = g.pivot_table(index=["layer", "head"], columns="step", values="value").dropna(axis=1)
        if wide.shape[1] < 2:
            continue  # a quantity at one checkpoint has no trajectory
        values = wide.to_numpy(dtype=float)
        if normalise == "quantity":
            values = values / max(np.abs(values).max(), 1e-12)
        elif normalise == "head":
            low, high = values.min(1, keepdims=True), values.max(1, keepdims=True)
            values = (values - low) / np.maximum(high - low, 1e-12)
        blocks.append(pd.DataFrame(values / np.sqrt(values.shape[1]), index=wide.index,
                                   columns=pd.MultiIndex.from_product([[quantity], wide.columns])))
        kept.append(pd.DataFrame(values, index=wide.index, columns=wide.columns).stack().rename("normalised")
                    .reset_index().assign(quantity=quantity))
    if not blocks:
        raise InvalidValueError("Every quantity has fewer than 2 checkpoints with all heads; a trajectory needs at least 2.")
    X = pd.concat(blocks, axis=1, join="inner")
    if len(X) < 2:
        raise InvalidValueError(f"Clustering needs at least 2 heads with every quantity; got {len(X)}.")
    # 2. Ward's hierarchical clustering of the head vectors, cut into n_clusters groups
    Z = linkage(X.to_numpy(), method="ward")
    cluster = fcluster(Z, t=min(n_clusters, len(X)), criterion="maxclust")

    # 3. the groups beside the heads' classes
    if classes is None:
        metrics = [f for f in frames if "metric" in f.columns and f["metric"].isin(list(LABELS)).any()]
        classes = classify_heads(metrics[0]) if metrics else None
    labels = {} if classes is None else {(int(r.layer), int(r.head)): r.label for r in classes.itertuples()}
    heads = [(int(layer), int(head)) for layer, head in X.index]
    assignments = pd.DataFrame({
        "layer": [la for la, _ in heads], "head": [h for _, h in heads],
        "name": [head_name(la, h) for la, h in heads], "cluster": cluster.astype(int),
        "label": pd.array([labels.get(h) for h in heads], dtype="string"),
    })
    table = pd.crosstab(assignments["cluster"], assignments["label"].fillna("unclassified"))
    normalised = pd.concat(kept, ignore_index=True)
    curves = curves.merge(normalised, on=["layer", "head", "quantity", "step"], how="inner")
    return HeadClusters(curves=curves.sort_values(["quantity", "layer", "head", "step"], ignore_index=True),
                        assignments=assignments, linkage=Z, table=table)


def _long(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-head rows of an LLC or metrics frame as `layer, head, quantity, step, value`."""
    columns = ["layer", "head", "quantity", "step", "value"]
    if {"scope", "llc_mean"} <= set(frame.columns):
        out = long_form(llc=head_rows(frame))
    elif {"metric", "value"} <= set(frame.columns):
        out = long_form(metrics=frame.dropna(subset=["layer", "head"]))
    else:
        raise InvalidValueError(f"Expected an LLC frame (step, scope, layer, head, llc_mean) or a metrics frame (step, "
                                f"metric, layer, head, value); got columns {list(frame.columns)}.")
    return out[columns].astype({"layer": "int64", "head": "int64", "step": "int64", "value": "float64"})
