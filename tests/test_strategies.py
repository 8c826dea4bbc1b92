"""Training strategies behind one seam: equivalences that can fail, the staleness bound, exact resume.

gloo, 2 ranks (real barrier stages on local[2]) unless a test says otherwise; the digits table,
a few steps each."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from sparkdl import _fs
from sparkdl.train import TrainConfig, fit
from sparkdl.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory) -> str:
    """digits_train plus digits_fed: the same rows with a 2-valued client column (digits < 5 | >= 5)."""
    from pyspark.sql import functions as F

    from sparkdl.etl import run_digits_etl
    from sparkdl.lakehouse import Lakehouse, read_table, write_table
    from sparkdl.schema import ColumnSpec, DatasetSchema

    root = str(tmp_path_factory.mktemp("strategies-lake"))
    run_digits_etl(spark=spark, lakehouse=root)
    lh = Lakehouse(root)
    base = DatasetSchema.load("digits")
    schema = DatasetSchema(name="digits_fed", columns=(*base.columns, ColumnSpec(name="client", type="int32",
                                                                                   role="meta")))
    df = read_table(spark, lh.table("digits_train")).withColumn("client", (F.col("label") >= 5).cast("int"))
    write_table(df.coalesce(1), lh.table("digits_fed"), schema=schema)
    return root


def _cfg(root: str, **kw) -> TrainConfig:
    base = dict(lakehouse=root, train_table="digits_train", valid_table=None, model="digits_cnn",
                model_kwargs={"channels": 8}, epochs=1, batch_size=16, optimizer="sgd", momentum=0.0, lr=0.05,
                num_ranks=2, max_steps=8, checkpoint_every=100, shuffle=False)
    base.update(kw)
    return TrainConfig(**base)


def _model(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.checkpoint)["model"]


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in _fs.read_text(result.step_metrics).splitlines() if line.strip()]


def _init() -> dict[str, torch.Tensor]:
    from sparkdl.models import build_model

    torch.manual_seed(0)
    return build_model("digits_cnn", channels=8).state_dict()


def _assert_close(got: dict, want: dict, *, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    init = _init()
    for k in want:
        assert not torch.equal(want[k], init[k]), f"{k} did not train: the comparison would be vacuous"
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _assert_differ(a: dict, b: dict) -> None:
    assert any(not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), "the runs should differ"


@pytest.fixture(scope="module")
def allreduce_sgd(spark, lake):
    return fit(_cfg(lake, run_id="ar-sgd"), spark=spark)


# ----- equivalences -----
def test_local_sgd_with_h1_equals_allreduce_and_h4_differs(spark, lake, allreduce_sgd):
    h1 = fit(_cfg(lake, run_id="lsgd-h1", strategy="local_sgd", sync_every=1), spark=spark)
    _assert_close(_model(h1), _model(allreduce_sgd))
    h4 = fit(_cfg(lake, run_id="lsgd-h4", strategy="local_sgd", sync_every=4), spark=spark)
    _assert_differ(_model(h4), _model(allreduce_sgd))


def test_allreduce_bucket_knobs_change_no_parameter(spark, lake, allreduce_sgd):
    # Copies into .grad (view off) and several small buckets instead of one: the same sums, the same model.
    knobs = fit(_cfg(lake, run_id="ar-buckets", ddp_bucket_view=False, ddp_bucket_cap_mb=0.01), spark=spark)
    _assert_close(_model(knobs), _model(allreduce_sgd))
    assert knobs.lineage["strategy"]["ddp_bucket_view"] is False


def test_allreduce_bucket_knobs_reach_ddp():
    import torch.distributed as dist

    from sparkdl.train.strategies.allreduce import AllReduce

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        default = AllReduce(TrainConfig(train_table="t", model="tabular_mlp"), device=torch.device("cpu"))
        ddp = default.wrap(torch.nn.Linear(4, 2))
        assert ddp.gradient_as_bucket_view is True
        set_ = AllReduce(TrainConfig(train_table="t", model="tabular_mlp", ddp_bucket_view=False,
                                     ddp_bucket_cap_mb=2.0), device=torch.device("cpu"))
        ddp = set_.wrap(torch.nn.Linear(4, 2))
        assert ddp.gradient_as_bucket_view is False and ddp.bucket_bytes_cap == 2 * 2**20
        assert set_.describe()["ddp_bucket_cap_mb"] == 2.0
    finally:
        dist.destroy_process_group()


def test_bmuf_without_momentum_equals_model_averaging(spark, lake):
    avg = fit(_cfg(lake, run_id="lsgd-h4b", strategy="local_sgd", sync_every=4), spark=spark)
    bmuf = fit(_cfg(lake, run_id="bmuf-plain", strategy="bmuf", sync_every=4, bmuf_block_momentum=0.0,
                    bmuf_block_lr=1.0, bmuf_nesterov=False), spark=spark)
    _assert_close(_model(bmuf), _model(avg))
    filtered = fit(_cfg(lake, run_id="bmuf-eta", strategy="bmuf", sync_every=4, bmuf_block_momentum=0.5),
                   spark=spark)
    _assert_differ(_model(filtered), _model(avg))


def test_ssp_with_staleness_0_equals_synchronous_training(spark, lake):
    kw = dict(momentum=0.9, lr=0.02, max_steps=10)
    sync = fit(_cfg(lake, run_id="ar-mom", **kw), spark=spark)
    ssp = fit(_cfg(lake, run_id="ssp-0", strategy="ssp", staleness=0, **kw), spark=spark)
    _assert_close(_model(ssp), _model(sync))
    assert [r["clock_gap_max"] for r in _rows(ssp)] == [0] * 10


@pytest.mark.parametrize("strategy", ["async", "ssp"])
def test_parameter_server_with_one_worker_is_plain_sgd(lake, strategy):
    kw = dict(num_ranks=1, local_mode=True, momentum=0.9, lr=0.02, max_steps=6)
    plain = fit(_cfg(lake, run_id=f"one-{strategy}-plain", **kw))
    ps = fit(_cfg(lake, run_id=f"one-{strategy}", strategy=strategy, staleness=1, **kw))
    _assert_close(_model(ps), _model(plain))


def test_fedavg_one_client_per_rank_one_full_step_all_clients_is_fedsgd(spark, lake):
    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.lakehouse import Lakehouse
    from sparkdl.models import build_model

    lr = 0.1
    result = fit(_cfg(lake, run_id="fedsgd", train_table="digits_fed", strategy="fedavg",
                      fedavg_client_column="client", batch_size=100_000, max_steps=1, lr=lr), spark=spark)
    # FedSGD by hand: every client's full-batch gradient at the initial model, averaged by row count.
    torch.manual_seed(0)
    model = build_model("digits_cnn", channels=8)
    with TableLoader(Lakehouse(lake).table("digits_fed"), config=LoaderConfig(
            batch_size=100_000, columns=["image", "label", "client"], shuffle=False, drop_last=False)) as ld:
        data = next(iter(ld))
    grads, rows = [], []
    for c in (0, 1):
        mask = data["client"] == c
        model.zero_grad()
        torch.nn.functional.cross_entropy(model({"image": data["image"][mask]}), data["label"][mask].long()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        rows.append(int(mask.sum()))
    assert min(rows) > 0 and rows[0] != rows[1], "clients must differ in size for the weighting to matter"
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p -= lr * (rows[0] * grads[0][i] + rows[1] * grads[1][i]) / sum(rows)
    _assert_close(_model(result), model.state_dict(), rtol=1e-4, atol=1e-6)


# ----- the staleness bound, measured -----
def test_ssp_keeps_the_fastest_worker_within_staleness_while_async_does_not(spark, lake):
    slow = {"rank": 1, "factor": 4.0}
    ssp = fit(_cfg(lake, run_id="ssp-straggler", strategy="ssp", staleness=2, straggler=slow, max_steps=24),
              spark=spark)
    gaps = [r["clock_gap_max"] for r in _rows(ssp)]
    assert max(gaps) == 2, f"the bound is 2 and a 4x straggler should make the fast worker reach it: {gaps}"
    asy = fit(_cfg(lake, run_id="async-straggler", strategy="async", straggler=slow, max_steps=24), spark=spark)
    assert max(r["clock_gap_max"] for r in _rows(asy)) > 2, "async has no bound: the gap must grow past 2"


# ----- exact resume after a killed rank -----
RESUMABLE = {
    # fp16 compression: stateless. PowerSGD's state is checkpointed per rank too, but a resume with
    # it is not bit-identical yet (a known gap, see docs/strategies.md).
    "allreduce": dict(compression="fp16", optimizer="adam", lr=3e-3),
    "local_sgd": dict(strategy="local_sgd", sync_every=3, local_sgd_warmup_steps=2, outer_lr=0.7, outer_momentum=0.9,
                      optimizer="adamw", lr=3e-3),
    "easgd": dict(strategy="easgd", sync_every=2, easgd_alpha=0.3, momentum=0.9),
    "bmuf": dict(strategy="bmuf", sync_every=3, bmuf_block_momentum=0.5, momentum=0.9),
    "ssp": dict(strategy="ssp", staleness=0, momentum=0.9, lr=0.02, ps_timeout_s=30.0),
    "fedavg": dict(strategy="fedavg", train_table="digits_fed", fedavg_client_column="label",
                   fedavg_clients_per_round=4, batch_size=64, dp_clip=1.0, dp_noise_multiplier=0.5,
                   epochs=4),  # 10 clients, 4 per round: an epoch is 3 rounds
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_killed_rank_resumes_bit_identical(spark, lake, name):
    kw = dict(RESUMABLE[name], deterministic=True, checkpoint_every=4, max_steps=10, shuffle=True, max_attempts=2)
    clean = fit(_cfg(lake, run_id=f"{name}-clean", **kw), spark=spark)
    faulty = fit(_cfg(lake, run_id=f"{name}-faulty", fault_injection={"rank": 1, "step": 7, "kind": "exit"}, **kw),
                 spark=spark)
    assert faulty.steps == clean.steps == 10
    a, b = _model(clean), _model(faulty)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert not all(torch.equal(a[k], v) for k, v in _init().items())
    # The checkpoint loads without pickled objects (weights_only) and names its strategy.
    state = torch.load(io.BytesIO(_fs.read_bytes(faulty.checkpoint)), weights_only=True)
    assert state["strategy"]["describe"]["name"] == name
    if name not in ("fedavg", "allreduce"):  # allreduce replicas are identical: rank 0's state is every rank's
        assert len(state["optimizer"]) == 2, "every rank's optimizer state is kept"


def test_fedavg_reports_the_epsilon_spent_by_the_rounds_run(lake):
    from sparkdl.train.strategies.fedavg import dp_epsilon

    result = fit(_cfg(lake, run_id="fed-dp", train_table="digits_fed", strategy="fedavg", local_mode=True,
                      fedavg_client_column="label", fedavg_clients_per_round=5, batch_size=64, dp_clip=1.0,
                      dp_noise_multiplier=1.1, max_steps=4, epochs=2))  # an epoch is 10 / 5 = 2 rounds
    assert result.steps == 4
    eps = [r["dp_epsilon"] for r in _rows(result)]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(dp_epsilon(1.1, 0.5, 4, 1e-5))
    assert math.isfinite(eps[-1])
    # The lineage a published model carries names the strategy and its parameters as they ran.
    assert result.lineage["strategy"]["name"] == "fedavg"


@pytest.mark.parametrize("bad, field", [
    ({"strategy": "gossip"}, "strategy"), ({"strategy": "fedavg"}, "fedavg_client_column"),
    ({"sync_every": 0}, "sync_every"), ({"easgd_alpha": 0.9}, "easgd_alpha"), ({"staleness": -1}, "staleness"),
    ({"strategy": "local_sgd", "compression": "fp16"}, "compression"), ({"dp_clip": 1.0}, "dp_clip"),
    ({"bmuf_block_momentum": 1.0}, "bmuf_block_momentum"), ({"straggler": {"rank": 5, "factor": 2}}, "straggler"),
    ({"outer_lr": 0.0}, "outer_lr"), ({"ddp_bucket_cap_mb": 0}, "ddp_bucket_cap_mb"),
    ({"strategy": "local_sgd", "ddp_bucket_view": False}, "ddp_bucket_view"),
    ({"parallelism": "fsdp", "ddp_bucket_cap_mb": 8}, "ddp_bucket_cap_mb"),
])
def test_strategy_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(train_table="t", model="tabular_mlp", **bad)
