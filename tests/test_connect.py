"""sparkdl from a Spark Connect client: a venv with only pyspark-client (no JVM, no sparkContext)
against a real Connect server on local-cluster[2,1,1024] (tests/connect_fixtures.py).

The infrastructure tests pass today. The tour and kill-and-resume tests are issue 18's target:
they are xfail until sparkdl runs over Connect; drop the xfail marks when they pass.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from connect_support import PYSPARK_CLIENT, run_source

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]

def _last_json(stdout: str) -> dict:
    """The JSON object a client script prints as its last line."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, f"the client printed no JSON result:\n{stdout[-3000:]}"
    return json.loads(lines[-1])


# ----- the client venv and the server ----------------------------------------------------------
def test_client_venv_has_pyspark_client_and_no_jvm_parts(connect_client_python):
    script = textwrap.dedent(
        """
        import importlib.util, json, pathlib, subprocess, sys
        import pyspark, pyspark.sql.connect.session
        root = pathlib.Path(pyspark.__file__).parent
        dists = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True,
                               text=True, check=True).stdout
        names = {d["name"].lower(): d["version"] for d in json.loads(dists)}
        print(json.dumps({
            "version": pyspark.__version__, "py4j": importlib.util.find_spec("py4j") is not None,
            "jars": (root / "jars").exists(), "spark_submit": (root / "bin" / "spark-submit").exists(),
            "pyspark_dist": "pyspark" in names, "client_dist": names.get("pyspark-client"),
            "torch": importlib.util.find_spec("torch") is not None, "python": list(sys.version_info[:2]),
        }))
        """
    )
    proc = run_source(connect_client_python.python, script, capture_output=True, text=True, timeout=120,
                      env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    got = _last_json(proc.stdout)
    assert got["client_dist"] == PYSPARK_CLIENT.split("==")[-1] == got["version"]
    assert not got["pyspark_dist"], "the full pyspark is installed next to pyspark-client"
    assert not got["py4j"] and not got["jars"] and not got["spark_submit"], got
    assert got["torch"] and got["python"] == [3, 11]


def test_a_server_that_cannot_start_fails_naming_it_with_its_log_tail(tmp_path):
    from connect_support import start_connect_server

    server = start_connect_server(tmp_path, master="nonsense://nowhere")
    try:
        message = r"(?s)exited with code \d+ before listening.*tail of .*connect-server\.log.*Master must either be"
        with pytest.raises(RuntimeError, match=message):
            server.wait_ready("/nonexistent/python", timeout=120)
    finally:
        server.stop()
    assert server.descendants() == []


PROBES = textwrap.dedent(
    """
    import json, os, sys, pathlib
    import pyspark
    from pyspark.sql import SparkSession
    from pyspark.errors import PySparkException

    spark = SparkSession.builder.remote(os.environ["SPARK_REMOTE"]).getOrCreate()
    out = {"client": pyspark.__version__, "server": spark.version,
           "connect": type(spark).__module__}
    out["range"] = sorted(r.id for r in spark.range(6, numPartitions=2).collect())
    try:
        spark.sparkContext
        out["sparkContext"] = "no error"
    except PySparkException as e:  # PySparkAttributeError in 4.x
        out["sparkContext"] = e.getCondition() if hasattr(e, "getCondition") else e.getErrorClass()

    def stage(batches):
        import pyarrow as pa
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        n = sum(b.num_rows for b in batches)
        ctx.barrier()
        got = ctx.allGather(f"{ctx.partitionId()}:{os.getpid()}")
        yield pa.RecordBatch.from_pydict({"rank": [ctx.partitionId()], "rows": [n], "all": [";".join(got)]})

    rows = spark.range(10, numPartitions=2).mapInArrow(stage, "rank long, rows long, all string", barrier=True).collect()
    out["barrier"] = sorted((r.rank, r.rows) for r in rows)
    out["barrier_pids"] = len({p.split(":")[1] for r in rows for p in r.all.split(";")})

    # A user module shipped with addArtifacts(pyfile=True) is importable in the executors' UDFs.
    mod = pathlib.Path(sys.argv[1]) / "sparkdl_connect_probe_mod.py"
    mod.write_text("def triple(x):\\n    return 3 * x\\n")
    spark.addArtifacts(str(mod), pyfile=True)

    def use(batches):
        import pyarrow as pa
        import sparkdl_connect_probe_mod as m

        for b in batches:
            yield pa.RecordBatch.from_pydict({"y": [m.triple(v) for v in b.column(0).to_pylist()]})

    out["artifact"] = sorted(r.y for r in spark.range(4, numPartitions=2).mapInArrow(use, "y long").collect())
    spark.stop()
    print(json.dumps(out))
    """
)


def test_dataframes_barrier_stages_and_artifacts_over_connect(run_client, tmp_path):
    got = _last_json(run_client(PROBES, str(tmp_path), timeout=300).stdout)
    assert got["connect"].startswith("pyspark.sql.connect"), got
    assert got["server"].startswith("4.3") and got["client"] == PYSPARK_CLIENT.split("==")[-1], got
    assert got["range"] == list(range(6))
    assert got["sparkContext"] == "JVM_ATTRIBUTE_NOT_SUPPORTED"
    assert got["barrier"] == [[0, 5], [1, 5]] and got["barrier_pids"] == 2, got
    assert got["artifact"] == [0, 3, 6, 9]


# ----- the README tour over Connect (issue 18) -----------------------------------------------------
TOUR = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import numpy as np
    import pandas as pd

    work, lakehouse = Path(sys.argv[1]), sys.argv[2]
    from sparkdl.session import spark_session

    spark = spark_session(remote=os.environ["SPARK_REMOTE"])
    assert type(spark).__module__.startswith("pyspark.sql.connect"), type(spark)

    from sparkdl.etl import ETLConfig, run_etl_config
    from sparkdl.pipeline import PipelineConfig, train_config
    from sparkdl.predict import PredictConfig, predict_table
    from sparkdl.train import fit

    config = ETLConfig.from_yaml(work / "churn.yaml")
    etl = run_etl_config(config, spark=spark, lakehouse=lakehouse)
    epochs = []
    cfg = train_config(PipelineConfig(lakehouse=lakehouse, config=str(work / "churn.yaml"), epochs=2,
                                      batch_size=32, num_ranks=2))
    trained = fit(cfg, spark=spark, on_epoch=epochs.append, progress=False)
    pred = predict_table(PredictConfig(lakehouse=lakehouse, model_name=trained.model_name, input_table="churn_valid",
                                       output_table="churn_predictions"), spark=spark)
    print(json.dumps({
        "rows_in": etl.rows_in, "rows_out": etl.rows_out, "rows_rejected": etl.rows_rejected,
        "reject_reasons": etl.reject_reasons, "model": [trained.model_name, trained.model_version],
        "history": len(trained.history), "on_epoch": len(epochs), "curves": trained.curves_png,
        "pred_rows": pred.rows, "pred_version": pred.output_version, "pred_model": pred.model_version,
    }))
    """
)


def _readme_churn(work: Path, n: int = 240) -> int:
    """README's "Bring your own data" config, verbatim, and small generated CSVs next to it (3 bad rows)."""
    import numpy as np
    import pandas as pd

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Bring your own data"):]
    start = section.index("```yaml\n") + 8
    (work / "churn.yaml").write_text(section[start:section.index("```", start)])
    (work / "data").mkdir(parents=True)
    rng = np.random.default_rng(4)
    plans = pd.DataFrame({"plan": ["basic", "plus", "pro", "team"], "tier": ["low", "mid", "high", "high"],
                          "list_price": [10.0, 20.0, 40.0, 80.0]})
    plans.to_csv(work / "data" / "plans.csv", index=False)
    plan = rng.choice(plans.plan, n)
    calls = rng.poisson(2, n)
    customers = pd.DataFrame({
        "customer_id": np.arange(1, n + 1), "signup_date": pd.date_range("2022-01-01", periods=n, freq="D").date,
        "plan": plan, "monthly_fee": (plans.set_index("plan").list_price[plan].to_numpy() * rng.uniform(0.7, 1.0, n)).round(2),
        "support_calls": calls, "tenure_months": rng.integers(1, 60, n),
        "country": rng.choice(["DE", "FR", "US", "BR", "IN"], n),
        "churned": np.where(rng.random(n) < 0.2 + 0.1 * (calls > 3), "yes", "no"),
    })
    customers.loc[0, "churned"] = "maybe"
    customers.loc[1, "monthly_fee"] = -5
    customers.loc[2, "plan"] = None
    customers.to_csv(work / "data" / "customers.csv", index=False)
    return n


@pytest.mark.slow
def test_readme_tour_from_a_pyspark_client_only_venv(run_client, connect_server, tmp_path):
    """ETL -> 2-rank training -> predict from the client, then the pipeline job over Connect."""
    n = _readme_churn(tmp_path)
    lakehouse = tmp_path / "lakehouse"
    got = _last_json(run_client(TOUR, str(tmp_path), str(lakehouse), timeout=900).stdout)
    assert got["rows_in"] == n == got["rows_out"] + got["rows_rejected"]
    assert got["reject_reasons"] == {"not_allowed:churned": 1, "out_of_range:monthly_fee": 1, "missing:plan": 1}
    assert got["model"] == ["churn", 1]
    assert got["history"] == got["on_epoch"] == 2, "per-epoch rows must reach the client while it trains"
    assert got["curves"] and Path(got["curves"]).exists()
    assert got["pred_model"] == 1 and got["pred_version"] == 0 and got["pred_rows"] > 0
    for table in ("churn_train", "churn_valid", "churn_rejects", "churn_predictions"):
        assert (lakehouse / "tables" / table / "_delta_log").is_dir(), f"{table} was not written"

    # The pipeline job (jobs/*.py --remote, or SPARK_REMOTE alone) on a second lakehouse.
    job = ROOT / "jobs" / "pipeline.py"
    args = [str(job), "--lakehouse", str(tmp_path / "lh2"), "--config", str(tmp_path / "churn.yaml"),
            "--epochs", "1", "--batch-size", "32", "--num-ranks", "2"]
    if "--remote" in job.read_text():
        args += ["--remote", connect_server.url]
    proc = run_client(f"import runpy, sys; sys.argv = {args!r}; runpy.run_path({str(job)!r}, run_name='__main__')",
                      timeout=900)
    assert "model churn v1" in proc.stdout, proc.stdout
    assert (tmp_path / "lh2" / "tables" / "churn_predictions" / "_delta_log").is_dir()


KILL_AND_RESUME = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch

    lakehouse = sys.argv[1]
    from sparkdl.session import spark_session

    spark = spark_session(remote=os.environ["SPARK_REMOTE"])
    from sparkdl.etl import run_digits_etl
    from sparkdl.train import TrainConfig, fit
    from sparkdl.train.checkpoint import load_checkpoint

    run_digits_etl(spark=spark, lakehouse=lakehouse)
    common = dict(lakehouse=lakehouse, train_table="digits_train", valid_table=None, model="digits_cnn", epochs=2,
                  batch_size=32, lr=3e-3, num_ranks=2, checkpoint_every=5, deterministic=True, max_attempts=2)
    clean = fit(TrainConfig(run_id="clean", **common), spark=spark, progress=False)
    faulty = fit(TrainConfig(run_id="faulty", fault_injection={"rank": 1, "step": 13, "attempt": 0, "kind": "exit"},
                             **common), spark=spark, log_row_ids="id", progress=False)
    a, b = load_checkpoint(clean.checkpoint)["model"], load_checkpoint(faulty.checkpoint)["model"]
    attempts = set()
    for rank in (0, 1):
        for line in (Path(faulty.run_dir) / f"rows-rank{rank}.jsonl").read_text().splitlines():
            attempts.add(json.loads(line)["attempt"])
    print(json.dumps({"steps": [clean.steps, faulty.steps], "attempts": sorted(attempts),
                      "identical": sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)}))
    """
)


@pytest.mark.slow
def test_killed_rank_resumes_over_connect_with_identical_parameters(run_client, tmp_path):
    """tests/test_train.py's kill-and-resume, driven from the Connect client: rank 1's worker exits
    at step 13, the stage relaunches and resumes from the step-10 checkpoint, bit-identical."""
    got = _last_json(run_client(KILL_AND_RESUME, str(tmp_path / "lakehouse"), timeout=900).stdout)
    assert got["steps"][0] == got["steps"][1] > 13
    assert got["attempts"] == [0, 1], "the fault must have forced a second attempt"
    assert got["identical"], "the resumed run's parameters differ from the clean run's"


@pytest.mark.slow
def test_tour_on_an_hdfs_lakehouse_from_a_client_without_any_hdfs_client(run_client, hdfs_uri, tmp_path):
    """Every lakehouse read and write the client would make runs on the cluster (on_storage): the
    client venv has no HDFS client (no hdfs-native, no JVM), yet ETL, training, publishing and
    predict land on hdfs://."""
    from sparkdl import _fs

    no_client = run_client("import importlib.util as u\nprint(u.find_spec('hdfs_native') is None, "
                           "u.find_spec('py4j') is None)\n").stdout.split()
    assert no_client[-2:] == ["True", "True"], no_client
    n = _readme_churn(tmp_path)
    lake = f"{hdfs_uri}/connect-lake"
    got = _last_json(run_client(TOUR, str(tmp_path), lake, timeout=900).stdout)
    assert got["rows_in"] == n == got["rows_out"] + got["rows_rejected"]
    assert got["model"] == ["churn", 1] and got["pred_rows"] > 0
    assert got["curves"].startswith("hdfs://") and _fs.exists(got["curves"])
    for table in ("churn_train", "churn_valid", "churn_rejects", "churn_predictions"):
        assert _fs.exists(f"{lake}/tables/{table}/_delta_log/00000000000000000000.json"), table
    assert _fs.exists(f"{lake}/models/churn/v1")
