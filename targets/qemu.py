"""Run cross-compiled aarch64 Relax VM libraries on an x86 host, under qemu-user.

An aarch64 ``.so`` cannot be loaded into the host process, so :class:`QemuRunner` keeps
one aarch64 Python (from :mod:`graphopt.targets.arm_sysroot`) alive under
``qemu-aarch64`` that loads the library and the weights once and then serves requests.
Starting Python and importing TVM under emulation takes seconds; a request takes only the
model's emulated run time.

``QEMU_CPU`` is set from the target's CPU, so qemu executes only that core's instruction
set: a module compiled for a feature the core lacks (``+sve`` or ``+dotprod`` on a
Cortex-A72) dies with SIGILL, which surfaces here as a :class:`~graphopt.errors.TargetError`
naming the signal and the CPU, exactly as it would on the board.

Protocol: requests and replies travel on two dedicated pipes (never stdin/stdout, which
TVM and Python may print to), as a 9-byte header (kind byte, little-endian u64 length)
followed by an ``.npz`` payload of the arrays in order.

Example:
    >>> import numpy as np                                               # doctest: +SKIP
    >>> with QemuRunner("model_aarch64.so", cpu="cortex-a72",           # doctest: +SKIP
    ...                 params=weights) as runner:
    ...     (logits,) = runner.run([np.zeros((1, 3, 8, 8), "float32")])
"""
from __future__ import annotations

import functools
import inspect
import io
import os
import select
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from graphopt.errors import TargetError

from .processes import kill_group
from .arm_sysroot import (
    PYTHON_RELPATH, RUNTIME_EXTRA_RELPATH, SITE_PACKAGES_RELPATH, ensure_sysroot,
    require_cross_compiler, require_qemu,
)

__all__ = ["QemuRunner", "cross_compile_library", "elf_machine",
           "qemu_cpu_names", "qemu_python_command"]

_HEADER = struct.Struct("<cQ")
# Host variables that would point the aarch64 Python at x86 code or another interpreter.
_SCRUBBED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV",
                 "LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONEXECUTABLE", "QEMU_LD_PREFIX")


@functools.lru_cache(maxsize=None)
def qemu_cpu_names() -> Tuple[str, ...]:
    """CPU models this host's ``qemu-aarch64`` can emulate (``qemu-aarch64 -cpu help``)."""
    out = subprocess.run([require_qemu(), "-cpu", "help"], capture_output=True, text=True)
    names = [line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()]
    return tuple(names)


def _check_cpu(cpu: str) -> str:
    names = qemu_cpu_names()
    if names and cpu not in names:
        raise TargetError(f"qemu-aarch64 cannot emulate CPU {cpu!r}; it knows: {', '.join(names)}")
    return cpu


def qemu_python_command(sysroot: os.PathLike, *, cpu: str, num_threads: Optional[int] = None,
                        launcher: Optional[os.PathLike] = None) -> Tuple[List[str], Dict[str, str]]:
    """The argv prefix and environment that start the sysroot's aarch64 Python under qemu.

    Args:
        sysroot: a directory made by :func:`~graphopt.targets.arm_sysroot.ensure_sysroot`.
        cpu: qemu CPU model (``cortex-a72``, ``cortex-a76``, ``neoverse-n1``...); qemu then
            enforces that core's instruction set.
        num_threads: ``TVM_NUM_THREADS`` for the emulated runtime (unset: TVM's default).
        launcher: passed as ``-0``, so the guest's ``sys.executable`` is this host script;
            Python processes the guest spawns (the RPC server's workers) then re-enter qemu.

    Returns:
        ``(argv, env)``: append a script or ``-c``/``-m`` arguments to ``argv``.
    """
    root = Path(sysroot)
    argv = [require_qemu(), "-L", str(root)]
    if launcher is not None:
        argv += ["-0", str(launcher)]
    argv.append(str(root / PYTHON_RELPATH))
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update({
        "QEMU_CPU": _check_cpu(cpu),
        # Explicit, because with -0 the guest's prefix search starts from the launcher.
        "PYTHONPATH": str(root / SITE_PACKAGES_RELPATH),
        "PYTHONNOUSERSITE": "1",
        "TVM_USE_RUNTIME_LIB": "1",  # the sysroot ships only the runtime library
    })
    if num_threads is not None:
        env["TVM_NUM_THREADS"] = str(int(num_threads))
    return argv, env


def cross_compile_library(executable, path: os.PathLike) -> Path:
    """Export a ``tvm.compile`` result built for an aarch64 target as an aarch64 ``.so``.

    Links with ``aarch64-linux-gnu-g++``: the host's g++ cannot link aarch64 objects.

    Args:
        executable: what ``tvm.compile(mod, target=<aarch64 llvm target>)`` returned.
        path: the ``.so`` to write.

    Returns:
        ``path`` as a Path.
    """
    from tvm.support import cc

    path = Path(path)
    executable.export_library(str(path), fcompile=cc.cross_compiler(require_cross_compiler()))
    return path


_ELF_MACHINES = {0x03: "x86", 0x28: "arm", 0x3E: "x86_64", 0xB7: "aarch64", 0xF3: "riscv"}


def elf_machine(path: os.PathLike) -> str:
    """The architecture an ELF file was built for (``"aarch64"``, ``"x86_64"``...).

    Lets callers refuse a library for the wrong machine with a clear error instead of a
    dlopen failure (or a crash) deep in TVM.

    Raises:
        TargetError: the file is not an ELF file.
    """
    with open(path, "rb") as f:
        header = f.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise TargetError(f"{path} is not an ELF shared library")
    order = "<" if header[5] == 1 else ">"
    (machine,) = struct.unpack(order + "H", header[18:20])
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine:#x}")


class QemuRunner:
    """A persistent aarch64 worker that runs one Relax VM library under qemu.

    Args:
        lib_path: the aarch64 ``.so`` (see :func:`cross_compile_library`).
        cpu: qemu CPU model the code must run on (``cortex-a72``, ``neoverse-n1``...).
        params: weights appended after the inputs on every call, loaded once.
        num_threads: ``TVM_NUM_THREADS`` inside the worker.
        sysroot: the aarch64 sysroot; built on first use (``ensure_sysroot()``) if omitted.
        entry: the VM function to call.
        timeout: seconds a single request (or the start-up) may take before the worker is
            killed and a TargetError raised; None waits forever.

    Raises:
        TargetError: the library is not aarch64, the worker could not load it, or the
            worker died (its signal and the emulated CPU are named).
    """

    def __init__(self, lib_path: os.PathLike, *, cpu: str, params: Sequence[np.ndarray] = (),
                 num_threads: int = 2, sysroot: Optional[os.PathLike] = None,
                 entry: str = "main", timeout: Optional[float] = 600.0):
        self.lib_path = Path(lib_path).resolve()
        self.cpu = cpu
        self.entry = entry
        self.timeout = timeout
        self._proc: Optional[subprocess.Popen] = None
        machine = elf_machine(self.lib_path)
        if machine != "aarch64":
            raise TargetError(f"{self.lib_path} is built for {machine}, not aarch64: "
                              "cross-compile it with cross_compile_library()")
        sysroot = Path(sysroot) if sysroot is not None else ensure_sysroot()
        argv, env = qemu_python_command(sysroot, cpu=cpu, num_threads=num_threads)

        self._tmp = tempfile.TemporaryDirectory(prefix="graphopt-qemu-")
        params_path = Path(self._tmp.name) / "params.npz"
        _save_arrays(params_path, params)
        self._stderr = open(Path(self._tmp.name) / "worker.stderr", "w+b")
        req_r, self._req_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        code = (inspect.getsource(_worker_main)
                + f"\n_worker_main({str(self.lib_path)!r}, {str(params_path)!r}, {entry!r}, "
                f"{req_r}, {resp_w}, {str(sysroot / RUNTIME_EXTRA_RELPATH)!r})\n")
        try:
            self._proc = subprocess.Popen(
                [*argv, "-c", code], env=env, stdin=subprocess.DEVNULL,
                stdout=self._stderr, stderr=self._stderr, pass_fds=(req_r, resp_w),
                start_new_session=True)
        finally:
            # Only the worker may hold these ends, so its death reads as EOF, not a hang.
            os.close(req_r)
            os.close(resp_w)
        kind, payload = self._receive("loading the library")
        if kind != b"R":
            self.close()
            raise TargetError(f"the aarch64 worker could not load {self.lib_path.name} "
                              f"(QEMU_CPU={cpu}):\n{payload.decode(errors='replace')}")

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Call ``vm[entry](*inputs, *params)`` in the worker; outputs flattened in order."""
        if self._proc is None:
            raise TargetError("this QemuRunner is closed")
        buf = io.BytesIO()
        np.savez(buf, *[np.ascontiguousarray(x) for x in inputs])
        self._send(b"I", buf.getvalue())
        kind, payload = self._receive("running the model")
        if kind == b"E":
            raise TargetError(f"the model raised under qemu (QEMU_CPU={self.cpu}):\n"
                              f"{payload.decode(errors='replace')}")
        return _load_arrays(payload)

    def close(self) -> None:
        """Stop the worker (closing its request pipe ends it; a stuck one is killed)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _close_fd(self._req_w)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_group(proc)
            _close_fd(self._resp_r)
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "QemuRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self.close()

    # --- pipe plumbing -------------------------------------------------------------------

    def _send(self, kind: bytes, payload: bytes) -> None:
        try:
            _write_all(self._req_w, _HEADER.pack(kind, len(payload)) + payload)
        except BrokenPipeError:
            raise self._death("sending inputs") from None

    def _receive(self, doing: str) -> Tuple[bytes, bytes]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        header = self._read_exact(_HEADER.size, deadline, doing)
        kind, length = _HEADER.unpack(header)
        return kind, self._read_exact(length, deadline, doing)

    def _read_exact(self, n: int, deadline: Optional[float], doing: str) -> bytes:
        chunks, got = [], 0
        while got < n:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 or not select.select([self._resp_r], [], [], left)[0]:
                kill_group(self._proc)
                err = self._death(doing, f"timed out after {self.timeout:g} s")
                self.close()
                raise err
            chunk = os.read(self._resp_r, min(n - got, 1 << 20))
            if not chunk:  # EOF: the worker is gone
                err = self._death(doing)
                self.close()
                raise err
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _death(self, doing: str, why: Optional[str] = None) -> TargetError:
        proc = self._proc
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = proc.wait()
        if why is None:
            if code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                why = f"was killed by {name}"
                if -code == signal.SIGILL:
                    why += (f": the module uses an instruction the emulated {self.cpu} lacks "
                            "(compile for this CPU's features, e.g. without +sve/+dotprod)")
            else:
                why = f"exited with status {code}"
        self._stderr.flush()
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip()[-2000:]
        return TargetError(f"the aarch64 worker running {self.lib_path.name} under qemu "
                           f"(QEMU_CPU={self.cpu}) {why} while {doing}"
                           + (f"\n{tail}" if tail else ""))


def _save_arrays(path: os.PathLike, arrays: Sequence[np.ndarray]) -> None:
    np.savez(path, *[np.ascontiguousarray(a) for a in arrays])


def _load_arrays(payload: bytes) -> List[np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _worker_main(lib_path, params_path, entry, fd_in, fd_out, runtime_extra):
    """Runs inside the aarch64 Python under qemu: stdlib, numpy and TVM's runtime only.

    Its source is shipped with ``-c`` (the sysroot has no graphopt), so it must stay
    self-contained: every import and helper lives inside this function.
    """
    import ctypes
    import faulthandler
    import io
    import os
    import struct
    import traceback

    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    faulthandler.enable()  # a SIGILL/SIGSEGV prints the Python stack to the stderr log
    header = struct.Struct("<cQ")

    def send(kind, payload=b""):
        view = memoryview(header.pack(kind, len(payload)) + payload)
        while view:
            view = view[os.write(fd_out, view):]

    def read_exact(n):
        chunks = []
        while n:
            chunk = os.read(fd_in, n)
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def arrays(payload):
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]

    def flatten(value, out):
        if hasattr(value, "numpy"):
            out.append(value.numpy())
        elif isinstance(value, (int, float, bool)):
            out.append(np.asarray(value))
        else:  # a tuple output: an ffi Array (or list/tuple) of tensors or nested tuples
            for item in value:
                flatten(item, out)
        return out

    try:
        ctypes.CDLL(runtime_extra)  # registers the packed functions some ops call
        dev = tvm.cpu()
        vm = VirtualMachine(tvm.runtime.load_module(lib_path), dev)
        with open(params_path, "rb") as f:
            params = [tvm.runtime.tensor(a, dev) for a in arrays(f.read())]
        func = vm[entry]
    except Exception:
        send(b"E", traceback.format_exc().encode())
        return
    send(b"R")
    while True:
        head = read_exact(header.size)
        if head is None:
            return  # the host closed the request pipe: shut down
        _, length = header.unpack(head)
        payload = read_exact(length)
        if payload is None:
            return
        try:
            inputs = [tvm.runtime.tensor(a, dev) for a in arrays(payload)]
            outputs = flatten(func(*inputs, *params), [])
            buf = io.BytesIO()
            np.savez(buf, *outputs)
            send(b"O", buf.getvalue())
        except Exception:
            send(b"E", traceback.format_exc().encode())
