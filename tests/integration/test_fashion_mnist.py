"""The real Fashion-MNIST loader (graphopt.data) and the bundled default model (graphopt.models)."""
import gzip
import struct

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from graphopt.data import (
    ENV_VAR, MEAN, STD, DatasetCorruptError, DatasetError, DatasetMissingError,
    calibration_batches, dataset_dir, fashion_mnist_batches, load_fashion_mnist,
)
from graphopt.errors import GraphoptError
from requirements import needs_fashion_mnist
from graphopt.models import (
    WEIGHTS_PATH, FashionCNN, default_example_inputs, default_model_info, evaluate_accuracy,
    load_default_model,
)


needs_data = needs_fashion_mnist


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_split(directory, images: bytes, labels: bytes, compress=True) -> None:
    for name, payload in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        (directory / name).write_bytes(gzip.compress(payload) if compress else payload)


# -- loader -------------------------------------------------------------------------------------

@needs_data
def test_test_split_shapes_dtypes_and_labels():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [1000] * 10
    # normalized with the train statistics: a black pixel maps to -MEAN/STD
    assert float(images.min()) == pytest.approx(-MEAN / STD, abs=1e-5)
    assert float(images.max()) == pytest.approx((1 - MEAN) / STD, abs=1e-5)
    assert abs(float(images.mean())) < 0.1 and abs(float(images.std()) - 1) < 0.1


@needs_data
def test_loads_return_independent_copies():
    images, labels = load_fashion_mnist("test")
    images.zero_()
    labels.zero_()
    again, again_labels = load_fashion_mnist("test")
    assert float(again.abs().sum()) > 0 and int(again_labels.max()) == 9


@needs_data
def test_batches_and_limit():
    batches = fashion_mnist_batches("test", batch_size=256, limit=1000)
    assert [len(y) for _, y in batches] == [256, 256, 256, 232]
    images, labels = load_fashion_mnist("test")
    assert torch.equal(torch.cat([x for x, _ in batches]), images[:1000])
    assert torch.equal(torch.cat([y for _, y in batches]), labels[:1000])


@needs_data
def test_calibration_batches_are_deterministic_train_images():
    first = calibration_batches(3, batch_size=8)
    second = calibration_batches(3, batch_size=8)
    assert len(first) == 3 and all(b.shape == (8, 1, 28, 28) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    test_images, _ = load_fashion_mnist("test")
    assert not torch.equal(first[0], test_images[:8])  # train split, not test
    with pytest.raises(DatasetError):
        calibration_batches(1000, batch_size=100)  # more than 60,000 images


def test_bad_arguments_are_typed_errors():
    with pytest.raises(DatasetError, match="valid splits"):
        load_fashion_mnist("validation")
    with pytest.raises(DatasetError):
        fashion_mnist_batches("test", batch_size=0)


def test_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert dataset_dir() == tmp_path
    with pytest.raises(DatasetMissingError) as info:
        load_fashion_mnist("test")
    assert isinstance(info.value, GraphoptError)
    message = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert ENV_VAR in message and str(tmp_path) in message
    with pytest.raises(DatasetMissingError):
        calibration_batches(1, 4)


def test_tiny_valid_idx_files_parse(tmp_path):
    pixels = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    _write_split(tmp_path, _idx(pixels), _idx(np.array([0, 9, 4], dtype=np.uint8)))
    images, labels = load_fashion_mnist("test", root=tmp_path)
    assert images.shape == (3, 1, 28, 28) and labels.tolist() == [0, 9, 4]
    expected = (torch.from_numpy(pixels).float() / 255 - MEAN) / STD
    assert torch.allclose(images[:, 0], expected)


@pytest.mark.parametrize("images, labels, match", [
    # wrong magic number: 0x0803 with a nonzero first byte
    (b"\x01\x00\x08\x03" + struct.pack(">3I", 1, 28, 28) + bytes(784), _idx(np.zeros(1, np.uint8)), "magic"),
    # header claims 2 images but holds one
    (_idx(np.zeros((1, 28, 28), np.uint8))[:4] + struct.pack(">3I", 2, 28, 28) + bytes(784),
     _idx(np.zeros(1, np.uint8)), "header says shape"),
    # truncated header
    (b"\x00\x00\x08\x03\x00\x00", _idx(np.zeros(1, np.uint8)), "truncated"),
    # images of the wrong size
    (_idx(np.zeros((1, 32, 32), np.uint8)), _idx(np.zeros(1, np.uint8)), "28 x 28"),
    # label count differs from image count
    (_idx(np.zeros((2, 28, 28), np.uint8)), _idx(np.zeros(1, np.uint8)), "2 images but 1 labels"),
    # label out of range
    (_idx(np.zeros((1, 28, 28), np.uint8)), _idx(np.array([10], np.uint8)), "outside 0..9"),
])
def test_corrupt_files_are_clear_errors(tmp_path, images, labels, match):
    _write_split(tmp_path, images, labels)
    with pytest.raises(DatasetCorruptError, match=match):
        load_fashion_mnist("test", root=tmp_path)


def test_not_gzip_is_a_clear_error(tmp_path):
    _write_split(tmp_path, _idx(np.zeros((1, 28, 28), np.uint8)), _idx(np.zeros(1, np.uint8)),
                 compress=False)
    with pytest.raises(DatasetCorruptError, match="not a readable gzip file"):
        load_fashion_mnist("test", root=tmp_path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    _write_split(tmp_path, _idx(np.zeros((1, 28, 28), np.uint8)), _idx(np.zeros(1, np.uint8)))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetCorruptError, match="not a readable gzip file"):
        load_fashion_mnist("test", root=tmp_path)


# -- model --------------------------------------------------------------------------------------

def test_default_model_loads_in_eval_mode_and_is_small():
    model = load_default_model()
    assert isinstance(model, FashionCNN) and not model.training
    assert WEIGHTS_PATH.stat().st_size < 1_000_000
    info = default_model_info()
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert load_default_model() is not model  # callers may modify their copy


def test_default_model_traces_and_has_what_the_passes_need():
    model = load_default_model()
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    (x,) = default_example_inputs()
    assert x.shape == (1, 1, 28, 28)
    torch.testing.assert_close(gm(x), model(x))

    modules = dict(gm.named_modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) >= 5 and all(c.groups == 1 and c.kernel_size == (3, 3) for c in convs)
    conv_bn = [n for n in gm.graph.nodes if n.op == "call_module"
               and isinstance(modules[n.target], nn.BatchNorm2d)
               and isinstance(modules[n.args[0].target], nn.Conv2d)]
    assert len(conv_bn) == len(convs)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) >= 1
    fc = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)]
    assert len(fc) == 1
    # a flatten of a C x 7 x 7 map feeds the classifier directly
    flatten = fc[0].args[0]
    assert flatten.op == "call_module" and isinstance(modules[flatten.target], nn.Flatten)
    assert modules[fc[0].target].in_features == 64 * 7 * 7


@needs_data
def test_default_model_accuracy_on_real_data():
    gm = torch.fx.symbolic_trace(load_default_model())
    accuracy = evaluate_accuracy(gm, "test", limit=2000)
    assert accuracy >= 0.88


@needs_data
def test_evaluate_accuracy_any_callable_and_mode_restored():
    model = load_default_model().train()
    eager = evaluate_accuracy(model, limit=500, batch_size=250)
    assert model.training  # put back the way it was
    as_numpy = evaluate_accuracy(lambda x: model.eval()(x).detach().numpy(), limit=500)
    assert eager == as_numpy
    assert evaluate_accuracy(lambda x: torch.zeros(len(x), 10), limit=500) == pytest.approx(
        float((load_fashion_mnist("test")[1][:500] == 0).float().mean()))
    with pytest.raises(ValueError, match="logits"):
        evaluate_accuracy(lambda x: torch.zeros(10), limit=10)


def test_fresh_model_shapes():
    model = FashionCNN().eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
