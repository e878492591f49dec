"""MetaSchedule tuning through the persistent cache: trial allocation, hits, damage, concurrency.

The integration tests really tune (a handful of trials on a one-conv model) into a private
cache directory; the damage tests work on copies of the database that run produced.
"""
import json
import logging
import multiprocessing
import shutil
import time

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.targets.cache import BUDGETS, RECORDS, WORKLOADS, TuningCache
from graphopt.targets.tuning import allocate_capped, allocate_trials

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TRIALS = 3


# --- trial allocation (pure) ---------------------------------------------------------------

def test_allocation_sums_to_the_budget_and_favours_heavy_tasks():
    costs = [1e9, 2e8, 1e6, 5e4]
    out = allocate_trials(200, costs)
    assert sum(out) == 200
    assert out == sorted(out, reverse=True) and min(out) >= 8  # the floor
    assert out[0] > 3 * out[1]


def test_capped_allocation_gives_what_a_small_space_cannot_use_to_the_others():
    assert allocate_capped(100, [1e9, 1e8, 1e3], [40, None, None]) == [40, 52, 8]
    assert allocate_capped(100, [1e9, 1e9], [40, 40]) == [40, 40]  # nothing else to tune
    assert allocate_capped(10, [1e9, None, 1e6], [5, None, None]) == [5, 0, 5]
    assert allocate_capped(200, [1e9, 1e8], [None, None]) == allocate_trials(200, [1e9, 1e8])


def test_allocation_edge_cases():
    assert allocate_trials(0, [1e9, 1e6]) == [0, 0]
    assert allocate_trials(2, [1e3, 1e9, 1e6]) == [0, 1, 1]  # fewer trials than tasks
    assert allocate_trials(10, [1e6, None, 1e6]) == [5, 0, 5]  # None: not worth tuning
    assert allocate_trials(10, [None, None]) == [0, 0]
    assert allocate_trials(7, []) == []


def test_weight_only_and_reshape_kernels_are_not_tuned():
    import tvm

    from graphopt.targets.pipeline import prepare
    from graphopt.targets.tuning import not_worth_tuning

    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 3))
    x86 = graphopt.get_target("x86")
    low = x86.lower(torch.fx.symbolic_trace(model.eval()), (torch.randn(1, 16, 4, 4),))
    prepared = prepare(low.mod, x86.tvm(), layout_block=16)
    skipped = not_worth_tuning(prepared)
    kernels = {gv.name_hint for gv, f in prepared.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any(k.startswith("transpose") for k in skipped)  # the Linear weight's transpose
    assert any(k.startswith("reshape") for k in skipped)    # bias reshapes and the flatten
    tuned = kernels - skipped
    assert any("conv2d_NCHWc" in k for k in tuned) and any("matmul" in k for k in tuned)
    assert any("layout_transform" in k for k in tuned)      # the activation's NCHW <-> NCHW16c


# --- a real tuning run ---------------------------------------------------------------------

def conv_model(with_pool=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    if with_pool:
        layers.append(nn.MaxPool2d(2))
    return torch.fx.symbolic_trace(nn.Sequential(*layers).eval()), (torch.randn(1, 3, 8, 8),)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("graphopt-cache")


@pytest.fixture(scope="module")
def x86(cache_root):
    # NCHW: the one-conv model is then one kernel (blocked, its stem would add layout transforms)
    return graphopt.get_target("x86").replace(cache_dir=str(cache_root), layout_block=0)


@pytest.fixture(scope="module")
def first_run(x86):
    gm, inputs = conv_model()
    start = time.perf_counter()
    compiled = x86.compile(gm, inputs, tune_trials=TRIALS)
    yield compiled, time.perf_counter() - start
    compiled.close()


def cache_dir(x86):
    return TuningCache(x86.cache_key(), root=x86.cache_dir).dir


def test_first_run_tunes_and_fills_the_cache(first_run, x86):
    compiled, _ = first_run
    info = compiled.tuning
    assert info.trials_requested == TRIALS and info.tasks_tuned == 1 and info.cache_hits == 0
    assert 1 <= info.trials_run <= TRIALS and info.tasks_with_records == 1
    gm, inputs = conv_model()
    torch.testing.assert_close(compiled(*inputs), gm(*inputs).detach(), rtol=1e-4, atol=1e-5)
    d = cache_dir(x86)
    assert (d / WORKLOADS).read_text().count("\n") == 1
    assert (d / RECORDS).read_text().count("\n") == info.trials_run
    assert list(json.loads((d / BUDGETS).read_text())["workloads"].values()) == [TRIALS]
    s = compiled.summary()
    assert s["trials_run"] == info.trials_run and s["tuning_seconds"] > 0


def test_second_run_is_a_cache_hit(first_run, x86, caplog):
    gm, inputs = conv_model()
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="graphopt"):
        compiled = x86.compile(gm, inputs, tune_trials=TRIALS)
    elapsed = time.perf_counter() - start
    info = compiled.tuning
    assert info.trials_run == 0 and info.tasks_tuned == 0 and info.cache_hits == 1
    assert info.tasks_with_records == 1
    assert "cache hit" in caplog.text
    assert elapsed < first_run[1]
    torch.testing.assert_close(compiled(*inputs), first_run[0](*inputs), rtol=0, atol=0)
    compiled.close()


def test_second_optimize_reports_the_cache_hit(first_run, x86, caplog):
    gm, inputs = conv_model()
    with caplog.at_level(logging.INFO, logger="graphopt"):
        opt = graphopt.optimize(gm, target=x86, example_inputs=inputs, tune_trials=TRIALS,
                                progress=False, measure_latency=False)
    assert opt.report.compile["trials_run"] == 0 and opt.report.compile["cache_hits"] == 1
    assert "cache hit" in caplog.text
    opt.compiled.close()


def test_unwritable_cache_is_a_clear_error(tmp_path):
    from graphopt.errors import TargetError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TargetError, match="GRAPHOPT_CACHE_DIR"):
        TuningCache("k", root=blocker)


def test_untuned_build_ignores_the_cache(first_run, x86):
    gm, inputs = conv_model()
    with x86.compile(gm, inputs, tune_trials=0) as compiled:
        assert compiled.tuning.tasks_with_records == 0 and "not tuned" in compiled.tuning.note


def test_a_layer_tuned_in_one_model_is_a_hit_in_another(first_run, x86):
    gm, inputs = conv_model(with_pool=True)
    with x86.compile(gm, inputs, tune_trials=2 * TRIALS) as compiled:
        info = compiled.tuning
        assert info.cache_hits == 1 and info.tasks_tuned == 1  # only the pool is tuned
        torch.testing.assert_close(compiled(*inputs), gm(*inputs).detach(), rtol=1e-4, atol=1e-5)


# --- damage --------------------------------------------------------------------------------

@pytest.fixture
def damaged(first_run, x86, tmp_path):
    """A private copy of the tuned cache directory, to break."""
    d = tmp_path / "tuning" / x86.cache_key()
    shutil.copytree(cache_dir(x86), d, ignore=shutil.ignore_patterns(".lock"))
    return TuningCache(x86.cache_key(), root=tmp_path), d


def test_truncated_record_line_is_dropped_with_a_warning(damaged, tmp_path):
    cache, d = damaged
    text = (d / RECORDS).read_text()
    n = text.count("\n")
    (d / RECORDS).write_text(text + text.splitlines()[0][:40])  # an interrupted append
    with pytest.warns(RuntimeWarning, match="dropped 1 damaged record"):
        snap = cache.snapshot(tmp_path / "snap")
    assert snap.records == n and len(snap.database) == n
    assert (d / RECORDS).read_text().count("\n") == n  # repaired in place


def test_damaged_workload_file_is_moved_aside(damaged, tmp_path):
    cache, d = damaged
    (d / WORKLOADS).write_text("not json\n")
    with pytest.warns(RuntimeWarning, match="moved aside"):
        snap = cache.snapshot(tmp_path / "snap")
    assert snap.records == 0 and snap.budgets == {}
    assert list(d.glob(f"{WORKLOADS}.corrupt-*")) and not (d / WORKLOADS).exists()


def test_records_tvm_cannot_read_are_moved_aside(damaged, tmp_path):
    cache, d = damaged
    (d / RECORDS).write_text('[0, [["not a trace"], [1.0], {"kind": "llvm"}, null]]\n')
    with pytest.warns(RuntimeWarning, match="TVM could not read it"):
        snap = cache.snapshot(tmp_path / "snap")
    assert snap.records == 0


@pytest.mark.slow
def test_damaged_budgets_warn_and_retune(first_run, x86, cache_root, tmp_path):
    shared = tmp_path / "shared"
    shutil.copytree(cache_root, shared)
    target = x86.replace(cache_dir=str(shared))
    (cache_dir(target) / BUDGETS).write_text("{ truncated")
    gm, inputs = conv_model()
    with pytest.warns(RuntimeWarning, match="damaged"):
        compiled = target.compile(gm, inputs, tune_trials=TRIALS)
    assert compiled.tuning.tasks_tuned == 1 and compiled.tuning.trials_run >= 1
    torch.testing.assert_close(compiled(*inputs), gm(*inputs).detach(), rtol=1e-4, atol=1e-5)
    compiled.close()


# --- two processes -------------------------------------------------------------------------

def _merge_many(root, key, source_dir, rounds):
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    records = JSONDatabase(work_dir=source_dir).get_all_tuning_records()
    cache = TuningCache(key, root=root)
    for i in range(rounds):
        cache.merge(records, {"w": i})


def test_concurrent_writers_leave_a_readable_database(first_run, x86, tmp_path):
    source = cache_dir(x86)
    n = (source / RECORDS).read_text().count("\n")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_merge_many, args=(str(tmp_path), "k", str(source), 5)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    snap = TuningCache("k", root=tmp_path).snapshot(tmp_path / "snap")
    assert snap.records == 2 * 5 * n and snap.budgets == {"w": 4}


def test_per_pass_latency_is_timed_tuned_and_the_artifact_reuses_it(x86):
    """With tune_trials, every pass is timed with tuned schedules (issue 15: the artifact's own),
    through the shared cache: the final compile then tunes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    inputs = (torch.randn(1, 3, 8, 8),)
    opt = graphopt.optimize(model, ["fuse_conv_bn"], target=x86, example_inputs=inputs, tune_trials=TRIALS,
                            progress=False)
    assert opt.report.latency_schedules.startswith("tuned") and f"tune_trials={TRIALS}" in opt.report.latency_schedules
    record = opt.report["fuse_conv_bn"]
    assert record.latency_ms_after > 0 and record.latency_spread_ms_after is not None
    assert opt.report.compile["trials_run"] == 0 and opt.report.compile["cache_hits"] >= 1
    opt.compiled.close()
