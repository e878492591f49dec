"""ARM targets end to end on an x86 host: cross-compiled, run under qemu or over TVM RPC.

Nothing here is mocked: the library is linked with aarch64-linux-gnu-g++, is an aarch64
ELF, and runs in an aarch64 Python under qemu-aarch64 with QEMU_CPU set from the target,
or on an emulated RPC server registered with a tracker on loopback.
"""

import numpy as np
import pytest
import torch

import graphopt
import zoo
from requirements import needs_arm_toolchain
from graphopt.targets.arm_sysroot import ensure_sysroot
from graphopt.targets.artifact import LIB
from graphopt.targets.qemu import elf_machine

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    needs_arm_toolchain,
]

DOTPROD_SUBSET = ("mobilenetv2",)


def rel_error(out, ref):
    out, ref = torch.as_tensor(out).detach(), ref.detach()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def sysroot():
    return ensure_sysroot(progress=False)


@pytest.fixture(scope="module")
def rpi4_residual(sysroot):
    model, inputs = zoo.build("residual")
    gm = torch.fx.symbolic_trace(model)
    compiled = graphopt.get_target("arm-rpi4").compile(gm, inputs)
    yield gm, inputs, compiled
    compiled.close()


def test_arm_build_is_an_aarch64_library_run_under_qemu(rpi4_residual, tmp_path):
    gm, inputs, compiled = rpi4_residual
    assert compiled.target.emulated and compiled.target.qemu_cpu == "cortex-a72"
    assert rel_error(compiled(*inputs), gm(*inputs)) < 1e-4
    saved = compiled.save(tmp_path / "rpi4")
    assert elf_machine(saved / LIB) == "aarch64"
    assert "cortex-a72" in (saved / "manifest.json").read_text()


def test_arm_save_load_round_trip(rpi4_residual, tmp_path):
    gm, inputs, compiled = rpi4_residual
    saved = compiled.save(tmp_path / "rpi4")
    with graphopt.load(saved) as loaded:
        assert loaded.target.name == "arm-rpi4" and loaded.target.emulated
        out = loaded(inputs[0].numpy())
        assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(out, compiled(*inputs).numpy())
        assert loaded.benchmark(repeat=2, warmup=0).where == "qemu"


def test_tuning_an_emulated_target_warns_and_builds_untuned(sysroot):
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval())
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="emulation"):
        compiled = graphopt.get_target("arm").compile(gm, (x,), tune_trials=8)
    with compiled:
        assert compiled.tuning.trials_run == 0 and "tracker" in compiled.tuning.note
        assert rel_error(compiled(x), gm(x)) < 1e-4


def test_optimize_for_an_emulated_target_reports_no_latency(sysroot):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    opt = graphopt.optimize(model, ["fuse_conv_bn"], target="arm", example_inputs=(x,), progress=False)
    with opt.compiled:
        record = opt.report["fuse_conv_bn"]
        assert record.status == "applied" and record.latency_ms_after is None  # qemu timings mean nothing
        assert "nan" not in opt.report.to_text().lower()
        assert rel_error(opt.compiled(x), opt.graph_module(x)) < 1e-4


@pytest.mark.parametrize("name", DOTPROD_SUBSET)
def test_zoo_subset_on_a_dotprod_core(sysroot, name):
    model, inputs = zoo.build(name)
    gm = torch.fx.symbolic_trace(model)
    with graphopt.get_target("arm-neoverse-n1").compile(gm, inputs) as compiled:
        assert rel_error(compiled(*inputs), gm(*inputs)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_on_arm(sysroot, name):
    model, inputs = zoo.build(name)
    gm = torch.fx.symbolic_trace(model)
    with graphopt.get_target("arm").compile(gm, inputs) as compiled:
        assert rel_error(compiled(*inputs), gm(*inputs)) < 1e-4


# --- a device behind a tracker -------------------------------------------------------------

@pytest.fixture(scope="module")
def farm(sysroot):
    from graphopt.targets.testing import LoopbackDeviceFarm

    with LoopbackDeviceFarm(cpu="cortex-a72", sysroot=sysroot) as farm:
        yield farm


def test_target_with_a_tracker_runs_remotely_and_matches(farm, tmp_path):
    model, inputs = zoo.build("residual")
    gm = torch.fx.symbolic_trace(model)
    target = graphopt.get_target("arm-rpi4").replace(tracker=farm.tracker, key=farm.key)
    with target.compile(gm, inputs) as compiled:
        assert compiled.target.remote
        assert rel_error(compiled(*inputs), gm(*inputs)) < 1e-4
        assert compiled.benchmark(repeat=2, warmup=0).where == "rpc"
        saved = compiled.save(tmp_path / "remote")
    with graphopt.load(saved) as again:  # the manifest remembers the tracker
        assert rel_error(again(*inputs), gm(*inputs)) < 1e-4


@pytest.mark.slow
def test_tuning_measures_on_the_remote_device(farm, tmp_path):
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval())
    x = torch.randn(1, 3, 8, 8)
    target = graphopt.get_target("arm-rpi4").replace(tracker=farm.tracker, key=farm.key,
                                                    cache_dir=str(tmp_path))
    with target.compile(gm, (x,), tune_trials=2) as compiled:
        assert compiled.tuning.trials_run >= 1 and compiled.tuning.tasks_with_records >= 1
        assert rel_error(compiled(x), gm(x)) < 1e-4
