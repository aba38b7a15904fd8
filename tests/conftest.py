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
