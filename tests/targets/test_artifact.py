"""CompiledModel: calling conventions, input checks, benchmark, IR, and the on-disk format.

A saved artifact that is incomplete, truncated, corrupt or mismatched must fail to load
with an ArtifactError that names the file and the problem, never crash in TVM.
"""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import ArtifactError, InputShapeError
from graphopt.targets.artifact import (
    LIB, MANIFEST, MANIFEST_DIGEST, PARAMS, BenchmarkResult, CompiledModel, _sha256, manifest_digest,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class TwoHeads(nn.Module):
    """Two inputs, a nested output structure: what the artifact must rebuild."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, scale):
        y = torch.relu(self.bn(self.conv(x))) * scale
        pooled = y.mean((2, 3))
        return {"logits": self.fc(pooled), "aux": [pooled, y]}


@pytest.fixture(scope="module")
def example():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    model.bn.running_var.uniform_(0.5, 1.5)
    inputs = (torch.randn(1, 3, 8, 8), torch.rand(1, 8, 1, 1))
    return torch.fx.symbolic_trace(model), inputs


@pytest.fixture(scope="module")
def compiled(example):
    gm, inputs = example
    model = graphopt.get_target("x86").compile(gm, inputs)
    yield model
    model.close()


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    return compiled.save(tmp_path_factory.mktemp("artifact") / "model")


@pytest.fixture
def copy_of(saved, tmp_path):
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(saved, dst)
        return dst
    return make


def flat(outputs):
    return [outputs["logits"], *outputs["aux"]]


def test_torch_in_torch_out_with_the_graph_structure(compiled, example):
    gm, inputs = example
    out, ref = compiled(*inputs), gm(*inputs)
    assert set(out) == {"logits", "aux"} and len(out["aux"]) == 2
    for o, r in zip(flat(out), flat(ref)):
        assert isinstance(o, torch.Tensor)
        torch.testing.assert_close(o, r.detach(), rtol=1e-4, atol=1e-5)


def test_numpy_in_numpy_out(compiled, example):
    gm, inputs = example
    out = compiled(*[x.numpy() for x in inputs])
    assert all(isinstance(o, np.ndarray) for o in flat(out))
    np.testing.assert_allclose(out["logits"], gm(*inputs)["logits"].detach().numpy(), rtol=1e-4, atol=1e-5)
    assert compiled(tuple(inputs))["logits"].shape == (1, 4)  # one tuple of inputs is accepted too


@pytest.mark.parametrize("bad,match", [
    (lambda x, s: (x,), "takes 2 input"),
    (lambda x, s: (x[:, :2], s), r"must be \[1, 3, 8, 8\] float32, got \[1, 2, 8, 8\]"),
    (lambda x, s: (x.double(), s), "float64"),
    (lambda x, s: (x.tolist(), s), "torch tensor or numpy array"),
])
def test_wrong_inputs_are_clear_errors(compiled, example, bad, match):
    with pytest.raises(InputShapeError, match=match):
        compiled(*bad(*example[1]))


def test_benchmark_reports_median_and_spread(compiled):
    result = compiled.benchmark(repeat=7, warmup=1)
    assert isinstance(result, BenchmarkResult)
    assert 0 < result.min_ms <= result.median_ms <= result.max_ms
    assert result.p10_ms <= result.p90_ms and result.spread_ms >= 0
    assert result.repeat == 7 and result.where == "local"
    assert result.num_threads == compiled.num_threads >= 1
    with pytest.raises(ValueError):
        compiled.benchmark(repeat=0)


def test_ir_is_the_final_relax_module(compiled):
    ir = compiled.ir()
    assert "R.function" in ir and "def main" in ir and "T.prim_func" in ir
    assert "graphopt_transform_params" in ir  # the lifted weight transform


def test_summary_is_flat_facts_for_the_report(compiled):
    s = compiled.summary()
    assert s["target"] == "x86" and s["num_threads"] == compiled.num_threads
    assert s["tune_trials"] == 0 and s["trials_run"] == 0
    assert all(isinstance(v, (int, float, str, dict)) for v in s.values())


def test_save_and_load_round_trip(compiled, saved, example):
    gm, inputs = example
    assert {p.name for p in saved.iterdir()} >= {LIB, PARAMS, MANIFEST, "ir.txt"}
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["target"]["name"] == "x86" and manifest["num_threads"] == compiled.num_threads
    assert [i["shape"] for i in manifest["inputs"]] == [[1, 3, 8, 8], [1, 8, 1, 1]]
    assert {"graphopt", "tvm", "torch"} <= set(manifest["versions"])
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    with graphopt.load(saved) as loaded:
        for o, r in zip(flat(loaded(*inputs)), flat(compiled(*inputs))):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
        assert loaded.ir() == compiled.ir()
        assert loaded.num_threads == compiled.num_threads
    with graphopt.load(saved, num_threads=1) as one:
        assert one.num_threads == 1 and one.benchmark(repeat=2, warmup=0).num_threads == 1


def test_missing_directory_and_manifest(tmp_path, copy_of):
    with pytest.raises(ArtifactError, match="not a directory"):
        graphopt.load(tmp_path / "nowhere")
    d = copy_of()
    (d / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no manifest.json.*interrupted"):
        graphopt.load(d)


def test_corrupt_manifest(copy_of):
    d = copy_of()
    (d / MANIFEST).write_text((d / MANIFEST).read_text()[:100])
    with pytest.raises(ArtifactError, match="corrupt"):
        graphopt.load(d)


def test_truncated_library(copy_of):
    d = copy_of()
    data = (d / LIB).read_bytes()
    (d / LIB).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="model.so is truncated"):
        graphopt.load(d)


def test_flipped_byte_in_the_weights(copy_of):
    d = copy_of()
    data = bytearray((d / PARAMS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / PARAMS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="params.npz is corrupt"):
        graphopt.load(d)


def _edit_manifest(d, fn, fix_checksums=True):
    """Edit the manifest; with ``fix_checksums``, as someone who knows the format would (files and
    manifest checksums made consistent), so the loader's deeper checks are what is tested."""
    manifest = json.loads((d / MANIFEST).read_text())
    fn(manifest)
    if fix_checksums:
        for name, entry in manifest["files"].items():
            entry.update(bytes=(d / name).stat().st_size, sha256=_sha256(d / name))
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (d / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["versions"].update(tvm="0.19.0"), "built with TVM 0.19.0"),
    (lambda m: m.update(format_version=99), "format version 99"),
    (lambda m: m["target"].update(triple="aarch64-linux-gnu"), "x86_64 library.*aarch64"),
    (lambda m: m["target"].update(features=["avx512_imaginary"]), "avx512_imaginary, which this CPU lacks"),
    (lambda m: m["target"].update(colour="red"), "bad target description"),
    (lambda m: m.pop("out_tree"), "lacks out_tree"),
])
def test_mismatched_artifacts(copy_of, edit, match):
    d = copy_of()
    _edit_manifest(d, edit)
    with pytest.raises(ArtifactError, match=match):
        graphopt.load(d)


@pytest.mark.parametrize("edit", [
    lambda m: m["inputs"][0].update(shape=[1, 3, 9, 9]),
    lambda m: m.update(num_threads=64),
    lambda m: m["files"].pop("ir.txt"),
])
def test_an_edited_manifest_is_refused(copy_of, edit):
    d = copy_of()
    _edit_manifest(d, edit, fix_checksums=False)
    with pytest.raises(ArtifactError, match="was changed after it was saved"):
        graphopt.load(d)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["inputs"][0].update(shape=[1, -3, 8, 8]), r"inputs\[0\].shape must be a list of non-negative"),
    (lambda m: m["inputs"][0].update(dtype="float99"), r"inputs\[0\].dtype 'float99' is not a dtype"),
    (lambda m: m.update(num_threads="2"), "num_threads must be an int"),
    (lambda m: m.update(inputs=[]), "inputs must be a non-empty list"),
    (lambda m: m["files"].pop("ir.txt"), "files must list exactly"),
])
def test_manifest_fields_are_validated(copy_of, edit, match):
    d = copy_of()
    _edit_manifest(d, edit)
    with pytest.raises(ArtifactError, match=match):
        graphopt.load(d)


def test_an_input_shape_the_library_was_not_built_for_is_refused_on_load(copy_of):
    d = copy_of()
    _edit_manifest(d, lambda m: m["inputs"][0].update(shape=[1, 3, 9, 9]))
    with pytest.raises(ArtifactError, match="does not run with the inputs and weights its manifest lists"):
        graphopt.load(d)


def test_another_models_library_is_refused_on_load(copy_of, tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 5, 1)).eval()
    with graphopt.get_target("x86").compile(torch.fx.symbolic_trace(other), (torch.randn(1, 3, 8, 8),)) as c:
        c.save(tmp_path / "other")
    d = copy_of()
    shutil.copyfile(tmp_path / "other" / LIB, d / LIB)
    _edit_manifest(d, lambda m: None)  # checksums fixed: only the content is wrong
    with pytest.raises(ArtifactError, match="does not run with the inputs and weights|returns"):
        graphopt.load(d)


def test_weights_that_do_not_fit_the_library(copy_of):
    d = copy_of()
    with np.load(d / PARAMS) as z:
        arrays = {k: z[k] for k in z.files}
    first = sorted(arrays)[0]
    arrays[first] = np.zeros((3, 3), arrays[first].dtype)
    np.savez(d / PARAMS, **arrays)
    _edit_manifest(d, lambda m: None)  # a consistent checksum: the content is what is wrong
    with pytest.raises(ArtifactError, match=f"weight {first}.*mismatched"):
        graphopt.load(d)


def test_save_over_an_existing_artifact_and_close(compiled, tmp_path, example):
    target = tmp_path / "again"
    compiled.save(target)
    compiled.save(target)
    with graphopt.load(target) as loaded:
        assert isinstance(loaded, CompiledModel)
        loaded(*example[1])
    closed = graphopt.load(target)
    closed.close()
    with pytest.raises(ArtifactError, match="closed"):
        closed.save(tmp_path / "x")
