"""The quantized graph compiled with TVM: integer kernels, and the same answers as the simulation."""
import re
import subprocess

import pytest
import torch

import graphopt
import zoo
from requirements import needs_arm_toolchain, needs_fashion_mnist

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def calibration(shape, n=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape[1:], generator=g) for _ in range(n)]


def quantized(model, inputs, options=None, passes=("fuse_conv_bn",), target=None, **kwargs):
    return graphopt.optimize(model, [*passes, ("quantize", options or {})], target=target, example_inputs=inputs,
                             calibration_data=calibration(inputs[0].shape), progress=False, on_error="raise",
                             tune_trials=0 if target else None, measure_latency=False, **kwargs)


def int8_conv_kernels(ir: str):
    """Compiled kernels multiplying uint8/int8 activations by int8 weights into an int32 accumulator:
    the packed conv a conv or linear becomes (or a direct grouped conv)."""
    found = []
    for m in re.finditer(r"def (\w*(?:conv)\w*)\((.*?)\):\n(.*?)(?=\n    @T\.prim_func|\n    @R\.function|\Z)",
                         ir, re.S):
        name, params, body = m.groups()
        dtypes = re.findall(r'\w+: T\.Buffer\(\(.*?\), "(\w+)"\)', params)
        int8_inputs = sum(1 for d in dtypes if d in ("uint8", "int8"))
        int32_acc = re.search(r'(conv\w*)_intermediate = T\.sblock_alloc_buffer\([^\n]*"int32"\)', body)
        if int8_inputs >= 2 and "int8" in dtypes and int32_acc:
            found.append(name)
    return found


def agreement(a, b):
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def test_every_graphopt_op_has_a_translation():
    from graphopt.ops.int8 import OP_NAMES, OPS
    from graphopt.targets.lowering import translations

    assert set(OP_NAMES) <= set(translations())
    assert all(hasattr(torch.ops.graphopt, op) for op in OPS)


def test_compiled_ir_has_int8_convolutions_with_int32_accumulation():
    model, inputs = zoo.build("residual")
    opt = quantized(model, inputs, target="x86")
    ir = opt.compiled.ir()
    kernels = int8_conv_kernels(ir)
    n_convs = sum(1 for m in opt.graph_module.modules() if type(m).__name__ == "QuantizedConv")
    assert len(kernels) >= n_convs - 4, kernels  # identical convs share a kernel
    assert "conv_packed" in ir
    x = calibration(inputs[0].shape, n=1, batch=1, seed=3)[0]
    assert torch.equal(opt(x), opt.graph_module(x))  # bit-exact: same integer math, same float32 steps


def test_int8_artifact_saves_loads_and_runs_the_same(tmp_path):
    model, inputs = zoo.build("residual")
    opt = quantized(model, inputs, target="x86")
    x = calibration(inputs[0].shape, n=1, batch=1, seed=4)[0]
    with graphopt.load(opt.compiled.save(tmp_path / "int8")) as loaded:
        assert torch.equal(torch.as_tensor(loaded(x)), opt(x))
        assert "conv_packed" in loaded.ir()


@pytest.mark.parametrize("name", ["mobilenetv2", "conv1d", "flatten_linear", "se_resnext"])
def test_compiled_agrees_with_simulated(name):
    model, inputs = zoo.build(name)
    batch = (16, *inputs[0].shape[1:])
    example = (torch.randn(batch, generator=torch.Generator().manual_seed(5)),)
    opt = quantized(model, example, target="x86")
    for seed in range(3):
        x = torch.randn(batch, generator=torch.Generator().manual_seed(100 + seed))
        simulated, compiled = opt.graph_module(x), opt(x)
        assert agreement(simulated, compiled) >= 0.99
        assert float((simulated - compiled).abs().max()) <= 1e-5 * float(simulated.abs().max())


def test_int8_activations_matmul_and_functional_conv_compile_exactly():
    torch.manual_seed(0)
    model = zoo.MatmulNet().eval()
    inputs = (torch.randn(4, 16, 8),)
    opt = quantized(model, inputs, {"activation_dtype": "int8"}, passes=(), target="x86")
    x = torch.randn(4, 16, 8)
    assert torch.equal(opt(x), opt.graph_module(x))
    assert "int8" in opt.compiled.ir()


def test_per_tensor_and_relu6_compile_exactly():
    model, inputs = zoo.build("mobilenetv2")
    opt = quantized(model, inputs, {"per_channel": False, "observer": "percentile"}, target="x86")
    x = torch.randn(*inputs[0].shape)
    assert torch.equal(opt(x), opt.graph_module(x))


# --- the bundled Fashion-MNIST model ---------------------------------------------------------------

@needs_fashion_mnist
def test_fashion_mnist_compiled_int8_accuracy_and_agreement():
    from graphopt import data
    from graphopt.models import fashion_cnn as models

    model = models.load_default_model()
    batch = 250
    images, labels = data.fashion_mnist_batches("test", batch_size=batch)[0]
    opt = graphopt.optimize(model, ["fuse_conv_bn", "quantize"], target="x86", example_inputs=(images,),
                            calibration_data=data.calibration_batches(8, 64), progress=False, on_error="raise",
                            tune_trials=0, measure_latency=False)
    limit = 1000  # untuned TVM kernels are slow; the benchmark measures all 10,000 images
    fp32 = models.evaluate_accuracy(model, batch_size=batch, limit=limit)
    simulated = models.evaluate_accuracy(opt.graph_module, batch_size=batch, limit=limit)
    compiled = models.evaluate_accuracy(opt.compiled, batch_size=batch, limit=limit)
    assert compiled >= fp32 - 0.01 and simulated >= fp32 - 0.01, (fp32, simulated, compiled)
    agree = [agreement(opt.graph_module(x), opt.compiled(x)) for x, _ in data.fashion_mnist_batches("test", batch, limit)]
    assert min(agree) >= 0.99


# --- ARM, cross-compiled and run under qemu ------------------------------------------------------



@needs_arm_toolchain
@pytest.mark.parametrize("name,target,options", [("residual", "arm-rpi4", {}), ("conv1d", "arm-a55", {}),
                                                 ("flatten_linear", "arm-rpi4", {"activation_dtype": "uint8"})])
def test_arm_compiled_agrees_with_simulated(name, target, options):
    model, inputs = zoo.build(name)
    example = (torch.randn(8, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(2)),)
    opt = quantized(model, example, options, target=target)
    try:
        assert opt.compiled.target.emulated
        want = torch.uint8 if options else torch.int8  # auto: int8 activations on AArch64 (sdot is signed)
        assert all(m.x_qparams.dtype == want for m in opt.graph_module.modules() if hasattr(m, "x_qparams"))
        assert int8_conv_kernels(opt.compiled.ir())
        x = torch.randn(*example[0].shape, generator=torch.Generator().manual_seed(9))
        assert torch.equal(opt(x), opt.graph_module(x))
    finally:
        opt.compiled.close()


@needs_arm_toolchain
@needs_fashion_mnist
def test_fashion_mnist_int8_on_arm_under_qemu():
    from graphopt import data
    from graphopt.models import fashion_cnn as models

    model = models.load_default_model()
    batch, limit = 250, 500  # emulated and untuned: about 10 s per batch
    images, _ = data.fashion_mnist_batches("test", batch_size=batch)[0]
    opt = graphopt.optimize(model, ["fuse_conv_bn", "quantize"], target="arm-rpi4", example_inputs=(images,),
                            calibration_data=data.calibration_batches(8, 64), progress=False, on_error="raise",
                            tune_trials=0, measure_latency=False)
    try:
        fp32 = models.evaluate_accuracy(model, batch_size=batch, limit=limit)
        compiled = models.evaluate_accuracy(opt.compiled, batch_size=batch, limit=limit)
        assert compiled >= fp32 - 0.01, (fp32, compiled)
        for x, _ in data.fashion_mnist_batches("test", batch, limit):
            assert agreement(opt.graph_module(x), opt.compiled(x)) >= 0.99
    finally:
        opt.compiled.close()


# --- tuned code uses the dot-product instructions (tiny budgets, private caches) --------------------

needs_vnni = pytest.mark.skipif(
    "avx512_vnni" not in graphopt.get_target("x86").features,
    reason="this CPU has no AVX-512 VNNI, so there is no vpdpbusd to look for (int8 still runs, as plain vector code)")


def _disassembly(compiled, tmp_path, objdump):
    lib = compiled.save(tmp_path / "model") / "model.so"
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                          check=True).stdout


def _two_convs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 32, 1)).eval()
    return model, (torch.randn(1, 16, 14, 14),)


@needs_vnni
def test_tuned_x86_int8_uses_vnni(tmp_path):
    target = graphopt.get_target("x86")
    model, inputs = _two_convs()
    opt = graphopt.optimize(model, ["quantize"], target=target.replace(cache_dir=str(tmp_path / "cache")),
                            example_inputs=inputs, calibration_data=calibration(inputs[0].shape), progress=False,
                            on_error="raise", tune_trials=8, measure_latency=False)
    assert torch.equal(opt(*inputs), opt.graph_module(*inputs))
    asm = _disassembly(opt.compiled, tmp_path, "objdump")
    assert re.search(r"\svpdpbusd\s", asm), "tuned int8 GEMMs should be tensorized with VNNI (dot_16x4_vnni)"


def _conv_design_spaces(target_name, activation_dtype):
    """MetaSchedule's design spaces for the packed int8 conv tasks of a small quantized model."""
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.measure import load_cpu_intrinsics
    from graphopt.targets.pipeline import prepare

    model, inputs = _two_convs()
    gm = quantized(model, inputs, {"activation_dtype": activation_dtype}, passes=()).graph_module
    target = graphopt.get_target(target_name)
    tvm_target = target.tvm()
    load_cpu_intrinsics()
    prepared = prepare(target.lower(gm, inputs).mod, tvm_target)
    traces = []
    for task in ms.relax_integration.extract_tasks(prepared, tvm_target):
        if "conv_packed" in task.task_name:
            ctx = ms.TuneContext(mod=task.dispatched[0], target=tvm_target, space_generator="post-order-apply",
                                 task_name=task.task_name)
            traces += [str(sch.trace) for sch in ctx.space_generator.generate_design_space(ctx.mod)]
    assert traces
    return traces


@pytest.mark.parametrize("target_name,dtype,intrinsic", [
    pytest.param("x86", "uint8", "dot_16x4_vnni", marks=needs_vnni),
    ("arm-a55", "int8", "dot_4x4_i8i8s32_sdot"),
    ("arm-neoverse-n1", "int8", "dot_4x4_i8i8s32_sdot"),
    ("arm-rpi4", "int8", "dot_4x4_i8i8s32_neon"),
])
def test_int8_convs_are_offered_to_the_cores_dot_product(target_name, dtype, intrinsic):
    traces = _conv_design_spaces(target_name, dtype)
    assert any(intrinsic in t for t in traces), "MetaSchedule would never tensorize these convs"
    if target_name == "arm-rpi4":
        assert not any("sdot" in t for t in traces)  # the Cortex-A72 has no dot product: it would SIGILL


@needs_arm_toolchain
@pytest.mark.slow
def test_tuned_arm_int8_uses_sdot(tmp_path):
    from graphopt.targets.testing import LoopbackDeviceFarm

    model, inputs = _two_convs()
    base = graphopt.get_target("arm-a55")
    with LoopbackDeviceFarm(cpu=base.qemu_cpu, key="q8-a55") as farm:
        target = base.replace(tracker=farm.tracker, key=farm.key, cache_dir=str(tmp_path / "cache"))
        opt = graphopt.optimize(model, ["quantize"], target=target, example_inputs=inputs,
                                calibration_data=calibration(inputs[0].shape), progress=False, on_error="raise",
                                tune_trials=16, measure_latency=False)
        try:  # the model runs on the farm's device: check it before the farm goes away
            assert torch.equal(torch.as_tensor(opt(*inputs)), opt.graph_module(*inputs))
            assert re.search(r"\ssdot\s", _disassembly(opt.compiled, tmp_path, "aarch64-linux-gnu-objdump"))
        finally:
            opt.compiled.close()


def _inverted_residual():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.ReLU6(),
                                torch.nn.Conv2d(32, 16, 1)).eval()
    return model, (torch.randn(1, 16, 14, 14),)


def _depthwise_kernel_asm(asm: str) -> str:
    """The disassembly of the compiled depthwise kernel(s) alone."""
    parts = re.findall(r"^[0-9a-f]+ <([^>]*depthwise_blocked[^>]*)>:\n(.*?)(?=\n\n|\Z)", asm, re.S | re.M)
    assert parts, "no depthwise_blocked function in the library"
    return "\n".join(body for _, body in parts)


def test_tuned_x86_int8_depthwise_is_vector_code_on_the_blocks(tmp_path):
    """The hand-written space of the int8 depthwise kernel: 16 channels per vector, the taps
    unrolled, widening integer multiply-adds (no scalar loop over the channels)."""
    target = graphopt.get_target("x86")
    model, inputs = _inverted_residual()
    opt = graphopt.optimize(model, ["quantize"], target=target.replace(cache_dir=str(tmp_path / "cache")),
                            example_inputs=inputs, calibration_data=calibration(inputs[0].shape), progress=False,
                            on_error="raise", tune_trials=8, measure_latency=False)
    assert torch.equal(opt(*inputs), opt.graph_module(*inputs))
    asm = _depthwise_kernel_asm(_disassembly(opt.compiled, tmp_path, "objdump"))
    vector_madds = re.findall(r"\s(vpmulld|vpmaddwd|vpdpbusd|vpdpwssd)\s+%[xyz]mm", asm)
    assert len(vector_madds) >= 9, "each of the 9 taps should multiply a whole channel block at once"


@needs_arm_toolchain
@pytest.mark.slow
def test_tuned_arm_int8_depthwise_is_neon_code_on_the_blocks(tmp_path):
    from graphopt.targets.testing import LoopbackDeviceFarm

    model, inputs = _inverted_residual()
    base = graphopt.get_target("arm-a55")
    with LoopbackDeviceFarm(cpu=base.qemu_cpu, key="q8dw-a55") as farm:
        target = base.replace(tracker=farm.tracker, key=farm.key, cache_dir=str(tmp_path / "cache"))
        opt = graphopt.optimize(model, ["quantize"], target=target, example_inputs=inputs,
                                calibration_data=calibration(inputs[0].shape), progress=False, on_error="raise",
                                tune_trials=8, measure_latency=False)
        try:
            assert torch.equal(torch.as_tensor(opt(*inputs)), opt.graph_module(*inputs))
            asm = _depthwise_kernel_asm(_disassembly(opt.compiled, tmp_path, "aarch64-linux-gnu-objdump"))
            neon_madds = re.findall(r"\s(smlal2?|mla|sdot|smull2?)\s+v\d+\.4s", asm)
            assert len(neon_madds) >= 9, "each tap should multiply-add whole channel blocks in NEON registers"
        finally:
            opt.compiled.close()
