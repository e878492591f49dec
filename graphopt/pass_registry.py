"""Pass declarations: one decorator carries a pass's metadata, one registry holds them.

A pass is a plain function ``(gm, ctx, **options) -> GraphModule | None`` (or a class whose
instances, built with the options, are called as ``(gm, ctx)``). Returning ``None`` means the
pass rewrote ``gm`` in place; the manager always hands a pass its own copy.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import PassOptionError, RegistrationError, did_you_mean
from .registry import Registry, origin_of

#: What a pass may declare in ``needs``; each maps to a PassContext attribute.
KNOWN_NEEDS = ("example_inputs", "calibration_data", "eval_fn", "target")


@dataclasses.dataclass(frozen=True)
class Option:
    """A typed pass option.

    Args:
        default: value used when the caller gives none.
        type: the accepted Python type(s); ints are accepted where floats are.
        check: optional predicate on the value; ``help`` says what it must satisfy.
        choices: optional closed set of accepted values.
        help: one line for ``graphopt passes`` and for error messages.
    """

    default: Any = None
    type: Union[type, Tuple[type, ...], None] = None
    check: Optional[Callable[[Any], bool]] = None
    choices: Optional[Tuple[Any, ...]] = None
    help: str = ""

    def validate(self, pass_name: str, name: str, value: Any) -> Any:
        """Return ``value`` converted to the option's type, or raise PassOptionError."""
        if value is None and self.default is None:
            return None
        if self.type is not None:
            value = _coerce(value, self.type, f"{pass_name}.{name}")
        if self.choices is not None and value not in self.choices:
            raise PassOptionError(
                f"{pass_name}: option {name}={value!r} is not one of {list(self.choices)}"
            )
        if self.check is not None and not self.check(value):
            raise PassOptionError(
                f"{pass_name}: option {name}={value!r} is invalid: {self.help or 'rejected by its check'}"
            )
        return value


def _coerce(value: Any, typ, where: str) -> Any:
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return value
    if isinstance(value, str):  # values from the CLI arrive as strings
        for t in types:
            try:
                if t is bool:
                    if value.lower() in ("1", "true", "yes", "on"):
                        return True
                    if value.lower() in ("0", "false", "no", "off"):
                        return False
                    continue
                if t in (tuple, list):
                    return t(v for v in value.split("+") if v)
                return t(value)
            except (TypeError, ValueError):
                continue
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tuple in types and isinstance(value, list):
        return tuple(value)
    names = " or ".join(t.__name__ for t in types)
    raise PassOptionError(f"{where} must be {names}, got {type(value).__name__} {value!r}")


def check_module_names(model, names: Sequence[str], where: str, layers: Tuple[type, ...] = ()) -> None:
    """For a pass's ``validate``: every name in ``names`` is a submodule of ``model``.

    Raises:
        PassOptionError: naming the first unknown name, the closest match, and the model's
            modules of the types ``layers`` (what the option usually names).

    Example:
        >>> import torch
        >>> model = torch.nn.ModuleDict({"fc": torch.nn.Linear(2, 2), "act": torch.nn.ReLU()})
        >>> check_module_names(model, ["fcc"], "my_pass: ignore", (torch.nn.Linear,))
        Traceback (most recent call last):
        ...
        graphopt.errors.PassOptionError: my_pass: ignore names 'fcc', which is not a module of this model. Did you mean 'fc'? Its layers: fc
    """
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            known = [k for k, v in modules.items() if isinstance(v, layers)] if layers else [k for k in modules if k]
            raise PassOptionError(
                f"{where} names {name!r}, which is not a module of this model.{did_you_mean(name, modules)} "
                f"Its layers: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")


def _as_option(spec: Any) -> Option:
    if isinstance(spec, Option):
        return spec
    return Option(default=spec, type=None if spec is None else type(spec))


@dataclasses.dataclass
class PassSpec:
    """A registered pass and everything the manager must know before running it."""

    name: str
    fn: Callable
    description: str
    exact: bool
    options: Dict[str, Option]
    tolerance: Optional[float] = None
    max_accuracy_drop: Optional[float] = None
    runs_after: Tuple[str, ...] = ()
    runs_before: Tuple[str, ...] = ()
    needs: Tuple[str, ...] = ()
    validate: Optional[Callable[..., None]] = None

    def resolve_options(self, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """Validate caller options against the declared ones and fill in defaults."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(f"{k} (default {o.default!r})" for k, o in self.options.items()) or "none"
            raise PassOptionError(
                f"pass {self.name!r} has no option {', '.join(map(repr, unknown))}. Valid options: {valid}."
            )
        return {
            k: opt.validate(self.name, k, given[k]) if k in given else opt.default
            for k, opt in self.options.items()
        }

    def instantiate(self, options: Mapping[str, Any]) -> Callable:
        """The callable ``(gm, ctx)`` for these options."""
        if inspect.isclass(self.fn):
            return self.fn(**options)
        fn = self.fn
        return lambda gm, ctx: fn(gm, ctx, **options)


PASSES: Registry[PassSpec] = Registry("pass", "graphopt.passes")


def register_pass(
    name: str,
    *,
    exact: bool,
    description: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    tolerance: Optional[float] = None,
    max_accuracy_drop: Optional[float] = None,
    runs_after: Sequence[str] = (),
    runs_before: Sequence[str] = (),
    needs: Sequence[str] = (),
    validate: Optional[Callable[..., None]] = None,
):
    """Declare a pass. Works on functions and on classes.

    Args:
        name: the name users put in ``passes=[...]``.
        exact: True when outputs must stay equal within float tolerance (fusion, DCE).
        description: one line; defaults to the first line of the docstring.
        options: ``{name: Option(...)}`` or ``{name: default}`` (the type is the default's).
        tolerance: lossy passes: the largest relative output error accepted (None: any
            finite output is accepted, e.g. pruning, which changes outputs by design).
        max_accuracy_drop: lossy passes: rolled back when ``eval_fn`` drops more than this.
        runs_after / runs_before: ordering constraints by pass name.
        needs: context entries the pass requires (see ``KNOWN_NEEDS``).
        validate: ``validate(gm, ctx, **options)``, called on the captured graph before any pass
            runs; raises PassOptionError for options that do not fit the model (e.g. a layer
            name it does not have), so bad input fails before anything runs.

    Example:
        >>> import graphopt
        >>> @graphopt.register_pass("doc_noop", exact=True, options={"verbose": False})
        ... def doc_noop(gm, ctx, verbose):
        ...     '''Leaves the graph as it is.'''
        ...     return gm
        >>> "doc_noop" in graphopt.list_passes()
        True
    """
    bad = [n for n in needs if n not in KNOWN_NEEDS]
    if bad:
        raise RegistrationError(f"pass {name!r}: unknown needs {bad}; known: {list(KNOWN_NEEDS)}")

    def decorate(fn):
        doc = inspect.getdoc(fn) or ""
        spec = PassSpec(
            name=name,
            fn=fn,
            description=description or (doc.splitlines()[0] if doc else ""),
            exact=exact,
            options={k: _as_option(v) for k, v in (options or {}).items()},
            tolerance=tolerance,
            max_accuracy_drop=max_accuracy_drop,
            runs_after=tuple(runs_after),
            runs_before=tuple(runs_before),
            needs=tuple(needs),
            validate=validate,
        )
        PASSES.add(name, spec, origin=origin_of(fn))
        fn.graphopt_pass = spec
        return fn

    return decorate


def get_pass(name: str) -> PassSpec:
    """The registered pass ``name``; an unknown name lists the known ones."""
    return PASSES.get(name)


def list_passes() -> List[str]:
    """Names of every registered pass, built-in and third-party."""
    return PASSES.names()


PassItem = Union[str, Tuple[str, Mapping[str, Any]], PassSpec, Callable]


def resolve_pass_item(item: PassItem) -> Tuple[PassSpec, Dict[str, Any]]:
    """A user's pass list entry to (spec, validated options)."""
    options: Mapping[str, Any] = {}
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, PassSpec)):
        item, options = item
    if isinstance(item, str):
        spec = get_pass(item)
    elif isinstance(item, PassSpec):
        spec = item
    elif isinstance(getattr(item, "graphopt_pass", None), PassSpec):
        spec = item.graphopt_pass
    elif callable(item):  # an undecorated function: treat as an exact pass without options
        spec = PassSpec(name=getattr(item, "__name__", "anonymous_pass"), fn=item,
                        description=(inspect.getdoc(item) or "").split("\n")[0], exact=True, options={})
    else:
        raise PassOptionError(
            f"a pass must be a registered name, (name, {{options}}), or a pass function; got {item!r}"
        )
    return spec, spec.resolve_options(options)


def parse_pass_string(text: str) -> List[Tuple[str, Dict[str, str]]]:
    """Parse the CLI form ``fuse_conv_bn,prune_channels:ratio=0.5:round_to=8``."""
    out = []
    for chunk in filter(None, (c.strip() for c in text.split(","))):
        name, *pairs = chunk.split(":")
        opts = {}
        for p in pairs:
            if "=" not in p:
                raise PassOptionError(f"option {p!r} of pass {name!r} must look like key=value")
            k, v = p.split("=", 1)
            opts[k.strip()] = v.strip()
        out.append((name.strip(), opts))
    return out

