"""graphopt: plugin-based compiler passes on torch.fx graphs, lowered through TVM to CPUs.

Example:
    >>> import torch, graphopt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    >>> opt = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=(torch.randn(1, 1, 8, 8),))
    >>> opt.report["fuse_conv_bn"].nodes_removed
    ['_1']
"""
from . import sparsity
from .analysis.channels import ChannelAnalysis, ChannelGroup, analyze_channels, register_channel_rule
from .analysis.graphview import to_networkx
from .analysis.metrics import count_macs, count_params, model_bytes, node_macs, register_macs
from .analysis.shapes import propagate_shapes
from .analysis.sharing import shared_weights
from .api import DEFAULT_PASSES, OptimizedModel, optimize
from .batches import as_batches, batch_inputs, check_batch, check_batches
from .capture import capture
from .context import PassContext
from .errors import (
    ArtifactError, CaptureError, GraphoptError, InputShapeError, InvalidModelError,
    MissingInputError, PassFailedError, PassOptionError, PassOrderError, RegistrationError,
    TargetError, UnknownNameError,
)
from .layer_registry import register_layer
from .manager import PassInstrument, PassManager, PassResult
from .pass_registry import Option, PassSpec, check_module_names, get_pass, list_passes, register_pass
from .report.record import PassRecord, Report
from .registry import exported
from .target_protocol import TargetCapabilities, TargetProtocol, capabilities_of
from .target_registry import get_target, list_targets, register_target

__version__ = "0.1.0"


def __getattr__(name):
    # Target classes and artifacts belong to the targets plugin: it exports them through the
    # ``graphopt.exports`` entry points, loaded on first use so `import graphopt` stays TVM-free.
    if name.startswith("__"):
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    value = exported(name)
    globals()[name] = value
    return value
