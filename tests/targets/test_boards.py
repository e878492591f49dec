"""targets/boards.py on a fake target (no TVM, no board): the builds are made one by one in the
calling thread, timed one per board at once in threads, each closed after its timing; local
targets, one board or one graph are timed one at a time through benchmark_graph."""
import threading
import time

import pytest

from graphopt.targets import boards

SLEEP_S = 0.3


class Compiled:
    def __init__(self, owner, gm):
        self.owner, self.gm, self.closed, self._runner = owner, gm, False, None

    @property
    def runner(self):
        if self._runner is None:
            self.owner.sessions.append(threading.current_thread().name)
            self._runner = object()
        return self._runner

    def benchmark(self, repeat=1, warmup=1):
        time.sleep(SLEEP_S / 2)

        class R:
            median_ms = self.gm

        return R()

    def close(self):
        self.closed = True


class FakeRemote:
    name = "fake-remote"

    def __init__(self, tracker="127.0.0.1:1", n=2):
        self.tracker, self.n = tracker, n
        self.built, self.sessions, self.compiled, self.single = [], [], [], []

    def boards(self):
        return self.n

    def compile(self, gm, example_inputs, tune_trials=None):
        self.built.append(threading.current_thread() is threading.main_thread())
        c = Compiled(self, gm)
        self.compiled.append(c)
        return c

    def benchmark_graph(self, gm, example_inputs, budget_s=2.0, tune_trials=None):
        self.single.append(gm)
        return gm


def test_builds_in_the_calling_thread_timings_on_the_boards_at_once():
    target = FakeRemote()
    before = dict(boards.STATS)
    start = time.perf_counter()
    out = boards.benchmark_many(target, [1.0, 2.0, 3.0, 4.0], ())
    wall = time.perf_counter() - start
    assert [r.median_ms for r in out] == [1.0, 2.0, 3.0, 4.0] and not target.single
    assert target.built == [True] * 4 and all(c.closed for c in target.compiled)
    assert len(target.sessions) == 4 and all(n.startswith("graphopt-board") for n in target.sessions)
    assert boards.STATS["max_in_flight"] >= 2 and boards.STATS["parallel"] - before["parallel"] == 4
    assert wall < 0.8 * 4 * SLEEP_S, wall   # 4 timings of SLEEP_S on 2 boards: about 2 of them


@pytest.mark.parametrize("tracker,n,gms", [(None, 2, [1.0, 2.0]), ("127.0.0.1:1", 1, [1.0, 2.0]),
                                           ("127.0.0.1:1", 2, [1.0])])
def test_local_one_board_or_one_graph_is_timed_one_at_a_time(tracker, n, gms):
    target = FakeRemote(tracker, n)
    assert boards.benchmark_many(target, gms, ()) == gms and target.single == gms and not target.compiled
