"""The graphopt command line, run as a user would."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

MODEL_FILE = textwrap.dedent('''
    import torch.nn as nn

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))

    def small():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

    def needs_width(width):
        return nn.Sequential(nn.Conv2d(3, width, 3))

    def broken():
        raise RuntimeError("the factory itself fails")
''')


def graphopt_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    return path


def test_passes_lists_options():
    out = graphopt_cli("passes")
    assert out.returncode == 0
    assert "fuse_conv_bn (exact): Fold BatchNorm" in out.stdout and "dce (exact)" in out.stdout
    assert "merge_branches (exact): Merge parallel convs" in out.stdout


def test_optimize_file_factory_with_report_and_out(model_file, tmp_path):
    report = tmp_path / "r.html"
    out = graphopt_cli("optimize", f"{model_file}:small", "--input-shape", "1,3,16,16",
                       "--passes", "fuse_conv_bn,dce", "--report", str(report), "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    assert "fuse_conv_bn  applied" in out.stdout
    assert report.read_text().startswith("<!DOCTYPE html>")
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [r["name"] for r in data["records"]] == ["fuse_conv_bn", "dce"]
    gm = torch.load(tmp_path / "o" / "graph_module.pt", weights_only=False)
    assert gm(torch.randn(1, 3, 16, 16)).shape == (1, 8, 14, 14)


def test_optimize_with_weights(model_file, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("mymodel_w", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.small()
    torch.nn.init.constant_(m[0].weight, 0.5)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    out = graphopt_cli("optimize", f"{model_file}:small", "--input-shape", "1,3,8,8", "--weights",
                       str(tmp_path / "w.pt"), "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    gm = torch.load(tmp_path / "o" / "graph_module.pt", weights_only=False)
    assert torch.allclose(gm(torch.ones(1, 3, 8, 8)), m.eval()(torch.ones(1, 3, 8, 8)), atol=1e-5)


def test_module_factory_form():
    out = graphopt_cli("optimize", "torch.nn:Identity", "--input-shape", "2,3")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args,msg", [
    (["--passes", "fuse_conv_bm"], "unknown pass 'fuse_conv_bm'. Did you mean 'fuse_conv_bn'?"),
    (["--passes", "fuse_conv_bn:ratio=2"], "has no option 'ratio'"),
    (["--passes", "fuse_conv_bn:ratio"], "must look like key=value"),
    (["--target", "risc-v"], "unknown target 'risc-v'"),
    (["--input-shape", "1,3,-8,8"], "every dimension must be a positive integer"),
    (["--tune-trials", "-1"], "argument --tune-trials: -1 is negative"),
    (["--tune-trials", "many"], "argument --tune-trials: 'many' is not an integer"),
    (["--weights", "missing.pt"], "--weights missing.pt: no such file"),
    (["--report", "no/such/dir/r.html"], "the directory"),
    (["--report", "report.txt"], "must end in .html or .json"),
    (["--passes", "prune_channels:ratio=lots"], "prune_channels.ratio must be float"),
])
def test_bad_input_exits_2_with_a_message(model_file, args, msg):
    out = graphopt_cli("optimize", f"{model_file}:small", "--input-shape", "1,3,8,8", *args)
    assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr


def test_a_report_path_is_checked_before_the_work(model_file, tmp_path):
    out = graphopt_cli("-v", "optimize", f"{model_file}:small", "--input-shape", "1,3,8,8",
                       "--report", str(tmp_path / "missing" / "r.html"))
    assert out.returncode == 2 and "does not exist; create it first" in out.stderr
    assert "pass fuse_conv_bn" not in out.stderr  # no pass ran


@pytest.mark.parametrize("factory,msg", [
    ("needs_width", "needs_width(width) needs arguments"),
    ("broken", "building the model failed: RuntimeError: the factory itself fails"),
])
def test_bad_factories(model_file, factory, msg):
    out = graphopt_cli("optimize", f"{model_file}:{factory}", "--input-shape", "1,3,8,8")
    assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr
    debug = graphopt_cli("--debug", "optimize", f"{model_file}:{factory}", "--input-shape", "1,3,8,8")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_model_spec(tmp_path):
    out = graphopt_cli("optimize", "nofile.py:make", "--input-shape", "1,3,8,8")
    assert out.returncode == 2 and "no such file: nofile.py" in out.stderr
    out = graphopt_cli("optimize", "justaname", "--input-shape", "1,3,8,8")
    assert out.returncode == 2 and "path/to/file.py:factory" in out.stderr
    out = graphopt_cli("optimize", "torch.nn:Identity", "--input-shape", "1,x")
    assert out.returncode == 2 and "comma-separated integers" in out.stderr


def test_targets_lists_presets():
    out = graphopt_cli("targets")
    assert out.returncode == 0
    assert all(f"{n}:" in out.stdout for n in ("x86", "arm", "arm-rpi4", "arm-neoverse-n1", "arm-a55"))
    assert "arm-rpi4: Raspberry Pi 4 (Cortex-A72" in out.stdout  # the description itself, not its repr


def test_demo_pipeline_leaves_out_what_is_not_installed():
    from graphopt.cli import demo_pipeline

    chosen, missing = demo_pipeline(["fuse_conv_bn", "distill", "dce"], train_data=["batches"])
    assert chosen == ["fuse_conv_bn", ("distill", {"epochs": 2, "train_data": ["batches"]}), "dce"]
    assert missing == ["prune_channels", "quantize"]


def test_optimize_with_a_latency_budget_runs_the_search(model_file, tmp_path):
    out = graphopt_cli("optimize", f"{model_file}:small", "--input-shape", "1,3,16,16", "--passes", "fuse_conv_bn",
                       "--target", "x86", "--tune-trials", "0", "--budget", "0.8", "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [r["name"] for r in data["records"]] == ["fuse_conv_bn", "latency_search"]
    search = data["records"][1]["data"]["search"]
    assert search["budget"]["latency"] == 0.8 and search["budget"]["recovery_batches"] == 0


@pytest.mark.parametrize("args,msg", [
    (["--budget", "fast"], "neither a fraction of the starting latency (0.5) nor milliseconds"),
    (["--budget", "1.5"], "strictly between 0 and 1"),
    (["--budget", "0.5"], "budget needs a target"),
    (["--budget", "0.5", "--target", "x86", "--max-drop", "0.01"], "--max-drop needs accuracy"),
    (["--int8"], "--int8 limits the latency search: give --budget"),
    (["--budget", "0.5", "--target", "x86", "--int8"], "--int8 calibrates the int8 graph on real input batches"),
    (["--max-drop", "0.01"], "--max-drop needs accuracy"),
])
def test_bad_budgets_exit_2_before_any_work(model_file, args, msg):
    out = graphopt_cli("optimize", f"{model_file}:small", "--input-shape", "1,3,8,8", *args)
    assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr
