"""A device farm on loopback: a TVM RPC tracker and emulated aarch64 boards, for tests and benchmarks.

Not part of compiling or running a model: it stands in for a lab of boards, so the RPC path
(running, tuning, several boards measuring at once) can be tried and tested on one x86 host.

Example:
    >>> from graphopt.targets.rpc import RpcRunner
    >>> with LoopbackDeviceFarm(cpu="cortex-a72", num_servers=2) as farm:   # doctest: +SKIP
    ...     with RpcRunner("m_aarch64.so", tracker=farm.tracker, key=farm.key,
    ...                    params=weights) as runner:
    ...         outputs = runner.run([x])
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from graphopt.errors import TargetError

from .arm_sysroot import RUNTIME_EXTRA_RELPATH, ensure_sysroot
from .processes import die_with_parent, kill_group
from .qemu import qemu_python_command
from .rpc import connect, parse_address

__all__ = ["DEFAULT_KEY", "LoopbackDeviceFarm"]

DEFAULT_KEY = "graphopt-aarch64"


class LoopbackDeviceFarm:
    """A TVM RPC tracker and emulated aarch64 RPC servers, all on 127.0.0.1.

    Lets one try (and test) RPC running and tuning without a board: the tracker runs on
    the host's Python; each server is the sysroot's aarch64 Python under qemu with
    ``QEMU_CPU=cpu``. The server spawns its session workers with ``sys.executable``; it
    is started with ``qemu-aarch64 -0 LAUNCHER`` so that ``sys.executable`` is a host
    script re-entering qemu, and those workers are emulated too. Every process gets its
    own process group, killed as a group on :meth:`close`.

    Args:
        cpu: qemu CPU model the servers emulate.
        key: the device key the servers register under.
        num_servers: how many servers to start.
        num_threads: ``TVM_NUM_THREADS`` on the servers.
        sysroot: the aarch64 sysroot (``ensure_sysroot()`` if omitted).
        startup_timeout: seconds to wait for the tracker and each server to be up.

    Attributes:
        tracker: ``"127.0.0.1:PORT"``, for :func:`connect` / :func:`make_ms_runner`.
        key: the device key.
    """

    def __init__(self, *, cpu: str = "cortex-a72", key: str = DEFAULT_KEY,
                 num_servers: int = 1, num_threads: int = 2,
                 sysroot: Optional[os.PathLike] = None, startup_timeout: float = 180.0):
        self.cpu = cpu
        self.key = key
        self.num_servers = num_servers
        self.num_threads = num_threads
        self.sysroot = Path(sysroot) if sysroot is not None else None
        self.startup_timeout = startup_timeout
        self.tracker: Optional[str] = None
        self._procs: List[Tuple[str, subprocess.Popen, Path]] = []
        self._tmp: Optional[tempfile.TemporaryDirectory] = None

    def start(self) -> "LoopbackDeviceFarm":
        """Start the tracker, then the servers; returns once all are registered."""
        sysroot = self.sysroot or ensure_sysroot()
        self._tmp = tempfile.TemporaryDirectory(prefix="graphopt-rpc-farm-")
        tmp = Path(self._tmp.name)
        try:
            port = _free_port()
            self.tracker = f"127.0.0.1:{port}"
            self._spawn("tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker",
                                    "--host", "127.0.0.1", "--port", str(port),
                                    "--port-end", str(port + 1), "--silent"], dict(os.environ))
            self._wait(lambda: _port_open(port), "the RPC tracker to listen")

            launcher = tmp / "python-aarch64"
            argv, env = qemu_python_command(sysroot, cpu=self.cpu, num_threads=self.num_threads,
                                            launcher=launcher)
            _write_launcher(launcher, argv)
            for i in range(self.num_servers):
                server_port = _free_port()
                self._spawn(f"server{i}", [
                    *argv, "-m", "tvm.exec.rpc_server", "--tracker", self.tracker,
                    "--key", self.key, "--host", "127.0.0.1", "--port", str(server_port),
                    "--port-end", str(server_port + 1), "--custom-addr", "127.0.0.1",
                    "--load-library", str(Path(sysroot) / RUNTIME_EXTRA_RELPATH),
                ], env)
            self._wait(lambda: self._registered() >= self.num_servers,
                       f"{self.num_servers} emulated RPC server(s) to register")
        except BaseException:
            self.close()
            raise
        return self

    def connect(self):
        """A session to one of the farm's servers, through the tracker."""
        return connect(tracker=self.tracker, key=self.key)

    def close(self) -> None:
        """Kill every process group the farm started, then remove its files."""
        for _, proc, log in reversed(self._procs):
            kill_group(proc, grace_s=5)
            log.close()
        self._procs = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "LoopbackDeviceFarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self, name: str, argv: List[str], env: dict) -> None:
        log = open(Path(self._tmp.name) / f"{name}.log", "w+b")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)
        self._procs.append((name, proc, log))

    def _registered(self) -> int:
        from tvm import rpc as tvm_rpc

        host, port = parse_address(self.tracker)
        summary = tvm_rpc.connect_tracker(host, port).summary()
        return sum(1 for s in summary.get("server_info", [])
                   if s["key"].split(":", 1)[-1] == self.key)

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for name, proc, log in self._procs:
                if proc.poll() is not None:
                    raise TargetError(f"the loopback RPC {name} exited with status "
                                      f"{proc.returncode} while waiting for {what}:\n"
                                      f"{_tail(log)}")
            try:
                if ready():
                    return
            except (OSError, RuntimeError, ValueError):
                pass  # not up yet
            time.sleep(0.5)
        logs = "\n".join(f"--- {name}\n{_tail(log)}" for name, _, log in self._procs)
        raise TargetError(f"timed out after {self.startup_timeout:g} s waiting for {what}\n"
                          f"{logs}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _write_launcher(launcher: Path, argv: Sequence[str]) -> None:
    # argv already carries "-0 <launcher>"; inside the script that is "$0" itself.
    words = ['"$0"' if arg == str(launcher) else shlex.quote(arg) for arg in argv]
    # The server runs in a child spawned through this launcher: tie it to its parent, so
    # a farm whose owner died without cleanup does not leave it serving forever.
    setpriv = shutil.which("setpriv")
    prefix = f"{shlex.quote(setpriv)} --pdeathsig KILL " if setpriv else ""
    launcher.write_text("#!/bin/sh\n# Re-enters qemu: Python processes the emulated RPC server "
                        "spawns are emulated too.\n"
                        f"exec {prefix}{' '.join(words)} \"$@\"\n")
    launcher.chmod(0o755)


def _tail(log, limit: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]


