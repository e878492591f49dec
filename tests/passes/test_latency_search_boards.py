"""The latency search on a target with several boards (issue 15): the probes of a step are timed
as batches, measured on the boards at once, with the same result as one board timing them one
after the other, and the run's timing cache counting as it would."""
import json
import pathlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch.nn as nn

import graphopt
from graphopt.analysis.signature import structure_signature

from test_latency_search import convnet, data_for, search_of  # noqa: E402  (same directory)

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = json.loads((pathlib.Path(graphopt.__file__).parent / "report" / "schema.json").read_text())
SLEEP_S = 0.3


class Stats:
    def __init__(self, median_ms):
        self.median_ms = self.p10_ms = self.p90_ms = median_ms


class Boards:
    """Latency = MACs / 1e6 ms (20% more when a conv breaks the lanes); every timing takes
    ``SLEEP_S`` seconds on one of ``boards`` boards: ``benchmark_graphs`` times its graphs in a
    thread pool with one worker per board; the most timings running at once is counted."""

    name = "fake-boards"
    preferred_channel_multiple = 4
    emulated = False

    def __init__(self, boards):
        self.boards, self.timed, self.batches, self.batch_seconds = boards, [], [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def compile(self, gm, example_inputs, **kwargs):
        return gm

    def latency(self, gm):
        ms = graphopt.count_macs(gm) / 1e6
        return ms * (1.2 if any(isinstance(m, nn.Conv2d) and m.out_channels % 4 for m in gm.modules()) else 1.0)

    def measure_latency(self, gm, example_inputs):
        return self.benchmark_graph(gm, example_inputs).median_ms

    def benchmark_graph(self, gm, example_inputs, tune_trials=None):
        self.timed.append(structure_signature(gm, example_inputs))
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(SLEEP_S)
        with self.lock:
            self.in_flight -= 1
        return Stats(self.latency(gm))

    def benchmark_graphs(self, gms, example_inputs, tune_trials=None):
        self.batches.append(len(gms))
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.boards) as pool:
            out = list(pool.map(lambda g: self.benchmark_graph(g, example_inputs), gms))
        self.batch_seconds.append((len(gms), round(time.perf_counter() - start, 3)))
        return out


def run(boards):
    model = convnet()
    x, batches, agreement = data_for(model)
    target = Boards(boards)
    start = time.perf_counter()
    opt = graphopt.optimize(model, ["fuse_conv_bn"], target, example_inputs=x, calibration_data=batches,
                            eval_fn=agreement, progress=False,
                            budget=graphopt.Budget(latency=0.6, max_drop=0.1, step=0.15, max_steps=3,
                                                   recovery_batches=1, final_recovery=0))
    return opt, target, time.perf_counter() - start


def test_two_boards_time_a_steps_probes_at_once_with_the_results_of_one():
    one, t1, wall1 = run(1)
    two, t2, wall2 = run(2)
    s1, s2 = search_of(one), search_of(two)
    # one board: one timing at a time, no batch; two: batches of several graphs, two at once
    assert t1.max_in_flight == 1 and not t1.batches and s1["boards"] == 1 and "batches" not in s1
    assert t2.max_in_flight == 2 and max(t2.batches) >= 2 and s2["boards"] == 2
    assert s2["batches"] == t2.batches
    # the same search: every step, candidate and latency, and the same final graph
    assert s2["steps"] == s1["steps"] and s2["final"] == s1["final"] and s2["stopped"] == s1["stopped"]
    assert structure_signature(two.graph_module, ()) == structure_signature(one.graph_module, ())
    # the run's cache: each structure measured once, the counters as one by one
    assert s2["timings"] == s1["timings"]
    assert sorted(t2.timed) == sorted(t1.timed) and len(set(t2.timed[:-1])) == len(t2.timed) - 1
    # and faster: a batch of n timings (SLEEP_S each) took about ceil(n / 2) of them, not n
    assert all(secs < 0.8 * n * SLEEP_S for n, secs in t2.batch_seconds), t2.batch_seconds
    print(f"one board {wall1:.1f} s, two boards {wall2:.1f} s, batches {t2.batch_seconds}")
    jsonschema.validate(json.loads(two.report.to_json()), SCHEMA)
    assert any("2 boards measured the candidates" in m for m in two.report["latency_search"].messages)


class ByWeights(Boards):
    def latency(self, gm):
        return float(sum(p.numel() for p in gm.parameters()))


def test_the_cache_answers_a_batch_from_structures_timed_before_and_times_repeats_once():
    target = ByWeights(2)
    caps = graphopt.capabilities_of(target)
    cache = graphopt.TimingCache()
    import torch
    import torch.fx as fx

    x = (torch.randn(1, 4),)
    a, b, c = (fx.symbolic_trace(nn.Linear(4, n)) for n in (2, 2, 3))
    assert cache.time(caps, a, x).median_ms > 0 and (cache.measured, cache.reused) == (1, 0)
    out = cache.time_many(caps, [b, c, a, c], x)   # b, a: a's structure; c twice: one timing
    assert [t.median_ms for t in out] == [10.0, 15.0, 10.0, 15.0]
    assert (cache.measured, cache.reused) == (2, 3) and len(target.timed) == 2
    assert target.batches == []   # one new structure: timed alone, not as a batch
    # a target without benchmark_graphs, or with one board, is timed one graph at a time
    one = graphopt.capabilities_of(ByWeights(1))
    assert len(one.time_many([a, c], x)) == 2 and one.target.batches == []


def test_boards_must_be_a_positive_int():
    target = Boards(0)
    with pytest.raises(graphopt.errors.InvalidArgumentError, match="boards must be an int >= 1"):
        graphopt.capabilities_of(target).boards()
    target.boards = lambda: 3
    assert graphopt.capabilities_of(target).boards() == 3
