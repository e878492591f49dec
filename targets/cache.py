"""The persistent tuning cache: MetaSchedule records shared by every run, model and process.

Layout (``$GRAPHOPT_CACHE_DIR``, default ``~/.cache/graphopt``)::

    tuning/<target name>-<hash of TVM target + TVM version>/
        database_workload.json       MetaSchedule's JSON database (one workload per line)
        database_tuning_record.json  (one measured candidate per line)
        budgets.json                 trials already spent per workload (structural hash)
        .lock                        a filelock: every read and write happens under it

A workload is one fused TIR function (a conv + bias + relu of given shapes...), identified
by its structural hash, which ignores names and weight values: a layer tuned once for one
model is a cache hit in another model with the same layer. ``budgets.json`` records how
many trials a workload has received, so a second run with the same budget tunes nothing,
and a larger budget tunes only the difference (starting from the cached records).

Readers never open the shared files with TVM directly: they are checked line by line and
copied under the lock into a private snapshot, because TVM's JSON database aborts on a
single truncated line (an interrupted run) and a concurrent writer may be appending. A
damaged file costs a warning and a re-tune, never a crash: bad record lines are dropped;
a bad workload line (records point at workloads by line number) moves the whole database
aside as ``*.corrupt-<time>``.

Example:
    >>> cache = TuningCache("x86-0123456789ab", root=tmp_path)     # doctest: +SKIP
    >>> snap = cache.snapshot(private_dir)                           # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from graphopt.errors import TargetError

__all__ = ["CacheSnapshot", "TuningCache", "default_cache_dir"]

log = logging.getLogger("graphopt.targets")

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
BUDGETS = "budgets.json"
LOCK_TIMEOUT_S = 600.0  # a merge takes milliseconds; only a stuck process holds it this long


def default_cache_dir() -> Path:
    """``$GRAPHOPT_CACHE_DIR``, else ``~/.cache/graphopt``."""
    return Path(os.environ.get("GRAPHOPT_CACHE_DIR") or "~/.cache/graphopt").expanduser()


@dataclasses.dataclass
class CacheSnapshot:
    """A private, consistent copy of one target's cache.

    Attributes:
        database: a MetaSchedule ``JSONDatabase`` over the private copy (never the shared files).
        budgets: structural hash -> trials already spent on that workload.
        records: how many tuning records the copy holds.
    """

    database: object
    budgets: Dict[str, int]
    records: int


class TuningCache:
    """One target's shared tuning database (see the module docstring).

    Args:
        target_key: from :meth:`Target.cache_key`; names the directory.
        root: the cache root (default :func:`default_cache_dir`).
    """

    def __init__(self, target_key: str, root: Optional[os.PathLike] = None):
        self.dir = Path(root or default_cache_dir()) / "tuning" / target_key
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TargetError(f"cannot create the tuning cache {self.dir} ({e}); point "
                              "GRAPHOPT_CACHE_DIR (or Target.cache_dir) at a writable directory") from e

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.dir / ".lock"), timeout=LOCK_TIMEOUT_S)

    # --- reading ---------------------------------------------------------------------------

    def snapshot(self, into: os.PathLike) -> CacheSnapshot:
        """Copy the shared database (repaired if damaged) into ``into`` and open it there."""
        from tvm.s_tir.meta_schedule.database import JSONDatabase

        from .measure import load_cpu_intrinsics

        load_cpu_intrinsics()  # records of tensorized schedules name intrinsics TVM must know to parse them
        into = Path(into)
        into.mkdir(parents=True, exist_ok=True)
        with self._lock():
            workloads, records = self._repaired_lines()
            budgets = self._read_budgets()
        (into / WORKLOADS).write_text("".join(workloads))
        (into / RECORDS).write_text("".join(records))
        try:
            database = JSONDatabase(work_dir=str(into))
        except Exception as e:  # TVM raises RuntimeError (or worse) on semantically bad records
            self._quarantine(f"TVM could not read it ({type(e).__name__}: {str(e)[:200]})")
            (into / WORKLOADS).write_text("")
            (into / RECORDS).write_text("")
            database, budgets, records = JSONDatabase(work_dir=str(into)), {}, []
        return CacheSnapshot(database=database, budgets=budgets, records=len(records))

    def _repaired_lines(self) -> Tuple[List[str], List[str]]:
        """The shared files' valid lines; damaged lines are dropped (records) or the database
        is moved aside (workloads). Call with the lock held."""
        wpath, rpath = self.dir / WORKLOADS, self.dir / RECORDS
        workloads = _read_lines(wpath)
        records = _read_lines(rpath)
        if not all(_valid_workload(line) for line in workloads):
            self._quarantine(f"a line of {WORKLOADS} is damaged")
            return [], []
        good = [line for line in records if _valid_record(line, len(workloads))]
        if len(good) != len(records):
            _warn(f"graphopt tuning cache {self.dir}: dropped {len(records) - len(good)} damaged "
                  f"record line(s) of {RECORDS} (an interrupted run?); those layers may be re-tuned")
            _atomic_write(rpath, "".join(good))
        return workloads, good

    def _read_budgets(self) -> Dict[str, int]:
        path = self.dir / BUDGETS
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            return {str(k): int(v) for k, v in data["workloads"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            _warn(f"graphopt tuning cache {path} is damaged ({type(e).__name__}); "
                  "its layers will be tuned again")
            return {}

    def _quarantine(self, why: str) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (WORKLOADS, RECORDS, BUDGETS):
            path = self.dir / name
            if path.exists():
                os.replace(path, path.with_name(f"{name}.corrupt-{stamp}"))
        _warn(f"graphopt tuning cache {self.dir} was unreadable: {why}. It was moved aside "
              f"(*.corrupt-{stamp}); the model's layers will be tuned again")

    # --- writing ---------------------------------------------------------------------------

    def merge(self, records: Iterable, budgets: Dict[str, int]) -> int:
        """Append new tuning records and raise the trial counts of ``budgets``' workloads.

        Args:
            records: MetaSchedule ``TuningRecord`` objects from a private tuning database.
            budgets: structural hash -> trials now spent in total on that workload.

        Returns:
            How many records were added.
        """
        from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord

        from .measure import load_cpu_intrinsics

        load_cpu_intrinsics()
        records = list(records)
        with self._lock():
            self._repaired_lines()  # never let TVM append after a truncated line
            added = 0
            if records:
                try:
                    shared = JSONDatabase(work_dir=str(self.dir), allow_missing=True)
                except Exception as e:  # semantically bad records TVM refuses to load
                    self._quarantine(f"TVM could not read it ({type(e).__name__}: {str(e)[:200]})")
                    shared = JSONDatabase(work_dir=str(self.dir), allow_missing=True)
                for r in records:
                    workload = shared.commit_workload(r.workload.mod)
                    shared.commit_tuning_record(TuningRecord(
                        r.trace, workload, r.run_secs, r.target, r.args_info))
                    added += 1
            current = self._read_budgets()
            for key, trials in budgets.items():
                current[key] = max(int(trials), current.get(key, 0))
            _atomic_write(self.dir / BUDGETS, json.dumps({"version": 1, "workloads": current},
                                                         indent=0, sort_keys=True))
        return added


def _read_lines(path: Path) -> List[str]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return [line for line in lines if line.strip()]


def _valid_workload(line: str) -> bool:
    try:
        w = json.loads(line)
    except ValueError:
        return False
    return isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) for x in w)


def _valid_record(line: str, n_workloads: int) -> bool:
    try:
        r = json.loads(line)
    except ValueError:
        return False
    return (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and 0 <= r[0] < n_workloads
            and isinstance(r[1], list) and len(r[1]) == 4)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
