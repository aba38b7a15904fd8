"""Per-token pictures: a sequence with each token coloured by how its loss changed between two checkpoints.

Red: the loss of predicting that token fell (the model learned something there); blue: it rose.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidValueError


def loss_difference_html(
    tokens: Sequence[str], diff: Sequence[float], *, scale: float | None = None, caption: str = ""
) -> str:
    """HTML spans for `tokens` coloured by `diff` (loss later minus loss earlier, one value per predicted
    token, i.e. `len(tokens) - 1` values: `diff[i]` belongs to `tokens[i + 1]`; the first token has none).

    `scale` is the |diff| that gets full colour (default: the largest |diff|). Hover shows the value.
    """
    diff = np.asarray(diff, dtype=float)
    if diff.shape != (len(tokens) - 1,):
        raise InvalidValueError(f"Need one loss difference per predicted token ({len(tokens) - 1}); got {diff.shape}.")
    scale = float(scale or np.abs(diff).max() or 1.0)
    spans = [f'<span class="tok" title="first token: no loss">{html.escape(tokens[0])}</span>']
    for tok, d in zip(tokens[1:], diff):
        a = min(abs(d) / scale, 1.0)
        rgb = "220,40,40" if d < 0 else "40,80,220"
        spans.append(f'<span class="tok" style="background: rgba({rgb},{a:.2f})" title="Δloss = {d:+.3f}">'
                     f"{html.escape(tok)}</span>")
    head = f'<div class="tok-caption">{html.escape(caption)}</div>' if caption else ""
    return f'{head}<div class="tokens">{" ".join(spans)}</div>'
