"""Bursty few-shot classification (tasks/bursty.py): the data as specified, the metrics of hand-built models,
bad specs, and the library's interventions and head clusters on the task."""

import numpy as np
import pytest
import torch

from tl_devinterp import Intervention, cluster_heads, compare_series, train
from tl_devinterp.tasks import make_task
from tl_devinterp.tasks.bursty import BurstyClassification

SPEC = dict(kind="bursty-classification", K=16, L=4, D=8, N=4, B=2, n_train=64, n_test=16, n_eval=64)


def test_contexts_are_bursty_iid_and_held_out_as_specified():
    """Catches: a bursty context without its query's class, an IWL context that shows it, labels that are not
    the fixed map on trained classes, held-out classes drawn from the trained ones, tokens not (exemplar, 0) /
    (0, one-hot label)."""
    task = make_task(dict(SPEC, p_bursty=1.0))
    inputs, target, classes = task.contexts(200, 0)
    assert inputs.shape == (200, 9, 12) and (classes[:, :4] == classes[:, 4:]).sum(1).eq(2).all()
    assert torch.equal(target, task.label_of[classes[:, 4]])
    assert torch.equal(inputs[:, 1::2, 8:].argmax(-1), task.label_of[classes[:, :4]])
    assert (inputs[:, 0::2, 8:] == 0).all() and (inputs[:, 1::2, :8] == 0).all()
    _, _, iwl = task.contexts(200, 1, kind="iwl")
    assert not (iwl[:, :4] == iwl[:, 4:]).any()
    x_icl, t_icl, c_icl = task.contexts(200, 2, kind="icl")
    match = c_icl[:, :4] == c_icl[:, 4:]
    assert match.sum(1).eq(2).all()  # the query's class twice; its label in context is the target
    assert (x_icl[:, 1::2, 8:].argmax(-1)[match].view(200, 2) == t_icl[:, None]).all()
    trained = task.exemplars(torch.arange(16), False, torch.Generator().manual_seed(1))  # one of each trained class
    assert not any(torch.allclose(task.exemplars(torch.tensor([c]), True, torch.Generator().manual_seed(0))[0],
                                  trained[k], atol=0.3) for c in range(4) for k in range(16))


class Copier(torch.nn.Module):
    """A hand-built in-context learner: the label of the context exemplar nearest the query."""

    def __init__(self, task):
        super().__init__()
        self.D, self.L = task.spec["D"], task.spec["L"]
        self.w = torch.nn.Parameter(torch.zeros(1))

    def predict(self, inputs):
        x = inputs[:, 0:-1:2, : self.D]
        q = inputs[:, -1, : self.D]
        nearest = ((x - q[:, None]) ** 2).sum(-1).argmin(1)
        return inputs[:, 1::2, self.D:][torch.arange(len(inputs)), nearest].argmax(-1)


def test_icl_accuracy_of_a_hand_built_copying_model():
    """Catches: ICL accuracy scored against the wrong label (the fixed map instead of the context's), or the
    held-out / swapped sets not being solvable in context: a nearest-exemplar copier scores 1 on both ICL sets
    (small within-class noise) and chance-level on the IWL set, where the query's class is absent."""
    task = make_task(dict(SPEC, epsilon=0.05))
    sets = task.eval_sets()
    copier = Copier(task)
    acc = {k: float((copier.predict(x) == t).float().mean()) for k, (x, t, _) in sets.items()}
    assert acc["icl"] == 1.0 and acc["swapped"] == 1.0 and acc["iwl"] < 0.5


def test_metrics_run_on_the_tasks_tl_model():
    """Catches: metrics that do not run on the task's TL model (its heads' patterns read through the input
    adapter), head scores outside [0, 1], and IWL targets that are not the fixed labels of the query's class."""
    task = make_task(SPEC)
    series = train_quick(task)
    rows = task.metrics(series.load(series.steps[-1]), task.data()[1])
    names = {r[0] for r in rows}
    assert {"loss", "icl_accuracy", "icl_swapped_accuracy", "iwl_accuracy", "prefix_matching", "previous_token"} <= names
    heads = [r for r in rows if r[0] == "prefix_matching"]
    assert len(heads) == 2 * 2 and all(0 <= r[3] <= 1 for r in heads)
    x, target, classes = task.eval_sets()["iwl"]
    assert torch.equal(task.label_of[classes[:, -1]], target)


def train_quick(task, tmp=None, **overrides):
    import tempfile

    from tl_devinterp import ModelConfig, TrainConfig

    config = TrainConfig(model=ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=9, d_vocab=task.d_in, attn_only=True),
                         data=task.spec, n_steps=20, batch_size=16, n_log_checkpoints=3, n_linear_checkpoints=1, **overrides)
    return train(tmp or tempfile.mkdtemp(), config=config, progress=False)


@pytest.mark.parametrize("spec, message", [
    (dict(kind="bursty-classification", K=0), "'K' option .* must be >= 1"),
    (dict(kind="bursty-classification", D=0), "'D' option .* must be >= 1"),
    (dict(kind="bursty-classification", K=3, N=8, B=2), "'K' option .* must be >= N/B = 4"),
    (dict(kind="bursty-classification", N=8, B=3), "'B' option .* must divide N=8"),
    (dict(kind="bursty-clasification"), "'kind' option of the data spec must be one of"),
])
def test_bad_specs_are_refused_naming_the_option(spec, message):
    with pytest.raises(ValueError, match=message):
        make_task(spec)


def test_an_exemplar_file_with_fewer_classes_than_asked_is_refused(tmp_path):
    """Catches: an embedding file whose classes cannot cover K trained plus the held-out ones, read anyway."""
    path = tmp_path / "emb.npy"
    np.save(path, np.random.default_rng(0).normal(size=(10, 3, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="'K' option .* at most 8"):
        make_task(dict(SPEC, exemplar_file=str(path), K=9))
    task = make_task(dict(SPEC, exemplar_file=str(path), K=8))
    x, _, classes = task.contexts(5, 0)
    table = np.load(path)
    assert any(np.allclose(x[0, 0, :8].numpy(), table[int(classes[0, 0]), j]) for j in range(3))


def test_interventions_and_head_clusters_run_on_the_task(tmp_path):
    """Catches: training interventions refused or crashing on a task whose inputs are embedded (a reference clamp
    runs the reference through the task's input adapter), a frozen head that moves, head clusters and the
    comparison of two series (compare_series) that cannot read the task's head scores (Singh et al. 2024's method)."""
    task = make_task(SPEC)
    base = train_quick(task, tmp_path / "base")
    frozen = train_quick(task, tmp_path / "frozen", interventions=[
        Intervention("l1h0", kind="freeze"),
        Intervention("blocks.0.attn.hook_pattern", kind="clamp", head=1,
                     value={"series": str(tmp_path / "base"), "step": 20}),
        Intervention("blocks.1.attn.hook_z", kind="zero", head=1, start=5, end=10),
    ])
    w0, w1 = (frozen.load(s).blocks[1].attn.W_Q[0].detach() for s in (0, 20))
    assert torch.equal(w0, w1)
    assert not torch.equal(base.load(20).blocks[0].attn.W_Q[1], frozen.load(20).blocks[0].attn.W_Q[1])
    metrics = task.metrics_over_series(frozen, *task.data(), progress=False)
    clusters = cluster_heads([metrics[metrics["head"].notna()]], n_clusters=2)
    assert len(clusters.assignments) == 4
    comparison = compare_series(base, frozen, labels=("base", "frozen"), progress=False)
    assert {"prefix_matching", "loss"} <= set(comparison.aligned["quantity"])
    assert set(comparison.phase_changes["series"]) == {"base", "frozen"}


def test_the_task_is_registered_with_its_presets():
    from tl_devinterp.training import PRESETS

    for name in ("bursty-classification", "bursty-classification-quick"):
        task = make_task(PRESETS[name].data)
        assert isinstance(task, BurstyClassification) and task.has_heads
        task.check_model(PRESETS[name].model)


@pytest.mark.slow
def test_train_then_analyze_the_quick_preset_from_the_command_line(tmp_path):
    """Catches: a bursty series the command line cannot train, read back or analyse (head LLCs, head scores and
    attention views through the input adapter): exit 0, a finite LLC curve, ICL/IWL accuracies and induction
    scores in R/results/."""
    import pandas as pd

    from tl_devinterp.cli import main

    s, r = tmp_path / "S", tmp_path / "R"
    assert main(["train", "--preset", "bursty-classification-quick", "--out", str(s), "--n-steps", "300"]) == 0
    assert main(["analyze", str(s), "--out", str(r), "--num-draws", "20", "--num-burnin", "10", "--head-steps", "2"]) == 0
    llc, metrics = pd.read_csv(r / "results" / "llc.csv"), pd.read_csv(r / "results" / "metrics.csv")
    assert np.isfinite(llc[llc.scope == "model"].llc_mean).all() and (llc.scope == "head").any()
    assert {"icl_accuracy", "iwl_accuracy", "icl_swapped_accuracy", "prefix_matching"} <= set(metrics.metric)
