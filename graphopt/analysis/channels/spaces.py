"""The data model of the channel analysis: spaces, couplings, and what a rule may refuse."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx as fx


class Unsupported(Exception):
    """Raised by a channel rule for a case it does not handle; the node is then left alone."""


@dataclasses.dataclass(frozen=True)
class Space:
    """A channel-indexed dimension: a node's channel dim, or a parameter's channel-indexed dim.

    Attributes:
        key: unique name, ``"node:<node>"`` or ``"param:<module>.<param>:<dim>"``.
        size: number of channels (elements).
        base: id of its first element (elements are numbered across all spaces).
        dim: the tensor dim that holds the channels.
        node: the fx node whose output this is (node spaces), or whose parameters (param spaces).
        module, param: the module and parameter name (param spaces; ``module`` is also set on
            node spaces of ``call_module`` nodes).
        role: for param spaces: ``"out"`` (a layer's output channels: conv/linear weight dim 0),
            ``"in"`` (a layer's input channels) or ``"channel"`` (per-channel parameters of
            norm layers, PReLU); None for node spaces.
    """

    key: str
    size: int
    base: int
    dim: Optional[int]
    node: Optional[str] = None
    module: Optional[str] = None
    param: Optional[str] = None
    role: Optional[str] = None

    @property
    def is_param(self) -> bool:
        return self.param is not None

    def ids(self, index: Union[Sequence[int], np.ndarray, None] = None) -> np.ndarray:
        """Global element ids of channels ``index`` (all channels when None)."""
        if index is None:
            return np.arange(self.base, self.base + self.size, dtype=np.int64)
        return self.base + np.asarray(index, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Opaque:
    """A tensor without analyzable channels (a model input, a constant, an unknown op's output)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Coupling:
    """One declared coupling between two spaces (an edge of ``ChannelAnalysis.graph``)."""

    a: str
    b: str
    kind: str  # identity | permutation | offset | block | param | group | depthwise | fixed-dim
    node: str  # the node whose rule declared it
    detail: str = ""


@dataclasses.dataclass
class Chain:
    """A tensor whose channels are spread over several dims (inside a view/transpose/reshape
    sequence such as a channel shuffle): ``probe`` holds, at every position, the channel of
    ``start`` found there; ``adapts[d]`` says whether dim ``d``'s size follows the channel count
    (computed at run time) or is fixed (a literal in the code)."""

    start: Space
    probe: torch.Tensor
    adapts: Tuple[bool, ...]


#: ``fn(node, new_size)``: rewrite ``node``'s arguments after a cut (``new_size(space)`` is the
#: space's new channel count), e.g. split sizes or a literal ``view`` size. It may return a
#: sentence for the report when the rewrite changes what the model checks (an assert).
Resize = Callable[[fx.Node, Callable[[Space], int]], Optional[str]]
