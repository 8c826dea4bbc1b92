"""Hardening (issue 11): nothing read from the lakehouse runs code, listeners bind one address,
deterministic errors fail once, jobs fail with one line, names stay inside the lakehouse,
leftovers get cleaned, attempts are counted one way, hung ranks are named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from pyspark import cloudpickle

from sparkdl.errors import (
    CheckpointError,
    DataValidationError,
    LoaderError,
    ModelNotFoundError,
    NonRetryableError,
    RankFailedError,
    RankHungError,
    SchemaMismatchError,
    UntrustedModelError,
    is_retryable,
)
from sparkdl.train import LaunchConfig, rank_context, run_distributed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ----- helpers --------------------------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    task = "binary"
    input_columns = ["x"]

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, batch):
        return self.lin(batch["x"].float()).squeeze(1)


def _publish(root: str, name: str, factory: str, kwargs: dict | None = None):
    from sparkdl.registry import publish_model

    return publish_model(root, name, model=_Tiny(), model_config={"factory": factory, "kwargs": kwargs or {},
                                                                  "input_columns": ["x"]},
                         training_config={}, lineage={}, metrics={})


def _listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            if width == 8:
                addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(hexaddr)[::-1])
            else:
                raw = bytes.fromhex(hexaddr)
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            out.append((addr, int(hexport, 16)))
    return out


_ANY = {"0.0.0.0", "::"}


# ----- 1. code from model configs ----------------------------------------------------------------------
def test_model_config_naming_subprocess_runs_nothing_on_the_driver(tmp_path):
    from sparkdl.registry import load_model

    root, marker = str(tmp_path / "lake"), tmp_path / "pwned"
    _publish(root, "evil", "subprocess:check_call", {"args": ["touch", str(marker)]})
    with pytest.raises(UntrustedModelError) as info:
        load_model(root, "evil")
    assert not marker.exists(), "the factory named by the model file ran"
    message = str(info.value)
    assert "'subprocess:check_call'" in message and "trusted_modules=['subprocess']" in message
    assert "SPARKDL_TRUSTED_MODULES" in message


def test_model_config_naming_subprocess_runs_nothing_in_a_predict_worker(spark, tmp_path):
    from sparkdl.predict import predict_dataframe, score_batches
    from sparkdl.tasks import make_task

    root, marker = str(tmp_path / "lake"), tmp_path / "pwned"
    _publish(root, "evil", "subprocess:check_call", {"args": ["touch", str(marker)]})
    df = spark.createDataFrame([([0.0, 1.0, 2.0, 3.0],)], "x array<float>")
    with pytest.raises(UntrustedModelError):  # refused on the driver, before any task
        predict_dataframe(df, lakehouse=root, model_name="evil").collect()
    def worker(_rows):  # what predict's mapInArrow runs in each Python worker
        try:
            next(score_batches(iter([]), lakehouse=root, model_name="evil", version=1, task=make_task("binary"),
                               input_columns=["x"], keep_columns=[], specs={}, batch_size=8), None)
            yield "loaded"
        except UntrustedModelError as e:
            yield f"refused: {e}"

    out = spark.sparkContext.parallelize([0], 1).mapPartitions(worker).collect()
    assert out[0].startswith("refused:"), out
    assert not marker.exists(), "the factory named by the model file ran in a Python worker"


def test_registered_entry_point_and_allowlisted_factories_load(tmp_path, monkeypatch):
    from sparkdl.registry import load_model

    mod = tmp_path / "hard_trusted_models.py"
    mod.write_text(textwrap.dedent("""
        import torch
        class M(torch.nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.lin = torch.nn.Linear(width, 1)
        def make(width=4):
            return M(width)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    root = str(tmp_path / "lake")
    from sparkdl.registry import publish_model

    import hard_trusted_models

    publish_model(root, "mine", model=hard_trusted_models.make(4),
                  model_config={"factory": "hard_trusted_models:make", "kwargs": {"width": 4}},
                  training_config={}, lineage={}, metrics={})
    with pytest.raises(UntrustedModelError, match="hard_trusted_models"):
        load_model(root, "mine")
    model, mv = load_model(root, "mine", trusted_modules=["hard_trusted_models"])
    assert mv.version == 1 and isinstance(model, hard_trusted_models.M)
    monkeypatch.setenv("SPARKDL_TRUSTED_MODULES", "other, hard_trusted_models")
    assert isinstance(load_model(root, "mine")[0], hard_trusted_models.M)
    # Registered names need no allowlist.
    from sparkdl.models import ImageCNN, build_model

    publish_model(root, "digits", model=build_model("digits_cnn", channels=4), model_config={
                  "factory": "digits_cnn", "kwargs": {"channels": 4}}, training_config={}, lineage={}, metrics={})
    assert isinstance(load_model(root, "digits")[0], ImageCNN)


# ----- 2. pickled checkpoints -----------------------------------------------------------------------------
class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_tampered_checkpoint_is_refused_without_running_it(tmp_path):
    from sparkdl.train.checkpoint import checkpoint_uri, latest_checkpoint, load_checkpoint

    run_dir, marker = str(tmp_path / "run"), tmp_path / "pwned"
    uri = checkpoint_uri(run_dir, 7)
    Path(uri).parent.mkdir(parents=True)
    torch.save({"model": {}, "step": 7, "rng": [_Payload(str(marker))]}, uri)
    assert latest_checkpoint(run_dir) == uri
    with pytest.raises(CheckpointError, match=r"step-000000007\.pt cannot be loaded safely"):
        load_checkpoint(uri)
    assert not marker.exists(), "loading the checkpoint ran its pickled payload"


def test_checkpoint_save_refuses_what_weights_only_cannot_load_and_rng_round_trips(tmp_path):
    import random

    import numpy as np

    from sparkdl.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

    with pytest.raises(TypeError, match=r"state\['rng'\]\[0\] is a numpy.ndarray"):
        save_checkpoint(str(tmp_path), 1, {"rng": [np.zeros(3)]})
    with pytest.raises(TypeError, match=r"numpy.float64"):
        save_checkpoint(str(tmp_path), 1, {"history": [{"val_auc": np.float64(0.5)}]})
    random.seed(3), np.random.seed(4), torch.manual_seed(5), np.random.standard_normal()
    state = capture_rng("cpu")
    expected = (random.random(), np.random.standard_normal(), torch.rand(2).tolist())
    uri = save_checkpoint(str(tmp_path), 2, {"rng": [state], "step": 2})
    restore_rng(load_checkpoint(uri)["rng"][0], "cpu")
    assert (random.random(), np.random.standard_normal(), torch.rand(2).tolist()) == expected
    with pytest.raises(CheckpointError, match="has no 'loaders' entry"):  # was a bare KeyError
        load_checkpoint(uri)["loaders"]


@pytest.fixture(scope="module")
def tiny_table(spark, tmp_path_factory):
    """A 256-row table of 4 float features and a binary label, and a model module ranks can import."""
    from sparkdl.lakehouse import Lakehouse, write_table

    base = tmp_path_factory.mktemp("hard_fit")
    (base / "hard_fit_models.py").write_text(textwrap.dedent("""
        import torch
        class Tiny(torch.nn.Module):
            task = "binary"
            input_columns = ["x0", "x1", "x2", "x3"]
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(4, 1)
            def forward(self, batch):
                x = torch.stack([batch[c].float() for c in self.input_columns], 1)
                return self.lin(x).squeeze(1)
        def tiny():
            return Tiny()
    """))
    sys.path.insert(0, str(base))  # spawn passes sys.path on to the local ranks
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    rows = [(i, *map(float, x[i]), int(x[i].sum() > 0)) for i in range(256)]
    df = spark.createDataFrame(rows, "id long, x0 double, x1 double, x2 double, x3 double, label long").coalesce(1)
    root = str(base / "lake")
    write_table(df, Lakehouse(root).table("tiny"), mode="overwrite")
    yield root
    sys.path.remove(str(base))


def _tiny_config(root: str, **kw):
    from sparkdl.train import TrainConfig

    return TrainConfig(lakehouse=root, train_table="tiny", model="hard_fit_models:tiny", label_column="label",
                       feature_columns=["x0", "x1", "x2", "x3"], batch_size=16, num_ranks=2, local_mode=True,
                       checkpoint_every=2, shuffle=False, collective_timeout_s=60, **kw)


def test_resume_from_a_weights_only_checkpoint_still_works(tiny_table):
    from sparkdl.train import fit
    from sparkdl.train.checkpoint import load_checkpoint

    first = fit(_tiny_config(tiny_table, run_id="resume-ok", max_steps=4), progress=False)
    assert first.steps == 4
    state = load_checkpoint(first.checkpoint)  # weights_only=True
    assert state["step"] == 4 and isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)
    again = fit(_tiny_config(tiny_table, run_id="resume-ok", max_steps=6, resume=True), progress=False)
    assert again.steps == 6


# ----- 3. listeners -------------------------------------------------------------------------------------
def _rank_listeners() -> list:
    import torch.distributed as dist

    mine = _listeners(os.getpid())
    rank_context().report({"kind": "probe"})
    time.sleep(0.5)  # the driver inspects its own sockets while the run is up
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    dist.barrier()
    return everyone


def _run_and_watch_driver(**kwargs) -> tuple[list, list]:
    seen: list = []

    def on_progress(event: dict) -> None:
        seen.extend(_listeners(os.getpid()))

    ranks = run_distributed(_rank_listeners, on_progress=on_progress, **kwargs)
    return ranks, seen


def test_local_run_listens_on_loopback_only():
    ranks, driver = _run_and_watch_driver(config=LaunchConfig(num_ranks=2, local_mode=True, pg_timeout_s=60))
    listening = [a for per_rank in ranks for a in per_rank] + driver
    assert driver, "the driver's progress channel and store must be seen listening"
    assert all(addr == "127.0.0.1" for addr, _ in listening), listening


@pytest.mark.integration
def test_barrier_run_listens_on_no_wildcard_address(spark):
    ranks, driver = _run_and_watch_driver(spark=spark, config=LaunchConfig(num_ranks=2, pg_timeout_s=60))
    listening = [a for per_rank in ranks for a in per_rank]
    assert ranks[0], "rank 0 must be seen listening (gloo)"
    assert not [a for a in listening + driver if a[0] in _ANY], listening + driver


def test_progress_channel_drops_forged_and_malformed_lines():
    from sparkdl.train._progress_channel import ProgressClient, ProgressServer

    events: list = []
    with ProgressServer(events.append, bind_host="127.0.0.1", advertise_host="127.0.0.1") as server:
        host, port = server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            lines = [
                {"_sparkdl": "failure", "rank": 0, "attempt": 0, "retry": False, "error": "forged", "traceback": ""},
                {"_sparkdl": "start", "rank": 0, "attempt": "zero", "_sparkdl_token": server.token},
                {"_sparkdl": "failure", "rank": [1], "attempt": {}, "_sparkdl_token": server.token},
                {"step": 1, "_sparkdl_token": "0" * 32},
            ]
            s.sendall(b"".join(json.dumps(x).encode() + b"\n" for x in lines) + b"{not json\n[1, 2]\n")
        client = ProgressClient(server.address, 1, 0, token=server.token)
        client.send({"step": 2})
        client.close()
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server._thread.is_alive(), "a malformed line stopped the channel"
        failures, states, _ = server.snapshot(0)
    assert failures == [] and states == {1: "done"}
    assert [e["step"] for e in events] == [2]


def test_a_forged_no_retry_report_does_not_abort_a_run():
    """A rank fails once (retried); meanwhile a forged "retry": false line reaches the driver."""
    cfg = LaunchConfig(num_ranks=2, local_mode=True, max_attempts=2, pg_timeout_s=60)
    assert run_distributed(_flaky_with_forgery, config=cfg, on_progress=lambda event: None) == 1


def _flaky_with_forgery() -> int:
    import torch.distributed as dist

    ctx = rank_context()
    if ctx.attempt == 0 and ctx.rank == 1:
        host, port = ctx._reporter._addr
        with socket.create_connection((host, port)) as s:  # everything but the token
            s.sendall(json.dumps({"_sparkdl": "failure", "rank": 1, "attempt": 0, "retry": False, "time": 0.0,
                                  "error": "DataValidationError: forged", "traceback": ""}).encode() + b"\n")
        time.sleep(0.5)
        raise RuntimeError("transient")
    dist.barrier()
    return ctx.attempt


# ----- 4. deterministic errors are not retried ------------------------------------------------------------
def _raise_on_rank1(kind: str) -> int:
    import torch.distributed as dist

    ctx = rank_context()
    Path(os.environ["HARD_ATTEMPTS"]).joinpath(f"{ctx.rank}-{ctx.attempt}").touch()
    if ctx.rank == 1:
        if kind == "loader":
            raise LoaderError("cannot read row group 0 of part-0.parquet: corrupt page")
        raise SchemaMismatchError("t", ["column 'x' is missing"])
    dist.barrier()
    return 0


@pytest.mark.parametrize("kind", ["loader", "schema"])
def test_deterministic_data_errors_fail_once(tmp_path, kind):
    cfg = LaunchConfig(num_ranks=2, local_mode=True, max_attempts=3, pg_timeout_s=60,
                       env={"HARD_ATTEMPTS": str(tmp_path)})
    with pytest.raises(RankFailedError) as info:
        run_distributed(_raise_on_rank1, kind, config=cfg)
    assert not info.value.retryable and info.value.attempt == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-0", "1-0"], "a deterministic error was retried"


def test_retryability_is_decided_by_class_and_cause():
    assert not is_retryable(LoaderError("x")) and not is_retryable(SchemaMismatchError("t", ["p"]))
    assert not is_retryable(DataValidationError("x")) and not is_retryable(CheckpointError("x"))
    assert is_retryable(RuntimeError("x")) and is_retryable(OSError("x"))
    try:
        try:
            raise ValueError("bad config")
        except ValueError as e:
            raise NonRetryableError(str(e)) from e
    except NonRetryableError as wrapped:
        assert not is_retryable(wrapped)
    offenders = subprocess.run(["grep", "-rn", "_sparkdl_no_retry", str(ROOT / "sparkdl")], capture_output=True,
                               text=True).stdout
    assert offenders == "", offenders


# ----- 5. jobs fail with one line --------------------------------------------------------------------------
def _job(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=240, env=e, cwd=str(ROOT))


def _one_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    failed = [ln for ln in err.splitlines() if ln.startswith(prefix)]
    assert len(failed) == 1, err[-3000:]
    return failed[0]


def test_train_job_lakehouse_that_is_a_file_is_one_line(tmp_path, tiny_table):
    from sparkdl.lakehouse import Lakehouse

    lake = tmp_path / "lake"
    lake.write_text("not a folder")
    proc = _job("train", "--lakehouse", str(lake), "--train-table", Lakehouse(tiny_table).table("tiny"),
                "--model", "hard_fit_models:tiny", "--label-column", "label", "--feature-columns", "x0,x1,x2,x3",
                "--local-mode", "--num-ranks", "1", "--max-steps", "1",
                env={"PYTHONPATH": f"{ROOT}{os.pathsep}{Path(tiny_table).parent}"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Not a directory" in _one_line(proc, "sparkdl train failed:")


def test_train_job_checkpoint_missing_keys_is_one_line(tmp_path):
    lake = tmp_path / "lake"
    ckpt = lake / "runs" / "r1" / "checkpoints" / "step-000000002.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": {}, "step": 2}, ckpt)
    proc = _job("train", "--lakehouse", str(lake), "--train-table", "t", "--model", "tabular_mlp", "--local-mode",
                "--num-ranks", "1",
                "--run-id", "r1", "--resume")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_line(proc, "sparkdl train failed:")
    assert "has no 'loaders' entry" in line and "step-000000002.pt" in line


@pytest.mark.parametrize("job, args, prefix", [
    ("etl", ["--valid-fraction", "2"], "sparkdl etl failed:"),
    ("predict", ["--model", "m", "--input", "a", "--output", "b", "--batch-size", "0"], "sparkdl predict failed:"),
    ("pipeline", ["--stages", "nope"], "sparkdl pipeline failed:"),
])
def test_every_job_maps_errors_to_one_line_and_takes_debug(job, args, prefix):
    proc = _job(job, *args, "--debug")  # --debug was an unknown flag (exit 2) before run_job
    assert proc.returncode == 1, proc.stderr[-3000:]
    _one_line(proc, prefix)
    usage = _job(job, "--no-such-flag")
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_run_job_maps_an_escaping_error_and_debug_adds_the_traceback(capsys):
    from sparkdl.cli import run_job

    def main(argv):
        raise KeyError("loaders")

    assert run_job("demo", main, []) == 1
    assert capsys.readouterr().err.strip() == "sparkdl demo failed: KeyError: 'loaders'"
    assert run_job("demo", main, ["--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sparkdl demo failed: KeyError") and "Traceback" in err


# ----- 6. names on read ------------------------------------------------------------------------------------
def test_model_names_outside_the_lakehouse_are_refused_on_read(tmp_path):
    from sparkdl.registry import get_model_version, list_versions, load_model

    root, other = tmp_path / "lake", tmp_path / "other"
    _publish(str(other), "x", "digits_cnn")
    (root / "models").mkdir(parents=True)
    for read in (lambda n: get_model_version(str(root), n), lambda n: list_versions(str(root), n),
                 lambda n: load_model(str(root), n)):
        with pytest.raises(ValueError, match="model name '../../other/models/x' is invalid"):
            read("../../other/models/x")


def test_table_and_run_names_outside_the_lakehouse_are_refused(spark, tmp_path):
    from sparkdl.lakehouse import Lakehouse, table_uri
    from sparkdl.predict import PredictConfig, predict_table

    lh = Lakehouse(str(tmp_path / "lake"))
    for call in (lambda: lh.table("../x"), lambda: lh.run("../../r"), lambda: lh.model("a/b"),
                 lambda: table_uri(lh.root, "../../x")):
        with pytest.raises(ValueError, match="invalid|neither a table name"):
            call()
    assert table_uri(lh.root, "t") == lh.table("t")
    assert table_uri(lh.root, str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    _publish(lh.root, "m", "digits_cnn")
    with pytest.raises(ValueError, match="'../../x' is neither a table name"):
        predict_table(PredictConfig(lakehouse=lh.root, model_name="m", input_table="t", output_table="../../x"),
                      spark=spark)
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


# ----- 7. leftovers -----------------------------------------------------------------------------------------
def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (past, past))


def test_cleanup_removes_old_leftovers_and_keeps_committed_and_young_ones(tmp_path):
    from sparkdl.registry import cleanup_models, get_model_version, list_versions

    root = tmp_path / "lake"
    _publish(str(root), "m", "digits_cnn")
    d = root / "models" / "m"
    (d / ".tmp-dead0001").mkdir()
    (d / ".tmp-dead0001" / "model.safetensors").write_bytes(b"x")
    (d / "v2").mkdir()
    (d / "v2" / "model_config.json").write_text("{}")
    (d / "v3").mkdir()  # a publisher still writing: young
    (d / "v1" / "._COMMITTED.tmp-0a0b0c0d").write_text("")
    for p in (d / ".tmp-dead0001", d / "v2", d / "v1" / "._COMMITTED.tmp-0a0b0c0d"):
        _age(p, 7200)
    assert cleanup_models(str(root), dry_run=True)
    assert (d / "v2").exists()
    gone = cleanup_models(str(root), older_than=3600)
    assert sorted(Path(g).name for g in gone) == sorted([".tmp-dead0001", "._COMMITTED.tmp-0a0b0c0d", "v2"])
    assert sorted(p.name for p in d.iterdir()) == ["v1", "v3"] and list_versions(str(root), "m") == [1]
    assert get_model_version(str(root), "m").version == 1
    # A model with no committed version is not offered as "published".
    (root / "models" / "ghost" / "v1").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError) as info:
        get_model_version(str(root), "nope")
    assert "published models: ['m']" in str(info.value)


def test_cleanup_of_interrupted_checkpoint_writes(tmp_path):
    from sparkdl.train.checkpoint import cleanup_checkpoints, save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(str(run), 1, {"step": 1})
    d = run / "checkpoints"
    old, young = d / ".step-000000002.pt.tmp-deadbeef", d / ".step-000000003.pt.tmp-cafecafe"
    old.write_bytes(b"partial"), young.write_bytes(b"partial")
    _age(old, 7200)
    assert [Path(g).name for g in cleanup_checkpoints(str(run))] == [old.name]
    assert sorted(p.name for p in d.iterdir()) == [young.name, "step-000000001.pt"]


# ----- 8. attempt numbering ---------------------------------------------------------------------------------
def _always_fails_on_rank1() -> None:
    import torch.distributed as dist

    if rank_context().rank == 1:
        raise RuntimeError(f"transient failure in attempt index {rank_context().attempt}")
    dist.barrier()


def test_attempts_are_counted_one_way_in_warnings_and_the_final_error(caplog):
    cfg = LaunchConfig(num_ranks=2, local_mode=True, max_attempts=2, pg_timeout_s=60)
    with caplog.at_level("WARNING", logger="sparkdl.train"), pytest.raises(RankFailedError) as info:
        run_distributed(_always_fails_on_rank1, config=cfg)
    assert any("attempt 1 of 2 failed on rank 1" in r.getMessage() for r in caplog.records)
    assert info.value.attempt == 1 and "rank 1 (attempt 2 of 2) failed" in str(info.value)


# ----- 9. hung ranks ---------------------------------------------------------------------------------------
def _rank1_hangs() -> None:
    import torch.distributed as dist

    dist.barrier()
    if rank_context().rank == 1:
        time.sleep(120)  # stuck: no collective, no error
    dist.all_reduce(torch.ones(1))


def test_a_hung_rank_is_reported_as_hung_within_the_collective_timeout():
    start = time.monotonic()
    with pytest.raises(RankHungError) as info:
        run_distributed(_rank1_hangs, config=LaunchConfig(num_ranks=2, local_mode=True, pg_timeout_s=10))
    assert time.monotonic() - start < 60
    err = info.value
    assert err.rank == 1 and "hung" in err.error and "exited" not in err.error
    assert "collective_timeout_s" in err.error


@pytest.mark.integration
def test_a_hung_barrier_rank_is_reported_as_hung(spark):
    with pytest.raises(RankHungError) as info:
        run_distributed(_rank1_hangs, spark=spark, config=LaunchConfig(num_ranks=2, pg_timeout_s=10))
    assert info.value.rank == 1 and "exited" not in info.value.error
    # The stage is over and the executors are usable again.
    assert run_distributed(_rank_listeners, spark=spark, config=LaunchConfig(num_ranks=2, pg_timeout_s=60))


def test_collective_timeout_is_a_train_config_field():
    from sparkdl.train import TrainConfig

    with pytest.raises(ValueError, match="collective_timeout_s"):
        TrainConfig(train_table="t", model="tabular_mlp", collective_timeout_s=0)
    assert TrainConfig(train_table="t", model="tabular_mlp", collective_timeout_s=30).collective_timeout_s == 30


def test_untrusted_model_reason_keeps_its_whole_fix(tmp_path):
    """A job prints failure_reason(e) as its one line: the fix at the end of a long reason survives."""
    from sparkdl.errors import failure_reason
    from sparkdl.registry import load_model

    root = str(tmp_path / "lake")
    _publish(root, "evil", "a_rather_long_package_name.with.several.levels.of_modules:build_the_model", {})
    with pytest.raises(UntrustedModelError) as info:
        load_model(root, "evil")
    line = failure_reason(info.value)
    assert "\n" not in line and len(line) <= 600
    assert line.startswith("UntrustedModelError: model evil v1 names the factory")
    module = "a_rather_long_package_name.with.several.levels.of_modules"
    assert f"--conf spark.sparkdl.trustedModules={module}; or register the factory" in line
    assert line.endswith("(sparkdl.models.register_model, or an entry point in group 'sparkdl.models')")
    long = failure_reason(ValueError("x" * 700 + " the fix: do this"))
    assert len(long) == 600 and long.endswith("the fix: do this") and " ... " in long
