"""Several boards timing graphs at once: the RPC tracker's servers under a key.

The latency search times the candidates of one step together
(:meth:`graphopt.TargetCapabilities.time_many`). On a target behind a tracker with several
servers for its key, :func:`benchmark_many` builds the graphs one after the other in the calling
thread (TVM compilation in several Python threads is not known to be safe) and then times the
builds in a thread pool, one worker per board: each timing opens its own RPC session, and the
tracker hands each a free board. Local timings stay sequential: runs in parallel on one machine
would disturb each other.

:data:`STATS` counts what happened (for tests and logs): the timings measured in parallel and
the most RPC sessions that were timing at the same moment (two at once under a key with two
servers: both boards served, since a server serves one session at a time).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

from graphopt.errors import TargetError

from .rpc import parse_address

__all__ = ["STATS", "benchmark_many", "tracker_boards"]

log = logging.getLogger("graphopt.targets")

#: ``parallel``: timings measured through the thread pool; ``max_in_flight``: the most sessions
#: timing at one moment; ``batches``: calls that used the pool.
STATS: Dict[str, int] = {"parallel": 0, "max_in_flight": 0, "batches": 0}
_lock = threading.Lock()
_in_flight = 0


def tracker_boards(tracker: str, key: str) -> int:
    """The servers registered with ``tracker`` under ``key`` (busy or free), from the tracker's
    ``summary()``: its ``server_info`` entries are keyed ``"server:<key>"`` (as TVM's own
    ``RPCConfig.count_num_servers`` counts them).

    Raises:
        TargetError: the tracker cannot be reached, or no server has ``key``.
    """
    from tvm import rpc as tvm_rpc

    host, port = parse_address(tracker)
    try:
        session = tvm_rpc.connect_tracker(host, port)
        try:
            summary = session.summary()
        finally:
            session.close()
    except (OSError, RuntimeError) as err:
        raise TargetError(f"could not ask tracker {tracker} for its servers: {err}") from err
    count = sum(1 for s in summary.get("server_info", []) if s.get("key", "").split(":", 1)[-1] == key)
    if count == 0:
        raise TargetError(f"tracker {tracker} has no server registered under key {key!r}")
    return count


def _timed_on_a_board(compiled, budget_s: float):
    """One build's statistics in its own RPC session (opened here, closed before returning)."""
    global _in_flight
    from .target import _benchmark

    try:
        compiled.runner  # noqa: B018  (opens the session: waits for a free board)
        with _lock:
            _in_flight += 1
            STATS["max_in_flight"] = max(STATS["max_in_flight"], _in_flight)
        try:
            return _benchmark(compiled, None, budget_s)
        finally:
            with _lock:
                _in_flight -= 1
    finally:
        compiled.close()


def benchmark_many(target, gms: Sequence, example_inputs: Sequence, tune_trials: Optional[int] = None,
                   budget_s: float = 2.0, boards: Optional[int] = None) -> List[Any]:
    """``target.benchmark_graph`` of each graph, in order; on a tracker with several boards the
    builds (made here, one by one) are timed ``boards`` at a time in threads."""
    gms = list(gms)
    if boards is None:
        boards = target.boards()
    if not target.tracker or boards < 2 or len(gms) < 2:
        return [target.benchmark_graph(gm, example_inputs, budget_s=budget_s, tune_trials=tune_trials)
                for gm in gms]
    built: List[Any] = []
    try:
        for gm in gms:
            built.append(target.compile(gm, example_inputs, tune_trials=tune_trials or 0))
    except BaseException:
        for c in built:
            c.close()
        raise
    workers = min(boards, len(built))
    log.info("%s: timing %d builds on %d boards at once", target.name, len(built), workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graphopt-board") as pool:
        futures = [pool.submit(_timed_on_a_board, c, budget_s) for c in built]
        results = [f.result() for f in futures]  # the first failure raises, after all finished
    with _lock:
        STATS["parallel"] += len(results)
        STATS["batches"] += 1
    return results
