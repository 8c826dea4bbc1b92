"""The barrier-mode launcher and local mode: real Spark barrier stages, real gloo groups of 2."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from pyspark import cloudpickle
import pytest

from sparkdl.errors import ClusterCapacityError, RankFailedError
from sparkdl.train import LaunchConfig, RankContext, rank_context, run_distributed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)
# Spark's Python workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TWO = LaunchConfig(num_ranks=2, pg_timeout_s=60)
TWO_LOCAL = LaunchConfig(num_ranks=2, local_mode=True, pg_timeout_s=60)


def _sum_ranks(offset: int, *, scale: int = 1) -> dict:
    import torch
    import torch.distributed as dist

    ctx = rank_context()
    t = torch.tensor([float(ctx.rank + offset) * scale])
    dist.all_reduce(t)
    return {
        "sum": t.item(),
        "rank": ctx.rank,
        "world_size": dist.get_world_size(),
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                               "OMP_NUM_THREADS", "SPARKDL_TEST_FLAG")},
        "threads": torch.get_num_threads(),
        "ctx": ctx,
    }


def _fail_on_rank1(message: str) -> str:
    import torch
    import torch.distributed as dist

    if rank_context().rank == 1:
        raise ValueError(message)
    dist.all_reduce(torch.ones(1))  # rank 0 blocks here until the failure tears the stage down
    return "unreachable"


def _die_on_rank1() -> str:
    import torch
    import torch.distributed as dist

    dist.barrier()
    if rank_context().rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))
    return "unreachable"


def _flaky_rank1() -> tuple[int, float]:
    import torch
    import torch.distributed as dist

    ctx = rank_context()
    if ctx.rank == 1 and ctx.attempt == 0:
        raise RuntimeError("transient failure on the first attempt")
    t = torch.ones(1)
    dist.all_reduce(t)
    return ctx.attempt, t.item()


def _bad_config_on_rank1() -> str:
    import torch
    import torch.distributed as dist

    from sparkdl.errors import DataValidationError

    if rank_context().rank == 1:
        raise DataValidationError(f"bad setting (attempt {rank_context().attempt})")
    dist.all_reduce(torch.ones(1))
    return "unreachable"


def _report_steps(n: int) -> int:
    ctx = rank_context()
    for step in range(n):
        ctx.report({"step": step, "loss": 1.0 / (step + 1)})
    return n


def _env_after_run() -> dict:
    return {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "SPARKDL_TEST_FLAG")}


@pytest.mark.integration
def test_barrier_all_reduce_returns_rank0_result_with_env(spark):
    cfg = LaunchConfig(num_ranks=2, pg_timeout_s=60, torch_threads=1, env={"SPARKDL_TEST_FLAG": "on"})
    out = run_distributed(_sum_ranks, 10, scale=2, spark=spark, config=cfg)
    assert out["sum"] == (10 + 11) * 2
    assert out["rank"] == 0 and out["world_size"] == 2
    env = out["env"]
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] and int(env["MASTER_PORT"]) > 0
    assert env["OMP_NUM_THREADS"] == "1" and out["threads"] == 1
    assert env["SPARKDL_TEST_FLAG"] == "on"
    ctx = out["ctx"]
    assert isinstance(ctx, RankContext)
    assert (ctx.attempt, ctx.local_mode, ctx.backend, str(ctx.device)) == (0, False, "gloo", "cpu")
    # Python workers are reused: the next task must not see the previous rank's identity.
    leftovers = spark.sparkContext.parallelize(range(2), 2).map(lambda _: _env_after_run()).collect()
    assert all(e["RANK"] is None and e["SPARKDL_TEST_FLAG"] is None for e in leftovers), leftovers


def test_local_mode_runs_two_processes():
    out = run_distributed(_sum_ranks, 1, config=TWO_LOCAL)
    assert out["sum"] == 1 + 2
    assert out["env"]["WORLD_SIZE"] == "2" and out["env"]["MASTER_ADDR"] == "127.0.0.1"
    assert out["ctx"].local_mode and out["ctx"].rank == 0
    assert out["env"]["RANK"] == "0"
    assert os.environ.get("RANK") is None  # the driver's own environment is untouched


def test_rank_context_outside_a_rank_is_an_error():
    with pytest.raises(RuntimeError, match="run_distributed"):
        rank_context()


def test_barrier_mode_needs_spark():
    with pytest.raises(ValueError, match="spark="):
        run_distributed(_sum_ranks, 0, config=TWO)


@pytest.mark.parametrize("bad, field", [({"num_ranks": 0}, "num_ranks"), ({"max_attempts": 0}, "max_attempts"),
                                        ({"backend": "mpi"}, "backend"), ({"backend": "nccl"}, "use_gpu")])
def test_launch_config_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        LaunchConfig(**bad)


@pytest.mark.integration
def test_rank_exception_reaches_driver_with_rank_and_traceback(spark):
    with pytest.raises(RankFailedError) as info:
        run_distributed(_fail_on_rank1, "boom", spark=spark, config=TWO)
    err = info.value
    assert err.rank == 1 and err.attempt == 0
    assert "rank 1 (attempt 1 of 1) failed" in str(err)  # counted from 1, like the relaunch warning
    assert "ValueError: boom" in err.error
    assert "Traceback" in err.traceback and "_fail_on_rank1" in err.traceback
    assert "rank 1" in str(err) and "boom" in str(err)


def test_local_mode_rank_exception(tmp_path):
    with pytest.raises(RankFailedError) as info:
        run_distributed(_fail_on_rank1, "boom", config=TWO_LOCAL)
    assert info.value.rank == 1 and "boom" in info.value.error and "_fail_on_rank1" in info.value.traceback


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_rank_dying_hard_fails_the_run_instead_of_hanging(spark):
    with pytest.raises(RankFailedError) as info:
        run_distributed(_die_on_rank1, spark=spark, config=TWO)
    assert info.value.rank == 1
    assert "Python worker exited" in info.value.error
    # The stage is over and the executors are usable again.
    assert run_distributed(_sum_ranks, 0, spark=spark, config=TWO)["sum"] == 1


@pytest.mark.timeout(180)
def test_local_rank_dying_hard_reports_exit_code_and_output():
    with pytest.raises(RankFailedError) as info:
        run_distributed(_die_on_rank1, config=TWO_LOCAL)
    err = info.value
    assert err.rank == 1 and "exited with code 3" in err.error
    assert "rank 1 of 2" in err.error


@pytest.mark.integration
def test_too_many_ranks_fails_at_once_naming_the_fix(spark):
    start = time.monotonic()
    with pytest.raises(ClusterCapacityError) as info:
        run_distributed(_sum_ranks, 0, spark=spark, config=LaunchConfig(num_ranks=5, start_timeout_s=1))
    message = str(info.value)
    assert "5 ranks requested" in message and "only 2" in message
    assert "--num-ranks" in message and "spark.executor.instances" in message and "local[N]" in message
    assert time.monotonic() - start < 60  # generous: the point is "not a hang", not speed


@pytest.mark.integration
def test_failed_attempt_relaunches_the_stage(spark, caplog):
    cfg = LaunchConfig(num_ranks=2, max_attempts=2, pg_timeout_s=60)
    with caplog.at_level("WARNING", logger="sparkdl.train"):
        attempt, total = run_distributed(_flaky_rank1, spark=spark, config=cfg)
    assert (attempt, total) == (1, 2.0)
    assert any("attempt 1 of 2 failed on rank 1" in r.getMessage() for r in caplog.records)


def test_a_failure_marked_not_retryable_is_raised_without_relaunching():
    cfg = LaunchConfig(num_ranks=2, local_mode=True, max_attempts=3, pg_timeout_s=60)
    with pytest.raises(RankFailedError) as info:
        run_distributed(_bad_config_on_rank1, config=cfg)
    assert info.value.rank == 1 and info.value.attempt == 0 and "bad setting (attempt 0)" in info.value.error
    assert not info.value.retryable and "DataValidationError: bad setting" in info.value.error


def test_local_mode_retry():
    cfg = LaunchConfig(num_ranks=2, local_mode=True, max_attempts=2, pg_timeout_s=60)
    assert run_distributed(_flaky_rank1, config=cfg) == (1, 2.0)


@pytest.mark.integration
def test_progress_events_reach_on_progress(spark):
    events: list[dict] = []
    lock = threading.Lock()

    def on_progress(event: dict) -> None:
        with lock:
            events.append(event)

    assert run_distributed(_report_steps, 3, spark=spark, config=TWO, on_progress=on_progress) == 3
    # Delivered before run_distributed returns: no waiting needed.
    got = sorted((e["rank"], e["step"]) for e in events)
    assert got == [(r, s) for r in (0, 1) for s in range(3)]
    assert all(e["loss"] == pytest.approx(1.0 / (e["step"] + 1)) for e in events)


def test_progress_events_in_local_mode_and_broken_callback_does_not_fail_run():
    seen: list[dict] = []

    def flaky_callback(event: dict) -> None:
        seen.append(event)
        raise KeyError("callback bug")

    assert run_distributed(_report_steps, 2, config=TWO_LOCAL, on_progress=flaky_callback) == 2
    assert sorted((e["rank"], e["step"]) for e in seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]


_CLUSTER_SCRIPT = textwrap.dedent("""
    import time
    import torch, torch.distributed as dist
    from pyspark import BarrierTaskContext
    from pyspark.sql import SparkSession
    from sparkdl.errors import ClusterCapacityError
    from sparkdl.train import LaunchConfig, rank_context, run_distributed

    def step():
        ctx = rank_context()
        t = torch.tensor([ctx.rank + 1.0])
        dist.all_reduce(t)
        # Each task's executor (host:port of its block manager): distinct executors, distinct ports.
        me = BarrierTaskContext.get().getTaskInfos()[ctx.rank].address
        seen = [None] * ctx.world_size
        dist.all_gather_object(seen, (ctx.rank, me))
        return t.item(), ctx.world_size, seen

    spark = SparkSession.builder.getOrCreate()
    try:
        out = run_distributed(step, spark=spark, config=LaunchConfig(num_ranks=2, start_timeout_s=120))
        print("RESULT", out, flush=True)
        start = time.monotonic()
        try:
            run_distributed(step, spark=spark, config=LaunchConfig(num_ranks=3, start_timeout_s=300))
        except ClusterCapacityError as e:
            print("CAPACITY", round(time.monotonic() - start), str(e), flush=True)
    finally:
        spark.stop()
""")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_executor_cluster_via_spark_submit(tmp_path):
    import pyspark

    script = tmp_path / "launch_on_cluster.py"
    script.write_text(_CLUSTER_SCRIPT)
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    env.pop("SPARK_HOME", None)
    proc = subprocess.run(
        [str(spark_submit), "--master", "local-cluster[2,1,1024]", "--conf", "spark.ui.enabled=false",
         "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.executor.memory=1g", str(script)],
        env=env, capture_output=True, text=True, timeout=280, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert result is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    total, world, seen = ast.literal_eval(result[len("RESULT "):])
    assert (total, world) == (3.0, 2)
    # Two executors with one core each: the two ranks ran on two different executors.
    assert [rank for rank, _ in seen] == [0, 1] and len({address for _, address in seen}) == 2, seen
    # Both expected executors are registered: 3 ranks fail at once, not after the 300 s timeout.
    capacity = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CAPACITY ")), "")
    assert "3 ranks requested" in capacity and "only 2" in capacity, proc.stdout[-2000:]
    assert int(capacity.split()[1]) < 60, capacity
