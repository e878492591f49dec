"""Valid models that used to fail inside TVM compile and run: without weights, in float16 or
bfloat16 (computed in float32, the caller's dtypes kept at the boundary), saved and loaded."""
import pytest
import torch
import torch.nn as nn

import graphopt
from requirements import needs_arm_toolchain

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _compile(model, x, target="x86"):
    return graphopt.optimize(model, ["fuse_conv_bn"], target, example_inputs=(x,), progress=False)


@pytest.mark.parametrize("target", ["x86", pytest.param("arm", marks=needs_arm_toolchain)])
def test_a_model_without_weights(target):
    model = nn.Sequential(nn.ReLU(), nn.AvgPool2d(2), nn.Hardswish()).eval()
    x = torch.randn(1, 3, 8, 8)
    opt = _compile(model, x, target)
    assert opt.compiled.summary()["target"] == target
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_compile_in_float32(dtype, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    model = model.to(dtype).eval()
    x = torch.randn(1, 3, 8, 8).to(dtype)
    opt = _compile(model, x)
    name = str(dtype).replace("torch.", "")
    assert f"compiled in float32: the model is {name}" in opt.report.compile["notes"]
    y = opt(x)
    assert y.dtype == dtype and y.shape == (1, 4)
    reference = model.float()(x.float())
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)  # the caller's dtype rounds
    with pytest.raises(graphopt.InputShapeError, match=f"must be \\[1, 3, 8, 8\\] {name}, got \\[1, 3, 8, 8\\] float32"):
        opt(x.float())
    opt.compiled.save(tmp_path / "half")
    with graphopt.load(tmp_path / "half") as loaded:
        assert torch.equal(loaded(x), y)


def test_a_zero_dim_output_keeps_its_shape():
    """x.sum() is a 0-d tensor in PyTorch and out of the compiled model alike."""
    class Total(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x).sum(), x.mean()

    x = torch.randn(2, 3)
    opt = graphopt.optimize(Total(), [], "x86", example_inputs=(x,), progress=False, measure_latency=False)
    got, want = opt(x), Total()(x)
    assert [t.shape for t in got] == [w.shape for w in want] == [torch.Size([]), torch.Size([])]
    assert all(torch.allclose(g, w, rtol=1e-5) for g, w in zip(got, want))
