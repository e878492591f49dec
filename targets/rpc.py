"""Run and tune compiled models on remote devices over TVM RPC.

A board (Raspberry Pi, Graviton...) runs ``python -m tvm.exec.rpc_server``, usually
registered with a tracker under a key naming the device kind. This module gives graphopt:

* :func:`connect`: a session to one server, directly or through a tracker;
* :class:`RpcRunner`: the :class:`~graphopt.targets.qemu.QemuRunner` interface on a
  remote device, so a CompiledModel runs the same way emulated or on a board;
* :func:`make_ms_builder` / :func:`make_ms_runner`: MetaSchedule builder and runner
  that cross-compile candidates on the host and time them on the device;
(:class:`graphopt.targets.testing.LoopbackDeviceFarm` is a tracker plus emulated aarch64
servers on loopback, to try and test all of this without a board.)

Example:
    >>> with RpcRunner("m_aarch64.so", tracker="10.0.0.2:9190", key="rpi4",  # doctest: +SKIP
    ...                params=weights) as runner:
    ...     outputs = runner.run([x])
"""
from __future__ import annotations

import functools
import gc
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from graphopt.errors import TargetError

from .arm_sysroot import CROSS_CXX, require_cross_compiler
from .qemu import elf_machine

__all__ = ["RpcRunner", "build_candidate", "connect",
           "export_cross_compiled",
           "make_ms_builder", "make_ms_runner", "parse_address"]

DEFAULT_KEY = "graphopt-aarch64"


def parse_address(address: str) -> Tuple[str, int]:
    """``"host:port"`` to ``(host, port)``, with a clear error for anything else."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TargetError(f"expected an address as 'host:port', got {address!r}")
    return host, int(port)


def connect(rpc: Optional[str] = None, *, tracker: Optional[str] = None,
            key: Optional[str] = None, priority: int = 1, session_timeout: float = 0,
            timeout: Optional[float] = 120.0):
    """Open a TVM RPC session to one device.

    Args:
        rpc: ``"host:port"`` of an RPC server, to connect directly.
        tracker: ``"host:port"`` of an RPC tracker, to be given a free server of ``key``.
        key: the device key; required with ``tracker`` (and checked by a direct server).
        priority: the tracker request's priority.
        session_timeout: seconds after which the server drops the session; 0 = never.
        timeout: seconds to wait for the tracker to hand out a free device; None = forever.
            (TVM's tracker queues a request until a device is free, forever by default.)

    Returns:
        A ``tvm.rpc.RPCSession``.

    Raises:
        TargetError: neither or both of ``rpc`` / ``tracker``, no key for a tracker, no
            device registered under ``key``, none free within ``timeout``, or the server /
            tracker could not be reached.
    """
    from tvm import rpc as tvm_rpc

    if (rpc is None) == (tracker is None):
        raise TargetError("give exactly one of rpc='host:port' or tracker='host:port'")
    if tracker is not None and not key:
        raise TargetError("a tracker hands out devices by key: pass key=...")
    where = f"RPC server {rpc}" if rpc else f"tracker {tracker} (key {key!r})"
    try:
        if rpc is not None:
            host, port = parse_address(rpc)
            return tvm_rpc.connect(host, port, key or "", session_timeout=session_timeout)
        host, port = parse_address(tracker)
        tracker_session = tvm_rpc.connect_tracker(host, port)
        keys = tracker_session.summary().get("queue_info", {})
        if key not in keys:
            raise TargetError(f"tracker {tracker} has no device registered under key {key!r}; "
                              f"its keys: {', '.join(sorted(keys)) or '(none)'}")
        return _call_with_timeout(
            lambda: tracker_session.request(key, priority=priority,
                                            session_timeout=session_timeout, max_retry=2),
            timeout, on_timeout=tracker_session.close,
            message=f"no free device from {where} within {timeout} s (all busy, or a "
                    "registered server stopped serving)")
    except (OSError, RuntimeError) as err:  # TVM reports RPC failures as RuntimeError
        raise TargetError(f"could not open a TVM RPC session to {where}: {err}") from err


def _call_with_timeout(call, timeout: Optional[float], *, on_timeout, message: str):
    # The tracker protocol blocks in a socket read with no timeout of its own: wait in a
    # daemon thread, and on expiry close the socket to release it.
    box: dict = {}

    def target():
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the caller's thread below
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        on_timeout()
        raise TargetError(message)
    if "error" in box:
        raise box["error"]
    return box["value"]


class RpcRunner:
    """Runs one Relax VM library on a remote device; the QemuRunner interface over RPC.

    The library is uploaded and the weights copied to the device once; each :meth:`run`
    then sends only the inputs. Outputs are fetched with ``set_input`` /
    ``invoke_stateful`` / ``get_outputs``, because a tuple returned by a remote call
    arrives as an opaque handle.

    Args:
        lib_path: a ``.so`` built for the device (for ARM: :func:`cross_compile_library`).
        params: weights passed after the inputs on every call.
        num_threads: runtime threads on the device (``runtime.config_threadpool``);
            None keeps the server's setting.
        entry: the VM function to call.
        session: an open session; otherwise one is opened with ``rpc`` / ``tracker`` /
            ``key`` (see :func:`connect`) and closed by :meth:`close`.

    Raises:
        TargetError: no session could be opened, or the device could not load the library.
    """

    def __init__(self, lib_path: os.PathLike, *, params: Sequence[np.ndarray] = (),
                 num_threads: Optional[int] = None, entry: str = "main", session=None,
                 rpc: Optional[str] = None, tracker: Optional[str] = None,
                 key: Optional[str] = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.lib_path = Path(lib_path).resolve()
        self.entry = entry
        self._session = session if session is not None else connect(rpc, tracker=tracker,
                                                                     key=key)
        remote_name = f"graphopt_{os.getpid()}_{id(self):x}_{self.lib_path.name}"
        try:
            if num_threads is not None:  # mode 1 = TVM's kBig: the big cores of big.LITTLE
                self._session.get_function("runtime.config_threadpool")(1, int(num_threads))
            self._session.upload(str(self.lib_path), remote_name)
            self._device = self._session.cpu()
            self._vm = VirtualMachine(self._session.load_module(remote_name), self._device)
            self._params = [tvm.runtime.tensor(np.ascontiguousarray(p), self._device)
                            for p in params]
        except (RuntimeError, OSError) as err:
            raise TargetError(
                f"the remote device could not load {self.lib_path.name} (built for "
                f"{elf_machine(self.lib_path)}): {err}") from err

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Call ``vm[entry](*inputs, *params)`` on the device; outputs flattened in order."""
        import tvm

        if self._session is None:
            raise TargetError("this RpcRunner is closed")
        try:
            args = [tvm.runtime.tensor(np.ascontiguousarray(x), self._device) for x in inputs]
            self._vm.set_input(self.entry, *args, *self._params)
            self._vm.invoke_stateful(self.entry)
            return _flatten(self._vm.get_outputs(self.entry), [])
        except (RuntimeError, OSError) as err:
            raise TargetError(f"running {self.lib_path.name} over RPC failed: {err}"
                              + _CRASH_HINT * ("kShutdown" in str(err))) from err

    def time_runs(self, inputs: Sequence[np.ndarray], repeat: int, warmup: int) -> List[float]:
        """Seconds per call, timed on the device (no network round trip in the numbers).

        Uses TVM's remote ``time_evaluator`` over ``invoke_stateful``; its own discarded
        first call plus ``warmup`` untimed calls precede the ``repeat`` timed ones.
        """
        import tvm

        if self._session is None:
            raise TargetError("this RpcRunner is closed")
        try:
            args = [tvm.runtime.tensor(np.ascontiguousarray(x), self._device) for x in inputs]
            self._vm.set_input(self.entry, *args, *self._params)
            for _ in range(warmup):
                self._vm.invoke_stateful(self.entry)
            timer = self._vm.time_evaluator("invoke_stateful", self._device, number=1,
                                            repeat=max(1, repeat))
            return [float(t) for t in timer(self.entry).results]
        except (RuntimeError, OSError) as err:
            raise TargetError(f"timing {self.lib_path.name} over RPC failed: {err}"
                              + _CRASH_HINT * ("kShutdown" in str(err))) from err

    def close(self) -> None:
        """Drop remote objects and the session (the server then frees them).

        TVM's VirtualMachine sits in a reference cycle (a closure over itself), so the session
        it holds, and with it the device, stays busy until the cycle collector runs: a tracker
        with one board would refuse the next session for minutes. Collect now.
        """
        self._vm = self._params = None
        self._session = None
        gc.collect()

    def __enter__(self) -> "RpcRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CRASH_HINT = (
    "\nThe remote session process died: most often a signal such as SIGILL (the library uses "
    "an instruction the device's CPU lacks, e.g. +sve or +dotprod on a Cortex-A72) or "
    "SIGSEGV. TVM's RPC server stops serving after such a crash: restart it.")


def _flatten(value, out: list) -> list:
    if hasattr(value, "numpy"):
        out.append(value.numpy())
    elif isinstance(value, (int, float, bool)):
        out.append(np.asarray(value))
    else:
        for item in value:
            _flatten(item, out)
    return out


# --- MetaSchedule ------------------------------------------------------------------------

def export_cross_compiled(rt_mod, cross_compiler: str = CROSS_CXX) -> str:
    """MetaSchedule ``f_export``: link a candidate into a ``.so`` for the device.

    The default exporter ships a ``.tar`` of objects that the *device* links with its own
    compiler; emulated servers and many boards have none, so candidates are linked here.
    """
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
    rt_mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    return path


def build_candidate(mod, target, params=None, *, intrinsics: Sequence[str] = ()):
    """MetaSchedule ``f_build``: TVM's ``default_build`` minus its import of every intrinsic.

    TVM's default imports all of ``tvm.s_tir.tensor_intrin`` in each fresh builder process
    (a new process per batch): about 50 s here, nearly all CUDA intrinsics, before every
    batch. Candidates arrive already tensorized, so CPU builds do not need that registry;
    modules that do (e.g. ``"cuda"`` for mma layouts) can be named in ``intrinsics``.
    """
    import importlib

    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    for name in intrinsics:
        importlib.import_module(f"tvm.s_tir.tensor_intrin.{name}")
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def make_ms_builder(cross_compiler: str = CROSS_CXX, *, max_workers: Optional[int] = None,
                    timeout_sec: float = 60.0, intrinsics: Sequence[str] = ()):
    """A MetaSchedule ``LocalBuilder`` whose candidates are cross-linked ``.so`` files.

    Args:
        cross_compiler: the g++ that links for the device.
        max_workers: parallel builds (TVM's default: one per host CPU).
        timeout_sec: per-candidate build limit.
        intrinsics: ``tvm.s_tir.tensor_intrin`` submodules the build needs registered
            (see :func:`build_candidate`); none for CPU targets.

    Raises:
        TargetError: the cross compiler is not installed.
    """
    from tvm.s_tir.meta_schedule.builder import LocalBuilder

    if cross_compiler == CROSS_CXX:
        require_cross_compiler()
    elif shutil.which(cross_compiler) is None:
        raise TargetError(f"cross compiler {cross_compiler!r} is not on PATH")
    # Module-level functions (in partials) pickle by reference into the builder processes.
    return LocalBuilder(
        max_workers=max_workers, timeout_sec=timeout_sec,
        f_build=functools.partial(build_candidate, intrinsics=tuple(intrinsics)),
        f_export=functools.partial(export_cross_compiled, cross_compiler=cross_compiler))


def make_ms_runner(tracker: str, key: str, *, number: int = 3, repeat: int = 1,
                   min_repeat_ms: int = 100, session_timeout_sec: int = 60,
                   max_workers: Optional[int] = None):
    """A MetaSchedule ``RPCRunner`` that times candidates on devices behind a tracker.

    Args:
        tracker: ``"host:port"`` of the tracker.
        key: the device key servers registered with.
        number, repeat, min_repeat_ms: TVM's ``EvaluatorConfig`` (see its docs).
        session_timeout_sec: per-candidate limit; emulated devices need generous ones.
        max_workers: concurrent measurements; defaults to the servers the tracker has
            for ``key`` (at least 1).

    Raises:
        TargetError: the tracker cannot be reached or has no server for ``key``.
    """
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    host, port = parse_address(tracker)
    config = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                       session_timeout_sec=session_timeout_sec)
    try:
        servers = config.count_num_servers(allow_missing=False)
    except (ValueError, OSError, RuntimeError) as err:
        raise TargetError(f"no device for MetaSchedule at tracker {tracker}: {err}") from err
    return RPCRunner(
        rpc_config=config,
        evaluator_config=EvaluatorConfig(number=number, repeat=repeat,
                                         min_repeat_ms=min_repeat_ms),
        max_workers=max_workers or servers)
