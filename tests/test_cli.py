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
])
def test_bad_input_exits_2_with_a_message(model_file, args, msg):
    out = graphopt_cli("optimize", f"{model_file}:small", "--input-shape", "1,3,8,8", *args)
    assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr


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
