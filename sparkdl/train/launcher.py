"""Driver side of a launch: N ranks as one barrier-mode Spark stage, or N local processes.

Ranks run inside the barrier tasks' own Python workers (no torchrun subprocess), which is
what makes start-up take seconds instead of tens of seconds (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import cloudpickle

from sparkdl.errors import ClusterCapacityError, RankFailedError
from sparkdl.train._rank import FAILURE_MARKER, barrier_task, free_port, local_process_main

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["LaunchConfig", "run_distributed"]

T = TypeVar("T")
log = logging.getLogger("sparkdl.train")
_FAILURE_RE = re.compile(re.escape(FAILURE_MARKER) + r"(\{.*?\})" + re.escape(FAILURE_MARKER), re.S)


@dataclass(kw_only=True)
class LaunchConfig:
    """How many ranks, where, and how failures are retried."""

    num_ranks: int = 2
    """Ranks = barrier tasks (or local processes); each needs one task slot at the same time."""
    local_mode: bool = False
    """Run ranks as processes on the driver machine, without Spark executors."""
    use_gpu: bool = False
    """NCCL with the task's `gpu` resource (Spark) or cuda:<local rank> (local mode)."""
    backend: str | None = None
    """torch.distributed backend; default nccl with GPUs, gloo without."""
    max_attempts: int = 1
    """The whole stage is relaunched up to this many times; the training loop resumes from its checkpoint."""
    start_timeout_s: float = 60.0
    """How long to wait for executors to offer num_ranks slots before ClusterCapacityError."""
    pg_timeout_s: float = 600.0
    """Timeout of torch.distributed collectives: a rank stuck this long fails the run instead of hanging."""
    torch_threads: int | None = 1
    """torch.set_num_threads in each rank (None leaves torch's default)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for each rank."""

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be at least 1, got {self.num_ranks}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend='nccl' needs use_gpu=True (NCCL runs on GPUs only)")

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("nccl" if self.use_gpu else "gloo")


def run_distributed(fn: Callable[..., T], *args: Any, spark: "SparkSession | None" = None, config: LaunchConfig,
                    **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on ``config.num_ranks`` ranks with torch.distributed up;
    return rank 0's result. Raises ``RankFailedError`` when a rank fails on the last attempt and
    ``ClusterCapacityError`` at once when the cluster cannot host the ranks."""
    if not config.local_mode and spark is None:
        raise ValueError("run_distributed needs spark= for barrier mode, or config.local_mode=True")
    payload = cloudpickle.dumps({
        "fn": fn, "args": args, "kwargs": kwargs, "backend": config.resolved_backend, "env": dict(config.env),
        "torch_threads": config.torch_threads, "pg_timeout_s": config.pg_timeout_s,
    })
    if not config.local_mode:
        _check_capacity(spark, config)
    for attempt in range(config.max_attempts):
        try:
            if config.local_mode:
                return _run_local(payload, config, attempt)
            return _run_barrier(spark, payload, config, attempt)
        except RankFailedError as e:
            nonfinite = _nonfinite(e)
            if nonfinite is not None:
                # A NaN would only come back on a retry from the same checkpoint: stop now.
                raise nonfinite from e
            if attempt + 1 >= config.max_attempts:
                raise
            log.warning("attempt %d failed (%s); relaunching the stage", attempt, e.error)
            print(f"[sparkdl] attempt {attempt} failed on rank {e.rank}: {e.error}; retrying", flush=True)
    raise AssertionError("unreachable")


def _nonfinite(e: RankFailedError) -> Exception | None:
    from sparkdl.errors import NonFiniteLossError

    m = re.search(r"NonFiniteLossError: loss became (\S+) at step (\d+).*?(?:kept at (\S+))?$", e.error, re.S)
    if not m:
        return None
    return NonFiniteLossError(int(m.group(2)), float(m.group(1).rstrip(";")), m.group(3))


def _slots(spark: "SparkSession") -> int:
    sc = spark.sparkContext._jsc.sc()
    return int(sc.maxNumConcurrentTasks(sc.resourceProfileManager().defaultResourceProfile()))


def _check_capacity(spark: "SparkSession", config: LaunchConfig) -> None:
    deadline = time.monotonic() + config.start_timeout_s
    slots = _slots(spark)
    # Executors of local-cluster and real clusters register after the session starts.
    while slots < config.num_ranks and time.monotonic() < deadline and not spark.sparkContext.master.startswith("local["):
        time.sleep(1.0)
        slots = _slots(spark)
    if slots < config.num_ranks:
        raise ClusterCapacityError(
            f"{config.num_ranks} ranks requested but the cluster ({spark.sparkContext.master}) can run only {slots} "
            "barrier tasks at once; lower --num-ranks, or add slots: spark.executor.instances x "
            "spark.executor.cores / spark.task.cpus (local[N] for local masters)"
        )
    if config.use_gpu and not spark.sparkContext.getConf().get("spark.task.resource.gpu.amount"):
        raise ClusterCapacityError(
            "use_gpu=True but spark.task.resource.gpu.amount is not set; use the gpu profile (spark-conf/gpu.conf)"
        )


def _parse_failure(text: str, attempt: int) -> RankFailedError:
    m = _FAILURE_RE.search(text)
    if m:
        info = json.loads(m.group(1))
        return RankFailedError(info["rank"], info["error"], info["traceback"], attempt)
    tail = "\n".join(text.strip().splitlines()[-40:])
    rank = re.search(r"partition (\d+)", text)
    return RankFailedError(int(rank.group(1)) if rank else -1,
                           "Python worker exited or was killed without reporting an error", tail, attempt)


def _run_barrier(spark: "SparkSession", payload: bytes, config: LaunchConfig, attempt: int) -> Any:
    sc = spark.sparkContext
    sc.setJobDescription(f"sparkdl: {config.num_ranks} ranks, attempt {attempt}")
    rdd = sc.parallelize(range(config.num_ranks), config.num_ranks).barrier()
    try:
        out = rdd.mapPartitions(partial(barrier_task, payload, attempt)).collect()
    except Exception as e:
        raise _parse_failure(str(e), attempt) from e
    return cloudpickle.loads(out[0])


def _run_local(payload: bytes, config: LaunchConfig, attempt: int) -> Any:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port("127.0.0.1")
    logdir = Path(tempfile.mkdtemp(prefix="sparkdl-ranks-"))
    procs = []
    for rank in range(config.num_ranks):
        p = ctx.Process(target=local_process_main, daemon=True,
                        args=(payload, rank, config.num_ranks, port, attempt, queue, str(logdir / f"rank{rank}.log")))
        p.start()
        procs.append(p)
    results: dict[int, tuple[str, Any]] = {}
    try:
        while len(results) < config.num_ranks:
            try:
                rank, status, data = queue.get(timeout=1.0)
                results[rank] = (status, data)
                if status == "error":
                    raise _parse_failure(data, attempt)
            except RankFailedError:
                raise
            except Exception:  # queue timeout: look for ranks that died without a word
                for rank, p in enumerate(procs):
                    if rank not in results and p.exitcode not in (None, 0):
                        tail = _tail(logdir / f"rank{rank}.log")
                        raise RankFailedError(rank, f"local rank process exited with code {p.exitcode}",
                                              f"command: python (spawn) rank {rank}/{config.num_ranks}\n{tail}",
                                              attempt) from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return cloudpickle.loads(results[0][1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
