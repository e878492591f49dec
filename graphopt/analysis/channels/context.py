"""The rule context: what a channel rule may read and declare while the walk visits a node.

Rules use only the public methods below (the built-in ones too), so a plugin can write a rule
for its own layer with nothing the built-ins do not have. What they declare is collected in a
:class:`Declarations`, which the solver turns into groups.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..shapes import output_shape
from .fxutil import norm_dim, resolve
from .spaces import Chain, Coupling, Opaque, Resize, Space, Unsupported

Recorded = Union[Space, Opaque, Chain]


@dataclasses.dataclass
class Declarations:
    """Everything the rules declared: the solver's input.

    Attributes:
        spaces: every space, in creation order; element ids run ``0 .. n-1`` across them.
        pairs: coupled element ids, one ``(a, b)`` pair of arrays per :meth:`RuleContext.couple`.
        frozen: ``(element ids, reason)``: channels that must never change.
        history: one :class:`Coupling` per ``couple`` call (the group's replayable history).
        resizes: ``(node, fn)`` argument rewrites to apply after a cut.
    """

    spaces: List[Space] = dataclasses.field(default_factory=list)
    by_key: Dict[str, Space] = dataclasses.field(default_factory=dict)
    pairs: List[Tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    frozen: List[Tuple[np.ndarray, str]] = dataclasses.field(default_factory=list)
    history: List[Coupling] = dataclasses.field(default_factory=list)
    resizes: List[Tuple[fx.Node, Resize]] = dataclasses.field(default_factory=list)
    n: int = 0

    def add_space(self, key: str, size: int, dim: Optional[int], **kw) -> Space:
        s = Space(key=key, size=int(size), base=self.n, dim=dim, **kw)
        self.n += s.size
        self.spaces.append(s)
        self.by_key[key] = s
        return s


class RuleContext:
    """What a channel rule may read and declare while the analysis walks the graph.

    Reading: :meth:`input` (the channel space of a node: a :class:`Space`, or None when the
    tensor has no analyzable channels; :meth:`input_or_opaque` also passes the "none" on),
    :meth:`channels_of` (what was recorded, in any form),
    :meth:`shape`, :meth:`value` (the concrete value of a non-tensor argument such as
    ``x.size(1) // 2``), :meth:`attr_space`, ``modules`` (name -> module), ``node`` (the node
    being visited).

    Declaring: :meth:`new_space` / :meth:`identity` / :meth:`opaque` / :meth:`set_chain` give a
    node its output; :meth:`param` names a parameter dim as a space; :meth:`couple` ties elements
    of two spaces; :meth:`freeze` marks channels that must never change; :meth:`on_resize`
    registers how to rewrite the node's arguments when channel counts change (e.g. split sizes).
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules: Dict[str, nn.Module] = dict(gm.named_modules())
        self.node: Optional[fx.Node] = None
        self.declared = Declarations()
        self.unknown: Dict[str, str] = {}
        self._out: Dict[str, Recorded] = {}    # node name -> its output's channels
        self._pre: Dict[str, Recorded] = {}    # declared for a later node (split's getitems)
        self._values: Dict[str, Any] = {}      # non-tensor nodes evaluated from the shapes

    # ---- reading ------------------------------------------------------------------------
    def shape(self, x: Any) -> Optional[Tuple[int, ...]]:
        """The tensor shape of node ``x`` (from shape propagation), or None."""
        return output_shape(x) if isinstance(x, fx.Node) else None

    def channels_of(self, x: Any) -> Optional[Recorded]:
        """What the walk recorded for node ``x``: a :class:`Space`, a :class:`Chain` (channels
        spread over several dims), an :class:`Opaque` (none, and why), or None (not a tensor)."""
        return self._out.get(x.name) if isinstance(x, fx.Node) else None

    def input(self, x: Any) -> Optional[Space]:
        """The channel space of tensor node ``x``; None if it has no analyzable channels.

        Raises:
            Unsupported: ``x``'s channels are spread over several dims (mid channel-shuffle).
        """
        got = self.channels_of(x)
        if isinstance(got, Chain):
            raise Unsupported(f"its input `{x.name}` has its channels spread over several dims (an "
                              "attention-style regrouping the analysis does not follow through this op)")
        return got if isinstance(got, Space) else None

    def input_or_opaque(self, x: Any) -> Optional[Space]:
        """:meth:`input`; when ``x`` has no analyzable channels, neither has the current node's
        output (declared :meth:`opaque` with ``x``'s reason) and None is returned."""
        src = self.input(x)
        if src is None:
            self.opaque(self.reason(x))
        return src

    def reason(self, x: Any) -> str:
        """Why node ``x`` has no analyzable channels."""
        got = self.channels_of(x)
        return got.reason if isinstance(got, Opaque) else "not a tensor with channels"

    def value(self, a: Any) -> Any:
        """The concrete value of an argument: literals as they are, shape arithmetic evaluated."""
        def known(n: fx.Node) -> Any:
            if n.name not in self._values:
                raise Unsupported(f"the value of `{n.name}` is not known statically")
            return self._values[n.name]

        return resolve(a, known)

    def expect_dim(self, src: Optional[Space], dim: int, what: str) -> None:
        """Unsupported unless ``src`` (when known) has its channels in ``dim``."""
        if src is not None and src.dim != dim:
            raise Unsupported(f"{what} expects its channels in dim {dim}, its input has them in dim {src.dim}")

    def attr_space(self, a: Any, dim: int, role: str) -> Optional[Space]:
        """The param space of a tensor read with ``get_attr`` (functional code: ConvNeXt's
        layer_scale, LayerNorm2d's weight), along ``dim``; None unless this read is its only use
        (then slicing it cannot break another op) and no module call owns it."""
        if not (isinstance(a, fx.Node) and a.op == "get_attr") or len(a.users) != 1:
            return None
        reads = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == a.target]
        module, _, param = a.target.rpartition(".")
        called = any(n.op == "call_module" and n.target == module for n in self.gm.graph.nodes)
        if len(reads) != 1 or called or module not in self.modules:
            return None
        if not isinstance(getattr(self.modules[module], param, None), torch.Tensor):
            return None
        return self.param(module, param, dim, role)

    # ---- declaring ----------------------------------------------------------------------
    def _record(self, node: fx.Node, what: Recorded) -> None:
        if node is self.node:
            self._out[node.name] = what
        else:
            self._pre[node.name] = what

    def new_space(self, dim: int, node: Optional[fx.Node] = None) -> Space:
        """Create the channel space of ``node`` (default: the current node) along ``dim``."""
        node = node or self.node
        shape = self.shape(node)
        if shape is None:
            raise Unsupported(f"`{node.name}` has no recorded shape")
        dim = norm_dim(dim, len(shape))
        mod = node.target if node.op == "call_module" else None
        s = self.declared.add_space(f"node:{node.name}", shape[dim], dim, node=node.name, module=mod)
        self._record(node, s)
        return s

    def piece_space(self, key: str, size: int, dim: int) -> Space:
        """A space with no node of its own (e.g. an unused output of a split)."""
        return self.declared.add_space(f"piece:{self.node.name}:{key}", size, dim, node=self.node.name)

    def param(self, module: str, param: str, dim: int, role: str) -> Space:
        """The space of dim ``dim`` of parameter (or buffer) ``module.param``; created once."""
        key = f"param:{module}.{param}:{dim}"
        if key not in self.declared.by_key:
            t = getattr(self.modules[module], param)
            self.declared.add_space(key, t.shape[dim], dim, node=self.node.name, module=module,
                                    param=param, role=role)
        return self.declared.by_key[key]

    def opaque(self, reason: str, node: Optional[fx.Node] = None) -> None:
        """``node``'s output (default: the current node's) has no analyzable channels."""
        self._record(node or self.node, Opaque(reason))

    def set_chain(self, chain: Chain) -> None:
        """The current node's output has its channels spread over several dims."""
        self._out[self.node.name] = chain

    def couple(self, a: Space, ia: Any, b: Space, ib: Any, kind: str, detail: str = "") -> None:
        """Tie channel ``ia[k]`` of ``a`` to channel ``ib[k]`` of ``b`` for every k (broadcast)."""
        ia, ib = np.broadcast_arrays(np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64))
        if ia.size == 0:
            return
        if ia.min() < 0 or ia.max() >= a.size or ib.min() < 0 or ib.max() >= b.size:
            raise Unsupported(f"channel index out of range coupling {a.key} with {b.key}")
        self.declared.pairs.append((a.base + ia.ravel(), b.base + ib.ravel()))
        self.declared.history.append(Coupling(a.key, b.key, kind, self.node.name if self.node else "", detail))

    def identity(self, src: Space, kind: str = "identity") -> Space:
        """The current node's output has the same channels as ``src``, in the same dim."""
        shape = self.shape(self.node)
        if shape is None or len(shape) <= src.dim or shape[src.dim] != src.size:
            raise Unsupported("its output does not keep the input's channel dim")
        out = self.new_space(src.dim)
        self.couple(src, np.arange(src.size), out, np.arange(src.size), kind)
        return out

    def freeze(self, space: Space, reason: str, index: Any = None) -> None:
        """Channels ``index`` (all when None) of ``space`` must never change."""
        self.declared.frozen.append((space.ids(index), reason))

    def freeze_input(self, x: Any, reason: str) -> None:
        """Freeze every channel of tensor node ``x``, whatever form its channels are in."""
        got = self.channels_of(x)
        if isinstance(got, Space):
            self.freeze(got, reason)
        elif isinstance(got, Chain):
            self.freeze(got.start, reason, np.unique(got.probe.numpy()))

    def on_resize(self, fn: Resize, node: Optional[fx.Node] = None) -> None:
        """``fn(node, new_size)`` rewrites ``node``'s arguments when channel counts change;
        ``new_size(space)`` is the space's new channel count."""
        self.declared.resizes.append((node or self.node, fn))
