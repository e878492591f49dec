"""Helper processes (qemu workers, RPC servers, trackers): tied to their parent, killed as a group."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional

__all__ = ["die_with_parent", "kill_group"]


def die_with_parent() -> None:
    """``preexec_fn`` for helper processes: SIGKILL them when the process that started them dies.

    Helpers run in their own session (so a group kill reaches their children) and would
    otherwise outlive a parent killed before its cleanup ran (a CI timeout, a SIGKILL). Note
    Linux ties this to the *thread* that started the child: start helpers from a thread that
    lives as long as they should.
    """
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: helpers are still killed by close()


def kill_group(proc: Optional[subprocess.Popen], grace_s: float = 0.0) -> None:
    """Kill ``proc``'s process group (it runs in its own session) and reap it.

    With ``grace_s`` > 0 the group gets SIGTERM first and that long to exit (servers that
    clean up), then SIGKILL.
    """
    if proc is None or proc.poll() is not None:
        return
    for sig in ((signal.SIGTERM,) if grace_s > 0 else ()) + (signal.SIGKILL,):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s if sig == signal.SIGTERM else 30)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.poll()
