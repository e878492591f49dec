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


#: Optional suites against model libraries: they run only when named with `-m`.
OPTIONAL_SUITES = ("torchvision", "timm")


def pytest_collection_modifyitems(config, items):
    """The model-library suites are optional: each runs only when asked for with `-m <name>`."""
    asked = config.getoption("-m") or ""
    skipped = [s for s in OPTIONAL_SUITES if s not in asked]
    # markers, not keywords: keywords also hold directory names (a checkout in a dir called `timm`)
    keep = [i for i in items if not any(i.get_closest_marker(s) for s in skipped)]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
