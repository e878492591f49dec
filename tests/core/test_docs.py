"""Docstring examples and the code in docs/ run, so they stay true."""
import doctest
import importlib
import os
import re

import pytest
import torch

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
MODULES = ["graphopt", "graphopt.api", "graphopt.capture", "graphopt.pass_registry", "graphopt.manager",
           "graphopt.analysis.graphview", "graphopt.models.reference", "graphopt.target_protocol",
           "graphopt.batches", "graphopt.analysis.sharing", "graphopt.errors", "graphopt.layer_registry",
           "graphopt.arguments", "graphopt.analysis.channels.blockers", "graphopt.sparsity"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_writing_passes_example_runs():
    text = open(os.path.join(DOCS, "writing-passes.md")).read()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    namespace = {}
    exec(compile(code, "writing-passes.md", "exec"), namespace)
    import graphopt

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6())
    opt = graphopt.optimize(m, ["swap_relu6"], example_inputs=(torch.randn(1, 3, 8, 8),))
    assert opt.report.records[0].status == "applied" and opt.report.records[0].nodes_removed == ["_1"]


def test_merge_branches_example_runs(capsys):
    text = open(os.path.join(DOCS, "merge_branches.md")).read()
    code, = re.findall(r"```python\n(.*?)```", text, re.S)
    exec(compile(code, "merge_branches.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed == re.search(r"# (\[.*\])", code).group(1)
