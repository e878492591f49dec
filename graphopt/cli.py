"""The ``graphopt`` command line: optimize, passes, targets, demo."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from .errors import GraphoptError, InvalidArgumentError
from .pass_registry import get_pass, list_passes, parse_pass_string
from .target_registry import list_targets

#: The demo's pipeline: half the MACs pruned, recovered by distillation, then int8. Passes not
#: installed are left out (and said so).
DEMO_PASSES = ("fuse_conv_bn", ("prune_channels", {"target_macs": 0.5, "importance": "taylor"}),
               "distill", "quantize", "dce")
DEMO_TRAIN_IMAGES = 10_000  # distillation data: recovers most of the accuracy in well under a minute on 2 idle cores


def load_model(spec: str, weights: Optional[str] = None) -> torch.nn.Module:
    """``path/to/file.py:factory`` or ``package.module:factory`` to a model instance."""
    if ":" not in spec:
        raise GraphoptError(f"MODEL must look like path/to/file.py:factory or package.module:factory, got {spec!r}")
    if weights and not os.path.isfile(weights):
        raise GraphoptError(f"--weights {weights}: no such file")
    where, attr = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise GraphoptError(f"no such file: {where}")
            mod_spec = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except GraphoptError:
        raise
    except Exception as e:  # the user's module failed to import
        raise GraphoptError(f"importing {where} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise GraphoptError(f"{where} has no attribute {attr!r}")
    factory = getattr(module, attr)
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise GraphoptError(f"{spec}: {attr}{inspect.signature(factory)} needs arguments; MODEL must name a "
                            "function or class that builds the model with none (wrap it: def make(): "
                            f"return {attr}(...))") from None
    except ValueError:
        pass  # builtins without a signature
    try:
        model = factory()
    except Exception as e:
        raise GraphoptError(f"{spec}: building the model failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise GraphoptError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as e:
            raise GraphoptError(f"--weights {weights}: could not load it into {type(model).__name__}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return model


def parse_shape(text: str) -> Tuple[int, ...]:
    """``1,3,224,224`` to a shape of positive ints."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise GraphoptError(f"--input-shape must be comma-separated integers like 1,3,224,224, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise GraphoptError(f"--input-shape {text}: every dimension must be a positive integer (e.g. 1,3,224,224)")
    return shape


def check_output_paths(args) -> None:
    """--report and --out must be writable before the work starts, not after it."""
    if getattr(args, "report", None):
        if not args.report.endswith((".html", ".json")):
            raise GraphoptError(f"--report {args.report}: the name must end in .html or .json")
        parent = os.path.dirname(os.path.abspath(args.report))
        if not os.path.isdir(parent):
            raise GraphoptError(f"--report {args.report}: the directory {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise GraphoptError(f"--report {args.report}: the directory {parent} is not writable")
    if getattr(args, "out", None):
        out = os.path.abspath(args.out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise GraphoptError(f"--out {args.out}: exists and is not a directory")
        parent = out if os.path.isdir(out) else os.path.dirname(out)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise GraphoptError(f"--out {args.out}: {parent} is not a writable directory")


def _write_outputs(opt, args) -> None:
    if args.report:
        (opt.report.to_html if not args.report.endswith(".json") else opt.report.to_json)(args.report)
        print(f"report written to {args.report}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        opt.report.to_json(os.path.join(args.out, "report.json"))
        opt.report.to_html(os.path.join(args.out, "report.html"))
        torch.save(opt.graph_module, os.path.join(args.out, "graph_module.pt"))
        if opt.compiled is not None:
            opt.compiled.save(os.path.join(args.out, "compiled"))
        print(f"results written to {args.out}/")


def budget_from(args, recovery: bool, default_drop: Optional[float] = None):
    """``--budget`` / ``--max-drop`` as a :class:`graphopt.Budget`, or None without ``--budget``.

    ``recovery``: the command has data to recover candidates on (the demo); ``optimize`` runs on
    random inputs only, so its candidates are judged as cut (recovery needs real batches).
    ``default_drop``: the accuracy budget when ``--max-drop`` is not given (the demo: one point)."""
    import graphopt

    if args.budget is None:
        for flag, value in (("--max-drop", args.max_drop), ("--int8", args.int8 or None)):
            if value is not None:
                raise InvalidArgumentError(f"{flag} limits the latency search: give --budget too (e.g. --budget 0.5)")
        return None
    kind, value = args.budget
    extra = {} if recovery else {"recovery_batches": 0, "final_recovery": 0}
    drop = args.max_drop if args.max_drop is not None else default_drop
    return graphopt.Budget(**{kind: value}, max_drop=drop, int8=args.int8, **extra)


def cmd_optimize(args) -> int:
    import graphopt

    check_output_paths(args)
    shapes = [parse_shape(s) for s in args.input_shape]
    passes = parse_pass_string(args.passes) if args.passes else None
    if args.max_drop is not None:
        raise InvalidArgumentError(
            "--max-drop needs accuracy, which `graphopt optimize` cannot measure (random inputs, no eval "
            "function): leave it out (the search then ranks candidates by output error), or use the Python "
            "API's eval_fn=")
    budget = budget_from(args, recovery=False)
    if args.int8:
        raise InvalidArgumentError(
            "--int8 calibrates the int8 graph on real input batches, which `graphopt optimize` does not have "
            "(random inputs): use `graphopt demo --budget 0.5 --int8`, or the Python API's calibration_data=")
    model = load_model(args.model, args.weights)
    inputs = tuple(torch.randn(*shape) for shape in shapes)
    opt = graphopt.optimize(model, passes, args.target, example_inputs=inputs, tune_trials=args.tune_trials,
                            on_error=args.on_error, budget=budget)
    print(opt.report.to_text(diffs=args.diff))
    _write_outputs(opt, args)
    return 0


def cmd_passes(args) -> int:
    for name in list_passes():
        spec = get_pass(name)
        kind = "exact" if spec.exact else "lossy"
        print(f"{name} ({kind}): {spec.description}")
        for k, o in spec.options.items():
            choices = f" one of {list(o.choices)}" if o.choices else ""
            print(f"    {k}={o.default!r}{choices}  {o.help}")
        if spec.needs:
            print(f"    needs: {', '.join(spec.needs)}")
    return 0


def cmd_targets(args) -> int:
    import graphopt

    for name in list_targets():
        t = graphopt.get_target(name)
        describe = getattr(t, "describe", None)
        line = describe() if callable(describe) else repr(t)
        print(f"{name}: {line}")
    return 0


def demo_pipeline(available: Sequence[str], train_data) -> Tuple[List, List[str]]:
    chosen, missing = [], []
    for item in DEMO_PASSES:
        name = item[0] if isinstance(item, tuple) else item
        if name not in available:
            missing.append(name)
        elif name == "distill":
            chosen.append(("distill", {"epochs": 2, "train_data": train_data}))
        else:
            chosen.append(item)
    return chosen, missing


def cmd_demo(args) -> int:
    import graphopt
    from .data import calibration_batches, fashion_mnist_batches
    from .models import default_example_inputs, evaluate_accuracy, load_default_model

    check_output_paths(args)
    budget = budget_from(args, recovery=True, default_drop=0.01)
    model = load_default_model()
    train = fashion_mnist_batches("train", batch_size=128, limit=DEMO_TRAIN_IMAGES)
    passes, missing = demo_pipeline(list_passes(), train)
    if budget is not None:  # the search decides what to cut: fusion first, then the target in the loop
        passes, missing = ["fuse_conv_bn"], []
    if missing:
        print(f"(not installed, left out of the demo: {', '.join(missing)})")
    limit = args.eval_images

    def eval_fn(m):
        return evaluate_accuracy(m, limit=limit)

    print(f"graphopt demo: the bundled Fashion-MNIST CNN; accuracy on {limit} real test images after "
          f"every pass; target {args.target or 'none (PyTorch)'}")
    opt = graphopt.optimize(model, passes, args.target, example_inputs=default_example_inputs(),
                            calibration_data=calibration_batches(8, 64), eval_fn=eval_fn,
                            tune_trials=args.tune_trials, budget=budget)
    print(opt.report.to_text(diffs=args.diff))
    if opt.compiled is not None:
        acc = evaluate_accuracy(opt.compiled, limit=limit, batch_size=1)
        print(f"\ncompiled for {args.target}: accuracy {acc:.4f} on the same {limit} images, "
              f"latency {opt.compiled.benchmark(repeat=50)}")
    _write_outputs(opt, args)
    return 0


def _count(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 (no tuning) or more")
    return value


def _budget(text: str) -> Tuple[str, float]:
    """argparse type: ``0.5`` (a fraction of the starting latency) or ``2.5ms``."""
    kind = "latency_ms" if text.endswith("ms") else "latency"
    try:
        return kind, float(text[:-2] if kind == "latency_ms" else text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a fraction of the starting latency (0.5) nor milliseconds (2.5ms)") from None


def _positive(text: str) -> int:
    """argparse type: an int >= 1."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphopt", description="Optimize PyTorch models with checked compiler passes.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every pass")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)

    def add_common(sp):
        sp.add_argument("--target", default=None, help="compile for this target (see `graphopt targets`)")
        sp.add_argument("--tune-trials", type=_count, default=None, help="MetaSchedule trials (0: no tuning)")
        sp.add_argument("--report", help="write the report here (.html, or .json)")
        sp.add_argument("--out", help="directory for report.json, report.html, graph_module.pt and the artifact")
        sp.add_argument("--diff", action="store_true", help="print each pass's code diff")
        sp.add_argument("--budget", type=_budget, help="latency search to this latency on the target: a "
                        "fraction of the starting one (0.5) or milliseconds (2.5ms); docs/latency_search.md")
        sp.add_argument("--max-drop", type=float, help="with --budget: the largest accuracy drop accepted (0.01)")
        sp.add_argument("--int8", action="store_true", help="with --budget: int8 allowed (the search tries the "
                        "int8 form of its graph at every step)")

    o = sub.add_parser("optimize", help="optimize a model given as file.py:factory or module:factory")
    o.add_argument("model")
    o.add_argument("--input-shape", action="append", required=True, help="e.g. 1,3,224,224 (repeat per input)")
    o.add_argument("--passes", help="e.g. fuse_conv_bn,prune_channels:ratio=0.5 (default: exact passes)")
    o.add_argument("--weights", help="state_dict file, loaded with torch.load(weights_only=True)")
    o.add_argument("--on-error", default="rollback", choices=["rollback", "stop", "raise"])
    add_common(o)
    o.set_defaults(fn=cmd_optimize)

    sub.add_parser("passes", help="list registered passes and their options").set_defaults(fn=cmd_passes)
    sub.add_parser("targets", help="list registered targets").set_defaults(fn=cmd_targets)

    d = sub.add_parser("demo", help="run the main pipeline on the bundled Fashion-MNIST model")
    d.add_argument("--eval-images", type=_positive, default=2000, help="test images used for accuracy per pass")
    add_common(d)
    d.set_defaults(fn=cmd_demo, report="graphopt-demo-report.html", target="x86", tune_trials=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error ends in one line; --debug shows the traceback
        if args.debug:
            raise
        user = isinstance(e, (GraphoptError, ValueError, TypeError, OSError))
        what = str(e) if isinstance(e, GraphoptError) else f"{type(e).__name__}: {e}"
        print(f"graphopt: error: {what}" + ("" if user else " (an internal error: rerun with --debug "
                                                            "for the traceback and report it)"), file=sys.stderr)
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main())
