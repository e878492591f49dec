"""The pass-level diff report: every field filled, JSON valid against its schema, self-contained HTML
(integration/test_report_browser.py renders it in Chromium)."""
import json
from importlib import resources

import jsonschema
import pytest
import torch
import torch.nn as nn

import graphopt
import zoo

RECORD_FIELDS = ["name", "options", "status", "seconds", "nodes_added", "nodes_removed", "nodes_changed",
                 "params_before", "params_after", "macs_before", "macs_after", "bytes_before", "bytes_after",
                 "max_abs_error", "rel_error", "accuracy_before", "accuracy_after", "messages", "code_diff"]


@pytest.fixture
def opt(residual_report):
    return residual_report


def schema():
    return json.loads(resources.files("graphopt.report").joinpath("schema.json").read_text())


def test_every_record_field_is_filled(opt):
    rec = opt.report["fuse_conv_bn"]
    for f in RECORD_FIELDS:
        assert getattr(rec, f) is not None, f
    assert rec.status == "applied" and rec.options == {}
    assert rec.seconds > 0
    assert len(rec.nodes_removed) == 10 and "stem_1" in rec.nodes_removed
    assert rec.nodes_added == [] and len(rec.nodes_changed) >= 10
    model = zoo.build("residual")[0]
    bn_params = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    new_biases = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is None)
    assert rec.params_after == rec.params_before - bn_params + new_biases
    assert rec.params_after == graphopt.count_params(opt.graph_module)
    assert rec.bytes_after < rec.bytes_before and rec.macs_after == rec.macs_before
    assert 0 <= rec.rel_error <= 1e-4 and rec.max_abs_error >= 0
    assert rec.accuracy_before in (0.0, 1.0) and rec.accuracy_after == rec.accuracy_before
    assert '-    stem_1 = getattr(self.stem, "1")(stem_0)' in rec.code_diff
    assert opt.report["dce"].status == "no-op" and opt.report["dce"].code_diff == ""


def test_text_table(opt):
    text = opt.report.to_text(diffs=True)
    assert "fuse_conv_bn  applied" in text and "+0/-10/" in text
    assert "--- before fuse_conv_bn" in text


def test_json_validates_against_documented_schema(opt):
    data = json.loads(opt.report.to_json())
    jsonschema.validate(data, schema())
    assert data["schema_version"] == "1.6"
    assert data["records"][0]["graph_after"]["nodes"][0]["op"] == "placeholder"


def test_rolled_back_record_with_shape_change_is_valid_json():
    @graphopt.register_pass("t_bad_shape", exact=True)
    def t_bad_shape(gm, ctx):
        """Changes the output shape: must be rolled back, and its infinite error stays valid JSON."""
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            out.args = (gm.graph.call_function(torch.flatten, (out.args[0],)),)

    m = nn.Sequential(nn.Conv2d(3, 4, 3))
    opt = graphopt.optimize(m, ["t_bad_shape"], example_inputs=(torch.randn(1, 3, 8, 8),))
    assert opt.report.records[0].status == "rolled back"
    assert opt.report.records[0].reason == "output shapes changed"
    jsonschema.validate(json.loads(opt.report.to_json()), schema())


def test_html_is_self_contained_and_highlights_changes(opt, tmp_path):
    page = opt.report.to_html(str(tmp_path / "r.html"))
    assert "<script src" not in page and "<link" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<svg") == 4  # before and after for both passes
    assert 'class="node removed"' in page and 'class="node changed"' in page
