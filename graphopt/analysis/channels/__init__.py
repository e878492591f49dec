"""Channel dependency analysis: which channels of which layers must change together, and how.

A pass that removes, reorders or pads channels (pruning, channel padding for a target's vector
width...) cannot touch one layer alone: a residual add ties the channels of every branch, a
concat maps each input to an offset range of its output, a depthwise conv ties its input to its
output, a flatten turns one channel into ``H*W`` features of the next Linear. This package works
those couplings out once, over the fx graph, and returns them as inspectable groups.

The model (``spaces``). Every tensor a node produces has a *channel space*: its channel dim
(dim 1 for conv activations, the last dim for Linear activations) with one *element* per
channel. Every channel-indexed dim of a parameter is a space too (``conv.weight`` dim 0 is the
conv's output channels, dim 1 its input channels). A *rule*, one per layer family, declares
which elements are coupled: identity (BatchNorm, ReLU, pooling, add), offsets (concat, split),
blocks (flatten into Linear, pixel shuffle), permutations (channel shuffle), parameter dims
(conv, linear). Coupled elements form *classes* (``solver``, union-find): the atoms a pass may
remove, each holding every element that must go with it. Classes that touch the same spaces form
a :class:`ChannelGroup` (``result``, which also holds :func:`cut`, the surgery).

Conservative by construction: an op no rule understands *freezes* every channel it touches
(they are never cut) and the reason is recorded; so do the model's inputs and outputs.

Rules are the ``channels`` part of a layer family (``graphopt.layer_registry``): one lookup
rule, added with ``graphopt.register_layer`` or ``@register_channel_rule``. A rule receives a
:class:`RuleContext` (``rc``, ``context``), the node and its module (or None) and declares the
node's output channel space and its couplings through ``rc``'s public methods (the ``walk``
visits the nodes); it raises :class:`Unsupported` for a case it does not handle, which undoes
whatever it declared and freezes the node's inputs instead. The built-in families live in
``parametric``, ``normalization``, ``pointwise``, ``concat`` and ``movement``.

Example:
    >>> import torch, torch.nn as nn, torch.fx as fx
    >>> from graphopt.analysis.shapes import propagate_shapes
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    ...         self.head = nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         return self.head(y + self.b(y))
    >>> gm = fx.symbolic_trace(Block())
    >>> propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    >>> groups = analyze_channels(gm).prunable_groups()
    >>> [(g.producers(), g.consumers(), g.size) for g in groups]
    [(['a', 'b'], ['b', 'head'], 8)]
"""
from ...layer_registry import register_channel_rule
from .context import Declarations, RuleContext
from .result import ChannelAnalysis, ChannelGroup, cut
from .spaces import Chain, Coupling, Opaque, Resize, Space, Unsupported
from .walk import analyze_channels

# the built-in layer families: importing them registers them
from . import concat, movement, normalization, parametric, pointwise  # noqa: E402,F401  isort:skip

__all__ = [
    "Chain", "ChannelAnalysis", "ChannelGroup", "Coupling", "Declarations", "Opaque", "Resize",
    "RuleContext", "Space", "Unsupported", "analyze_channels", "cut", "register_channel_rule",
]
