"""graphopt: plugin-based compiler passes on torch.fx graphs, lowered through TVM to CPUs."""
from .errors import (
    ArtifactError, CaptureError, GraphoptError, InputShapeError, InvalidModelError,
    MissingInputError, PassFailedError, PassOptionError, PassOrderError, TargetError,
    UnknownNameError,
)
from .target_registry import get_target, list_targets, register_target

__version__ = "0.1.0"


def __getattr__(name):
    # Target classes and artifacts live in the graphopt.targets plugin package; import it
    # only when asked so that `import graphopt` stays light and TVM-free.
    if name in ("Target", "CompiledModel", "load"):
        from . import targets
        return getattr(targets, name)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
