"""The x86 target: registry and presets, CPU detection, validation, lowering, and numerics.

Every model here is really lowered to Relax, compiled with LLVM for this host's CPU and run
through the Relax VM; outputs must match the torch graph within 1e-4 relative error
(max abs diff / max abs of the reference).
"""
import json
import logging
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import InputShapeError, TargetError, UnknownNameError
from graphopt.targets import Target
from graphopt.targets.hostcpu import HostCpu, host_cpu, pick_x86_mcpu, x86_vector_lanes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

import zoo


# --- a small local zoo: the patterns lowering must handle ----------------------------------

class ResidualAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        return F.relu(y + self.c2(y))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return F.relu6(self.bn(self.pw(self.dw(x))))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), F.max_pool2d(self.b(x), 3, 1, 1)], dim=1)


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 8, 5, padding=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).mean(-1))


LOCAL = {
    "residual_add": (ResidualAdd, (1, 3, 8, 8)),
    "depthwise": (Depthwise, (1, 8, 8, 8)),
    "concat": (Concat, (1, 4, 8, 8)),
    "flatten_linear": (FlattenLinear, (1, 1, 8, 8)),
    "conv1d": (Conv1d, (1, 3, 16)),
}


def build_local(name):
    factory, shape = LOCAL[name]
    torch.manual_seed(0)
    model = factory().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return torch.fx.symbolic_trace(model), (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)


def rel_error(out, ref):
    out, ref = out.detach(), ref.detach()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def x86():
    return graphopt.get_target("x86")


# --- registry and presets ------------------------------------------------------------------

def test_builtin_targets_are_registered_through_the_entry_point():
    names = graphopt.list_targets()
    assert {"x86", "arm", "arm-rpi4", "arm-neoverse-n1", "arm-a55"} <= set(names)
    assert graphopt.get_target("arm-rpi4").mcpu == "cortex-a72"
    assert graphopt.get_target("arm-neoverse-n1").features == ("neon", "dotprod")
    assert "dotprod" not in graphopt.get_target("arm-rpi4").features
    assert all(graphopt.get_target(n).description for n in names)


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as e:
        graphopt.get_target("arm-rpi5")
    msg = str(e.value)
    assert "arm-rpi4" in msg and "x86" in msg and "Did you mean" in msg


def test_x86_preset_uses_a_real_llvm_cpu(x86):
    from tvm.target import codegen

    assert x86.mcpu and x86.mcpu != "native"
    assert codegen.llvm_is_valid_cpu(x86.mcpu, "x86_64-linux-gnu")
    cpu = host_cpu()
    assert x86.mcpu == pick_x86_mcpu(cpu)
    assert x86.preferred_channel_multiple == x86_vector_lanes(cpu) in (4, 8, 16)
    assert set(x86.features) <= cpu.flags
    assert x86.native and not x86.emulated and x86.runtime_threads >= 1


@pytest.mark.parametrize("vendor,flags,mcpu,lanes", [
    ("GenuineIntel", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma"}, "cascadelake", 16),
    ("AuthenticAMD", {"avx512f", "avx512_vnni", "avx512_bf16", "avx2", "fma"}, "znver4", 16),
    ("GenuineIntel", {"amx_tile", "avx512_fp16", "avx512_vnni", "avx512f"}, "sapphirerapids", 16),
    ("GenuineIntel", {"avx", "avx2", "fma", "bmi2"}, "haswell", 8),
    ("AuthenticAMD", {"avx", "avx2", "fma"}, "znver1", 8),
    ("", set(), "x86-64", 4),
])
def test_mcpu_table(vendor, flags, mcpu, lanes):
    cpu = HostCpu(arch="x86_64", vendor=vendor, flags=frozenset(flags))
    assert pick_x86_mcpu(cpu) == mcpu
    assert x86_vector_lanes(cpu) == lanes


def test_cpuinfo_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU\n"
                    "flags\t\t: fpu sse4_2 avx avx2 fma bmi2\n\nprocessor\t: 1\nflags\t: fpu\n")
    cpu = host_cpu(str(info))
    assert cpu.vendor == "GenuineIntel" and cpu.model_name == "Test CPU"
    assert pick_x86_mcpu(cpu) == "haswell"
    assert host_cpu(str(tmp_path / "missing")).flags == frozenset()


# --- validation ----------------------------------------------------------------------------

def test_target_fields_are_validated():
    base = dict(name="t", tvm_target={"kind": "llvm"})
    with pytest.raises(TargetError, match="kind"):
        Target(name="t", tvm_target={"mcpu": "znver4"})
    with pytest.raises(TargetError, match="not both"):
        Target(**base, rpc="h:1", tracker="h:2", key="k")
    with pytest.raises(TargetError, match="key"):
        Target(**base, tracker="h:2")
    with pytest.raises(TargetError, match="num_threads"):
        Target(**base, num_threads=0)


def test_native_mcpu_is_refused_with_a_clear_error():
    t = Target(name="bad", tvm_target={"kind": "llvm", "mcpu": "native"})
    with pytest.raises(TargetError, match="native"):
        t.tvm()


def test_missing_toolchain_names_the_debian_package(monkeypatch):
    import graphopt.targets.target as target_mod

    real = target_mod.shutil.which
    monkeypatch.setattr(target_mod.shutil, "which",
                        lambda tool: None if tool in ("aarch64-linux-gnu-g++", "qemu-aarch64") else real(tool))
    with pytest.raises(TargetError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        graphopt.get_target("arm-rpi4").check_toolchain()
    monkeypatch.setattr(target_mod.shutil, "which", lambda tool: None if tool == "qemu-aarch64" else real(tool))
    with pytest.raises(TargetError, match="apt-get install qemu-user"):
        graphopt.get_target("arm").check_toolchain()


def test_replace_and_round_trip_through_a_dict():
    t = graphopt.get_target("arm-rpi4").replace(name="pi", tracker="127.0.0.1:9190", key="rpi4")
    assert t.remote and not t.emulated and t.mcpu == "cortex-a72"
    assert Target.from_dict(t.to_dict()) == t
    with pytest.raises(TargetError, match="unknown target fields"):
        Target.from_dict({**t.to_dict(), "colour": "red"})


# --- lowering ------------------------------------------------------------------------------

def test_weights_become_parameters_not_constants(x86):
    gm, inputs = build_local("depthwise")
    low = x86.lower(gm, inputs)
    names = [s.name for s in low.param_specs]
    assert any("running_mean" in n for n in names)  # BatchNorm buffers are parameters too
    assert len(low.params) == len(names) and low.inputs[0].shape == (1, 8, 8, 8)
    assert len(low.mod["main"].params) == len(low.inputs) + len(low.params)


# In a fresh interpreter: compile a float graph before any pass is looked up, then again after
# pass discovery imported every built-in pass (the quantize pass among them). The max pooling has
# an omitted stride with padding, which the Relax frontend receives as stride [] and rejects.
_FRESH_COMPILE = """
import json, sys
import torch, torch.nn as nn, torch.nn.functional as F
import graphopt

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        y = F.relu(self.conv(x))
        y = F.max_pool2d(y, 3, padding=1)
        y = torch.sigmoid(y) * y + y
        return self.pool(torch.clamp(y - 0.5, min=0.0))

torch.manual_seed(0)
gm, x = torch.fx.symbolic_trace(Net().eval()), torch.randn(1, 3, 16, 16)
target = graphopt.get_target("x86")
before = "graphopt.passes.quantize" in sys.modules
fresh = target.compile(gm, (x,))
graphopt.list_passes()
after = "graphopt.passes.quantize" in sys.modules
discovered = target.compile(gm, (x,))
error = float((fresh(x) - gm(x)).abs().max() / gm(x).abs().max())
print(json.dumps({"imported": [before, after], "ir": [fresh.ir(), discovered.ir()], "error": error}))
"""


def test_a_float_graph_lowers_the_same_whatever_was_imported():
    """graphopt's ATen translations (blocked-copy aware elementwise and pooling ops, the
    omitted-stride max pooling fix) belong to the lowering, not to the quantize pass."""
    out = subprocess.run([sys.executable, "-c", _FRESH_COMPILE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported"] == [False, True]  # the first compile really ran before discovery
    fresh, discovered = result["ir"]
    assert fresh == discovered
    assert "max_pool2d" in fresh and result["error"] < 1e-4


@torch.library.custom_op("graphopt_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.graphopt_test.twice(self.fc(x))


def test_stateful_translations_get_one_state_per_lowering(x86):
    """``with_state=True``: ``fn(node, importer, state)`` with a fresh LoweringState per lower()
    call (nothing kept on TVM's importer); a plain ``fn(node, importer)`` keeps TVM's contract."""
    from tvm import relax
    from tvm.relax import op as R

    from graphopt.targets import lowering, translations

    seen = []

    def emit_twice(node, importer):
        return importer.block_builder.emit(R.multiply(importer.env[node.args[0]], relax.const(2.0, "float32")))

    def stateful(node, importer, state):
        seen.append(state)
        return emit_twice(node, importer)

    gm, x = torch.fx.symbolic_trace(Twice().eval()), torch.randn(1, 4)
    try:
        lowering.register_translation("twice.default", with_state=True)(stateful)
        x86.lower(gm, (x,))
        x86.lower(gm, (x,))
        assert len(seen) == 2 and all(isinstance(s, lowering.LoweringState) for s in seen)
        assert seen[0] is not seen[1]
        translations._TRANSLATIONS.pop("twice.default")
        lowering.register_translation("twice.default")(emit_twice)  # TVM's contract, unchanged
        assert torch.allclose(torch.as_tensor(x86.compile(gm, (x,))(x)), gm(x))
    finally:
        translations._TRANSLATIONS.pop("twice.default", None)
        translations._WITH_STATE.pop("twice.default", None)


def test_lowering_hooks(x86):
    from graphopt.targets import lowering

    seen = []

    @lowering.register_relax_rewrite("test-count-functions")
    def count(mod):
        seen.append(len(mod.get_global_vars()))
        return mod

    try:
        gm, inputs = build_local("concat")
        x86.lower(gm, inputs)
        assert seen == [1]
        with pytest.raises(ValueError, match="already registered"):
            lowering.register_relax_rewrite("test-count-functions")(lambda mod: mod)
    finally:
        lowering._REWRITES.pop("test-count-functions", None)


def test_non_tensor_example_inputs_are_refused(x86):
    gm, _ = build_local("concat")
    with pytest.raises(InputShapeError):
        x86.lower(gm, (3.0,))


# --- numerics ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LOCAL))
def test_local_models_compile_and_match(x86, name):
    gm, inputs = build_local(name)
    with x86.compile(gm, inputs) as compiled:
        assert rel_error(compiled(*inputs), gm(*inputs)) < 1e-4


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_compiles_for_x86_and_matches(x86, name):
    model, inputs = zoo.build(name)
    gm = torch.fx.symbolic_trace(model)
    with x86.compile(gm, inputs) as compiled:
        out, ref = compiled(*inputs), gm(*inputs)
        assert out.shape == ref.shape
        assert rel_error(out, ref) < 1e-4


def test_channel_block_choice():
    from graphopt.targets.layouts import choose_block

    assert choose_block(64, 128, 16) == 16
    assert choose_block(24, 144, 16) == 8
    assert choose_block(12, 36, 16) == 4
    assert choose_block(3, 32, 16) == 0  # an RGB stem shares no block with its output...
    assert choose_block(64, 64, 8) == 8


@pytest.mark.parametrize("block", [0, 4])
def test_layouts_are_a_choice_and_blocked_kernels_are_used(x86, block):
    gm, inputs = build_local("depthwise")
    with x86.replace(layout_block=block).compile(gm, inputs) as compiled:
        assert rel_error(compiled(*inputs), gm(*inputs)) < 1e-4
        ir = compiled.ir()
        assert ("conv2d_NCHWc" in ir) == bool(block)
        assert ("depthwise_conv2d_NCHWc" in ir) == bool(block)


@pytest.mark.parametrize("c_in", [1, 3])
def test_a_narrow_stem_reads_its_channels_as_one_block(x86, c_in):
    """...so it reads NCHW{c_in}c and writes NCHW16c: the blocked kernel, not plain NCHW."""
    model = nn.Sequential(nn.Conv2d(c_in, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    gm, x = torch.fx.symbolic_trace(model), torch.randn(1, c_in, 16, 16)
    with x86.replace(layout_block=16).compile(gm, (x,)) as compiled:
        kernels = re.findall(r"def (\w+)\(", compiled.ir())
        convs = [k for k in kernels if "conv2d" in k]
        assert len(convs) == 2 and all("NCHWc" in k for k in convs), convs
        assert rel_error(compiled(x), gm(x)) < 1e-4


def test_relu6_keeps_the_blocked_layout_and_fuses(x86):
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 1), nn.ReLU6()).eval()
    gm, x = torch.fx.symbolic_trace(model), torch.randn(1, 16, 6, 6)
    with x86.replace(layout_block=16).compile(gm, (x,)) as compiled:
        kernels = re.findall(r"def (\w+)\(", compiled.ir())
        assert not [k for k in kernels if "clip" in k]  # no ReLU6 kernel of its own...
        fused = [k for k in kernels if "conv2d_NCHWc" in k]
        assert len(fused) == 2 and all("maximum_minimum" in k for k in fused)  # ...it is in the convs
        assert rel_error(compiled(x), gm(x)) < 1e-4


class ConcatIntoConv(nn.Module):
    """24 + 8 channels (NCHW8c each) concatenated into a 32-channel conv, whose input block
    by channel count is 16: a change of block TVM's ConvertLayout cannot make."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(16, 24, 1), nn.Conv2d(16, 8, 1), nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_blocks_that_meet_in_a_concat_fall_back_to_one_block_for_the_model(caplog):
    from graphopt.targets.layouts import uniform_block

    gm, x = torch.fx.symbolic_trace(ConcatIntoConv().eval()), torch.randn(1, 16, 6, 6)
    x86 = graphopt.get_target("x86")
    assert uniform_block(x86.lower(gm, (x,)).mod, 16) == 8
    with caplog.at_level(logging.INFO, logger="graphopt"), x86.replace(layout_block=16).compile(gm, (x,)) as compiled:
        assert rel_error(compiled(x), gm(x)) < 1e-4
        ir = compiled.ir()
    assert "(per-conv blocks) not applied" in caplog.text and "(uniform blocks) not applied" not in caplog.text
    assert "T.int64(1), T.int64(4), T.int64(6), T.int64(6), T.int64(8))" in ir  # the conv's input: NCHW8c


def test_x86_default_layout_follows_the_vector_width(x86):
    assert x86.layout_block == (x86.preferred_channel_multiple if x86.preferred_channel_multiple >= 8 else 0)


def test_optimize_compiles_for_x86_end_to_end(caplog):
    gm, inputs = build_local("residual_add")
    with caplog.at_level(logging.INFO, logger="graphopt"):
        opt = graphopt.optimize(gm, target="x86", example_inputs=inputs, progress=False,
                                measure_latency=False)
    compiled = opt.compiled
    assert compiled.target.name == "x86"
    assert rel_error(compiled(*inputs), gm(*inputs)) < 1e-4
    assert compiled.num_threads == graphopt.get_target("x86").runtime_threads
    assert "lowered to Relax" in caplog.text


def test_measure_latency_is_a_positive_median_and_builds_are_reused(x86):
    from graphopt.targets import target as target_mod

    gm, inputs = build_local("conv1d")
    first = x86.measure_latency(gm, inputs, repeat=5)
    builds = len(target_mod._LATENCY_BUILDS)
    second = x86.measure_latency(gm, inputs, repeat=5)
    assert first > 0 and second > 0
    assert len(target_mod._LATENCY_BUILDS) == builds  # the same graph is not rebuilt


def test_emulated_latency_is_not_a_number(recwarn):
    import math

    gm, inputs = build_local("conv1d")
    assert math.isnan(graphopt.get_target("arm").measure_latency(gm, inputs))


@pytest.mark.parametrize("name", ["graphopt.targets", "graphopt.targets.target", "graphopt.targets.presets",
                                  "graphopt.targets.hostcpu", "graphopt.targets.lowering", "graphopt.targets.translations",
                                  "graphopt.targets.aten", "graphopt.targets.coverage",
                                  "graphopt.targets.layouts", "graphopt.targets.tuning",
                                  "graphopt.targets.schedules", "graphopt.targets.schedules.common"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
