"""Typed exceptions: every user mistake ends in one of these, with a message that says what to do."""
from __future__ import annotations

import difflib
from typing import Iterable


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class CaptureError(GraphoptError):
    """The model could not be traced into a torch.fx graph."""


class UnknownNameError(GraphoptError, KeyError):
    """A pass or target name that no registry knows."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(GraphoptError, ValueError, TypeError):
    """An argument of ``optimize()`` (or the CLI) graphopt cannot use; the message names it and
    what to pass instead."""


class PassOptionError(GraphoptError, ValueError):
    """An unknown option, or an option value of the wrong type or range."""


class PassOrderError(GraphoptError):
    """The passes' ordering constraints contradict each other."""


class MissingInputError(GraphoptError, ValueError):
    """A pass or target needs something the caller did not give (example inputs, data, eval_fn)."""


class InputShapeError(GraphoptError, ValueError):
    """Inputs whose number, shape or dtype the model or artifact does not accept."""


class InvalidModelError(GraphoptError, ValueError):
    """The model itself is unusable, e.g. NaN or Inf weights."""


class PassFailedError(GraphoptError):
    """A pass raised or broke the graph, and the pipeline was told to stop (on_error="raise")."""


class TargetError(GraphoptError):
    """A target cannot compile or run here (missing toolchain, unsupported op...)."""


class ArtifactError(GraphoptError):
    """A saved artifact is corrupt, truncated or does not match this machine or version."""


class RegistrationError(GraphoptError, ValueError):
    """Two plugins claim the same name or key (a pass, a target, a layer family's part)."""


def did_you_mean(name: str, known: Iterable[str], n: int = 3, *, sentence: bool = True) -> str:
    """The close matches of ``name`` among ``known``, as a suffix for an error message.

    ``sentence=True`` gives a sentence of its own (`` Did you mean 'a', 'b'?``), False a clause
    (``; did you mean 'a'?``); no close match gives ''.

    Example:
        >>> "unknown pass 'fuse_conv_bm'." + did_you_mean("fuse_conv_bm", ["fuse_conv_bn", "dce"])
        "unknown pass 'fuse_conv_bm'. Did you mean 'fuse_conv_bn'?"
    """
    close = difflib.get_close_matches(str(name), [str(k) for k in known if k], n=n)
    if not close:
        return ""
    names = ", ".join(map(repr, close))
    return f" Did you mean {names}?" if sentence else f"; did you mean {names}?"
