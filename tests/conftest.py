"""Shared fixtures: tiny models and a short trained series, built once per session."""

import pytest
import torch

# Tiny models: more threads only contend on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def quick_series_dir(tmp_path_factory):
    """A series of the `quick` preset (seconds on a CPU), trained once for the whole session."""
    from tl_devinterp.training import train

    out = tmp_path_factory.mktemp("quick_series")
    train(out, "quick", progress=False)
    return out


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory):
    """`hf_run(arch)`: the output_dir of a short real transformers Trainer run of a tiny model of that family
    (`hf_models.trainer_run`: checkpoint-2 … checkpoint-8), made once per session."""
    runs = {}

    def run(arch: str):
        if arch not in runs:
            from hf_models import trainer_run

            runs[arch] = trainer_run(arch, tmp_path_factory.mktemp(f"hf_run_{arch}"))
        return runs[arch]

    return run
