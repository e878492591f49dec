"""An aarch64 Python sysroot, so cross-compiled TVM modules can run on an x86 host under qemu.

graphopt's ARM targets are tested without ARM hardware: the module is cross-compiled on
the host, then loaded by an *aarch64* Python running under ``qemu-aarch64`` (design.md,
"ARM without ARM hardware"). That Python, its shared libraries and TVM's aarch64 runtime
live in a sysroot assembled here from two sources the machine can reach:

* Debian bookworm arm64 ``.deb`` files (``python3.11`` and ``libstdc++6`` with their
  dependency closure, about 28 packages), fetched with a *private* apt state so the host's
  own package lists and caches are never touched, and unpacked with ``dpkg -x``;
* aarch64 wheels (TVM, TVM FFI, numpy...) installed by the host's pip with
  ``--platform``/``--target``, so nothing has to run on ARM to install them.

The build is idempotent: a stamp file records exactly what was installed and the recipe
that produced it, and a later call with the same recipe returns at once. A build goes to a
temporary directory and is renamed into place, under a file lock, so concurrent test
sessions never see a half-built sysroot.

Example:
    >>> from graphopt.targets.arm_sysroot import ensure_sysroot  # doctest: +SKIP
    >>> root = ensure_sysroot()                                    # doctest: +SKIP
    >>> (root / "usr/bin/python3.11").exists()                     # doctest: +SKIP
    True

From a shell (CI and the setup script do this)::

    python -m graphopt.targets.arm_sysroot [--dest DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from graphopt.errors import TargetError

__all__ = [
    "CROSS_CXX", "PYTHON_RELPATH", "RUNTIME_EXTRA_RELPATH", "SITE_PACKAGES_RELPATH",
    "default_sysroot_dir", "ensure_sysroot", "host_debian_mirrors", "read_stamp",
    "require_cross_compiler", "require_qemu",
]

# --- The recipe. Changing any of it changes the stamp's "recipe" and triggers a rebuild. ---
RECIPE_VERSION = 1
DEBIAN_SUITE = "bookworm"  # ships python3.11, the version the aarch64 cp311 wheels need
DEBIAN_ROOT_PACKAGES = ("python3.11", "libstdc++6")  # libstdc++: TVM's runtime is C++
# Needed only by maintainer scripts, which dpkg -x never runs; they would drag perl in.
DEBIAN_SKIPPED = ("dpkg", "install-info", "debconf", "perl-base", "tar")
WHEELS = (
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post0",  # the host's pin (design.md): both ends must agree
    "numpy",
    "ml_dtypes",          # imported by tvm.runtime
    "typing_extensions",  # imported by tvm_ffi
    "psutil",             # the RPC server's PopenWorker kills its children with it
    "cloudpickle",        # the RPC server's PopenWorker protocol
)
# pip matches --platform tags literally, so every glibc in [2.17, bookworm's 2.36] is listed.
MANYLINUX_TAGS = tuple(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)) + (
    "manylinux2014_aarch64",
)
# The compiler library (about 230 MB) is never used on the device side: the runtime falls
# back to runtime-only mode without it (and we set TVM_USE_RUNTIME_LIB=1 anyway).
DROPPED_PATHS = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty")

PYTHON_RELPATH = "usr/bin/python3.11"
SITE_PACKAGES_RELPATH = "usr/lib/python3/dist-packages"
# Runtime-only TVM does not load this on import, yet it holds packed functions remote
# measurement needs (tvm.contrib.random.*, sort...): the qemu worker and the RPC server
# load it explicitly.
RUNTIME_EXTRA_RELPATH = SITE_PACKAGES_RELPATH + "/tvm/lib/libtvm_runtime_extra.so"
STAMP_NAME = ".graphopt-sysroot.json"

QEMU = "qemu-aarch64"
QEMU_PACKAGE = "qemu-user"
CROSS_CXX = "aarch64-linux-gnu-g++"
CROSS_PACKAGE = "g++-aarch64-linux-gnu"

DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
FALLBACK_MIRRORS = {
    "debian": "http://deb.debian.org/debian",
    "security": "http://deb.debian.org/debian-security",
}


def default_sysroot_dir() -> Path:
    """``$GRAPHOPT_CACHE_DIR/aarch64-sysroot`` (the cache dir defaults to ``~/.cache/graphopt``)."""
    cache = os.environ.get("GRAPHOPT_CACHE_DIR") or os.path.join("~", ".cache", "graphopt")
    return Path(cache).expanduser() / "aarch64-sysroot"


def require_qemu() -> str:
    """Path of ``qemu-aarch64``, or a TargetError that says which package provides it."""
    return _require_tool(QEMU, QEMU_PACKAGE, "run aarch64 code on this host")


def require_cross_compiler() -> str:
    """Path of ``aarch64-linux-gnu-g++``, or a TargetError that says which package provides it."""
    return _require_tool(CROSS_CXX, CROSS_PACKAGE, "link aarch64 modules")


def _require_tool(tool: str, package: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise TargetError(
            f"{tool} is not installed; it is needed to {why}. "
            f"Install it with: apt-get install {package}"
        )
    return path


def read_stamp(sysroot: Path) -> Optional[dict]:
    """The stamp of a finished sysroot (what was installed, and how), or None."""
    try:
        return json.loads((Path(sysroot) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _recipe() -> dict:
    return {
        "version": RECIPE_VERSION,
        "suite": DEBIAN_SUITE,
        "debian_roots": list(DEBIAN_ROOT_PACKAGES),
        "debian_skipped": list(DEBIAN_SKIPPED),
        "wheels": list(WHEELS),
        "platforms": list(MANYLINUX_TAGS),
        "dropped": list(DROPPED_PATHS),
    }


def ensure_sysroot(dest: Optional[os.PathLike] = None, progress: bool = True) -> Path:
    """Build the aarch64 sysroot at ``dest`` unless an identical one is already there.

    Idempotent and safe to call from several processes at once (a file lock serializes
    builders; the finished tree appears by rename). Building takes about 15-30 s and needs
    the Debian mirror and PyPI; a finished sysroot is used offline.

    Args:
        dest: where the sysroot goes; defaults to :func:`default_sysroot_dir`.
        progress: print one line per step to stderr.

    Returns:
        The sysroot directory; ``qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11`` runs it.

    Raises:
        TargetError: qemu-aarch64, apt-get, dpkg or pip is missing, or a step failed
            (the message carries the failing command's output).
    """
    dest = Path(dest).expanduser().resolve() if dest is not None else default_sysroot_dir()
    recipe = _recipe()
    stamp = read_stamp(dest)
    if stamp is not None and stamp.get("recipe") == recipe:
        return dest
    require_qemu()  # building a sysroot nothing can run would only waste time
    for tool, package in (("apt-get", "apt"), ("dpkg", "dpkg")):
        _require_tool(tool, package, "build the aarch64 sysroot")

    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        stamp = read_stamp(dest)  # another process may have finished while we waited
        if stamp is not None and stamp.get("recipe") == recipe:
            return dest
        _build(dest, recipe, progress)
    return dest


def _build(dest: Path, recipe: dict, progress: bool) -> None:
    say = _sayer(progress)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.build-", dir=dest.parent) as tmp:
        work = Path(tmp)
        root = work / "root"
        root.mkdir()
        debs = _install_debs(root, work / "apt", say)
        wheels = _install_wheels(root / SITE_PACKAGES_RELPATH, say)
        site = root / SITE_PACKAGES_RELPATH
        for rel in DROPPED_PATHS:
            path = site / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        _precompile(root, say)
        say("checking that TVM's runtime imports under qemu")
        _smoke_test(root)
        stamp = {
            "recipe": recipe,
            "debs": debs,
            "wheels": wheels,
            "bytes": _tree_bytes(root),
            "build_seconds": round(time.monotonic() - start, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (root / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True))
        if dest.exists() or dest.is_symlink():
            old = work / "old"
            dest.rename(old)  # the rmtree of the old tree happens with the temp dir
        root.rename(dest)
    say(f"aarch64 sysroot ready at {dest} ({stamp['bytes'] / 1e6:.0f} MB, "
        f"{stamp['build_seconds']} s)")


def _sayer(progress: bool):
    def say(message: str) -> None:
        if progress:
            print(f"[graphopt sysroot] {message}", file=sys.stderr, flush=True)
    return say


def _run(cmd: Sequence[str], what: str, **kwargs) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-3000:]
        raise TargetError(f"building the aarch64 sysroot failed while {what}: "
                          f"{' '.join(cmd[:4])}... exited {proc.returncode}\n{tail}")
    return proc.stdout


# --- Debian packages ---------------------------------------------------------------------

def host_debian_mirrors(apt_dir: Path = Path("/etc/apt")) -> Dict[str, Tuple[str, str]]:
    """The Debian mirrors the host's apt already uses, as ``{"debian"|"security": (uri, keyring)}``.

    Reusing them (rather than hard-coding one) keeps the arm64 download on whatever mirror
    or proxy this machine is set up for. Both one-line ``.list`` and deb822 ``.sources``
    files are read; entries whose suite is not a Debian release suite are ignored. Missing
    entries fall back to deb.debian.org.
    """
    found: Dict[str, Tuple[str, str]] = {}
    for entry in _host_source_entries(apt_dir):
        if "deb" not in entry["types"] or "main" not in entry["components"]:
            continue
        for suite in entry["suites"]:
            kind = "security" if suite.endswith("-security") else "debian"
            if not re.fullmatch(r"[a-z]+(-updates|-security)?", suite) or kind in found:
                continue
            for uri in entry["uris"]:
                if uri.startswith(("http://", "https://", "file:/")):
                    found[kind] = (uri.rstrip("/"), entry["signed_by"] or DEFAULT_KEYRING)
                    break
    for kind, uri in FALLBACK_MIRRORS.items():
        found.setdefault(kind, (uri, DEFAULT_KEYRING))
    return found


def _host_source_entries(apt_dir: Path) -> Iterable[dict]:
    files = [apt_dir / "sources.list"] + sorted((apt_dir / "sources.list.d").glob("*"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.name.endswith(".list"):
            yield from _parse_one_line_sources(text)
        elif path.name.endswith(".sources"):
            yield from _parse_deb822_sources(text)


def _parse_one_line_sources(text: str) -> Iterable[dict]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not match:
            continue
        options = dict(o.split("=", 1) for o in (match.group(2) or "").split() if "=" in o)
        yield {"types": [match.group(1)], "uris": [match.group(3)], "suites": [match.group(4)],
               "components": match.group(5).split(), "signed_by": options.get("signed-by")}


def _parse_deb822_sources(text: str) -> Iterable[dict]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: Dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:  # continuation line (e.g. an inline key block)
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if not fields or fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by", "")
        yield {"types": fields.get("types", "").split(), "uris": fields.get("uris", "").split(),
               "suites": fields.get("suites", "").split(),
               "components": fields.get("components", "").split(),
               "signed_by": signed_by if signed_by.startswith("/") else None}


def _apt_options(apt: Path) -> List[str]:
    # Every piece of state apt reads or writes is redirected into `apt`: the host's lists,
    # archives cache, dpkg status, pins and lock files stay untouched.
    return [
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::Cache={apt / 'cache'}",
        f"-oDir::State::status={apt / 'status'}",
        f"-oDir::Etc::SourceList={apt / 'sources.list'}",
        f"-oDir::Etc::SourceParts={apt / 'sources.list.d'}",
        f"-oDir::Etc::Preferences={apt / 'preferences'}",
        f"-oDir::Etc::PreferencesParts={apt / 'preferences.d'}",
        "-oAPT::Architecture=arm64",
        "-oAPT::Architectures=arm64",
        "-oDebug::NoLocking=1",
        "-qq",
    ]


def _install_debs(root: Path, apt: Path, say) -> Dict[str, str]:
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d",
                "debs"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").write_text("")
    mirrors = host_debian_mirrors()
    main_uri, main_key = mirrors["debian"]
    sec_uri, sec_key = mirrors["security"]
    (apt / "sources.list").write_text(
        f"deb [arch=arm64 signed-by={main_key}] {main_uri} {DEBIAN_SUITE} main\n"
        f"deb [arch=arm64 signed-by={main_key}] {main_uri} {DEBIAN_SUITE}-updates main\n"
        f"deb [arch=arm64 signed-by={sec_key}] {sec_uri} {DEBIAN_SUITE}-security main\n"
    )
    opts = _apt_options(apt)
    say(f"apt-get update (arm64, {main_uri})")
    _run(["apt-get", *opts, "update"], "downloading the arm64 package lists")
    packages = _dependency_closure(opts, DEBIAN_ROOT_PACKAGES, set(DEBIAN_SKIPPED))
    say(f"downloading {len(packages)} arm64 packages")
    _run(["apt-get", *opts, "download", *packages], "downloading arm64 packages",
         cwd=apt / "debs")
    versions: Dict[str, str] = {}
    for deb in sorted((apt / "debs").glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(root)], f"unpacking {deb.name}")
        name, version = deb.name.split("_")[:2]
        versions[name] = version.replace("%3a", ":")
    missing = sorted(set(packages) - set(versions))
    if missing:
        raise TargetError(f"apt-get download did not fetch: {', '.join(missing)}")
    return versions


def _dependency_closure(opts: List[str], roots: Sequence[str], skipped: set) -> List[str]:
    """Breadth-first Depends/PreDepends closure, taking the first of each ``a | b`` choice.

    ``apt-cache depends --recurse`` would follow every alternative (pulling perl in through
    mailcap), so alternatives are resolved here the way apt itself would by default.
    """
    seen = set(roots)
    frontier = list(roots)
    while frontier:
        out = _run(["apt-cache", *opts, "depends", "--no-recommends", "--no-suggests",
                    "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                    *frontier], "resolving arm64 dependencies")
        frontier = []
        for dep in _first_alternatives(out):
            if dep not in seen and dep not in skipped:
                seen.add(dep)
                frontier.append(dep)
    return sorted(seen)


def _first_alternatives(apt_cache_depends_output: str) -> List[str]:
    chosen: List[str] = []
    in_alternatives = False  # the previous line was "|Depends: x": this one is its fallback
    pending_virtual = False  # "<virtual>": its first provider follows, indented deeper
    for line in apt_cache_depends_output.splitlines():
        match = re.match(r"^ ( |\|)(Pre)?Depends: (\S+)", line)
        if match:
            pending_virtual = False
            bar, name = match.group(1) == "|", match.group(3)
            if not in_alternatives:
                if name.startswith("<"):
                    pending_virtual = True
                else:
                    chosen.append(name.split(":")[0])
            in_alternatives = bar
        elif pending_virtual and line.startswith("    "):
            chosen.append(line.strip().split(":")[0])
            pending_virtual = False
    return chosen


# --- Wheels ------------------------------------------------------------------------------

def _install_wheels(site: Path, say) -> Dict[str, str]:
    site.mkdir(parents=True, exist_ok=True)
    platforms = [arg for tag in MANYLINUX_TAGS for arg in ("--platform", tag)]
    say(f"pip installing aarch64 wheels: {', '.join(WHEELS)}")
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--no-deps", "--no-compile", "--only-binary=:all:", *platforms,
          "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          "--target", str(site), *WHEELS], "installing aarch64 wheels with pip")
    installed = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        installed[name] = version
    return installed


def _precompile(root: Path, say) -> None:
    # Debian byte-compiles in postinst scripts, which dpkg -x never runs: without .pyc files
    # every emulated start would compile the stdlib and TVM again. A host CPython 3.11
    # writes the same .pyc files (the magic number is per minor version) in a second.
    if sys.version_info[:2] != (3, 11):
        return  # the smoke test's first import under qemu writes the ones that matter
    say("byte-compiling the stdlib and wheels")
    # Not checked: a few test files in the stdlib do not compile on purpose.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0",
                    "-x", r"(lib2to3|idlelib|test|tests|turtledemo)[/\\]",
                    str(root / "usr/lib/python3.11"), str(root / SITE_PACKAGES_RELPATH)],
                   capture_output=True)


def _smoke_test(root: Path) -> None:
    # Imports exactly what the qemu worker and the RPC server import, on the emulated CPU.
    from .qemu import qemu_python_command

    cmd, env = qemu_python_command(root, cpu="cortex-a72")
    code = ("import ctypes, numpy, tvm, tvm.rpc, tvm.runtime.vm, tvm_ffi; "
            "assert tvm.base._RUNTIME_ONLY; "
            f"ctypes.CDLL({str(root / RUNTIME_EXTRA_RELPATH)!r}); "
            "assert tvm_ffi.get_global_func('tvm.contrib.random.random_fill_for_measure', "
            "allow_missing=True) is not None; print(tvm.__version__)")
    _run([*cmd, "-c", code], "importing TVM under qemu", env=env, timeout=300)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m graphopt.targets.arm_sysroot [--dest DIR] [--quiet]``: build, print the path."""
    parser = argparse.ArgumentParser(
        prog="python -m graphopt.targets.arm_sysroot",
        description="Build (idempotently) the aarch64 Python + TVM runtime sysroot that "
                    "graphopt runs cross-compiled ARM modules in under qemu-aarch64.")
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"sysroot directory (default: {default_sysroot_dir()})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        root = ensure_sysroot(args.dest, progress=not args.quiet)
    except TargetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
