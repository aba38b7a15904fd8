"""Regression settings: in-context linear regression and sparse-attention regression, on TL models.

Both read real vectors, not tokens. A batch is `(inputs [n, seq, d_in], targets [n, seq, d_out], mask [n, seq])`;
the model is a TL transformer with `d_vocab = d_in`, whose own `W_E` embeds each input vector linearly
(`inputs @ W_E`, plus `W_pos`) and which runs from block 0 on that residual stream (`start_at_layer=0`); its
first `d_out` logits are the read-out. So heads, hook points, restrictions and attention views are TL's own.
The loss is the mean squared error at the positions the mask marks (`masked_mse`).

1. **In-context linear regression** (`icl-regression`; Garg et al. 2022, Raventós et al. 2023, Hoogland et al.
   2024). A context x₁, y₁, …, x_K, y_K with yₖ = w·xₖ + ε, ε ~ N(0, σ²), xₖ ~ N(0, I_D), and w drawn from a
   pool of M tasks (task diversity; itself drawn from N(0, I_D)) or, with M = None, from N(0, I_D). Tokens are
   (D+1)-dimensional: x̂ₖ = (0, xₖ), ŷₖ = (yₖ, 0, …, 0); the prediction of yₖ is read (logit 0) at x̂ₖ.
   Reference predictors: ridge regression (the posterior mean under the Gaussian prior) and dMMSE (the
   posterior mean under the uniform prior on the pool), `ridge_predictions` and `dmmse_predictions`.
2. **Sparse-attention regression** (`sparse-regression`; Zucchet et al. 2025). T tokens xₜ ~ N(0, I_D); the
   target, read at the last position, is y = W* x_r / √n (over the n relevant positions r = relevant, …,
   relevant+n−1) + ε, with one fixed teacher W* (D × D, entries N(0, 1/D)). The model must learn to attend to
   the relevant tokens; uniform attention leaves it on a plateau whose length grows with T.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from jaxtyping import Float
from torch import nn

from ..errors import InvalidValueError
from .base import VectorTokenTask, embed_inputs, integer, number, register

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, mask


def readout(model: nn.Module, inputs: Float[torch.Tensor, "n seq d_in"], d_out: int) -> Float[torch.Tensor, "n seq d_out"]:
    """The model's first `d_out` outputs at every position."""
    return model(embed_inputs(model, inputs), start_at_layer=0)[..., :d_out]


def masked_mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean over marked positions of the squared error averaged over output dimensions: the regression loss
    (training's and the sampler's)."""
    inputs, targets, mask = batch
    err = ((readout(model, inputs, targets.shape[-1]) - targets) ** 2).mean(-1)
    return (err * mask).sum() / mask.sum()


def readout_features(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The essential-dynamics proxy: the model's predictions at every marked position, flattened."""
    inputs, targets, mask = batch
    return readout(model, inputs, targets.shape[-1])[mask.bool()].flatten()


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007): between 1 and min(shape)."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def layer_norm_norms(model: nn.Module) -> list[tuple[str, int | None, int | None, float]]:
    """`ln_weight_norm` per layer (‖ln1.w‖ and ‖ln2.w‖ together; the final LayerNorm as layer n_layers)."""
    per_layer: dict[int, float] = {}
    for name, t in model.state_dict().items():
        m = re.fullmatch(r"blocks\.(\d+)\.ln[12]\.(w|weight)", name)
        final = re.fullmatch(r"ln_final\.(w|weight)", name)
        if m or final:
            layer = int(m.group(1)) if m else model.cfg.n_layers
            per_layer[layer] = per_layer.get(layer, 0.0) + float((t.float() ** 2).sum())
    return [("ln_weight_norm", layer, None, math.sqrt(v)) for layer, v in sorted(per_layer.items())]


class LinearTokenTask(VectorTokenTask):
    """Base of the regression tasks: real-vector tokens through the model's own embedding, MSE at a mask."""

    d_in: int
    d_out: int
    seq_len: int
    sampler_defaults = dict(epsilon=3e-4, gamma=100.0, nbeta=30.0)
    """nβ = 30: the default n/log n of batch 32 (9.2) leaves the chains prior-dominated on these MSE losses
    (calibrate_llc on the icl-regression-quick series); a smaller step than the token default."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return masked_mse(model, batch)

    @property
    def sampler_loss(self):
        return masked_mse

    def probes(self, test: Batch, n: int):
        return tuple(t[:n] for t in test), readout_features

    def position_losses(self, model: nn.Module, sample: Batch):
        inputs, targets, mask = (t[None] for t in sample)
        with torch.no_grad():
            err = ((readout(model, inputs, targets.shape[-1]) - targets) ** 2).mean(-1)[0]
        positions = torch.nonzero(mask[0]).flatten()
        labels = self.labels(sample)
        return positions.numpy(), [labels[i] for i in positions.tolist()], err[positions].numpy()

    def _generator(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.spec["seed"] * 1000 + offset)


@register
class ICLRegression(LinearTokenTask):
    """In-context linear regression (see the module docstring). Options: D (input dimension), K (pairs per
    context), M (task pool size; None: Gaussian tasks), noise (σ²), n_train, n_test, seed."""

    kind = "icl-regression"
    OPTIONS = dict(D=integer(1, 4), K=integer(1, 8), M=integer(1, None), noise=number(0.0, 0.125),
                   n_train=integer(1, 20_000), n_test=integer(1, 1024), seed=integer(0, 0))

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.d_in, self.d_out, self.seq_len = self.spec["D"] + 1, 1, 2 * self.spec["K"]
        self._reference: dict[str, torch.Tensor] | None = None

    @property
    def pool(self) -> torch.Tensor | None:
        """The M tasks w (rows), or None for Gaussian tasks."""
        M = self.spec["M"]
        return None if M is None else torch.randn(M, self.spec["D"], generator=self._generator(0))

    def sample(self, n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [n, K, D], y [n, K], w [n, D]) of `n` contexts, seeded by the spec's seed and `offset`."""
        D, K, g = self.spec["D"], self.spec["K"], self._generator(offset)
        pool = self.pool
        w = torch.randn(n, D, generator=g) if pool is None else pool[torch.randint(len(pool), (n,), generator=g)]
        x = torch.randn(n, K, D, generator=g)
        y = (x @ w[:, :, None])[..., 0] + math.sqrt(self.spec["noise"]) * torch.randn(n, K, generator=g)
        return x, y, w

    def tokens(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """The batch of contexts (x, y): tokens (0, xₖ) and (yₖ, 0…0) interleaved, targets yₖ at x̂ₖ."""
        n, K, D = x.shape
        inputs = torch.zeros(n, 2 * K, D + 1)
        inputs[:, 0::2, 1:] = x
        inputs[:, 1::2, 0] = y
        targets = torch.zeros(n, 2 * K, 1)
        targets[:, 0::2, 0] = y
        mask = torch.zeros(n, 2 * K)
        mask[:, 0::2] = 1.0
        return inputs, targets, mask

    def data(self) -> tuple[Batch, Batch]:
        train = self.tokens(*self.sample(self.spec["n_train"], 1)[:2])
        test = self.tokens(*self.sample(self.spec["n_test"], 2)[:2])
        return train, test

    def reference(self) -> dict[str, torch.Tensor]:
        """The ridge and dMMSE predictions [n_test, K] on the test contexts (computed once)."""
        if self._reference is None:
            x, y, _ = self.sample(self.spec["n_test"], 2)
            pool = self.pool
            self._reference = {"ridge": ridge_predictions(x, y, self.spec["noise"]),
                               "dmmse": (ridge_predictions(x, y, self.spec["noise"]) if pool is None
                                         else dmmse_predictions(x, y, pool, self.spec["noise"]))}
        return self._reference

    def metrics(self, model: nn.Module, test: Batch):
        inputs, targets, _ = test
        pred = readout(model, inputs, 1)[:, 0::2, 0].cpu()  # [n, K]
        y = targets[:, 0::2, 0].cpu()
        per_k = ((pred - y) ** 2).mean(0)
        rows = [("loss", None, None, float(per_k.mean())),
                ("prediction_norm", None, None, float(pred.abs().mean())),
                ("icl_score", None, None, float(per_k[-1] - per_k[0]))]
        for name, ref in self.reference().items():
            ref = ref[: len(y)]
            rows.append((f"loss_minus_{name}", None, None, float(per_k.mean() - ((ref - y) ** 2).mean())))
            rows.append((f"mse_to_{name}", None, None, float(((pred - ref) ** 2).mean())))
        rows += layer_norm_norms(model)
        rows.append(("unembed_norm", None, None, float(model.W_U[:, :1].norm())))
        rows.append(("pos_effective_rank", None, None, effective_rank(model.W_pos[: self.seq_len])))
        return rows

    def labels(self, sample: Batch) -> list[str]:
        return [f"{'xy'[i % 2]}{i // 2 + 1}" for i in range(sample[0].shape[-2])]


def ridge_predictions(x: Float[torch.Tensor, "n K D"], y: Float[torch.Tensor, "n K"], noise: float
                      ) -> Float[torch.Tensor, "n K"]:
    """ŷₖ = xₖ·ŵₖ with ŵₖ = (Σ_{i<k} xᵢxᵢᵀ + σ²I)⁻¹ Σ_{i<k} xᵢyᵢ: the posterior mean of w ~ N(0, I) given the
    first k−1 pairs (ŷ₁ = 0). With σ² = 0 the pseudo-inverse solution."""
    n, K, D = x.shape
    x, y = x.double(), y.double()
    xx = torch.cumsum(x[..., :, None] * x[..., None, :], dim=1) - x[..., :, None] * x[..., None, :]  # Σ_{i<k}
    xy = torch.cumsum(x * y[..., None], dim=1) - x * y[..., None]
    A = xx + noise * torch.eye(D, dtype=x.dtype)
    w = (torch.linalg.pinv(A) @ xy[..., None])[..., 0]
    return (w * x).sum(-1).float()


def dmmse_predictions(x: Float[torch.Tensor, "n K D"], y: Float[torch.Tensor, "n K"], pool: Float[torch.Tensor, "M D"],
                      noise: float) -> Float[torch.Tensor, "n K"]:
    """ŷₖ = xₖ·ŵₖ with ŵₖ the posterior mean of w under the uniform prior on the pool, given the first k−1
    pairs: weights ∝ exp(−Σ_{i<k} (yᵢ − w_m·xᵢ)² / 2σ²) (ŷ₁ = xₖ·mean of the pool)."""
    x, y, pool = x.double(), y.double(), pool.double()
    sq = (y[..., None] - x @ pool.T) ** 2  # [n, K, M]
    before = torch.cumsum(sq, dim=1) - sq  # Σ_{i<k}
    logp = -before / (2 * max(noise, 1e-12))
    w = torch.softmax(logp, dim=-1) @ pool  # [n, K, D]
    return (w * x).sum(-1).float()


@register
class SparseRegression(LinearTokenTask):
    """Sparse-attention regression (see the module docstring). Options: D (token dimension), T (sequence
    length), relevant (the first relevant position), n_relevant, noise (σ²), n_train, n_test, seed."""

    kind = "sparse-regression"
    OPTIONS = dict(D=integer(1, 8), T=integer(1, 32), relevant=integer(0, 0), n_relevant=integer(1, 1),
                   noise=number(0.0, 0.0), n_train=integer(1, 20_000), n_test=integer(1, 1024), seed=integer(0, 0))

    @classmethod
    def check_shapes(cls, spec: dict[str, Any]) -> None:
        if spec["n_relevant"] > spec["T"]:
            raise InvalidValueError(f"The 'n_relevant' option of the 'sparse-regression' data spec must fit in the "
                                    f"sequence: an integer in [1, T] = [1, {spec['T']}]; got {spec['n_relevant']} "
                                    f"(or raise T).")
        if spec["relevant"] + spec["n_relevant"] > spec["T"]:
            raise InvalidValueError(f"The 'relevant' option of the 'sparse-regression' data spec must leave its "
                             f"{spec['n_relevant']} relevant token(s) inside the sequence: an integer in "
                             f"[0, T - n_relevant] = [0, {spec['T'] - spec['n_relevant']}]; got {spec['relevant']} "
                             f"(or raise T).")

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.d_in = self.d_out = self.spec["D"]
        self.seq_len = self.spec["T"]
        self.positions = list(range(self.spec["relevant"], self.spec["relevant"] + self.spec["n_relevant"]))

    @property
    def teacher(self) -> torch.Tensor:
        """W* [D, D], entries N(0, 1/D)."""
        D = self.spec["D"]
        return torch.randn(D, D, generator=self._generator(0)) / math.sqrt(D)

    def split(self, n: int, offset: int) -> Batch:
        D, T, g = self.spec["D"], self.spec["T"], self._generator(offset)
        x = torch.randn(n, T, D, generator=g)
        y = x[:, self.positions].sum(1) @ self.teacher.T / math.sqrt(len(self.positions))
        y = y + math.sqrt(self.spec["noise"]) * torch.randn(n, D, generator=g)
        targets = torch.zeros(n, T, D)
        targets[:, -1] = y
        mask = torch.zeros(n, T)
        mask[:, -1] = 1.0
        return x, targets, mask

    def data(self) -> tuple[Batch, Batch]:
        return self.split(self.spec["n_train"], 1), self.split(self.spec["n_test"], 2)

    def metrics(self, model: nn.Module, test: Batch):
        inputs, targets, mask = test
        names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)}
        out, cache = model.run_with_cache(**self.model_inputs(model, test), names_filter=lambda n: n in names)
        rows = [("loss", None, None, float(((out[:, -1, : self.d_out] - targets[:, -1]) ** 2).mean()))]
        relevant_attention = []
        for layer in range(model.cfg.n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, -1, :].double()  # [n, head, key]: last query
            on_relevant = pattern[..., self.positions].sum(-1).mean(0)
            entropy = -(pattern * pattern.clamp_min(1e-30).log()).sum(-1).mean(0)
            for h in range(pattern.shape[1]):
                rows.append(("relevant_attention", layer, h, float(on_relevant[h])))
                rows.append(("attention_entropy", layer, h, float(entropy[h])))
            relevant_attention.append(on_relevant.max())
        rows.append(("max_relevant_attention", None, None, float(max(relevant_attention))))
        return rows

    def labels(self, sample: Batch) -> list[str]:
        return [f"x{t}" + ("*" if t in self.positions else "") for t in range(sample[0].shape[-2])]
