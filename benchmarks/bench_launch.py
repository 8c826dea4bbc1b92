"""Launch to first training step: sparkdl's run_distributed vs pyspark's TorchDistributor.

Both run the same function on 2 ranks as a barrier stage of the same SparkSession (local[2],
gloo): build a tiny DDP model and take one optimizer step; the function returns the wall-clock
time of that first step. Launch latency = first step time - the driver's call time. The two
launchers alternate, ``--reps`` times each, after one untimed warm-up of each (JVM, Python
workers, imports). Medians and the ratio are printed.

TorchDistributor starts ``torchrun`` in each barrier task, which spawns a fresh Python
process that imports torch and pickles the function through files; run_distributed runs the
function inside the task's own (reused) Python worker.

    .venv/bin/python benchmarks/bench_launch.py            # 3 reps each
    .venv/bin/python benchmarks/bench_launch.py --reps 5 --local-mode   # also local-mode processes

Over Spark Connect (issue 18): ``--connect`` starts a Connect server on local-cluster[2,1,1024]
(127.0.0.1) and the cached pyspark-client venv, both made by tests/connect_support.py as the tests
make them, and reruns this script in that venv with ``--remote``: TorchDistributor over Connect
(pyspark-client ships pyspark.ml.torch; it launches with a barrier mapInArrow) against
run_distributed given the Connect session. ``--remote sc://host:port`` alone measures against a
server you run. A launcher that fails over Connect is reported as "not supported yet" with its
first error line.

    .venv/bin/python benchmarks/bench_launch.py --connect --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def first_step(init_group: bool) -> float:
    """One DDP step of a tiny model; returns time.time() when the step has finished."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if init_group:  # TorchDistributor only sets the env vars; torchrun's rank initializes the group
        dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 8), torch.randn(16, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return time.time()
    finally:
        if init_group:
            dist.destroy_process_group()


def _ours(spark, local_mode: bool) -> float:
    from sparkdl.train import LaunchConfig, run_distributed

    start = time.time()
    t = run_distributed(first_step, False, spark=spark, config=LaunchConfig(num_ranks=2, local_mode=local_mode))
    return t - start


def _torch_distributor(spark) -> float:
    from pyspark.ml.torch.distributor import TorchDistributor

    start = time.time()
    t = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(first_step, True)
    return t - start


def _measure(launchers: dict, reps: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Alternate the launchers, one untimed warm-up round then ``reps`` timed ones."""
    runs: dict[str, list[float]] = {name: [] for name in launchers}
    broken: dict[str, str] = {}
    for rep in range(reps + 1):  # rep 0 warms up the JVM, the Python workers and imports
        for name in runs:
            if name in broken:
                continue
            try:
                latency = launchers[name]()
            except Exception as e:
                broken[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                continue
            print(f"{'warm-up' if rep == 0 else f'rep {rep}'}: {name}: {latency:.2f} s to first step", flush=True)
            if rep > 0:
                runs[name].append(latency)
    return runs, broken


def _summary(title: str, runs: dict[str, list[float]], broken: dict[str, str], *, failed: str = "failed") -> None:
    print(f"\n{title}:")
    medians = {name: statistics.median(v) for name, v in runs.items() if v}
    for name, v in runs.items():
        if name in medians:
            print(f"  {name:30s} {medians[name]:7.2f} s   (runs: {', '.join(f'{x:.2f}' for x in v)})")
        else:
            reason = next((ln for ln in broken.get(name, "no runs").splitlines() if ln.strip()), "no runs")
            print(f"  {name:30s} {failed}: {reason[:300]}")
    if "run_distributed" in medians and "TorchDistributor" in medians:
        print(f"  ratio TorchDistributor / run_distributed: {medians['TorchDistributor'] / medians['run_distributed']:.1f}x")


def _remote(url: str, reps: int) -> None:
    """Both launchers with a Spark Connect session (run inside the client venv)."""
    import pyspark
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(url).getOrCreate()
    print(f"Spark Connect: client pyspark {pyspark.__version__}, server Spark {spark.version}, {url}", flush=True)
    launchers = {"run_distributed": lambda: _ours(spark, False), "TorchDistributor": lambda: _torch_distributor(spark)}
    try:
        runs, broken = _measure(launchers, reps)
    finally:
        spark.stop()
    _summary(f"launch -> first DDP step over Spark Connect, 2 ranks, local-cluster[2,1,1024], median of {reps} "
             "(after a warm-up)", runs, broken, failed="not supported yet")


def _connect(reps: int) -> int:
    """Start a Connect server and the client venv as the tests do, then time both launchers in it."""
    import secrets
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import connect_support

    with tempfile.TemporaryDirectory(prefix="bench-connect-") as tmp:
        # Version skew: pyspark-client 4.2's TorchDistributor pickles its 4.2 task function, which
        # calls the server's 4.3 torchrun helpers; those read a rendezvous id that only 4.3's task
        # function sets. Each run takes a fresh MASTER_PORT, so one id per server is enough.
        server = connect_support.start_connect_server(
            Path(tmp), conf={"spark.executorEnv.PYSPARK_TORCH_DISTRIBUTOR_RDZV_ID": secrets.token_hex(16)})
        try:
            venv = connect_support.ensure_client_venv(log=print)
            print(f"client venv {venv.path}: {'built' if venv.created else 'cached'} in {venv.seconds:.1f} s", flush=True)
            ready = server.wait_ready(venv.python)
            print(f"Spark Connect server {server.url}: ready in {ready:.1f} s (2 executors up)", flush=True)
            proc = subprocess.run([str(venv.python), __file__, "--remote", server.url, "--reps", str(reps)],
                                  env=connect_support.client_env(server.url))
            return proc.returncode
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each launcher")
    parser.add_argument("--local-mode", action="store_true", help="also time run_distributed's local mode")
    parser.add_argument("--connect", action="store_true",
                        help="start a Spark Connect server and a pyspark-client venv; time both launchers over Connect")
    parser.add_argument("--remote", default=None, metavar="sc://HOST:PORT",
                        help="time both launchers over this Spark Connect server (run from a pyspark-client venv)")
    args = parser.parse_args()
    if args.connect:
        raise SystemExit(_connect(args.reps))
    if args.remote:
        return _remote(args.remote, args.reps)

    from sparkdl.session import spark_session

    spark = spark_session("local", master="local[2]", app_name="bench-launch",
                          conf={"spark.default.parallelism": "2"})
    launchers = {
        "run_distributed": lambda: _ours(spark, False),
        "TorchDistributor": lambda: _torch_distributor(spark),
    }
    if args.local_mode:
        launchers["run_distributed (local mode)"] = lambda: _ours(spark, True)
    try:
        runs, broken = _measure(launchers, args.reps)
    finally:
        spark.stop()
    _summary(f"launch -> first DDP step, 2 ranks, local[2], median of {args.reps} (after a warm-up)", runs, broken)


if __name__ == "__main__":
    main()
