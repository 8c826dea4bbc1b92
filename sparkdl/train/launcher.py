"""Driver side of a launch: N ranks as one barrier-mode Spark stage, or N local processes.

Ranks run inside the barrier tasks' own Python workers (no torchrun subprocess), which is
what makes start-up take seconds instead of tens of seconds (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import queue
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from pyspark import cloudpickle

from sparkdl.errors import ClusterCapacityError, RankFailedError, RankHungError, attempt_label
from sparkdl.session import (
    barrier_stage,
    conf_value,
    expected_executors,
    is_connect,
    job_description,
    registered_executors,
    spark_master,
    task_slots,
)
from sparkdl.train._progress_channel import ProgressServer
from sparkdl.train._progress_files import ProgressFileReader
from sparkdl.train._rank import FAILURE_MARKER, barrier_task, listen_socket, local_process_main

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["LaunchConfig", "check_capacity", "run_distributed"]

T = TypeVar("T")
log = logging.getLogger("sparkdl.train")
_FAILURE_RE = re.compile(re.escape(FAILURE_MARKER) + r"(\{.*?\})" + re.escape(FAILURE_MARKER), re.S)
# Errors a rank gets because a *peer* went away; never preferred as the root cause.
_COMM_ERROR_RE = re.compile(r"Dist\w*Error|gloo|NCCL|Connection (closed|reset) by peer|Broken pipe|ProcessGroup")
# A peer's collective timed out: the rank it waited for was silent for the whole timeout.
_TIMEOUT_RE = re.compile(r"time[ds]? ?out|Timeout", re.I)
_CRASH_RE = re.compile(r"Python worker exited unexpectedly|worker.*crashed|Python worker.*killed", re.I)
# How long, after a first failure, to wait for the other ranks' reports before diagnosing.
_SETTLE_S = 5.0


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
    """How long to wait for executors to offer num_ranks slots before ClusterCapacityError; a local
    master fails at once, and so does a cluster whose expected executors (local-cluster[N,..], or
    spark.executor.instances with dynamic allocation off) have all registered."""
    pg_timeout_s: float = 600.0
    """Timeout of torch.distributed collectives (and of the store rendezvous): a rank that stops making
    progress for this long fails the run, reported as hung, instead of blocking it."""
    torch_threads: int | None = 1
    """torch.set_num_threads (and OMP_NUM_THREADS) in each rank; None leaves torch's default."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for each rank (restored afterwards in reused Python workers)."""
    progress_dir: str | None = None
    """Where ranks leave their progress events when the caller cannot be reached (a Spark Connect
    client); the caller reads them from there when it can reach that storage. None: no live
    progress then, only the result."""
    world_sizes: tuple[int, ...] | None = None
    """Elastic: the world sizes a relaunch may pick (the largest the cluster's free slots allow, so a
    relaunch shrinks after losing executors and grows when slots come back); None = num_ranks only."""

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be at least 1, got {self.num_ranks}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend='nccl' needs use_gpu=True (NCCL runs on GPUs only)")
        if self.start_timeout_s < 0 or self.pg_timeout_s <= 0:
            raise ValueError("start_timeout_s must be >= 0 and pg_timeout_s > 0 (seconds)")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be None or at least 1, got {self.torch_threads}")
        if self.world_sizes is not None and (not self.world_sizes or min(self.world_sizes) < 1):
            raise ValueError(f"world_sizes must be None or a non-empty tuple of sizes >= 1, got {self.world_sizes}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise ValueError("env must map str to str (environment variables are strings)")

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("nccl" if self.use_gpu else "gloo")


def run_distributed(fn: Callable[..., T], *args: Any, spark: "SparkSession | None" = None, config: LaunchConfig,
                    on_progress: Callable[[dict], None] | None = None, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on ``config.num_ranks`` ranks with torch.distributed up;
    return rank 0's result (other ranks' return values are dropped).

    Barrier mode runs one barrier Spark stage, one task per rank, inside the tasks' Python
    workers; ``config.local_mode`` runs the ranks as spawned processes on this machine (from a
    script, call it under ``if __name__ == "__main__":``, as ``spawn`` re-imports the main module).
    ``fn`` and its arguments are pickled with cloudpickle: functions of modules the executors
    cannot import must be shipped (``--py-files``) or registered with
    ``cloudpickle.register_pickle_by_value``; notebook functions travel by value already.
    ``on_progress`` receives every ``rank_context().report(event)`` with ``"rank"`` added; it is
    called on a background thread, over a plain-TCP channel to the driver (see
    ``sparkdl.train._progress_channel``) that closes when this function returns.

    Raises ``RankFailedError`` (rank, error, traceback, attempt) when a rank fails on the last
    attempt; earlier failures relaunch all ranks (``rank_context().attempt`` counts them from 0;
    messages show "attempt 1 of N"), except a ``sparkdl.errors.NonRetryableError`` (or an error
    raised from one), which a relaunch would only repeat: it is raised at once, with
    ``retryable=False``. ``RankHungError`` names a rank that stopped making progress (its peers'
    collectives timed out after ``pg_timeout_s`` while it was still running).
    Raises ``ClusterCapacityError`` at once when the cluster cannot host the ranks.

    Every listener of a run binds one address: the rendezvous store and the progress channel on
    the driver's address (loopback in local mode), gloo/NCCL on each rank's executor address;
    see docs/security.md."""
    if not config.local_mode and spark is None:
        raise ValueError("run_distributed needs spark= for barrier mode, or config.local_mode=True")
    now = config
    if not config.local_mode:
        sizes = sorted(config.world_sizes or (config.num_ranks,))
        check_capacity(spark, replace(config, num_ranks=sizes[0]) if len(sizes) > 1 else config)
        if len(sizes) > 1 and _slots(spark, config.num_ranks) < config.num_ranks:  # elastic: what the cluster offers
            now = replace(config, num_ranks=max(m for m in sizes if m <= _slots(spark, config.num_ranks)))
    bind, advertise = _driver_address(spark, config)
    # A Spark Connect client is usually unreachable from the executors: no channel back to it.
    # The ranks' failure reports then travel in the stage's error text, and their results in its rows.
    remote = not config.local_mode and is_connect(spark)
    channel = contextlib.nullcontext(None) if remote else ProgressServer(on_progress, bind_host=bind,
                                                                         advertise_host=advertise)
    files = ProgressFileReader(config.progress_dir, on_progress) if remote and config.progress_dir else None
    with channel as server, files or contextlib.nullcontext():
        try:
            payload = cloudpickle.dumps({
                "fn": fn, "args": args, "kwargs": kwargs, "backend": config.resolved_backend,
                "env": dict(config.env), "torch_threads": config.torch_threads, "pg_timeout_s": config.pg_timeout_s,
                "progress": server.address if server else None, "progress_token": server.token if server else "",
                "progress_dir": config.progress_dir if remote else None,
                "user_events": on_progress is not None,
            })
        except Exception as e:
            raise ValueError(f"run_distributed could not pickle fn {fn!r} or its arguments: {e}") from e
        for attempt in range(config.max_attempts):
            try:
                if config.local_mode:
                    return _run_local(payload, now, attempt, server)
                if attempt > 0:  # a lost executor may not be back yet: wait for it, shrink, or fail clearly
                    now = _relaunch_size(spark, config, now)
                return _run_barrier(spark, payload, now, attempt, server, bind, advertise)
            except RankFailedError as e:
                if attempt + 1 >= config.max_attempts or not e.retryable:
                    raise
                log.warning("%s failed on rank %d (%s); relaunching from the last checkpoint",
                            attempt_label(attempt, config.max_attempts), e.rank, e.error)
    raise AssertionError("unreachable: the loop returns or raises")


def _driver_address(spark: "SparkSession | None", config: LaunchConfig) -> tuple[str, str]:
    """(address to bind, address ranks connect to) for the progress channel."""
    if config.local_mode or spark is None:
        return "127.0.0.1", "127.0.0.1"
    host = conf_value(spark, "spark.driver.host") or "127.0.0.1"
    return conf_value(spark, "spark.driver.bindAddress") or host, host


def _slots(spark: "SparkSession", wanted: int) -> int:
    """Task slots now; ``wanted`` when the session cannot tell (Spark Connect: the stage then
    waits for slots as Spark's barrier scheduling does)."""
    slots = task_slots(spark)
    return wanted if slots is None else slots


def check_capacity(spark: "SparkSession", config: LaunchConfig) -> None:
    """Raise ClusterCapacityError, naming the fix, when the cluster cannot run ``config.num_ranks``
    barrier tasks at once (after waiting for executors that are known to be on their way)."""
    master = spark_master(spark)
    if config.use_gpu and not conf_value(spark, "spark.task.resource.gpu.amount"):
        raise ClusterCapacityError(
            "use_gpu=True but spark.task.resource.gpu.amount is not set, so barrier tasks get no GPU; "
            "start Spark with the gpu profile (spark-conf/gpu.conf) or set spark.task.resource.gpu.amount=1 "
            "and spark.executor.resource.gpu.amount"
        )
    slots = _slots(spark, config.num_ranks)
    waited = 0.0
    # local / local[N] never grow: fail at once. Executors of other masters register after the
    # session starts: wait for them, but only until all the expected ones are there.
    if slots < config.num_ranks and master != "local" and not master.startswith("local["):
        expected = expected_executors(spark)
        start = time.monotonic()
        while slots < config.num_ranks and time.monotonic() - start < config.start_timeout_s:
            if expected is not None and (registered_executors(spark) or 0) >= expected:
                time.sleep(0.5)  # the last executor's slots can trail its registration
                slots = _slots(spark, config.num_ranks)
                break
            time.sleep(0.5)
            slots = _slots(spark, config.num_ranks)
        waited = time.monotonic() - start
    if slots < config.num_ranks:
        gpu = " (and spark.executor.resource.gpu.amount / spark.task.resource.gpu.amount)" if config.use_gpu else ""
        wait = (f" (after waiting {waited:.0f}s for executors; --start-timeout-s sets the limit)"
                if waited >= 1 else "")
        raise ClusterCapacityError(
            f"{config.num_ranks} ranks requested but the cluster ({master}) can run only {slots} barrier tasks "
            f"at once{wait}; lower --num-ranks to {slots} or less, or add task slots: spark.executor.instances x "
            f"spark.executor.cores / spark.task.cpus{gpu}, or local[N] with N >= ranks for a local master"
        )


def _relaunch_size(spark: "SparkSession", config: LaunchConfig, last: LaunchConfig) -> LaunchConfig:
    """The launch config of a relaunch. Not elastic: the same size, once the slots are back.
    Elastic: the largest allowed size the free slots hold now (fewer after a lost executor, more
    when slots came back), after waiting up to start_timeout_s for the smallest one."""
    sizes = sorted(config.world_sizes or (config.num_ranks,))
    if len(sizes) == 1:
        check_capacity(spark, last)
        return last
    time.sleep(1.0)  # the scheduler drops a lost executor's slots a moment after its tasks fail
    start = time.monotonic()
    while True:
        slots = _slots(spark, last.num_ranks)
        fits = [m for m in sizes if m <= slots]
        if fits or time.monotonic() - start >= config.start_timeout_s:
            break
        time.sleep(0.5)
    if not fits:
        check_capacity(spark, replace(last, num_ranks=sizes[0]))  # raises ClusterCapacityError with the fix
    size = max(fits)
    if size != last.num_ranks:
        log.warning("the cluster offers %d task slots: relaunching on %d ranks instead of %d (elastic; "
                    "docs/elastic.md)", slots, size, last.num_ranks)
    return replace(last, num_ranks=size)


def _is_comm_error(failure: dict) -> bool:
    return bool(_COMM_ERROR_RE.search(failure.get("error", "")))


def _marker(text: str) -> dict | None:
    """The failure report a rank put in Spark's error text, if any (None when absent or garbled)."""
    m = _FAILURE_RE.search(text)
    if not m:
        return None
    try:
        info = json.loads(m.group(1))
    except ValueError:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("rank"), int) else None


def _diagnose(config: LaunchConfig, attempt: int, server: ProgressServer | None, text: str = "",
              reported: list[dict] | None = None, deaths: dict[int, str] | None = None) -> RankFailedError:
    """Pick the root cause among what the ranks reported and what is known about ranks that died.

    When one rank fails, its peers fail too ("connection closed by peer"), so the order of
    preference is: a rank's own error (earliest first); then, when a peer's collective timed out,
    a rank that sent no report and was still alive (hung: Spark or the launcher stopped it
    afterwards); then a rank that died without a word; then the peers' communication errors."""
    failures, _states, channel_deaths = server.snapshot(attempt) if server is not None else ([], {}, {})
    failures = list(failures) + list(reported or [])
    marker = _marker(text)
    if marker is not None:
        failures.append(marker)
    crashed = dict(deaths or {})  # local mode: exit codes, known to precede the peers' errors
    deaths = dict(crashed)
    for rank, when in sorted(channel_deaths.items(), key=lambda kv: kv[1]):
        deaths.setdefault(rank, "Python worker exited (crashed or was killed) without reporting an error")
    if marker is None and _CRASH_RE.search(text):
        lost = re.search(r"ResultTask\(\d+, (\d+)\)|Lost task (\d+)\.\d+", text)
        rank = int(next(g for g in lost.groups() if g is not None)) if lost else -1
        deaths.setdefault(rank, "Python worker exited (crashed or was killed) without reporting an error")
        crashed.setdefault(rank, deaths[rank])
    unique: dict[tuple[Any, str], dict] = {}
    for f in failures:  # the same report can arrive over the channel and in Spark's error text
        unique.setdefault((f.get("rank"), f.get("error", "")), f)
    failures = list(unique.values())
    own = sorted((f for f in failures if not _is_comm_error(f)), key=lambda f: f.get("time", 0.0))
    if own:
        return _rank_error(own[0], attempt, config.max_attempts)
    tail = "" if marker is not None else _spark_summary(text)  # a marker's text only repeats a peer's report
    peers = "".join(f"\nrank {f['rank']} then failed with: {f['error']}" for f in failures)
    first = min((f.get("time", 0.0) for f in failures), default=None)
    if first is not None and any(_TIMEOUT_RE.search(f.get("error", "")) for f in failures):
        reported_ranks = {f.get("rank") for f in failures}
        # Alive when the first peer timed out: no report, no known crash, and its channel (if it
        # dropped at all) dropped only after that, when the stage was torn down.
        hung = [r for r in range(config.num_ranks) if r not in reported_ranks and r not in crashed
                and channel_deaths.get(r, float("inf")) >= first]
        if hung:
            rank = hung[0]
            detail = (f"rank {rank} hung: it stopped making progress and sent no error while its peers waited "
                      f"{config.pg_timeout_s:g}s for it in a collective (it was stuck in a deadlock, blocked I/O, "
                      "a collective the others did not call, or an endless loop); it was stopped. If it was only "
                      "slow, raise the collective timeout (TrainConfig.collective_timeout_s)")
            return RankHungError(rank, detail, (detail + peers + ("\n" + tail if tail else "")).strip(), attempt,
                                 config.max_attempts)
    if deaths:
        rank = min(deaths, key=lambda r: (r < 0, r))
        detail = deaths[rank]
        return RankFailedError(rank, detail, (detail + peers + ("\n" + tail if tail else "")).strip(), attempt,
                               config.max_attempts)
    if failures:
        return _rank_error(sorted(failures, key=lambda f: f.get("time", 0.0))[0], attempt, config.max_attempts)
    return RankFailedError(-1, "the launch failed before any rank reported", tail, attempt, config.max_attempts)


def _rank_error(failure: dict, attempt: int, max_attempts: int) -> RankFailedError:
    # retry=False: the rank's error was a NonRetryableError (a relaunch would repeat it).
    return RankFailedError(int(failure["rank"]), str(failure.get("error", "")), str(failure.get("traceback", "")),
                           attempt, max_attempts, retryable=bool(failure.get("retry", True)))


def _spark_summary(text: str, lines: int = 40) -> str:
    """The readable part of a Spark job failure: messages and Python frames, no JVM stack frames."""
    keep = [ln for ln in text.strip().splitlines()
            if ln.strip() and not re.match(r"\s+at |\s*\.\.\. \d+ more", ln)]
    return "\n".join(keep[-lines:])


def _settle(server: ProgressServer, attempt: int, num_ranks: int, timeout_s: float = _SETTLE_S) -> None:
    """Give the other ranks a moment to report: every rank done, failed or gone, or the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _failures, states, _deaths = server.snapshot(attempt)
        if states and len(states) >= num_ranks and "running" not in states.values():
            return
        time.sleep(0.05)


def _serve_store(bind: str, timeout_s: float) -> tuple[Any, int]:
    """This attempt's rendezvous store, served by the driver on ``bind`` from a socket that stays
    bound from the moment its port is known (no free-port probe to race with); (store, port)."""
    import torch.distributed as dist
    from datetime import timedelta

    sock = listen_socket(bind)
    port = sock.getsockname()[1]
    store = dist.TCPStore(bind, port, None, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=sock.detach())
    return store, port


def _run_barrier(spark: "SparkSession", payload: bytes, config: LaunchConfig, attempt: int,
                 server: ProgressServer | None, bind: str, advertise: str) -> Any:
    # Classic Spark: the driver serves the store, at the address the ranks already reach its
    # progress channel by: publishing a port from rank 0 instead takes a BarrierTaskContext.allGather,
    # and Spark's barrier RPC polls for completion once a second (about 1 s of every launch,
    # docs/benchmarks.md). A Spark Connect client is usually unreachable from the executors: there
    # rank 0 serves the store and shares its port with allGather.
    store, port = (None, None) if server is None else _serve_store(bind, config.pg_timeout_s)
    master = None if port is None else f"{advertise}:{port}"
    try:
        with job_description(spark, f"sparkdl: {config.num_ranks} ranks, attempt {attempt}"):
            out = barrier_stage(spark, config.num_ranks, partial(barrier_task, payload, attempt, master))
    except Exception as e:  # Py4JJavaError / PythonException: the text carries the rank's marker
        # Spark kills the barrier siblings (spark.python.task.killTimeout later, their workers).
        if server is not None:
            _settle(server, attempt, config.num_ranks)
        raise _diagnose(config, attempt, server, text=str(e)) from e
    finally:
        del store
    if not out:
        raise RankFailedError(0, "rank 0 returned no result to the driver", "", attempt, config.max_attempts)
    return cloudpickle.loads(out[0])


def _run_local(payload: bytes, config: LaunchConfig, attempt: int, server: ProgressServer) -> Any:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    store, port = _serve_store("127.0.0.1", config.pg_timeout_s)
    logdir = Path(tempfile.mkdtemp(prefix="sparkdl-ranks-"))
    procs = []
    for rank in range(config.num_ranks):
        p = ctx.Process(target=local_process_main, daemon=True, name=f"sparkdl-rank{rank}",
                        args=(payload, rank, config.num_ranks, port, attempt, results, str(logdir / f"rank{rank}.log")))
        p.start()
        procs.append(p)
    ok: dict[int, bytes | None] = {}
    errors: dict[int, dict] = {}
    failed_at: float | None = None
    try:
        while len(ok) < config.num_ranks:
            _collect(results, ok, errors, timeout_s=0.2)
            dead = _dead_without_word(procs, ok, errors)
            if (errors or dead) and failed_at is None:
                failed_at = time.monotonic()
            # After a first failure, give the peers a moment to report (or die) before diagnosing.
            settled = all(r in ok or r in errors or procs[r].exitcode is not None for r in range(config.num_ranks))
            if failed_at is not None and (settled or time.monotonic() - failed_at > _SETTLE_S):
                while _collect(results, ok, errors, timeout_s=0.2):  # a report may trail its exit code
                    pass
                deaths = {r: f"local rank process exited with code {procs[r].exitcode}\n"
                             f"command: {procs[r].name} (multiprocessing spawn, rank {r} of {config.num_ranks})\n"
                             f"--- last lines of its output ---\n{_tail(logdir / f'rank{r}.log') or '(no output)'}"
                          for r in _dead_without_word(procs, ok, errors)}
                raise _diagnose(config, attempt, server, reported=list(errors.values()), deaths=deaths)
    finally:
        for p in procs:
            p.join(timeout=5 if failed_at is None else 0.5)
            if p.is_alive():  # blocked in a collective whose peer failed
                p.kill()
                p.join()
        results.close()
        del store
        shutil.rmtree(logdir, ignore_errors=True)  # the error already carries each dead rank's output tail
    return cloudpickle.loads(ok[0])


def _dead_without_word(procs: list, ok: dict, errors: dict) -> list[int]:
    return [r for r, p in enumerate(procs) if r not in ok and r not in errors and p.exitcode not in (None, 0)]


def _collect(results: Any, ok: dict, errors: dict, timeout_s: float) -> bool:
    """Take one message off the local ranks' queue; False when none came within the timeout."""
    try:
        rank, status, data = results.get(timeout=timeout_s)
    except queue.Empty:
        return False
    if status == "ok":
        ok[rank] = data
    else:
        errors[rank] = _marker(data) or {"rank": rank, "error": data, "traceback": ""}
    return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
