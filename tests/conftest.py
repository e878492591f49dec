"""Shared fixtures: the test zoo, a fixed torch thread count, a report to look at.

Tests live in folders that mirror the layers: core/ (graphopt without passes' internals or
TVM), passes/, targets/ (TVM on this host), integration/ (qemu, RPC, datasets, a browser, a
fresh venv, optional model libraries).
"""
import os
import sys

import pytest
import torch

import graphopt

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import zoo`

import zoo  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: two OpenMP threads on a shared 2-core machine can
    be 100x slower than one. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=sorted(zoo.ZOO))
def zoo_model(request):
    """(name, model, example_inputs) for every zoo architecture."""
    model, inputs = zoo.build(request.param)
    return request.param, model, inputs


@pytest.fixture(scope="session")
def residual_report():
    """The zoo's residual net through fuse_conv_bn and dce, with accuracy: a report with every field."""
    model, inputs = zoo.build("residual")
    return graphopt.optimize(model, ["fuse_conv_bn", "dce"], example_inputs=inputs,
                             eval_fn=lambda m: float(m(*inputs).argmax() == 3))


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
