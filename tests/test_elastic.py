"""Elastic training (docs/elastic.md): a run continues on another number of ranks with every
(epoch, row id) trained exactly once, under an explicit lr / global-batch policy.

Local-mode resumes (2 -> 3, 2 -> 1) use a run folder checkpointed by 2 ranks; the executor-loss
test runs a real 3-executor local-cluster in a subprocess and takes one executor away for good."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

from sparkdl.train import TrainConfig, fit
from sparkdl.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ROWS, B = 176, 8  # 2 ranks stop after 5 steps (80 rows); the 96 left divide by 3 x 8 and by 1 x 8
FIRST_STEPS = 5


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["x"].float()).squeeze(-1)


def tiny_net(**_kwargs) -> nn.Module:
    return _Tiny()


def _write_table(root: Path, rows: int = ROWS) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake

    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 4, generator=g)
    y = (x.sum(1) > 0).float()
    table = pa.table({"id": pa.array(range(rows), pa.int64()),
                      "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).numpy()), 4),
                      "label": pa.array(y.numpy())})
    write_deltalake(str(root / "tables" / "rows"), table)


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("elastic-lake")
    _write_table(root)
    return root


def _cfg(root: Path, **kw) -> TrainConfig:
    base = dict(lakehouse=str(root), train_table=str(root / "tables" / "rows"), model="test_elastic:tiny_net",
                feature_columns=["x"], label_column="label", task="binary", local_mode=True, num_ranks=2,
                batch_size=B, epochs=2, optimizer="sgd", momentum=0.9, lr=0.05, checkpoint_every=FIRST_STEPS,
                deterministic=True, seed=3, resize_policy="scale_lr")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def two_rank_run(lake) -> Path:
    """A run checkpointed by 2 ranks at step 5, mid-epoch 0 (its row log goes with it when copied)."""
    fit(_cfg(lake, run_id="base", max_steps=FIRST_STEPS), progress=False, log_row_ids="id")
    return lake / "runs" / "base"


def _copy_run(lake: Path, base: Path, run_id: str) -> None:
    shutil.copytree(base, lake / "runs" / run_id)


def _rows_by_epoch(run_dir: Path) -> dict[int, list[int]]:
    """Every logged row id per epoch, keeping of each attempt only the steps before the next
    attempt resumed (what a failed attempt trained past its checkpoint was redone)."""
    entries = [json.loads(line) for f in sorted(run_dir.glob("rows-rank*.jsonl")) for line in f.read_text().splitlines()]
    resumed = {}  # attempt -> first step it logged
    for e in entries:
        resumed[e["attempt"]] = min(resumed.get(e["attempt"], e["step"]), e["step"])
    out: dict[int, list[int]] = defaultdict(list)
    for e in entries:
        nxt = resumed.get(e["attempt"] + 1)
        if nxt is None or e["step"] < nxt:
            out[e["epoch"]].extend(e["ids"])
    return out


def _assert_each_row_once(run_dir: Path, *, rows: int, last_world: int, full_epochs: tuple[int, ...]) -> None:
    per_epoch = _rows_by_epoch(run_dir)
    assert sorted(per_epoch) == [0, 1]
    for epoch, ids in per_epoch.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch} trained a row twice"
        assert set(ids) <= set(range(rows))
        if epoch in full_epochs:
            assert sorted(ids) == list(range(rows)), f"epoch {epoch} left rows out"
        else:  # a fresh epoch on the new world: only its remainder / last partial batches are left out
            assert rows - len(ids) < last_world * (B + 1)


def _final(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.checkpoint)["model"]


def _steps_lr(result) -> list[float]:
    return [json.loads(line)["lr"] for line in Path(result.step_metrics).read_text().splitlines()]


# ----- resume on another world size (local mode) -----
def test_two_rank_checkpoint_resumes_on_three_ranks_every_row_once_and_reproducibly(lake, two_rank_run):
    results = []
    for run in ("up-a", "up-b"):
        _copy_run(lake, two_rank_run, run)
        results.append(fit(_cfg(lake, run_id=run, resume=True, num_ranks=3), progress=False, log_row_ids="id"))
    a, b = results
    # Epoch 0's remaining 96 rows went to 3 ranks (4 steps), then epoch 1 is 176 // 3 rows a rank, 7 steps.
    assert a.steps == FIRST_STEPS + 4 + 7
    _assert_each_row_once(Path(a.run_dir), rows=ROWS, last_world=3, full_epochs=(0,))
    # The resize is recorded with its policy and the lr it led to, in the result's lineage.
    assert a.lineage["resizes"] == [{"attempt": 0, "from_ranks": 2, "to_ranks": 3, "step": FIRST_STEPS,
                                     "policy": "scale_lr", "lr": pytest.approx(0.05 * 3 / 2),
                                     "accumulation_steps": 1}]
    lrs = _steps_lr(a)
    assert lrs[:FIRST_STEPS] == [0.05] * FIRST_STEPS and lrs[FIRST_STEPS:] == [pytest.approx(0.075)] * 11
    # A deterministic run resized at the same step ends with the same parameters every time.
    for k, v in _final(a).items():
        torch.testing.assert_close(_final(b)[k], v, rtol=0, atol=0, msg=k)
    # And it trained on: the parameters moved away from the 2-rank checkpoint's.
    first = load_checkpoint(str(two_rank_run / "checkpoints" / "step-000000005.pt"))["model"]
    assert any(not torch.equal(first[k], v) for k, v in _final(a).items())


def test_two_rank_checkpoint_resumes_on_one_rank_keeping_the_global_batch(lake, two_rank_run):
    _copy_run(lake, two_rank_run, "down")
    res = fit(_cfg(lake, run_id="down", resume=True, num_ranks=1, resize_policy="keep_global_batch"),
              progress=False, log_row_ids="id")
    # 1 rank x 2 micro-batches of 8 == the 2-rank global batch: 96 rows left -> 6 steps, then 11 a full epoch.
    assert res.steps == FIRST_STEPS + 6 + 11
    _assert_each_row_once(Path(res.run_dir), rows=ROWS, last_world=1, full_epochs=(0,))
    (resize,) = res.lineage["resizes"]
    assert (resize["from_ranks"], resize["to_ranks"], resize["policy"], resize["accumulation_steps"],
            resize["lr"]) == (2, 1, "keep_global_batch", 2, 0.05)
    assert _steps_lr(res) == [0.05] * res.steps


def test_resize_that_breaks_the_policy_or_cannot_reshard_is_refused_before_launch(lake, two_rank_run):
    _copy_run(lake, two_rank_run, "refused")
    # 2 ranks x 1 micro-batch cannot be split over 3 ranks: the numbers and the fix are named.
    with pytest.raises(ValueError, match=r"keep_global_batch.*2 micro-batches.*not a multiple of 3"):
        fit(_cfg(lake, run_id="refused", resume=True, num_ranks=3, resize_policy="keep_global_batch"),
            progress=False)
    with pytest.raises(ValueError, match=r"checkpointed with num_ranks=2 but the config has num_ranks=3; resume "
                                         r"with num_ranks=2, or set resize_policy"):
        fit(_cfg(lake, run_id="refused", resume=True, num_ranks=3, resize_policy=None), progress=False)
    # Sharded strategies hold their state on one device mesh: an elastic range is refused in the config.
    with pytest.raises(ValueError, match=r"parallelism='fsdp' cannot change its world size"):
        _cfg(lake, run_id="x", parallelism="fsdp", min_ranks=1)
    with pytest.raises(ValueError, match=r"min_ranks <= num_ranks <= max_ranks"):
        _cfg(lake, run_id="x", min_ranks=3)
    # The parameter server's shards are cut for the saved world: refused, naming the fix.
    from sparkdl.train.elastic import allowed_sizes, check_resizable

    with pytest.raises(ValueError, match=r"strategy='ssp'.*resume with num_ranks=2"):
        check_resizable(_cfg(lake, strategy="ssp"), "ssp", saved_ranks=2, world=3)
    assert allowed_sizes(_cfg(lake, strategy="async", min_ranks=1, max_ranks=3), base_ranks=2) == [2]


def test_lr_schedule_is_sized_in_global_samples():
    from sparkdl.train.optim import lr_factor, lr_factor_samples

    cfg = TrainConfig(train_table="t", model="m", warmup_steps=4, lr_schedule="cosine")
    by_step = lr_factor(cfg, 20)
    by_samples = lr_factor_samples(cfg, total_samples=20 * 32, schedule_batch=32)
    # A constant global batch: the same schedule, to the bit.
    assert [by_samples(s * 32, 32) for s in range(20)] == [by_step(s) for s in range(20)]
    # Half the global batch after a resize: the schedule stays at the same point of the run's samples.
    assert by_samples(10 * 32, 16) == by_step(10)
    assert by_samples(2 * 32, 16) == pytest.approx(by_step(2) - 0.5 / 4 * 1)  # warm-up advances per sample


@pytest.mark.parametrize("strategy", ["local_sgd", "bmuf", "fedavg"])
def test_other_strategies_resume_on_another_world_size(tmp_path, strategy):
    import pyarrow as pa
    from deltalake import write_deltalake

    kw = dict(strategy=strategy, sync_every=2)
    if strategy != "fedavg":
        _write_table(tmp_path)
    else:
        tbl = pa.table({"id": pa.array(range(64), pa.int64()), "client": pa.array([i % 6 for i in range(64)]),
                        "x": pa.FixedSizeListArray.from_arrays(pa.array(torch.randn(64 * 4).numpy()), 4),
                        "label": pa.array((torch.rand(64) > 0.5).float().numpy())})
        write_deltalake(str(tmp_path / "tables" / "rows"), tbl)
        kw = dict(strategy="fedavg", fedavg_client_column="client", fedavg_clients_per_round=3, optimizer="sgd",
                  momentum=0.0)
    epochs = 3 if strategy == "fedavg" else 1  # fedavg: 2 rounds an epoch (6 clients, 3 a round)
    fit(_cfg(tmp_path, run_id="r", max_steps=3, checkpoint_every=3, epochs=epochs, **kw), progress=False)
    res = fit(_cfg(tmp_path, run_id="r", resume=True, num_ranks=3, checkpoint_every=3, epochs=epochs, **kw),
              progress=False)
    assert res.lineage["resizes"][0]["to_ranks"] == 3 and res.steps > 3
    assert all(torch.isfinite(v).all() for v in _final(res).values())


# ----- a real cluster loses an executor for good -----
_KILL_SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path
from pyspark.sql import SparkSession
sys.path.insert(0, sys.argv[2])
from sparkdl.train import TrainConfig, fit

lake = Path(sys.argv[1])
spark = SparkSession.builder.getOrCreate()
sc = spark.sparkContext
run_dir = lake / "runs" / "kill"

def killer():
    # Once the 3 ranks checkpointed step 4 and rank 0 stalls in step 6, take an executor away; killExecutor
    # lowers the app's executor target, so the cluster does not start a replacement.
    while not list(run_dir.glob("checkpoints/*000004.pt")):
        time.sleep(0.2)
    time.sleep(1.0)
    ids = sorted(str(sc._jsc.sc().getExecutorIds().mkString(",")).split(","))
    print("KILL", ids[-1], flush=True)
    sc._jsc.sc().killExecutor(ids[-1])

threading.Thread(target=killer, daemon=True).start()
cfg = TrainConfig(lakehouse=str(lake), train_table=str(lake / "tables" / "rows"), model="test_elastic:tiny_net",
                  feature_columns=["x"], label_column="label", task="binary", num_ranks=3, min_ranks=2, max_ranks=3,
                  resize_policy="scale_lr", batch_size=8, epochs=2, optimizer="sgd", lr=0.05, checkpoint_every=2,
                  max_attempts=3, run_id="kill", start_timeout_s=60, collective_timeout_s=60,
                  fault_injection={"rank": 0, "step": 6, "attempt": 0, "kind": "stall", "seconds": 120})
res = fit(cfg, spark=spark, log_row_ids="id", progress=False)
print("RESULT", json.dumps({"steps": res.steps, "resizes": res.lineage.get("resizes")}), flush=True)
spark.stop()
"""


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_executor_lost_for_good_mid_epoch_run_finishes_on_two_ranks_every_row_once(tmp_path):
    import pyspark

    rows = 240  # 3 ranks x 10 batches of 8; after 4 steps (96 rows) the 144 left split into 2 x 9 batches
    _write_table(tmp_path, rows)
    script = tmp_path / "kill_executor.py"
    script.write_text(_KILL_SCRIPT)
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    env.pop("SPARK_HOME", None)
    proc = subprocess.run(
        [str(spark_submit), "--master", "local-cluster[3,1,1024]", "--conf", "spark.ui.enabled=false",
         "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.executor.memory=1g",
         "--conf", "spark.python.task.killTimeout=2s", str(script), str(tmp_path), str(ROOT / "tests")],
        env=env, capture_output=True, text=True, timeout=400, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    (resize,) = out["resizes"]
    assert (resize["from_ranks"], resize["to_ranks"], resize["step"], resize["policy"]) == (3, 2, 4, "scale_lr")
    assert resize["attempt"] >= 1
    assert out["steps"] == 4 + 9 + rows // 2 // B
    _assert_each_row_once(tmp_path / "runs" / "kill", rows=rows, last_world=2, full_epochs=(0, 1))
