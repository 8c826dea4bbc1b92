"""Training through sparkdl's own loop: real Spark (local[2], barrier mode) and local mode, gloo, world size 2."""

from __future__ import annotations

import importlib.util
import json
import math
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from sparkdl import _fs
from sparkdl.errors import ClusterCapacityError, NonFiniteGradientError, NonFiniteLossError
from sparkdl.train import TrainConfig, fit
from sparkdl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sparkdl.train.optim import lr_factor

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_lakehouse(spark, tmp_path_factory) -> str:
    from sparkdl.etl import run_digits_etl

    root = tmp_path_factory.mktemp("train-lake")
    run_digits_etl(spark=spark, lakehouse=str(root))
    return str(root)


def _digits(root: str, **kw) -> TrainConfig:
    base = dict(lakehouse=root, train_table="digits_train", valid_table="digits_valid", model="digits_cnn",
                epochs=2, batch_size=32, lr=3e-3, num_ranks=2)
    base.update(kw)
    return TrainConfig(**base)


def _final_state(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.checkpoint)["model"]


def _step_rows(result) -> list[dict]:
    return [json.loads(line) for line in _fs.read_text(result.step_metrics).splitlines() if line.strip()]


# ----- equivalence: 2 ranks x b == 1 rank x 2b == 1 rank x (2 micro-batches of b) -----
B, STEPS = 16, 8


@pytest.fixture(scope="module")
def ordered_tables(spark, digits_lakehouse) -> dict[str, str]:
    """Two orders of the same 2*STEPS*B digits rows, made so that each optimizer step sees the same rows.

    With shuffle off, rank r of w reads the contiguous range [r*N/w, (r+1)*N/w) of the table
    (sparkdl/data/plan.py). "halves" = A then B: rank 0 reads A, rank 1 reads B, so 2 ranks x
    batch b take A[sb:(s+1)b] + B[sb:(s+1)b] at step s. "interleaved" = A0 B0 A1 B1 ... (blocks of
    b): 1 rank x batch 2b takes the same rows at step s, and so do 2 micro-batches of b."""
    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.lakehouse import Lakehouse, read_table, write_table
    from sparkdl.schema import DatasetSchema

    lh = Lakehouse(digits_lakehouse)
    rows = read_table(spark, lh.table("digits_train")).toPandas().sort_values("id").head(2 * STEPS * B)
    a, b = rows.iloc[: STEPS * B], rows.iloc[STEPS * B:]
    blocks = [part.iloc[s * B:(s + 1) * B] for s in range(STEPS) for part in (a, b)]
    import pandas as pd

    orders = {"eq_halves": pd.concat([a, b]), "eq_interleaved": pd.concat(blocks)}
    schema = DatasetSchema.load("digits")
    for name, pdf in orders.items():
        df = spark.createDataFrame(pdf, schema="id long, image binary, label int, split string").coalesce(1)
        write_table(df, lh.table(name), schema=schema)
        with TableLoader(lh.table(name), config=LoaderConfig(batch_size=len(pdf), columns=["id"], shuffle=False)) as ld:
            stored = next(iter(ld))["id"].tolist()
        assert stored == pdf["id"].tolist(), f"{name} was not stored in the order written"
    return {"halves": "eq_halves", "interleaved": "eq_interleaved"}


def _sgd(root: str, table: str, **kw) -> TrainConfig:
    return _digits(root, train_table=table, valid_table=None, optimizer="sgd", momentum=0.0, lr=0.05,
                   shuffle=False, epochs=1, checkpoint_every=100, **kw)


@pytest.fixture(scope="module")
def one_rank_2b(spark, digits_lakehouse, ordered_tables):
    return fit(_sgd(digits_lakehouse, ordered_tables["interleaved"], num_ranks=1, batch_size=2 * B), spark=spark)


def _assert_same_parameters(got: dict, want: dict, init: dict) -> None:
    for k in want:
        assert not torch.equal(want[k], init[k]), f"{k} did not train: the comparison would be vacuous"
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def _init_state() -> dict[str, torch.Tensor]:
    from sparkdl.models import build_model

    torch.manual_seed(0)  # the ranks seed with TrainConfig.seed before building the model
    return build_model("digits_cnn").state_dict()


def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b(spark, digits_lakehouse, ordered_tables, one_rank_2b):
    two = fit(_sgd(digits_lakehouse, ordered_tables["halves"], num_ranks=2, batch_size=B), spark=spark)
    assert two.steps == one_rank_2b.steps == STEPS
    _assert_same_parameters(_final_state(two), _final_state(one_rank_2b), _init_state())


def test_accumulating_two_micro_batches_equals_one_batch_of_twice_the_size(spark, digits_lakehouse, ordered_tables,
                                                                           one_rank_2b):
    acc = fit(_sgd(digits_lakehouse, ordered_tables["interleaved"], num_ranks=1, batch_size=B,
                   accumulation_steps=2), spark=spark)
    assert acc.steps == STEPS
    _assert_same_parameters(_final_state(acc), _final_state(one_rank_2b), _init_state())
    # The logged loss averages the micro-batches: it is the loss of the whole step's batch.
    for x, y in zip(_step_rows(acc), _step_rows(one_rank_2b)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


# ----- accuracy, publishing, the round trip -----
def test_digits_cnn_reaches_95_percent_and_round_trips_through_the_registry(spark, digits_lakehouse):
    from safetensors.torch import load_file

    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.lakehouse import Lakehouse
    from sparkdl.models import build_model
    from sparkdl.registry import load_model

    result = fit(_digits(digits_lakehouse, epochs=5, model_name="digits", run_id="digits-5"), spark=spark)
    print(f"digits CNN validation accuracy {result.metrics['val_accuracy']:.4f}")
    assert result.metrics["val_accuracy"] >= 0.95
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    model, mv = load_model(digits_lakehouse, "digits", result.model_version)
    # The trained weights, independently of the registry: the run's last checkpoint.
    trained = build_model("digits_cnn")
    trained.load_state_dict(_final_state(result))
    with TableLoader(Lakehouse(digits_lakehouse).table("digits_valid"),
                     config=LoaderConfig(batch_size=64, columns=["image"], shuffle=False)) as loader:
        batch = next(iter(loader))
    with torch.inference_mode():
        torch.testing.assert_close(model(batch), trained.eval()(batch), rtol=0, atol=0)
    folder = Path(mv.uri)
    assert {p.name for p in folder.iterdir()} >= {
        "model.safetensors", "model_config.json", "training_config.json", "lineage.json", "metrics.json",
        "preprocessing.json", "curves.png", "_COMMITTED"}
    weights = load_file(str(folder / "model.safetensors"))  # safetensors: no pickle involved
    assert weights.keys() == trained.state_dict().keys()
    config = json.loads((folder / "model_config.json").read_text())
    assert (config["factory"], config["input_columns"], config["label_column"], config["task"]) == (
        "digits_cnn", ["image"], "label", "multiclass")
    training = json.loads((folder / "training_config.json").read_text())
    assert training["epochs"] == 5 and training["run_id"] == "digits-5" and training["model"] == "digits_cnn"
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["run_id"] == "digits-5"
    assert lineage["train_table"] == {"uri": Lakehouse(digits_lakehouse).table("digits_train"), "version": 0}
    assert lineage["valid_table"]["version"] == 0
    assert json.loads((folder / "metrics.json").read_text()) == result.metrics
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in _step_rows(result)] == list(range(1, result.steps + 1))


# ----- failures and resume -----
def _table_ids(root: str, table: str) -> set[int]:
    import pyarrow.parquet as pq

    from sparkdl.lakehouse import Lakehouse, snapshot

    return {i for f in snapshot(Lakehouse(root).table(table)).files for i in pq.read_table(f, columns=["id"])["id"].to_pylist()}


def test_killed_rank_resumes_from_checkpoint_with_identical_parameters(spark, digits_lakehouse):
    common = dict(epochs=2, checkpoint_every=5, deterministic=True, max_attempts=2, valid_table=None)
    clean = fit(_digits(digits_lakehouse, run_id="clean", **common), spark=spark)
    faulty_cfg = _digits(digits_lakehouse, run_id="faulty",
                         fault_injection={"rank": 1, "step": 13, "attempt": 0, "kind": "exit"}, **common)
    faulty = fit(faulty_cfg, spark=spark, log_row_ids="id")
    assert faulty.steps == clean.steps
    clean_state, faulty_state = _final_state(clean), _final_state(faulty)
    for k in clean_state:
        torch.testing.assert_close(faulty_state[k], clean_state[k], rtol=0, atol=0)
    # For every step keep the ids of its last attempt: each epoch then sees each row once.
    seen: dict[tuple[int, int, int], list[int]] = {}
    attempts = set()
    for rank in (0, 1):
        for line in (Path(faulty.run_dir) / f"rows-rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            attempts.add(row["attempt"])
            seen[(row["epoch"], row["step"], rank)] = row["ids"]
    assert attempts == {0, 1}, "the fault must have forced a second attempt"
    table = _table_ids(digits_lakehouse, "digits_train")
    per_epoch: dict[int, list[int]] = defaultdict(list)
    for (epoch, _, _), ids in seen.items():
        per_epoch[epoch].extend(ids)
    assert sorted(per_epoch) == [0, 1]
    for epoch, ids in per_epoch.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch} saw a row twice"
        assert set(ids) <= table
        assert len(ids) == clean.steps // 2 * 32 * 2
        assert len(table) - len(ids) < 2 * 32 + 2  # only the drop_last / remainder rows are left out
    # The steps the failed attempt trained past its checkpoint are stored once.
    assert [r["step"] for r in _step_rows(faulty)] == list(range(1, faulty.steps + 1))
    # Deterministic mode is process-wide: the reused Python workers must not keep it.
    flags = spark.sparkContext.parallelize(range(2), 2).map(
        lambda _: __import__("torch").are_deterministic_algorithms_enabled()).collect()
    assert flags == [False, False]


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(spark, digits_lakehouse):
    cfg = _digits(digits_lakehouse, run_id="nan", checkpoint_every=4, max_attempts=2,
                  fault_injection={"rank": 0, "step": 6, "attempt": 0, "kind": "nan"})
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 6") as info:
        fit(cfg, spark=spark)
    assert info.value.step == 6 and info.value.checkpoint.endswith("step-000000004.pt")
    ckpts = list((Path(digits_lakehouse) / "runs" / "nan" / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-000000004.pt"]


def test_inf_gradient_with_finite_loss_stops_before_the_step_and_keeps_a_finite_checkpoint(spark, digits_lakehouse):
    # Step 8 is a checkpoint step: applied, its inf weights would become the "last good" checkpoint.
    cfg = _digits(digits_lakehouse, run_id="infgrad", checkpoint_every=4, valid_table=None,
                  fault_injection={"rank": 1, "step": 8, "kind": "inf_grad"})
    with pytest.raises(NonFiniteGradientError, match=r"gradient norm became inf at step 8") as info:
        fit(cfg, spark=spark)
    assert info.value.checkpoint.endswith("step-000000004.pt")
    state = load_checkpoint(info.value.checkpoint)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_local_mode_features_smoke(digits_lakehouse):
    """SGD + warm-up + linear decay + clipping + accumulation + bf16 + fp16 compression, 2 local ranks."""
    cfg = _digits(digits_lakehouse, local_mode=True, valid_table=None, optimizer="sgd", momentum=0.0, lr=0.1,
                  warmup_steps=2, lr_schedule="linear", grad_clip=0.01, accumulation_steps=2, precision="bf16",
                  compression="fp16", max_steps=5, epochs=1, batch_size=16)
    result = fit(cfg)
    rows = _step_rows(result)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    factor = lr_factor(cfg, 5)
    assert [r["lr"] for r in rows] == pytest.approx([0.1 * factor(s) for s in range(5)])
    assert all(math.isfinite(r["loss"]) for r in rows)
    init, final = _init_state(), _final_state(result)
    moved = math.sqrt(sum(float((final[k] - init[k]).double().pow(2).sum()) for k in init))
    # Plain SGD moves the weights by lr x (clipped gradient) per step: the clip bounds the distance.
    assert 0 < moved <= sum(r["lr"] for r in rows) * 0.01 * (1 + 1e-3)


@pytest.mark.parametrize("optimizer, compression, schedule", [("adagrad", "powersgd", "cosine"),
                                                              ("adam", "none", "constant")])
def test_optimizers_schedules_and_powersgd_train(spark, digits_lakehouse, optimizer, compression, schedule):
    cfg = _digits(digits_lakehouse, valid_table=None, optimizer=optimizer, compression=compression,
                  lr_schedule=schedule, warmup_steps=1, max_steps=5, epochs=1, checkpoint_every=3)
    result = fit(cfg, spark=spark)
    factor = lr_factor(cfg, 5)
    assert [r["lr"] for r in _step_rows(result)] == pytest.approx([3e-3 * factor(s) for s in range(5)])
    init, final = _init_state(), _final_state(result)
    assert all(not torch.equal(final[k], init[k]) for k in init)
    if compression == "powersgd":  # the error-feedback state travels with the checkpoint
        hooks = load_checkpoint(result.checkpoint)["comm_hook"]
        assert len(hooks) == 2 and all(h["iter"] > 0 and h["error_dict"] for h in hooks)


def test_resume_after_max_steps_finishes_the_epoch_and_stores_each_step_once(spark, digits_lakehouse):
    epochs: list[tuple[str, dict]] = []

    def on_epoch(row: dict) -> None:
        epochs.append((threading.current_thread().name, row))

    first = fit(_digits(digits_lakehouse, run_id="partial", max_steps=3, epochs=1, batch_size=64, warmup_steps=4,
                        checkpoint_every=2), spark=spark, on_epoch=on_epoch)
    assert first.steps == 3 and first.history[-1]["partial"] is True
    resumed = fit(_digits(digits_lakehouse, run_id="partial", resume=True, epochs=2, batch_size=64, warmup_steps=4,
                          checkpoint_every=2), spark=spark, on_epoch=on_epoch)
    assert resumed.steps == 2 * resumed.history[0]["step"] > 3
    assert [(h["epoch"], h.get("partial", False)) for h in resumed.history] == [(1, False), (2, False)]
    rows = _step_rows(resumed)
    assert [r["step"] for r in rows] == list(range(1, resumed.steps + 1))
    assert [r["lr"] for r in rows[:5]] == pytest.approx([3e-3 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])
    # on_epoch: every row once, live from the progress channel's thread (not replayed at the end).
    assert [(r["epoch"], r.get("partial", False)) for _, r in epochs] == [(1, True), (1, False), (2, False)]
    assert all(name == "sparkdl-progress" for name, _ in epochs)
    assert epochs[-1][1]["val_accuracy"] == resumed.history[-1]["val_accuracy"]


def test_progress_bar_counts_steps_and_on_epoch_gets_each_row_once():
    from sparkdl.train.progress import DriverProgress

    rows: list[dict] = []
    display = DriverProgress(on_epoch=rows.append, earlier=[{"epoch": 1, "step": 5}], show=True)
    step = {"kind": "step", "epoch": 2, "epochs": 3, "total_steps": 15, "loss": 0.5, "samples_per_s": 100.0}
    for s in (6, 7, 8):
        display({**step, "step": s})
    assert (display._bar.n, display._bar.initial) == (8, 5)
    display({**step, "step": 7})  # a relaunched attempt resumed from the checkpoint of step 6
    assert (display._bar.n, display._bar.initial) == (7, 6)
    display({"kind": "epoch", "rank": 0, "epoch": 2, "step": 10, "val_loss": 0.4})
    display({"kind": "epoch", "rank": 0, "epoch": 2, "step": 10, "val_loss": 0.4})  # the retry repeats it
    display.finish([{"epoch": 1, "step": 5}, {"epoch": 2, "step": 10, "val_loss": 0.4},
                    {"epoch": 3, "step": 15, "val_loss": 0.3}])
    assert rows == [{"epoch": 2, "step": 10, "val_loss": 0.4}, {"epoch": 3, "step": 15, "val_loss": 0.3}]


def test_bad_model_fails_on_the_driver_without_a_run_folder(digits_lakehouse):
    for bad in (dict(model="no_such_model"), dict(model_kwargs={"channels": "x"}), dict(model="digits_cnn",
                                                                                       feature_columns=["id"])):
        cfg = _digits(digits_lakehouse, run_id="bad-model", local_mode=True, **bad)
        with pytest.raises(ValueError, match="model"):
            fit(cfg)
        assert not (Path(digits_lakehouse) / "runs" / "bad-model").exists()


def test_resume_errors_name_the_problem(spark, digits_lakehouse):
    with pytest.raises(ValueError, match="no run never-ran"):
        fit(_digits(digits_lakehouse, run_id="never-ran", resume=True, local_mode=True))
    (Path(digits_lakehouse) / "runs" / "no-ckpt").mkdir(parents=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        fit(_digits(digits_lakehouse, run_id="no-ckpt", resume=True, local_mode=True))
    fit(_digits(digits_lakehouse, run_id="two-ranks", max_steps=1, valid_table=None), spark=spark)
    with pytest.raises(ValueError, match="num_ranks=2"):
        fit(_digits(digits_lakehouse, run_id="two-ranks", resume=True, local_mode=True, num_ranks=1))


def test_too_many_ranks_fails_at_once_naming_the_numbers(spark, digits_lakehouse):
    # local[2] never grows: no waiting, even with a long start timeout.
    with pytest.raises(ClusterCapacityError, match=r"5 ranks requested.*only 2") as info:
        fit(_digits(digits_lakehouse, num_ranks=5, start_timeout_s=600), spark=spark)
    assert "after waiting" not in str(info.value)


@pytest.mark.parametrize("bad, field", [
    ({"optimizer": "lamb"}, "optimizer"), ({"precision": "fp16"}, "precision.*GPU"),
    ({"compression": "bf16"}, "compression.*NCCL"), ({"warmup_steps": -5}, "warmup_steps"),
    ({"max_steps": 0}, "max_steps"), ({"grad_clip": 0.0}, "grad_clip"), ({"grad_clip": -1.0}, "grad_clip"),
    ({"momentum": -1.0}, "momentum"), ({"weight_decay": -1.0}, "weight_decay"), ({"lr": float("nan")}, "lr"),
    ({"model_name": "a/b"}, "model_name"), ({"run_id": "../x"}, "run_id"),
    ({"fault_injection": {"kind": "bogus", "step": 1}}, "fault_injection"), ({"shuffle_buffer_rows": 0}, "shuffle_buffer_rows"),
    ({"batch_size": 0}, "batch_size"), ({"start_timeout_s": -1}, "start_timeout_s"), ({"resume": True}, "resume"),
    ({"task": "ranking"}, "task"), ({"num_classes": 1}, "num_classes"), ({"loss": "huber", "task": "binary"}, "loss"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(train_table="t", model="tabular_mlp", **bad)


# ----- non-local lakehouse paths (file:// goes through the same code as object stores) -----
def test_file_uri_lakehouse_in_local_mode_trains_checkpoints_and_publishes_end_to_end(digits_lakehouse):
    from sparkdl.registry import get_model_version, list_versions, load_model

    uri = Path(digits_lakehouse).as_uri()
    result = fit(_digits(uri, run_id="uri-run", local_mode=True, max_steps=4, checkpoint_every=2, epochs=1,
                         model_name="digits_uri"))
    assert list_versions(uri, "digits_uri") == list_versions(digits_lakehouse, "digits_uri") == [1]
    version_dir = Path(digits_lakehouse) / "models" / "digits_uri" / "v1"
    assert (version_dir / "_CLAIM").exists(), "a URI lakehouse publishes with the claim + marker protocol"
    model, mv = load_model(uri, "digits_uri")
    trained = load_checkpoint(result.checkpoint)["model"]
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    # A claimed version without its marker (a crashed publisher) is invisible and not reused.
    (version_dir.parent / "v2").mkdir()
    (version_dir.parent / "v2" / "_CLAIM").write_text("crashed")
    assert get_model_version(uri, "digits_uri").version == 1
    from sparkdl.registry import publish_model

    mv3 = publish_model(uri, "digits_uri", model=model, model_config=mv.model_config, training_config={},
                        lineage={}, metrics={})
    assert mv3.version == 3 and list_versions(uri, "digits_uri") == [1, 3]


def test_checkpoints_through_a_file_uri(tmp_path):
    run = tmp_path.as_uri() + "/runs/r"
    assert latest_checkpoint(run) is None
    for step in (1, 2, 3, 4):
        save_checkpoint(run, step, {"step": step, "w": torch.full((2,), float(step))})
    latest = latest_checkpoint(run)
    assert latest == run + "/checkpoints/step-000000004.pt"
    assert torch.equal(load_checkpoint(latest)["w"], torch.full((2,), 4.0))
    assert sorted(p.name for p in (tmp_path / "runs" / "r" / "checkpoints").iterdir()) == [
        "step-000000002.pt", "step-000000003.pt", "step-000000004.pt"]


# ----- the CLI -----
def _cli():
    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_the_run_id_and_a_one_line_error_with_the_resume_hint(digits_lakehouse, capsys):
    job = _cli()
    args = ["--lakehouse", digits_lakehouse, "--train-table", "digits_train", "--model", "digits_cnn",
            "--local-mode", "--num-ranks", "1", "--max-steps", "2", "--checkpoint-every", "1", "--run-id", "cli"]
    assert job.main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "run cli" and "run cli: 2 steps" in out
    assert job.main(args + ["--resume", "--num-ranks", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("sparkdl train failed: run cli was checkpointed with num_ranks=1")
    assert err[1].endswith("--resume --run-id cli") and len(err) == 2


@pytest.mark.gpu
def test_gpu_training_with_nccl_in_local_mode(digits_lakehouse):
    ranks = min(2, torch.cuda.device_count())
    result = fit(_digits(digits_lakehouse, local_mode=True, use_gpu=True, num_ranks=ranks, max_steps=4, epochs=1,
                         precision="bf16", checkpoint_every=2))
    assert result.steps == 4 and math.isfinite(result.metrics["val_loss"])
    assert all(math.isfinite(r["loss"]) for r in _step_rows(result))


def test_cli_tracking_logs_the_run_and_the_published_model(digits_lakehouse, tmp_path, capsys):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = _cli()
    args = ["--lakehouse", digits_lakehouse, "--train-table", "digits_train", "--valid-table", "digits_valid",
            "--model", "digits_cnn", "--local-mode", "--num-ranks", "1", "--epochs", "1", "--max-steps", "3",
            "--run-id", "cli-tracked", "--model-name", "digits_tracked", "--tracking-uri", uri]
    assert job.main(args) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("mlflow run ")]
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(line.split()[2])
    assert run.data.params["train.run_id"] == "cli-tracked" and run.data.params["train.model"] == "digits_cnn"
    assert "val_accuracy" in run.data.metrics
    assert run.data.tags["model"] == "digits_tracked/v1"
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
