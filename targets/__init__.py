"""graphopt's backends: targets, Relax lowering, MetaSchedule tuning and compiled artifacts.

Installed as ``graphopt.targets``. The built-in presets (``x86``, ``arm``, ``arm-rpi4``,
``arm-neoverse-n1``, ``arm-a55``) are registered through the ``graphopt.targets``
entry point like any third-party target; this package's top level stays light (no TVM
import) so that discovering targets is cheap.

Example:
    >>> import graphopt
    >>> "x86" in graphopt.list_targets() and "arm-rpi4" in graphopt.list_targets()
    True
    >>> custom = graphopt.get_target("arm-rpi4").replace(name="my-pi", tracker="10.0.0.2:9190", key="rpi4")
    >>> custom.remote
    True
"""
from graphopt.target_registry import get_target, list_targets, register_target

from .target import Target

__all__ = ["CompiledModel", "Target", "get_target", "list_targets", "load", "register_target"]


def __getattr__(name):
    # The artifact module imports the tuning and runtime helpers: load it on first use.
    if name in ("CompiledModel", "load", "BenchmarkResult"):
        from . import artifact

        return getattr(artifact, name)
    raise AttributeError(f"module 'graphopt.targets' has no attribute {name!r}")
