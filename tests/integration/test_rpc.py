"""TVM RPC: a tracker on loopback with an emulated aarch64 server, running and tuning through it.

The server is the sysroot's aarch64 Python under qemu (its session workers too, through
the ``-0 LAUNCHER`` trick), so this is the path a Raspberry Pi behind a tracker takes,
minus the board.
"""
import time

import numpy as np
import pytest
import torch

from graphopt.errors import TargetError
from graphopt.targets.arm_sysroot import ensure_sysroot
from graphopt.targets.qemu import cross_compile_library
from test_arm_emulation import TwoConvs  # the same tiny model: two convs and a tuple output
from graphopt.targets.rpc import RpcRunner, connect, make_ms_builder, make_ms_runner, parse_address
from graphopt.targets.testing import LoopbackDeviceFarm

A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
       "num-cores": 2}


def to_relax(model, x):
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    return mod, [p.numpy() for p in params.get("main", [])]


@pytest.fixture(scope="module")
def farm():
    with LoopbackDeviceFarm(cpu="cortex-a72", sysroot=ensure_sysroot(progress=False)) as farm:
        yield farm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import tvm

    torch.manual_seed(0)
    model = TwoConvs().eval()
    x = torch.randn(1, 3, 16, 16)
    mod, params = to_relax(model, x)
    lib = cross_compile_library(tvm.compile(mod, target=tvm.target.Target(A72)),
                                tmp_path_factory.mktemp("rpc") / "tiny_a72.so")
    return model, x, params, lib


def test_model_runs_remotely_through_the_tracker(farm, tiny):
    model, x, params, lib = tiny
    with torch.no_grad():
        expected = [t.numpy() for t in model(x)]
    with RpcRunner(lib, tracker=farm.tracker, key=farm.key, params=params,
                   num_threads=2) as runner:
        for _ in range(2):
            outputs = runner.run([x.numpy()])
            assert len(outputs) == 2  # the remote tuple came back flattened
            for got, want in zip(outputs, expected):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        times = runner.time_runs([x.numpy()], repeat=3, warmup=1)
        assert len(times) == 3 and all(t > 0 for t in times)
    with pytest.raises(TargetError, match="closed"):
        runner.run([x.numpy()])


def test_session_can_be_shared_and_opened_directly(farm, tiny):
    model, x, params, lib = tiny
    session = farm.connect()
    with RpcRunner(lib, session=session, params=params) as runner:
        with torch.no_grad():
            np.testing.assert_allclose(runner.run([x.numpy()])[0], model(x)[0].numpy(),
                                       rtol=1e-4, atol=1e-5)


def test_connection_mistakes_are_clear_errors(farm):
    with pytest.raises(TargetError, match="exactly one"):
        connect()
    with pytest.raises(TargetError, match="exactly one"):
        connect("127.0.0.1:1", tracker=farm.tracker)
    with pytest.raises(TargetError, match="pass key"):
        connect(tracker=farm.tracker)
    with pytest.raises(TargetError, match="host:port"):
        parse_address("localhost")
    start = time.monotonic()
    with pytest.raises(TargetError, match=f"no device registered under key 'rpi5'.*{farm.key}"):
        connect(tracker=farm.tracker, key="rpi5")  # TVM alone would wait forever
    with pytest.raises(TargetError, match="could not open"):
        connect("127.0.0.1:1")
    assert time.monotonic() - start < 30


def test_remote_crash_is_reported_not_hung(tmp_path):
    import tvm

    model, x = TwoConvs().eval(), torch.randn(1, 3, 16, 16)
    mod, params = to_relax(model, x)
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+sve"]}
    lib = cross_compile_library(tvm.compile(mod, target=tvm.target.Target(target)),
                                tmp_path / "sve.so")
    # Its own farm: TVM's RPC server stops serving after a session crashes.
    with LoopbackDeviceFarm(cpu="cortex-a72", key="crashy") as farm:
        with RpcRunner(lib, tracker=farm.tracker, key=farm.key, params=params) as runner:
            with pytest.raises(TargetError, match="SIGILL"):
                runner.run([x.numpy()])


@pytest.mark.slow
def test_metaschedule_tunes_on_the_remote_device(farm, tmp_path):
    """A few MetaSchedule trials built with the cross compiler and timed over RPC.

    Slow because TVM's tuner imports all of ``tvm.s_tir.tensor_intrin`` once (about 40 s
    here), whatever the budget.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)

    class MatMul(torch.nn.Module):
        def forward(self, x):
            return x @ torch.from_numpy(weight)

    x = torch.randn(4, 16)
    mod, params = to_relax(MatMul(), x)
    mod = tvm.relax.transform.LegalizeOps()(mod)
    target = tvm.target.Target(A72)
    database = ms.relax_integration.tune_relax(
        mod, {}, target, str(tmp_path / "tuning"), max_trials_global=4, max_trials_per_task=2,
        num_trials_per_iter=2, builder=make_ms_builder(max_workers=1),
        runner=make_ms_runner(farm.tracker, farm.key, number=1, min_repeat_ms=0))
    records = database.get_all_tuning_records()
    assert records and all(r.run_secs and float(r.run_secs[0]) > 0 for r in records)

    tuned = ms.relax_integration.compile_relax(database, mod, target, params=None)
    lib = cross_compile_library(tuned, tmp_path / "tuned.so")
    with RpcRunner(lib, tracker=farm.tracker, key=farm.key, params=params) as runner:
        (out,) = runner.run([x.numpy()])
    np.testing.assert_allclose(out, x.numpy() @ weight, rtol=1e-4, atol=1e-5)


def test_ms_runner_without_devices_is_a_clear_error(farm):
    with pytest.raises(TargetError, match="no device"):
        make_ms_runner(farm.tracker, "no-such-board")
