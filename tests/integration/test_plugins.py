"""Third-party passes: a decorated function in a user's script, and an installed package's entry point."""
import os
import subprocess
import sys
import sysconfig
import textwrap
import venv

HERE = os.path.dirname(__file__)

USER_SCRIPT = textwrap.dedent('''
    import torch, torch.nn as nn, graphopt

    @graphopt.register_pass("my_double_output", exact=False, tolerance=None, options={"times": 2})
    def my_double_output(gm, ctx, times):
        """Multiplies the output (a user's own lossy pass)."""
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            out.args = (gm.graph.call_function(torch.mul, (out.args[0], times)),)
        ctx.note(f"times {times}")

    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    x = torch.randn(1, 1, 6, 6)
    opt = graphopt.optimize(m, ["fuse_conv_bn", ("my_double_output", {"times": 3})], example_inputs=(x,))
    r = opt.report["my_double_output"]
    assert r.status == "applied" and r.messages == ["times 3"], (r.status, r.reason)
    assert torch.allclose(opt(x), 3 * m(x), atol=1e-5)
    print("OK", opt.report.records[0].status)
''')


def test_decorated_function_in_a_script(tmp_path):
    script = tmp_path / "my_pipeline.py"
    script.write_text(USER_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK applied"


def test_installed_package_entry_point(tmp_path):
    """pip-install a plugin package into a fresh venv; graphopt finds its pass by entry point only."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # let the fresh venv see this environment's packages (torch, graphopt) without copying them
    target_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(target_site, "_parent_env.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", os.path.join(HERE, "plugin_pkg")],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    check = textwrap.dedent('''
        import torch, torch.nn as nn, graphopt
        assert "swap_relu_for_functional" in graphopt.list_passes(), graphopt.list_passes()
        m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        opt = graphopt.optimize(m, ["swap_relu_for_functional"], example_inputs=(torch.randn(1, 1, 5, 5),))
        r = opt.report.records[0]
        print(r.status, r.nodes_added, r.nodes_removed, r.messages)
    ''')
    out = subprocess.run([str(py), "-c", check], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "applied ['relu'] ['_1'] ['1 -> torch.relu']"
    # and the plugin is not visible from this environment, where it was never installed
    assert "swap_relu_for_functional" not in subprocess.run(
        [sys.executable, "-c", "import graphopt; print(graphopt.list_passes())"],
        capture_output=True, text=True).stdout
