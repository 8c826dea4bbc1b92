"""Training on real Spark (local[2], barrier mode) and in local mode, gloo, world size 2."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from sparkdl.errors import ClusterCapacityError, NonFiniteLossError
from sparkdl.train import LaunchConfig, TrainConfig, fit, run_distributed

pytestmark = pytest.mark.integration


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


def _sgd_step_on_shards(data: torch.Tensor, target: torch.Tensor, steps: int) -> list[torch.Tensor]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Linear(data.shape[1], 1)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    rank, world = dist.get_rank(), dist.get_world_size()
    per = data.shape[0] // steps // world
    for s in range(steps):
        lo = (s * world + rank) * per
        loss = torch.nn.functional.mse_loss(ddp(data[lo:lo + per]).squeeze(1), target[lo:lo + per])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b():
    g = torch.Generator().manual_seed(1)
    data, target = torch.randn(64, 5, generator=g), torch.randn(64, generator=g)
    two = run_distributed(_sgd_step_on_shards, data, target, 4, config=LaunchConfig(num_ranks=2, local_mode=True))
    one = run_distributed(_sgd_step_on_shards, data, target, 4, config=LaunchConfig(num_ranks=1, local_mode=True))
    for a, b in zip(two, one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_digits_cnn_reaches_95_percent_and_round_trips_through_the_registry(spark, digits_lakehouse):
    from sparkdl.registry import load_model

    result = fit(_digits(digits_lakehouse, epochs=5, model_name="digits"), spark=spark)
    print(f"digits CNN validation accuracy {result.metrics['val_accuracy']:.4f}")
    assert result.metrics["val_accuracy"] >= 0.95
    assert Path(result.curves_png).exists()
    model, mv = load_model(digits_lakehouse, "digits", result.model_version)
    assert mv.lineage["train_table"]["version"] == 0
    batch = {"image": torch.randint(0, 255, (4, 8, 8), dtype=torch.uint8)}
    from sparkdl.models import build_model

    again = build_model("digits_cnn")
    again.load_state_dict({k: v for k, v in model.state_dict().items()})
    torch.testing.assert_close(model(batch), again.eval()(batch))


def test_killed_rank_resumes_from_checkpoint_with_identical_parameters(spark, digits_lakehouse):
    common = dict(epochs=2, checkpoint_every=5, deterministic=True, max_attempts=2, valid_table=None)
    clean = fit(_digits(digits_lakehouse, run_id="clean", **common), spark=spark)
    faulty_cfg = _digits(digits_lakehouse, run_id="faulty",
                         fault_injection={"rank": 1, "step": 13, "attempt": 0, "kind": "exit"}, **common)
    faulty = fit(faulty_cfg, spark=spark, log_row_ids="id")
    assert faulty.steps == clean.steps
    clean_state = torch.load(clean.checkpoint, weights_only=False)["model"]
    faulty_state = torch.load(faulty.checkpoint, weights_only=False)["model"]
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
    per_epoch: dict[int, list[int]] = defaultdict(list)
    for (epoch, _, _), ids in seen.items():
        per_epoch[epoch].extend(ids)
    for epoch, ids in per_epoch.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch} saw a row twice"
        assert len(ids) == clean.steps // 2 * 32 * 2


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(spark, digits_lakehouse):
    cfg = _digits(digits_lakehouse, run_id="nan", checkpoint_every=4, max_attempts=2,
                  fault_injection={"rank": 0, "step": 6, "attempt": 0, "kind": "nan"})
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 6") as info:
        fit(cfg, spark=spark)
    assert info.value.step == 6 and info.value.checkpoint.endswith("step-000000004.pt")
    ckpts = list((Path(digits_lakehouse) / "runs" / "nan" / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-000000004.pt"]


def test_local_mode_trains_without_executors(digits_lakehouse):
    result = fit(_digits(digits_lakehouse, local_mode=True, epochs=1, max_steps=5), spark=None)
    assert result.steps == 5


def test_too_many_ranks_fails_at_once_naming_the_numbers(spark, digits_lakehouse):
    with pytest.raises(ClusterCapacityError, match=r"5 ranks requested.*only 2"):
        fit(_digits(digits_lakehouse, num_ranks=5), spark=spark)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(train_table="t", optimizer="lamb")
    with pytest.raises(ValueError, match="precision.*GPU"):
        TrainConfig(train_table="t", precision="fp16")
    with pytest.raises(ValueError, match="compression.*NCCL"):
        TrainConfig(train_table="t", compression="bf16")
