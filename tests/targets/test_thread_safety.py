"""A CompiledModel called from many threads at once (what a web server does) gives every caller
the single-threaded answer, bit for bit, also while ``benchmark()`` runs beside the calls."""
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from requirements import needs_arm_toolchain

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

THREADS, CALLS = 8, 200


def _small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    return torch.fx.symbolic_trace(model)


def _inputs(n, shape=(1, 3, 16, 16)):
    return [np.random.default_rng(i).standard_normal(shape).astype("float32") for i in range(n)]


def _hammer(compiled, inputs, expected, threads, calls, beside=None):
    """Every thread calls the model ``calls`` times; returns the failures (wrong outputs, errors)."""
    failures = []
    start = threading.Barrier(threads + (beside is not None))

    def work(k):
        start.wait()
        try:
            for i in range(calls):
                j = (k + i) % len(inputs)
                if not np.array_equal(compiled(inputs[j]), expected[j]):
                    failures.append(f"thread {k}, call {i}: wrong output")
        except Exception as e:  # noqa: BLE001  (any error is a failure to report)
            failures.append(f"thread {k}: {type(e).__name__}: {e}")

    def side():
        start.wait()
        try:
            beside()
        except Exception as e:  # noqa: BLE001
            failures.append(f"beside: {type(e).__name__}: {e}")

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    if beside is not None:
        workers.append(threading.Thread(target=side))
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return failures


@pytest.fixture(scope="module")
def compiled():
    gm = _small_model()
    model = graphopt.get_target("x86").compile(gm, (torch.randn(1, 3, 16, 16),), tune_trials=0)
    yield model
    model.close()


def test_many_threads_get_the_single_threaded_outputs(compiled):
    inputs = _inputs(8)
    expected = [compiled(x) for x in inputs]
    assert _hammer(compiled, inputs, expected, THREADS, CALLS) == []


def test_benchmark_beside_calls(compiled):
    inputs = _inputs(4)
    expected = [compiled(x) for x in inputs]
    results = []
    failures = _hammer(compiled, inputs, expected, THREADS, CALLS // 2,
                       beside=lambda: results.append(compiled.benchmark(repeat=50, warmup=2)))
    assert failures == []
    assert results and results[0].median_ms > 0


def test_a_model_first_called_from_threads_starts_one_runner():
    gm = _small_model()
    with graphopt.get_target("x86").compile(gm, (torch.randn(1, 3, 16, 16),), tune_trials=0) as model:
        inputs = _inputs(2)
        reference = [gm(torch.from_numpy(x)).detach().numpy() for x in inputs]
        outs = {}

        def first(k):
            outs[k] = model(inputs[k % 2])

        threads = [threading.Thread(target=first, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k, out in outs.items():
            np.testing.assert_allclose(out, reference[k % 2], rtol=1e-4, atol=1e-5)
        assert len(outs) == 6


@needs_arm_toolchain
def test_an_emulated_model_serializes_calls_from_threads():
    gm = _small_model()
    with graphopt.get_target("arm").compile(gm, (torch.randn(1, 3, 16, 16),), tune_trials=0) as model:
        inputs = _inputs(3)
        expected = [model(x) for x in inputs]
        assert _hammer(model, inputs, expected, threads=4, calls=5) == []
