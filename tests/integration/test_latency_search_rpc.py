"""The latency search on an ARM board behind an RPC tracker (the loopback device farm: an aarch64
server under qemu), the path a Raspberry Pi takes: the same target under plain qemu is refused,
through the tracker its timings are taken and the search runs (issue 15)."""
import shutil

import pytest
import torch
import torch.nn as nn

import graphopt

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
                                reason="needs the aarch64 cross compiler and qemu-aarch64")


def test_search_times_candidates_through_the_tracker_and_refuses_plain_qemu():
    from graphopt.targets.arm_sysroot import ensure_sysroot
    from graphopt.targets.testing import LoopbackDeviceFarm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    base = graphopt.get_target("arm-rpi4")
    budget = graphopt.Budget(latency=0.8, max_steps=1, recovery_batches=1, final_recovery=0)
    with pytest.raises(graphopt.errors.InvalidArgumentError, match="qemu"):
        graphopt.optimize(model, [], base, example_inputs=(x,), calibration_data=batches, budget=budget,
                          progress=False)
    with LoopbackDeviceFarm(cpu=base.qemu_cpu, key="search-rpi4", sysroot=ensure_sysroot(progress=False)) as farm:
        target = base.replace(tracker=farm.tracker, key=farm.key)
        opt = graphopt.optimize(model, [], target, example_inputs=(x,), calibration_data=batches,
                                budget=budget, progress=False, measure_latency=True)
        opt.compiled.close()
    s = opt.report["latency_search"].data["search"]
    assert s["start"]["latency_ms"] > 0 and s["steps"] and s["timings"]["measured"] >= 2
    assert all(c["latency_ms"] > 0 for st in s["steps"] for c in st["candidates"])


def test_two_boards_behind_the_tracker_time_a_steps_candidates_at_once():
    """Two emulated boards under one key: the tracker says 2, the first probes of the step's two
    groups are built one after the other and timed on both boards at the same moment."""
    from graphopt.targets import boards
    from graphopt.targets.arm_sysroot import ensure_sysroot
    from graphopt.targets.testing import LoopbackDeviceFarm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    batches = [torch.randn(2, 3, 8, 8)]
    base = graphopt.get_target("arm-rpi4")
    budget = graphopt.Budget(latency=0.8, max_steps=1, recovery_batches=0, final_recovery=0)
    before = dict(boards.STATS)
    with LoopbackDeviceFarm(cpu=base.qemu_cpu, key="search-2boards", num_servers=2,
                            sysroot=ensure_sysroot(progress=False)) as farm:
        target = base.replace(tracker=farm.tracker, key=farm.key)
        assert target.boards() == 2
        opt = graphopt.optimize(model, [], target, example_inputs=(x,), calibration_data=batches,
                                budget=budget, progress=False)
        assert target.boards() == 2  # both still registered: neither board was lost
    s = opt.report["latency_search"].data["search"]
    assert s["boards"] == 2 and s["steps"] and max(s["batches"]) >= 2, s
    assert all(c["latency_ms"] > 0 for st in s["steps"] for c in st["candidates"])
    # timed through the pool, and two sessions timing at once: one on each board
    assert boards.STATS["parallel"] - before["parallel"] >= 2 and boards.STATS["batches"] > before["batches"]
    assert boards.STATS["max_in_flight"] == 2
