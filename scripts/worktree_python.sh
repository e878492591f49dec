#!/usr/bin/env bash
# Run the main checkout's .venv Python on the code of the git worktree you are in.
#
# Why: the editable install maps graphopt, graphopt.passes and graphopt.targets to the main
# checkout's folders, so PYTHONPATH=<worktree> alone still imports main's passes and targets.
# This writes a sitecustomize that points the mapping at the worktree, for this run only.
#
# Usage (from inside a worktree made with `git worktree add`):
#     bash scripts/worktree_python.sh -m pytest -q tests/passes/test_latency_search.py
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
main="$(git worktree list --porcelain | awk '/^worktree /{print $2; exit}')"
python="$main/.venv/bin/python"
[ -x "$python" ] || { echo "no $python: run 'bash scripts/setup.sh' in $main first" >&2; exit 2; }
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
cat > "$shim/sitecustomize.py" <<PY
import sys
finder = next((m for n, m in sys.modules.items() if n.startswith("__editable__") and n.endswith("_finder")), None)
if finder is not None:
    finder.MAPPING.update({"graphopt": "$root/graphopt", "graphopt.passes": "$root/passes",
                           "graphopt.targets": "$root/targets"})
PY
PYTHONPATH="$root:$shim${PYTHONPATH:+:$PYTHONPATH}" "$python" "$@"
