"""Bursty few-shot classification: in-context vs in-weights learning (Chan et al. 2022; Reddy 2023; Singh et al.
2023, *The transient nature of emergent in-context learning*; Singh et al. 2024, *What needs to go right for an
induction head*), on a TL model.

A context is N exemplar–label pairs and a query exemplar: x₁, ℓ₁, …, x_N, ℓ_N, x_q; the model predicts the
query's label at the last position. K classes with Zipfian frequencies p(k) ∝ (k+1)^−α; each class has a fixed
label among L (so a label can be learnt in the weights). A *bursty* context (probability `p_bursty`) holds N/B
classes B times each, the query's class among them (so it can be read in context); an i.i.d. context draws its
N classes from p.

Exemplars are Gaussian clusters (Reddy's setting): class means μ_k ~ N(0, I_D/D), an exemplar is
(μ_k + ε·η)/√(1 + ε²) with η ~ N(0, I_D/D) (ε the within-class noise); or rows of a user's embedding file
(`exemplar_file`: a `.npy` array [classes, exemplars per class, D], e.g. image embeddings), classes K and the
held-out ones taken from it. Tokens are (D + L)-dimensional, an exemplar (x, 0) and a label (0, one-hot ℓ): a
label is a token (its row of `W_E`), an exemplar is embedded linearly. The model is a TL transformer with
`d_vocab = D + L` run from block 0 on that residual stream (as the regression tasks), so heads, hook points,
restrictions, head scores and attention views are TL's own; its first L logits at the query are the read-out.

Metrics (each checkpoint): `icl_accuracy` on held-out classes (bursty contexts, labels drawn per context),
`icl_swapped_accuracy` on trained classes whose labels are permuted within the context, `iwl_accuracy` on
trained classes with no exemplar of the query's class in context, the loss; per head `prefix_matching` (the
induction score: attention from the query to the label tokens after its class's exemplars) and
`previous_token` (attention from a label token to its exemplar), named as the library's head scores so that
head classes, clusters and attention views use them. Transience (Singh 2023) shows as `icl_accuracy` rising,
then falling while `iwl_accuracy` rises, with long training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidValueError
from ..models import model_device
from ..options import Declared, Option
from .base import VectorTokenTask, integer, number, register

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs [n, 2N+1, D+L], query labels [n], classes [n, N+1]


@register
class BurstyClassification(VectorTokenTask):
    """Bursty few-shot classification (module docstring). Options: K classes, L labels, D exemplar dimensions,
    N pairs per context, B copies per class in a bursty context, p_bursty, alpha (Zipf exponent), epsilon
    (within-class noise), exemplar_file, n_train, n_test, n_eval (sequences per metric), seed."""

    kind = "bursty-classification"
    OPTIONS = dict(
        K=integer(1, 64), L=integer(2, 8), D=integer(1, 16), N=integer(1, 8), B=integer(1, 2),
        p_bursty=number(0.0, 0.9, high=1.0),
        alpha=number(0.0, 1.0), epsilon=number(0.0, 0.1),
        exemplar_file=Declared(str | None, None, Option(help="None (Gaussian clusters) or the path of a .npy array "
                                                            "[classes, exemplars per class, D]")),
        n_train=integer(1, 20_000), n_test=integer(1, 512), n_eval=integer(1, 512), seed=integer(0, 0),
    )

    @classmethod
    def check_shapes(cls, spec: dict[str, Any]) -> None:
        N, B, K = spec["N"], spec["B"], spec["K"]
        if N % B:
            raise InvalidValueError(f"The 'B' option of the 'bursty-classification' data spec must divide N={N} (a bursty "
                                    f"context holds N/B classes B times each): one of {[b for b in range(1, N + 1) if N % b == 0]}; "
                                    f"got {B}.")
        if N // B > spec["L"]:
            raise InvalidValueError(f"The 'L' option of the 'bursty-classification' data spec must be >= N/B = {N // B} "
                                    f"(the classes of a bursty context get distinct labels); got {spec['L']}.")
        if N // B > K:
            raise InvalidValueError(f"The 'K' option of the 'bursty-classification' data spec must be >= N/B = {N // B} "
                                    f"(the classes of a bursty context); got {K}.")
        if spec["exemplar_file"] is not None:
            path = Path(spec["exemplar_file"])
            if path.suffix != ".npy" or not path.is_file():
                raise InvalidValueError(f"The 'exemplar_file' option of the 'bursty-classification' data spec must name a "
                                        f".npy file; {path} does not exist.")
            shape = np.load(path, mmap_mode="r").shape
            if len(shape) != 3 or shape[2] != spec["D"]:
                raise InvalidValueError(f"{path} must hold an array [classes, exemplars per class, D={spec['D']}] "
                                        f"(set the 'D' option to its last dimension); its shape is {shape}.")
            if K + N // B > shape[0]:
                raise InvalidValueError(f"The 'K' option of the 'bursty-classification' data spec must leave {N // B} "
                                        f"held-out classes in {path}: at most {shape[0] - N // B}; got {K} (the file "
                                        f"has more classes needed than it holds).")

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        s = self.spec
        self.d_in, self.seq_len = s["D"] + s["L"], 2 * s["N"] + 1
        g = self._generator(0)
        self.label_of = torch.randint(s["L"], (s["K"],), generator=g)  # each trained class's fixed label
        self.zipf = (torch.arange(1, s["K"] + 1, dtype=torch.float64) ** -s["alpha"])
        self.zipf /= self.zipf.sum()
        self.n_novel = (s["N"] // s["B"] * 64 if s["exemplar_file"] is None
                        else np.load(s["exemplar_file"], mmap_mode="r").shape[0] - s["K"])  # held-out classes
        self._eval: dict[str, Batch] | None = None

    def _generator(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.spec["seed"] * 1000 + offset)

    # -- exemplars and contexts --------------------------------------------------------------------------------
    def _means(self, novel: bool) -> torch.Tensor:
        """Class means [K (or the held-out classes), D]."""
        n = self.n_novel if novel else self.spec["K"]
        return torch.randn(n, self.spec["D"], generator=self._generator(1 + novel)) / self.spec["D"] ** 0.5

    def exemplars(self, classes: torch.Tensor, novel: bool, g: torch.Generator) -> torch.Tensor:
        """One exemplar [..., D] of each class in `classes` (a trained class, or with `novel` a held-out one)."""
        s = self.spec
        if s["exemplar_file"] is not None:
            table = torch.from_numpy(np.load(s["exemplar_file"])).float()
            table = table[s["K"]:] if novel else table[: s["K"]]
            pick = torch.randint(table.shape[1], classes.shape, generator=g)
            return table[classes, pick]
        means = self._means(novel)
        noise = torch.randn(*classes.shape, s["D"], generator=g) / s["D"] ** 0.5
        return (means[classes] + s["epsilon"] * noise) / (1 + s["epsilon"] ** 2) ** 0.5

    def contexts(self, n: int, offset: int, *, kind: str = "train") -> Batch:
        """`n` sequences: "train" (the training mixture), "icl" (held-out classes, bursty, labels drawn per
        context), "swapped" (trained classes, bursty, labels permuted per context), "iwl" (trained classes, the
        query's class absent from the context)."""
        s, g = self.spec, self._generator(10 + offset)
        N, B, K, L = s["N"], s["B"], s["K"], s["L"]
        m = N // B
        # 1. a bursty context: m distinct classes (the query's first), B copies each, shuffled
        if kind == "icl":
            base = torch.stack([torch.randperm(self.n_novel, generator=g)[:m] for _ in range(n)])
        else:
            base = torch.multinomial(self.zipf.float().expand(n, K), m, replacement=False, generator=g)
        slot = torch.arange(m).repeat_interleave(B).expand(n, N).gather(1, torch.argsort(torch.rand(n, N, generator=g), 1))
        query = base[:, 0]
        if kind in ("icl", "swapped"):  # 2. labels drawn per context, one per class
            relabel = torch.stack([torch.randperm(L, generator=g)[:m] for _ in range(n)])
            context, labels = base.gather(1, slot), relabel.gather(1, slot)
            target = relabel[:, 0]
        else:  # 3. fixed labels; i.i.d. contexts from the Zipfian classes
            iid = torch.multinomial(self.zipf.float(), n * N, replacement=True, generator=g).view(n, N)
            if kind == "iwl":  # the query's class never in context
                context = torch.where(iid == query[:, None], (iid + 1) % K, iid)
            else:
                is_bursty = torch.rand(n, generator=g) < s["p_bursty"]
                context = torch.where(is_bursty[:, None], base.gather(1, slot), iid)
            labels, target = self.label_of[context], self.label_of[query]
        classes = torch.cat([context, query[:, None]], 1)  # [n, N+1]
        x = self.exemplars(classes, kind == "icl", g)  # [n, N+1, D]
        inputs = torch.zeros(n, 2 * N + 1, self.d_in)
        inputs[:, 0::2, : s["D"]] = x
        inputs[:, 1::2, s["D"]:] = nn.functional.one_hot(labels, L).float()
        return inputs, target, classes

    def data(self) -> tuple[Batch, Batch]:
        return self.contexts(self.spec["n_train"], 1), self.contexts(self.spec["n_test"], 2)

    # -- the model's side --------------------------------------------------------------------------------------
    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The L label logits at the query, [n, L]."""
        return model(**self.model_inputs(model, inputs))[:, -1, : self.spec["L"]]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(model, batch[0]), batch[1])

    def features(self, model: nn.Module, inputs: Batch) -> torch.Tensor:
        return self.logits(model, inputs[0]).log_softmax(-1).flatten()

    def eval_sets(self) -> dict[str, Batch]:
        """The metrics' sequences (made once): held-out classes, swapped labels, in-weights."""
        if self._eval is None:
            n = self.spec["n_eval"]
            self._eval = {kind: self.contexts(n, 3 + i, kind=kind) for i, kind in enumerate(("icl", "swapped", "iwl"))}
        return self._eval

    def metrics(self, model: nn.Module, test: Batch) -> list[tuple[str, int | None, int | None, float]]:
        device = model_device(model)
        with torch.no_grad():
            rows = [("loss", None, None, float(self.loss(model, test)))]
            for kind, name in (("icl", "icl_accuracy"), ("swapped", "icl_swapped_accuracy"), ("iwl", "iwl_accuracy")):
                inputs, target, _ = (t.to(device) for t in self.eval_sets()[kind])
                rows.append((name, None, None, float((self.logits(model, inputs).argmax(-1) == target).float().mean())))
            return rows + head_scores(model, self, *self.eval_sets()["icl"])

    def position_losses(self, model: nn.Module, sample: Batch):
        inputs, target, _ = sample
        with torch.no_grad():
            loss = nn.functional.cross_entropy(self.logits(model, inputs[None]), target[None].to(inputs.device))
        return np.array([self.seq_len - 1]), ["query"], loss.cpu().numpy()[None]

    def labels(self, sample: Batch) -> list[str]:
        inputs, target, classes = sample
        N = self.spec["N"]
        names = []
        for i in range(N):
            names += [f"x{i + 1}:c{int(classes[i])}", f"l{i + 1}"]
        return names + [f"query:c{int(classes[N])}"]


def head_scores(model: nn.Module, task: BurstyClassification, inputs: torch.Tensor, target: torch.Tensor,
                classes: torch.Tensor) -> list[tuple[str, int, int, float]]:
    """Per head: `prefix_matching`, the attention from the query to the label tokens that follow exemplars of
    its class (Singh et al. 2024's induction head), and `previous_token`, from each label token to its exemplar."""
    N = task.spec["N"]
    device = model_device(model)
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(**task.model_inputs(model, inputs.to(device)), names_filter=lambda n: n in names)
    match = (classes[:, :N] == classes[:, N:]).float().to(device)  # [n, N]: context items of the query's class
    rows = []
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [n, head, query, key]
        to_labels = (pattern[:, :, -1, 1::2] * match[:, None]).sum(-1).mean(0)  # query -> matching labels
        label_rows = torch.arange(1, 2 * N, 2, device=device)
        to_exemplar = pattern[:, :, label_rows, label_rows - 1].mean((0, 2))
        for h in range(pattern.shape[1]):
            rows.append(("prefix_matching", layer, h, float(to_labels[h])))
            rows.append(("previous_token", layer, h, float(to_exemplar[h])))
    return rows
