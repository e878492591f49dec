"""Shared fixtures: the test zoo, a fixed torch thread count, a private graphopt cache."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import zoo`

import zoo  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(params=sorted(zoo.ZOO))
def zoo_model(request):
    """(name, model, example_inputs) for every zoo architecture."""
    model, inputs = zoo.build(request.param)
    return request.param, model, inputs
