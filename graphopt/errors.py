"""Typed exceptions: every user mistake ends in one of these, with a message that says what to do."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """`` Did you mean 'x'?`` for the known names closest to ``name``, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=n)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


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
