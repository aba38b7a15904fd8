"""Tasks: the settings of the field as one kind of object, so training and analysis assume nothing about tokens.

A task is built from a *spec*, a small JSON dict whose `kind` names the task (`make_task(spec)`); the spec
is what `TrainConfig.data` holds and what a series manifest records, so the same task comes back anywhere.
A task owns five things, and the pipeline (`train`, `analyze`) asks it for each:

1. **data**: `task.data() -> (train, test)`, each a tensor (tokens `[n, seq]`) or a tuple of tensors sharing
   the first dimension (e.g. inputs, targets, read-out mask), regenerated from the spec.
2. **the model and its adapter**: `task.build_model(ModelConfig)` (default a TL model, which stays a TL model:
   heads, hook points, restrictions, head scores and attention views work unchanged), `task.check_model`
   (refuses a config that cannot run the data before anything is written), and `task.model_inputs(model, x)`,
   the keyword arguments of `model(...)` / `model.run_with_cache(...)` for inputs x (tokens as they are; a
   regression task embeds real vectors linearly through the model's own `W_E` and `W_pos` and starts at
   block 0).
3. **the loss**: `task.loss(model, batch)`, what training minimises, and `task.sampler_loss`, what the SGLD
   sampler uses (None for token tasks: the sampler's own LM loss with its fast forward, the same function; else
   a module-level function or a partial of one, which result stores can key), with `task.sampler_defaults`,
   the SGLD settings suited to its loss scale, used where the user sets none.
4. **probes**: `task.probes(test, n) -> (inputs, proxy)`, the fixed inputs and the functional proxy that
   essential dynamics reads (`task.features(model, inputs)` unless the task names a built-in proxy).
5. **metrics**: `task.metrics(model, test)`, one checkpoint's (metric, layer, head, value) rows, run over a
   series by `task.metrics_over_series` (resumable); and `task.position_losses` / `task.labels` for the
   per-position pictures of one sample.

`has_heads = False` marks a model without attention heads (e.g. the toy model of superposition): the
head-based passes (head LLCs, head clusters, attention views) are skipped, the LLC, stages and essential
dynamics run as for any model. Head scores (previous-token, induction, ...) are part of the token tasks'
metrics, not of every task's.

To add a task: subclass `Task`, set `kind` and `OPTIONS` (each option's default and allowed values, checked
in one place, `Task.check_spec`, with one message format), write `data`, `loss`, `features`, `metrics`,
`position_losses` and `labels` (and `build_model`/`model_inputs` for another model), and decorate it with
`@register`. Its presets go in `training.PRESETS`.

Tasks here: token tasks (`markov`, `stdlib`, and `TokenTask.of_tokens` for given tokens); in-context linear
regression (`icl-regression`) and sparse-attention regression (`sparse-regression`), `tasks.regression`; the toy
model of superposition (`tms`), `tasks.tms`; bursty few-shot classification (`bursty-classification`),
`tasks.bursty`.
"""

from ..options import Declared
from .base import TASKS, Batch, Task, make_task, register
from .bursty import BurstyClassification
from .regression import ICLRegression, SparseRegression, dmmse_predictions, ridge_predictions
from .tms import TMSTask
from .tokens import MarkovTokens, StdlibTokens, TokenTask

__all__ = ["TASKS", "Batch", "Declared", "Task", "make_task", "register", "TokenTask", "MarkovTokens", "StdlibTokens",
           "ICLRegression", "SparseRegression", "ridge_predictions", "dmmse_predictions", "TMSTask",
           "BurstyClassification"]
