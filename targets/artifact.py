"""The compiled artifact: a callable model, its benchmark, its IR, and a checked on-disk format.

A :class:`CompiledModel` is what ``graphopt.optimize(..., target=...)`` returns as
``opt.compiled``. It runs wherever its target says (this process, qemu, an RPC device),
takes torch tensors or numpy arrays and returns the same kind, in the structure the torch
graph returned (a tensor, or a nested tuple/list/dict of tensors).

On disk (``save(dir)`` / ``load(dir)``)::

    dir/model.so        the library (an aarch64 ELF for ARM targets)
    dir/params.npz      the weights, already transformed (prepacked) for the library
    dir/ir.txt          the final Relax module as text
    dir/manifest.json   format version, target, input/output/weight specs, output
                        structure, thread count, tuning summary, library versions, and the
                        size and sha256 of every file above

``manifest.json`` is written last, so an interrupted save is "incomplete", never
"loads but crashes". Everything that can be wrong (missing or truncated file, checksum,
TVM version, CPU features, ELF machine, weight shapes) is checked before the library is
opened and reported as :class:`~graphopt.errors.ArtifactError`.

Example:
    >>> compiled = graphopt.get_target("x86").compile(gm, (x,))   # doctest: +SKIP
    >>> y = compiled(x)                                            # doctest: +SKIP
    >>> compiled.save("out/model"); again = graphopt.load("out/model")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from graphopt.errors import ArtifactError, InputShapeError, TargetError

from .lowering import TensorSpec
from .pipeline import TRANSFORM_ENTRY, export_library
from .runtime import make_runner
from .target import Target
from .tuning import TuningInfo

__all__ = ["BenchmarkResult", "CompiledModel", "FORMAT", "FORMAT_VERSION", "load"]

_log = logging.getLogger("graphopt.targets")

FORMAT = "graphopt-compiled-model"
FORMAT_VERSION = 2  # 2: the manifest carries its own checksum
LIB, PARAMS, IR, MANIFEST = "model.so", "params.npz", "ir.txt", "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """Latency statistics of ``repeat`` runs, in milliseconds.

    ``where`` says what was timed: ``local`` (the model only), ``qemu`` (emulated: not a
    speed) or ``rpc`` (including the network round trip).
    """

    median_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p10_ms: float
    p90_ms: float
    repeat: int
    num_threads: int
    where: str

    @property
    def spread_ms(self) -> float:
        """p90 - p10: how noisy the machine was."""
        return self.p90_ms - self.p10_ms

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "spread_ms": self.spread_ms}

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms median (p10-p90 {self.p10_ms:.3f}-{self.p90_ms:.3f}, "
                f"{self.repeat} runs, {self.num_threads} threads, {self.where})")


def _to_caller(out: np.ndarray, dtype: str, as_torch: bool):
    """A library output in the caller's kind and dtype (numpy has no bfloat16: float32 there)."""
    import torch

    if as_torch:
        t = torch.from_numpy(np.ascontiguousarray(out).reshape(np.shape(out)))  # 0-d stays 0-d
        return t if str(t.dtype) == f"torch.{dtype}" else t.to(getattr(torch, dtype))
    return out if dtype == "bfloat16" or str(out.dtype) == dtype else out.astype(dtype)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    import torch
    import tvm
    import tvm_ffi

    import graphopt

    return {"graphopt": graphopt.__version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


#: weights with at least this fraction of exact zeros are stored deflated (np.savez_compressed)
DEFLATE_ZEROS = 0.25


def _save_params(path: Path, params: Sequence[np.ndarray]) -> None:
    """The weights as ``.npz``; deflated when many are exactly zero (a weight-pruned model whose
    layers run dense still gets a small artifact: zlib stores a zero in a few bits), plain
    otherwise (dense float weights barely deflate, and compressing them costs seconds)."""
    arrays = {f"p{i:04d}": np.ascontiguousarray(p) for i, p in enumerate(params)}
    total = sum(a.size for a in arrays.values())
    zeros = sum(a.size - np.count_nonzero(a) for a in arrays.values())
    save = np.savez_compressed if total and zeros >= DEFLATE_ZEROS * total else np.savez
    save(path, **arrays)


def _sparse_summary(layers: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The masked layers' kernels for the compile summary: a line, and the per-layer records."""
    if not layers:
        return {}
    n = sum(r["kernel"] == "sparse" for r in layers)
    return {"sparse": f"{n} of {len(layers)} masked layers on sparse kernels", "sparse_layers": layers}


class CompiledModel:
    """A compiled model bound to a target; call it like the torch graph it came from.

    Build one with :meth:`Target.compile` or :func:`load`; the constructor is internal.
    """

    def __init__(self, target: Target, directory: Path, manifest: Dict[str, Any],
                 params: List[np.ndarray], *, owns_directory: Optional[tempfile.TemporaryDirectory] = None):
        self.target = target
        self._dir = Path(directory)
        self._manifest = manifest
        self._params = params
        self._owned = owns_directory
        self._runner = None
        self._lock = threading.RLock()  # starts the runner once; serializes runners that are not thread-safe
        self.inputs = [TensorSpec.from_dict(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_dict(d) for d in manifest["outputs"]]
        # the caller's dtypes where the library computes in another (a float16 model runs in float32)
        io = manifest.get("io_dtypes") or {}
        self.input_dtypes = list(io.get("inputs") or [s.dtype for s in self.inputs])
        self.output_dtypes = list(io.get("outputs") or [s.dtype for s in self.outputs])
        self.tuning = TuningInfo.from_dict(manifest.get("tuning") or {})
        self.num_threads = int(manifest["num_threads"])

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_build(cls, target: Target, lowered, built, *, tuning: Optional[TuningInfo] = None,
                   build_seconds: float = 0.0, log: logging.Logger = _log) -> "CompiledModel":
        """Export ``built`` to a private directory, transform the weights once, and wrap it."""
        tmp = tempfile.TemporaryDirectory(prefix="graphopt-compiled-")
        directory = Path(tmp.name)
        try:
            start = time.perf_counter()
            export_library(built.executable, str(directory / LIB), target.cross_compiler)
            (directory / IR).write_text(built.ir)
            params = list(lowered.params)
            if built.has_transform:
                runner = make_runner(target, str(directory / LIB), entry=TRANSFORM_ENTRY)
                try:
                    params = runner.run(params)
                finally:
                    runner.close()
            link_seconds = time.perf_counter() - start
        except TargetError:
            tmp.cleanup()
            raise
        except Exception as e:
            tmp.cleanup()
            raise TargetError(f"building for {target.name} failed: {type(e).__name__}: {e}") from e
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "target": target.to_dict(),
            "entry": "main",
            "inputs": [s.to_dict() for s in lowered.inputs],
            "outputs": [s.to_dict() for s in lowered.outputs],
            "io_dtypes": lowered.io_dtypes,
            "notes": list(lowered.notes),
            "sparse_layers": list(getattr(lowered, "sparse_layers", [])),
            "out_tree": lowered.out_tree,
            "params": [TensorSpec(f"p{i:04d}", tuple(p.shape), str(p.dtype)).to_dict()
                       for i, p in enumerate(params)],
            "source_params": [s.to_dict() for s in lowered.param_specs],
            "num_threads": target.runtime_threads,
            "weight_prepack": target.weight_prepack,
            "tuning": (tuning or TuningInfo()).to_dict(),
            "build_seconds": round(build_seconds + link_seconds, 3),
        }
        log.info("%s: built in %.1f s (%d tuned tasks applied, %d threads)", target.name,
                 build_seconds + link_seconds, (tuning or TuningInfo()).tasks_with_records,
                 target.runtime_threads)
        return cls(target, directory, manifest, params, owns_directory=tmp)

    # --- calling ---------------------------------------------------------------------------

    def _check_inputs(self, args: Sequence[Any]) -> List[np.ndarray]:
        """Inputs as numpy arrays, or an InputShapeError saying what the model takes."""
        import torch

        args = self._unpack(args)
        if len(args) != len(self.inputs):
            raise InputShapeError(f"this model takes {len(self.inputs)} input(s) "
                                  f"({self._specs_text()}), got {len(args)}")
        arrays = []
        for i, (x, spec, dtype) in enumerate(zip(args, self.inputs, self.input_dtypes)):
            if isinstance(x, torch.Tensor):
                got = str(x.dtype).replace("torch.", "")
                x = x.detach().cpu()
                x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16
            elif isinstance(x, np.ndarray):
                got = str(x.dtype)
            else:
                raise InputShapeError(f"input {i} ({spec.name}) must be a torch tensor or numpy array, "
                                      f"not {type(x).__name__}")
            if tuple(x.shape) != spec.shape or got != dtype:
                raise InputShapeError(
                    f"input {i} ({spec.name}) must be {list(spec.shape)} {dtype}, got "
                    f"{list(x.shape)} {got}: the model was compiled for fixed shapes; "
                    "compile again with example inputs of the new shape")
            arrays.append(x.astype(spec.dtype, copy=False))
        return arrays

    def _unpack(self, args: Sequence[Any]) -> Sequence[Any]:
        # model(x, y) and model((x, y)) are both accepted
        if len(args) == 1 and isinstance(args[0], (tuple, list)) and len(self.inputs) != 1:
            return tuple(args[0])
        return args

    def _specs_text(self) -> str:
        return ", ".join(f"{s.name}: {list(s.shape)} {d}" for s, d in zip(self.inputs, self.input_dtypes))

    @property
    def runner(self):
        """The runner (started on first use: a qemu worker or an RPC session takes seconds)."""
        with self._lock:
            if self._runner is None:
                if self._dir is None:
                    raise ArtifactError("this CompiledModel is closed")
                self._runner = make_runner(self.target, str(self._dir / LIB), params=self._params)
            return self._runner

    def _serialized(self, runner):
        """A lock to hold around ``runner``'s calls: none for thread-safe runners."""
        return contextlib.nullcontext() if getattr(runner, "thread_safe", False) else self._lock

    def __call__(self, *args):
        """Run on torch tensors (returns torch tensors) or numpy arrays (returns numpy)."""
        import torch
        import torch.utils._pytree as pytree

        arrays = self._check_inputs(args)
        runner = self.runner
        with self._serialized(runner):
            flat = runner.run(arrays)
        if len(flat) != len(self.outputs):
            raise TargetError(f"the library returned {len(flat)} outputs, the graph has {len(self.outputs)}")
        as_torch = any(isinstance(a, torch.Tensor) for a in self._unpack(args))
        leaves = [_to_caller(o, dtype, as_torch) for o, dtype in zip(flat, self.output_dtypes)]
        return pytree.tree_unflatten(leaves, pytree.treespec_loads(self._manifest["out_tree"]))

    def benchmark(self, repeat: int = 50, *, warmup: int = 5, inputs: Optional[Sequence] = None) -> BenchmarkResult:
        """Time ``repeat`` runs on random (or given) inputs; median and spread in ms."""
        if repeat < 1:
            raise ValueError("repeat must be >= 1")
        if inputs is None:
            rng = np.random.default_rng(0)
            arrays = [rng.standard_normal(s.shape).astype(s.dtype) if np.dtype(s.dtype).kind == "f"
                      else np.zeros(s.shape, s.dtype) for s in self.inputs]
        else:
            arrays = self._check_inputs(tuple(inputs))
        runner = self.runner
        with self._serialized(runner):
            if hasattr(runner, "time_runs"):
                seconds = runner.time_runs(arrays, repeat, warmup)
            else:
                for _ in range(warmup):
                    runner.run(arrays)
                seconds = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    runner.run(arrays)
                    seconds.append(time.perf_counter() - start)
        ms = sorted(s * 1e3 for s in seconds)
        q = lambda f: ms[min(len(ms) - 1, int(round(f * (len(ms) - 1))))]  # noqa: E731
        where = "rpc" if self.target.remote else "qemu" if self.target.emulated else "local"
        return BenchmarkResult(median_ms=statistics.median(ms), mean_ms=statistics.fmean(ms),
                               std_ms=statistics.pstdev(ms), min_ms=ms[0], max_ms=ms[-1],
                               p10_ms=q(0.1), p90_ms=q(0.9), repeat=repeat,
                               num_threads=self.num_threads, where=where)

    def verify(self) -> None:
        """Run the library once on zeros and check its outputs against the manifest.

        A library that is not the one the manifest describes (another model's ``model.so``,
        weights of other shapes) then fails here, with an ArtifactError, instead of on the
        first call inside TVM.
        """
        arrays = [np.zeros(s.shape, s.dtype) for s in self.inputs]
        try:
            runner = self.runner
            with self._serialized(runner):
                flat = runner.run(arrays)
        except Exception as e:
            raise ArtifactError(
                f"{self._dir / LIB} does not run with the inputs and weights its manifest lists "
                f"({self._specs_text()}): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
                "the artifact's files do not belong together: save the model again") from e
        got = [(tuple(o.shape), str(o.dtype)) for o in flat]
        want = [(s.shape, s.dtype) for s in self.outputs]
        if got != want:
            raise ArtifactError(f"{self._dir / LIB} returns {got}, its manifest says {want}: the artifact's "
                                "files do not belong together: save the model again")

    def ir(self) -> str:
        """The final Relax module (after tuning and weight-transform lifting), as text."""
        if self._dir is None:
            raise ArtifactError("this CompiledModel is closed")
        return (self._dir / IR).read_text()

    def summary(self) -> Dict[str, Any]:
        """Flat facts for the optimize report: target, threads, tuning and build times."""
        t = self.tuning
        return {"target": self.target.name, "mcpu": self.target.mcpu or "generic",
                "num_threads": self.num_threads, "tune_trials": t.trials_requested,
                "trials_run": t.trials_run, "tasks": t.tasks, "tasks_tuned": t.tasks_tuned,
                "cache_hits": t.cache_hits, "tuning_seconds": round(t.seconds, 2),
                "build_seconds": self._manifest.get("build_seconds", 0.0),
                "schedule_fallbacks": "; ".join(t.fallbacks) or "none",
                **({"notes": "; ".join(self._manifest["notes"])} if self._manifest.get("notes") else {}),
                **_sparse_summary(self._manifest.get("sparse_layers") or []),
                "tuning": t.to_dict()}

    def set_sparse_layers(self, layers: List[Dict[str, Any]]) -> None:
        """Replace the masked layers' records (the whole-model check's verdict, before any save)."""
        self._manifest["sparse_layers"] = [dict(r) for r in layers]

    @property
    def manifest(self) -> Dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    # --- persistence -----------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write the artifact to ``directory`` (created; existing artifact files replaced)."""
        if self._dir is None:
            raise ArtifactError("this CompiledModel is closed")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)  # a half-written save must not look complete
        if out.resolve() != self._dir.resolve():
            shutil.copyfile(self._dir / LIB, out / LIB)
            shutil.copyfile(self._dir / IR, out / IR)
        _save_params(out / PARAMS, self._params)
        manifest = dict(self._manifest)
        manifest["versions"] = _versions()
        manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        manifest["files"] = {name: {"bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
                             for name in (LIB, PARAMS, IR)}
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, out / MANIFEST)
        return out

    def close(self) -> None:
        """Stop the runner (qemu worker, RPC session) and delete the private build directory."""
        with self._lock:
            if self._runner is not None:
                self._runner.close()
                self._runner = None
        if self._owned is not None:
            self._owned.cleanup()
            self._owned = None
        self._dir = None

    def __enter__(self) -> "CompiledModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def __repr__(self) -> str:
        return (f"<CompiledModel {self.target.name} inputs=[{self._specs_text()}] "
                f"threads={self.num_threads} tuned_tasks={self.tuning.tasks_with_records}>")


# --- loading -----------------------------------------------------------------------------------

_REQUIRED = ("format", "format_version", "target", "inputs", "outputs", "out_tree", "params",
             "num_threads", "files", "versions")


def _read_manifest(directory: Path) -> Dict[str, Any]:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory holding a saved graphopt model")
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not a graphopt artifact, or its save "
                            "was interrupted; save it again")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path} is corrupt (not valid JSON: {e}); save the model again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory} uses artifact format version {manifest.get('format_version')}; "
                            f"this graphopt reads version {FORMAT_VERSION}: rebuild the model")
    if manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        raise ArtifactError(f"{path} was changed after it was saved (its {MANIFEST_DIGEST} does not match "
                            "its content): the artifact cannot be trusted; save the model again")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}: corrupt manifest")
    _check_fields(path, manifest)
    return manifest


def _is_dtype(name: Any) -> bool:
    """A numpy dtype name, or bfloat16 (which numpy lacks)."""
    if name == "bfloat16":
        return True
    try:
        np.dtype(name)
    except TypeError:
        return False
    return isinstance(name, str)


def manifest_digest(manifest: Dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without the digest itself."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_fields(path: Path, manifest: Dict[str, Any]) -> None:
    """Every field the loader uses has the type and range it needs (a clear error, not one from TVM)."""
    def bad(field: str, why: str):
        raise ArtifactError(f"{path}: {field} {why}: corrupt manifest; save the model again")

    for field in ("inputs", "outputs", "params"):
        specs = manifest[field]
        if not isinstance(specs, list) or (field == "inputs" and not specs):
            bad(field, "must be a non-empty list" if field == "inputs" else "must be a list")
        for i, d in enumerate(specs):
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                bad(f"{field}[{i}]", "must be a {name, shape, dtype} record")
            shape = d.get("shape")
            if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                      for v in shape):
                bad(f"{field}[{i}].shape", f"must be a list of non-negative ints, not {shape!r}")
            if not _is_dtype(d.get("dtype")):
                bad(f"{field}[{i}].dtype", f"{d.get('dtype')!r} is not a dtype")
    threads = manifest["num_threads"]
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 1024:
        bad("num_threads", f"must be an int from 1 to 1024, not {threads!r}")
    if not isinstance(manifest["target"], dict):
        bad("target", "must be a record")
    if not isinstance(manifest["out_tree"], str):
        bad("out_tree", "must be a string")
    files = manifest["files"]
    if not isinstance(files, dict) or sorted(files) != sorted((LIB, PARAMS, IR)):
        bad("files", f"must list exactly {LIB}, {PARAMS} and {IR}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) \
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
            bad(f"files[{name!r}]", "must be a {bytes, sha256} record")
    if not isinstance(manifest["versions"], dict):
        bad("versions", "must be a record")


def _check_files(directory: Path, manifest: Dict[str, Any]) -> None:
    for name in (LIB, PARAMS, IR):
        expected = manifest["files"].get(name)
        path = directory / name
        if expected is None:
            raise ArtifactError(f"{directory / MANIFEST} has no checksum for {name}: corrupt manifest")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: copy the whole artifact directory")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ArtifactError(f"{path} is truncated or altered: {size} bytes, the manifest says "
                                f"{expected['bytes']}")
        if _sha256(path) != expected["sha256"]:
            raise ArtifactError(f"{path} is corrupt: its sha256 does not match the manifest")


def _check_compatible(directory: Path, manifest: Dict[str, Any], target: Target) -> None:
    import tvm

    from .hostcpu import host_cpu
    from .qemu import elf_machine

    built_with = manifest["versions"].get("tvm")
    if built_with != tvm.__version__:
        raise ArtifactError(f"{directory} was built with TVM {built_with}, this is TVM {tvm.__version__}: "
                            "the library and runtime must match; compile the model again")
    try:
        machine = elf_machine(directory / LIB)
    except TargetError as e:
        raise ArtifactError(f"{directory / LIB}: {e}") from e
    if machine != target.arch:
        raise ArtifactError(f"{directory / LIB} is a {machine} library but the manifest's target "
                            f"{target.name!r} is {target.arch}: mismatched artifact")
    if target.native and target.arch == "x86_64":
        missing = [f for f in target.features if f not in host_cpu().flags]
        if missing:
            raise ArtifactError(f"{directory} was built for a CPU with {', '.join(missing)}, which this "
                                f"CPU lacks: compile it again with target='x86' on this machine")


def _load_params(directory: Path, manifest: Dict[str, Any]) -> List[np.ndarray]:
    specs = [TensorSpec.from_dict(d) for d in manifest["params"]]
    try:
        with np.load(directory / PARAMS, allow_pickle=False) as z:
            params = [z[s.name] for s in specs]
    except (OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"{directory / PARAMS} does not hold the weights the manifest lists: {e}") from e
    for s, p in zip(specs, params):
        if tuple(p.shape) != s.shape or str(p.dtype) != s.dtype:
            raise ArtifactError(f"weight {s.name} in {directory / PARAMS} is {list(p.shape)} {p.dtype}, "
                                f"the library expects {list(s.shape)} {s.dtype}: mismatched artifact")
    return params


def load(directory, *, rpc: Optional[str] = None, tracker: Optional[str] = None,
         key: Optional[str] = None, num_threads: Optional[int] = None) -> CompiledModel:
    """Load a saved model, checking every file before the library is opened.

    Args:
        directory: what :meth:`CompiledModel.save` wrote.
        rpc, tracker, key: run on this remote device instead of where the manifest says.
        num_threads: runtime threads (default: the count recorded at build time).

    Raises:
        ArtifactError: missing, truncated, corrupt or mismatched artifact (the message says
            which file and what to do).
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    _check_files(directory, manifest)
    try:
        target = Target.from_dict(manifest["target"])
        changes = {k: v for k, v in dict(rpc=rpc, tracker=tracker, key=key).items() if v is not None}
        if rpc or tracker:  # a new device replaces the recorded one, whichever way it was reached
            changes.setdefault("rpc", rpc)
            changes.setdefault("tracker", tracker)
        if num_threads is not None:
            changes["num_threads"] = num_threads
        target = target.replace(**changes) if changes else target
    except (TargetError, TypeError) as e:
        raise ArtifactError(f"{directory / MANIFEST}: bad target description: {e}") from e
    _check_compatible(directory, manifest, target)
    params = _load_params(directory, manifest)
    manifest = dict(manifest)
    manifest["num_threads"] = target.runtime_threads if num_threads is not None else manifest["num_threads"]
    if num_threads is None and target.num_threads is None:
        target = target.replace(num_threads=int(manifest["num_threads"]))
    model = CompiledModel(target, directory, manifest, params)
    try:
        model.verify()
    except Exception:
        model.close()
        raise
    return model
