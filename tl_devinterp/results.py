"""The results schema, written down once: the tidy frames every pass over a series returns and `analyze`
saves as CSV.

- LLC frames (`llc_over_series`, `susceptibilities_over_series`): one row per estimate, keyed by
  `step, scope, layer, head`; `scope` is "model" (layer and head missing) or "head"; then the estimate's
  columns (`llc_mean, llc_std, llc_se, d, init_loss`, the diagnostics of `sampling.diagnostics.ROW`,
  `forward`, `note`).
- Metrics frames (`metrics_over_series`, a task's metrics): long form `step, metric, layer, head, value`
  (layer and head missing for a model-level metric).
- `long_form` puts both into one shape, `step, quantity, layer, head, value, se`: the model's LLC is quantity
  "llc", a head's "rllc", a metric its name.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import InvalidValueError

MODEL, HEAD = "model", "head"
"""The values of an LLC frame's `scope`."""
LLC_KEYS = ["step", "scope", "layer", "head"]
METRIC_COLUMNS = ["step", "metric", "layer", "head", "value"]
LONG_COLUMNS = ["step", "quantity", "layer", "head", "value", "se"]


def model_rows(llc: pd.DataFrame) -> pd.DataFrame:
    """The whole model's rows of an LLC frame, in step order."""
    return llc[llc["scope"] == MODEL].sort_values("step")


def head_rows(llc: pd.DataFrame) -> pd.DataFrame:
    """The heads' rows of an LLC frame."""
    return llc[llc["scope"] == HEAD]


def model_curve(llc: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, λ̂, its SE) of the whole model: what `find_stages` reads."""
    rows = model_rows(llc)
    return rows["step"].to_numpy(), rows["llc_mean"].to_numpy(), rows["llc_se"].to_numpy()


def long_form(llc: pd.DataFrame | None = None, metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """An LLC frame and/or a metrics frame as `step, quantity, layer, head, value, se` (see the module)."""
    parts = []
    if metrics is not None:
        if not {"metric", "value"} <= set(metrics.columns):
            raise InvalidValueError(f"Expected a metrics frame (step, metric, layer, head, value); got columns "
                                    f"{list(metrics.columns)}.")
        parts.append(metrics.assign(quantity=metrics["metric"].astype(str), se=np.nan))
    if llc is not None:
        if not {"scope", "llc_mean"} <= set(llc.columns):
            raise InvalidValueError(f"Expected an LLC frame (step, scope, layer, head, llc_mean); got columns "
                                    f"{list(llc.columns)}.")
        parts.append(llc.assign(quantity=np.where(llc["scope"] == MODEL, "llc", "rllc"), value=llc["llc_mean"],
                                se=llc["llc_se"] if "llc_se" in llc else np.nan))
    frame = pd.concat([p[LONG_COLUMNS] for p in parts], ignore_index=True)
    return frame.astype({"step": "int64", "layer": "Int64", "head": "Int64", "value": "float64", "se": "float64"})
