"""Where a compiled library runs: in this process, under qemu, or on an RPC device.

Every runner has the same small interface (``run(list of arrays) -> list of arrays``,
``close()``, optionally ``thread_safe``), so :class:`~graphopt.targets.artifact.CompiledModel` does not care where the
code executes. :class:`LocalRunner` is the in-process one; :class:`QemuRunner` and
:class:`RpcRunner` live in :mod:`graphopt.targets.qemu` and :mod:`graphopt.targets.rpc`.

Example:
    >>> runner = make_runner(target, "model.so", params=weights)  # doctest: +SKIP
    >>> (logits,) = runner.run([x])                                 # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import List, Sequence

import numpy as np

from graphopt.errors import TargetError

__all__ = ["LocalRunner", "make_runner", "set_runtime_threads"]

log = logging.getLogger("graphopt.targets")
_POOL = threading.local()  # .threads: what this thread's TVM pool was last set to (TVM's pools are per thread)

_AFFINITY_BIG = 1  # TVM's ThreadGroup::kBig: on a homogeneous CPU, every core


def set_runtime_threads(n: int) -> None:
    """Set the calling thread's TVM runtime pool to ``n`` threads (cheap when unchanged).

    Done explicitly because TVM's default is single-threaded on these machines: without
    ``TVM_NUM_THREADS`` its pool is capped at half the logical cores (it assumes
    hyper-threading), and ``runtime.config_threadpool`` cannot raise that cap, so the
    variable is set (process-wide, inherited by child processes) before the pool is
    reconfigured. TVM pins the calling thread to core 0 while configuring its pool; that pin
    is undone, or PyTorch and ONNX Runtime threads started later in this process would
    share one core.
    """
    if getattr(_POOL, "threads", None) == n:
        return
    import tvm  # noqa: F401  (loads the runtime library that registers the function)
    import tvm_ffi

    try:
        affinity = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        affinity = None
    os.environ["TVM_NUM_THREADS"] = str(int(n))
    tvm_ffi.get_global_func("runtime.config_threadpool")(_AFFINITY_BIG, int(n))
    if affinity is not None:
        os.sched_setaffinity(0, affinity)
    _POOL.threads = n


def _flatten(value, out: list) -> list:
    if hasattr(value, "numpy"):
        out.append(value.numpy())
    else:  # a tuple output arrives as an ffi Array (possibly nested)
        for item in value:
            _flatten(item, out)
    return out


class LocalRunner:
    """Runs a host-architecture library in this process through the Relax VM.

    Safe to call from any number of threads: a Relax ``VirtualMachine`` keeps its registers and
    frames in the object, so each calling thread gets its own VM over the one loaded library,
    and all of them read the same weights (converted once, never written).

    Args:
        lib_path: the exported ``.so``.
        params: weights appended after the inputs on every call (converted once).
        num_threads: TVM runtime threads, set before every call batch.
        entry: the VM function to call.
    """

    #: callers need no lock around run() (runners without it are serialized by CompiledModel)
    thread_safe = True

    def __init__(self, lib_path: str, *, params: Sequence[np.ndarray] = (), num_threads: int = 1,
                 entry: str = "main"):
        import tvm

        self.num_threads = num_threads
        self.entry = entry
        try:
            self._lib = tvm.runtime.load_module(str(lib_path))
        except Exception as e:  # TVM surfaces dlopen failures as its own error types
            raise TargetError(f"could not load {lib_path}: {e}") from e
        self._local = threading.local()
        self._func_for_thread()  # the creating thread's VM now: a bad library fails here
        self._params = [tvm.runtime.tensor(np.ascontiguousarray(p)) for p in params]

    def _func_for_thread(self):
        """This thread's VM function (its VM is created on the thread's first call)."""
        func = getattr(self._local, "func", None)
        if func is None:
            if self._lib is None:
                raise TargetError("this runner is closed")
            import tvm
            from tvm import relax

            vm = relax.VirtualMachine(self._lib, tvm.cpu())
            self._local.vm, self._local.func = vm, vm[self.entry]
            func = self._local.func
        return func

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """``vm[entry](*inputs, *params)``, outputs flattened to numpy (copies) in order."""
        import tvm

        set_runtime_threads(self.num_threads)
        func, params = self._func_for_thread(), self._params
        args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
        return _flatten(func(*args, *params), [])

    def bind(self, inputs: Sequence[np.ndarray]):
        """A zero-argument callable running the model on ``inputs`` staged once (for timing),
        on the VM of whichever thread calls it."""
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
        params, threads = self._params, self.num_threads

        def call():
            set_runtime_threads(threads)
            self._func_for_thread()(*args, *params)
        return call

    def time_runs(self, inputs: Sequence[np.ndarray], repeat: int, warmup: int) -> List[float]:
        """Seconds per call, inputs already on the device: the model's time, not the copies."""
        call = self.bind(inputs)
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        """Drop the library and weights; threads still in a call finish it on their own VM."""
        self._lib = self._params = None
        self._local = threading.local()

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_runner(target, lib_path: str, *, params: Sequence[np.ndarray] = (), entry: str = "main"):
    """The runner for ``target``: RPC device if it names one, qemu if emulated, else local."""
    threads = target.runtime_threads
    if target.remote:
        from .rpc import RpcRunner

        return RpcRunner(lib_path, params=params, num_threads=threads, entry=entry,
                         rpc=target.rpc, tracker=target.tracker, key=target.key)
    if target.emulated:
        if target.arch != "aarch64":
            raise TargetError(f"target {target.name!r} is {target.arch}: only aarch64 code can "
                              "run emulated on this host")
        from .qemu import QemuRunner

        if not target.qemu_cpu:
            raise TargetError(f"target {target.name!r} needs qemu_cpu= to run under qemu")
        return QemuRunner(lib_path, cpu=target.qemu_cpu, params=params, num_threads=threads,
                          entry=entry)
    return LocalRunner(lib_path, params=params, num_threads=threads, entry=entry)
