"""FSDP2, pipeline stages and their meshes on real gloo process groups (world 2; 4 for hybrid).

Each test spawns ranks with torch.multiprocessing; rank functions are top-level so spawn can
import them. Oracles: FSDP == DDP after the same steps; a 2-stage pipeline == one rank on the
same global batch; a sharded checkpoint resumes bit-exactly.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.integration

STEPS = 3
BATCH = 8  # per data-parallel rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=True)


def _entry(rank: int, fn, world: int, port: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + torch.tanh(self.fc(x)))


class _Net(nn.Module):
    """Dict batch in, one logit out; blocks named like an encoder so split points read naturally."""

    task = "binary"

    def __init__(self, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, batch):
        x = self.inp(batch["x"])
        for b in self.blocks:
            x = b(x)
        return self.head(x).squeeze(1)


def _data(step: int, rows: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {"x": torch.randn(rows, 4, generator=g)}, (torch.rand(rows, generator=g) > 0.5).float()


def _loss(logits, y):
    return nn.functional.binary_cross_entropy_with_logits(logits, y)


def _opt(params, kind: str):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(params, lr=0.01)


# ----- FSDP == DDP -----

def _train_ddp_or_fsdp(rank, world, mode, kind, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparkdl.train.parallel import MeshLayout, build_mesh
    from sparkdl.train.parallel.fsdp import shard_model
    from sparkdl.train.parallel.sharded_checkpoint import save_full_weights

    torch.manual_seed(0)
    model = _Net()
    if mode == "ddp":
        net = DDP(model)
    else:  # fsdp: 1 x world shards; hsdp: 2 replicas x world/2 shards
        dp = 2 if mode == "hsdp" else 1
        mesh = build_mesh(MeshLayout("fsdp", dp, world // dp), torch.device("cpu"))
        net = shard_model(model, mesh if dp > 1 else mesh["shard"], classes=["_Block"])
    opt = _opt(net.parameters(), kind)
    for step in range(STEPS):
        x, y = _data(step, BATCH * world)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        _loss(net({"x": x["x"][mine]}), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    if mode == "ddp":
        if rank == 0:
            torch.save(model.state_dict(), out)
    else:
        save_full_weights(str(out), model)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fsdp_matches_ddp(tmp_path, kind):
    from safetensors.torch import load_file

    _spawn(_train_ddp_or_fsdp, 2, "ddp", kind, tmp_path / "ddp.pt")
    _spawn(_train_ddp_or_fsdp, 2, "fsdp", kind, tmp_path / "fsdp.safetensors")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    fsdp = load_file(tmp_path / "fsdp.safetensors")
    assert set(ddp) == set(fsdp)
    initial = _Net().state_dict()
    moved = 0
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(ddp[k], initial[k])
    assert moved >= len(ddp) - 2  # the comparison is about trained weights, not two copies of the init


def test_wrap_policy_by_size_and_class():
    from sparkdl.train.parallel.fsdp import wrap_targets

    net = _Net(dim=16, depth=3)
    assert wrap_targets(net, classes=["_Block"]) == ["blocks.0", "blocks.1", "blocks.2"]
    # 16*16+16 + 2*16 = 304 parameters per block: each block is its own unit, the rest stays with the root.
    assert wrap_targets(net, min_params=300) == ["blocks.0", "blocks.1", "blocks.2"]
    assert wrap_targets(net, min_params=10_000) == []
    with pytest.raises(ValueError, match="fsdp_wrap.*no module of class.*Missing"):
        wrap_targets(net, classes=["Missing"])


# ----- a 2-stage pipeline == one rank on the same global batch -----

class _TokenNet(nn.Module):
    """A small token transformer (no dropout, so ranks and stages compute the same thing)."""

    task = "binary"
    input_columns = ["tokens"]

    def __init__(self, vocab: int = 32, length: int = 8, dim: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim, padding_idx=0)
        self.positions = nn.Embedding(length, dim)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True), layers,
            enable_nested_tensor=False)
        self.head = nn.Linear(dim, 1)

    def forward(self, batch):
        ids = batch["tokens"].long()
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.encoder(x).mean(1)).squeeze(1)


def token_net(vocab: int = 32, length: int = 8, dim: int = 16, layers: int = 4) -> nn.Module:
    """Factory for fit(model="test_parallel:token_net") (explicit arguments: it takes no table features)."""
    return _TokenNet(vocab=vocab, length=length, dim=dim, layers=layers)


def _token_data(step: int, rows: int):
    g = torch.Generator().manual_seed(2000 + step)
    return {"tokens": torch.randint(1, 32, (rows, 8), generator=g)}, (torch.rand(rows, generator=g) > 0.5).float()


def _train_pipeline(rank, world, schedule, accum, out):
    from sparkdl.train.parallel.pipeline import StageRunner, split_model

    torch.manual_seed(0)
    model = _TokenNet()
    rows = BATCH // accum  # per pipeline step; accum steps make one optimizer step, as accumulation_steps does
    x, _ = _token_data(0, rows // 4)
    pipe = split_model(model, ["encoder.layers.2"], x)
    runner = StageRunner(pipe, stage_index=rank, device=torch.device("cpu"), group=None, microbatches=4,
                         schedule=schedule, loss_fn=lambda o, y: _loss(o, y) / accum)
    opt = torch.optim.SGD(runner.module.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(STEPS):
        x, y = _token_data(step, BATCH)
        total = 0.0
        for part in range(accum):
            mine = slice(part * rows, (part + 1) * rows)
            loss = runner.step({"tokens": x["tokens"][mine]} if runner.is_first else None,
                               y[mine] if runner.is_last else None)
            total += loss.item() if loss is not None else 0.0
        if runner.is_last:
            losses.append(total)
        opt.step()
        opt.zero_grad()
    torch.save({"state": runner.module.state_dict(), "losses": losses}, f"{out}.{rank}")


@pytest.mark.parametrize("schedule,accum", [("gpipe", 1), ("1f1b", 1), ("gpipe", 2)])
def test_two_stage_pipeline_equals_one_rank(tmp_path, schedule, accum):
    _spawn(_train_pipeline, 2, schedule, accum, tmp_path / "pipe")
    torch.manual_seed(0)
    model = _TokenNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(STEPS):
        x, y = _token_data(step, BATCH)
        loss = _loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first = torch.load(f"{tmp_path / 'pipe'}.0", weights_only=True)
    last = torch.load(f"{tmp_path / 'pipe'}.1", weights_only=True)
    stages = {**first["state"], **last["state"]}
    assert "encoder.layers.1.linear1.weight" in first["state"] and "head.weight" in last["state"]
    reference = model.state_dict()
    assert set(stages) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(stages[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert last["losses"] == pytest.approx(losses, rel=1e-5)
    assert first["losses"] == []  # the loss exists on the last stage only


# ----- sharded checkpoints: pickle-free, exact -----

def _save_then_load(rank, world, folder, out):
    from sparkdl.train.parallel import MeshLayout, build_mesh
    from sparkdl.train.parallel.fsdp import shard_model
    from sparkdl.train.parallel.sharded_checkpoint import load_sharded, save_sharded

    mesh = build_mesh(MeshLayout("fsdp", 1, world), torch.device("cpu"))

    def fresh():
        torch.manual_seed(0)
        m = shard_model(_Net(), mesh, min_params=100)
        return m, torch.optim.AdamW(m.parameters(), lr=0.01)

    def train(m, opt, steps):
        for step in steps:
            x, y = _data(step, BATCH * world)
            mine = slice(rank * BATCH, (rank + 1) * BATCH)
            _loss(m({"x": x["x"][mine]}), y[mine]).backward()
            opt.step()
            opt.zero_grad()

    m, opt = fresh()
    train(m, opt, range(2))
    save_sharded(folder, m, opt)
    train(m, opt, range(2, 4))
    straight = {k: v.full_tensor() for k, v in m.state_dict().items()}
    m2, opt2 = fresh()
    load_sharded(folder, m2, opt2)
    train(m2, opt2, range(2, 4))
    resumed = {k: v.full_tensor() for k, v in m2.state_dict().items()}
    if rank == 0:
        torch.save({"straight": straight, "resumed": resumed}, out)


def test_sharded_checkpoint_resumes_exactly_without_pickles(tmp_path):
    _spawn(_save_then_load, 2, str(tmp_path / "ckpt"), tmp_path / "out.pt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["extra.json", "shard-00001-model-00001-of-00001.safetensors",
                     "shard-00002-model-00001-of-00001.safetensors"], files
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for k, v in out["straight"].items():
        assert torch.equal(out["resumed"][k], v), k


# ----- through fit(): the strategies on the real loop, loader, checkpoints and registry -----

ROWS = 256


@pytest.fixture(scope="module")
def token_lake(tmp_path_factory) -> str:
    """A lakehouse with one Delta table of token sequences (written with delta-rs: no Spark needed)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    root = tmp_path_factory.mktemp("par-lake")
    x, y = _token_data(0, ROWS)
    table = pa.table({"id": pa.array(range(ROWS), pa.int64()),
                      "tokens": pa.FixedSizeListArray.from_arrays(pa.array(x["tokens"].reshape(-1).numpy()), 8),
                      "label": pa.array(y.numpy())})
    write_deltalake(str(root / "tables" / "tokens"), table)
    return str(root)


def _cfg(root: str, **kw):
    from sparkdl.train import TrainConfig

    base = dict(lakehouse=root, train_table=str(Path(root) / "tables" / "tokens"), model="test_parallel:token_net",
                feature_columns=["tokens"], label_column="label", local_mode=True, num_ranks=2, batch_size=16,
                epochs=1, max_steps=4, shuffle=False, optimizer="adamw", lr=0.01, checkpoint_every=2,
                deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


def _published(root: str, name: str):
    import inspect

    from sparkdl.registry import load_model

    # The test models' factory lives in this module: trust it where the registry asks (hardening).
    trust = {"trusted_modules": ["test_parallel"]} if "trusted_modules" in inspect.signature(load_model).parameters \
        else {}
    model, mv = load_model(root, name, **trust)
    return model, mv


def test_fsdp_through_fit_equals_allreduce_publishes_and_predicts(token_lake):
    from sparkdl.train import fit

    fit(_cfg(token_lake, run_id="ar", model_name="tok-ar"), progress=False)
    res = fit(_cfg(token_lake, run_id="fsdp", model_name="tok-fsdp", parallelism="fsdp",
                   fsdp_wrap=["TransformerEncoderLayer"], valid_table=str(Path(token_lake) / "tables" / "tokens")),
              progress=False)
    ar, _ = _published(token_lake, "tok-ar")
    sharded, mv = _published(token_lake, "tok-fsdp")
    assert mv.training_config["parallelism"] == "fsdp"
    x, y = _token_data(0, ROWS)  # the table's rows: validation on the sharded model == the published one
    with torch.no_grad():
        assert res.history[-1]["val_loss"] == pytest.approx(_loss(sharded(x), y).item(), rel=1e-4)
    for k, v in ar.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    x, _ = _token_data(99, 5)
    with torch.no_grad():
        torch.testing.assert_close(sharded(x), ar(x), rtol=1e-5, atol=1e-6)
    # Checkpoints hold shards (safetensors + JSON) and a model-free loop file.
    shards = Path(res.checkpoint[:-3] + ".shards")
    assert sorted(p.suffix for p in shards.iterdir()) == [".json", ".safetensors", ".safetensors"]
    assert "model" not in torch.load(res.checkpoint, weights_only=True) or \
        torch.load(res.checkpoint, weights_only=True).get("model") is None


def test_fsdp_kill_and_resume_is_exact(token_lake):
    from sparkdl.train import fit

    fit(_cfg(token_lake, run_id="fsdp-clean", model_name="tok-clean", parallelism="fsdp", max_steps=6),
        progress=False)
    fit(_cfg(token_lake, run_id="fsdp-killed", model_name="tok-killed", parallelism="fsdp", max_steps=6,
             fault_injection={"rank": 1, "step": 4, "kind": "exit"}), progress=False)
    clean, _ = _published(token_lake, "tok-clean")
    killed, _ = _published(token_lake, "tok-killed")
    for k, v in clean.state_dict().items():
        assert torch.equal(killed.state_dict()[k], v), k


def test_pipeline_through_fit_equals_one_rank_and_publishes(token_lake):
    from sparkdl.train import fit

    fit(_cfg(token_lake, run_id="one", model_name="tok-one", num_ranks=1, optimizer="sgd", momentum=0.9, lr=0.1),
        progress=False)
    res = fit(_cfg(token_lake, run_id="pipe", model_name="tok-pipe", parallelism="pipeline", optimizer="sgd",
                   momentum=0.9, lr=0.1, pipeline_split=["encoder.layers.2"], microbatches=4,
                   valid_table=str(Path(token_lake) / "tables" / "tokens")), progress=False)
    one, _ = _published(token_lake, "tok-one")
    piped, mv = _published(token_lake, "tok-pipe")
    for k, v in one.state_dict().items():
        torch.testing.assert_close(piped.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    x, _ = _token_data(99, 5)
    with torch.no_grad():
        torch.testing.assert_close(piped(x), one(x), rtol=1e-5, atol=1e-6)
    assert res.history[-1]["train_loss"] > 0
    # Validation ran on the whole model gathered from the stages: its loss is the published model's.
    x, y = _token_data(0, ROWS)
    with torch.no_grad():
        assert res.history[-1]["val_loss"] == pytest.approx(_loss(piped(x), y).item(), rel=1e-4)


def test_pre_launch_errors_name_the_field(token_lake):
    from sparkdl.train import fit

    with pytest.raises(ValueError, match=r"pipeline_split=\['encoder.layers.9'\].*no submodule"):
        fit(_cfg(token_lake, run_id="bad-split", parallelism="pipeline", pipeline_split=["encoder.layers.9"]))
    assert not (Path(token_lake) / "runs" / "bad-split").exists()  # failed before launch: no run folder
    with pytest.raises(ValueError, match="num_ranks=3 is invalid: 2 pipeline stages"):
        _cfg(token_lake, parallelism="pipeline", pipeline_split=["encoder.layers.2"], num_ranks=3)
    with pytest.raises(ValueError, match="data_parallel_size=3 is invalid"):
        _cfg(token_lake, parallelism="fsdp", data_parallel_size=3, num_ranks=4)
    with pytest.raises(ValueError, match="strategy='local_sgd' is invalid: parallelism='fsdp'"):
        _cfg(token_lake, parallelism="fsdp", strategy="local_sgd")
    with pytest.raises(ValueError, match="fsdp_offload=True is invalid: offload moves GPU-resident"):
        _cfg(token_lake, parallelism="fsdp", fsdp_offload=True)
    with pytest.raises(ValueError, match=r"fsdp_wrap=\['Nope'\] is invalid"):
        fit(_cfg(token_lake, run_id="bad-wrap", parallelism="fsdp", fsdp_wrap=["Nope"]))


# ----- hybrids on 4 ranks: HSDP (2 replicas x 2 shards) and data parallel x pipeline (2 x 2) -----

def test_hsdp_2x2_matches_ddp_on_4_ranks(tmp_path):
    from safetensors.torch import load_file

    _spawn(_train_ddp_or_fsdp, 4, "ddp", "adamw", tmp_path / "ddp.pt")
    _spawn(_train_ddp_or_fsdp, 4, "hsdp", "adamw", tmp_path / "hsdp.safetensors")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    hsdp = load_file(tmp_path / "hsdp.safetensors")
    for k in ddp:
        torch.testing.assert_close(hsdp[k], ddp[k], rtol=1e-5, atol=1e-6, msg=k)


def test_pipeline_2x2_shards_data_by_replica_and_equals_allreduce(token_lake):
    from sparkdl.train import fit

    fit(_cfg(token_lake, run_id="ar2", model_name="tok-ar2", num_ranks=2, optimizer="sgd", momentum=0.9, lr=0.1,
             ), progress=False, log_row_ids="id")
    res = fit(_cfg(token_lake, run_id="pipe2x2", model_name="tok-pipe2x2", num_ranks=4, parallelism="pipeline",
                   optimizer="sgd", momentum=0.9, lr=0.1, pipeline_split=["encoder.layers.2"], microbatches=2),
              progress=False, log_row_ids="id")
    ar, _ = _published(token_lake, "tok-ar2")
    piped, mv = _published(token_lake, "tok-pipe2x2")
    for k, v in ar.state_dict().items():
        torch.testing.assert_close(piped.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # Ranks 0,1 (replica 0's stages) read the same rows, ranks 2,3 the other half.
    import json

    def rows(run: str, rank: int) -> list[int]:
        path = Path(token_lake) / "runs" / run / f"rows-rank{rank}.jsonl"
        return [i for line in path.read_text().splitlines() for i in json.loads(line)["ids"]]

    assert rows("pipe2x2", 0) == rows("pipe2x2", 1) == rows("ar2", 0)
    assert rows("pipe2x2", 2) == rows("pipe2x2", 3) == rows("ar2", 1)
    # The logged loss is the replicas' mean, the same as all-reduce's.
    ar_rows = [json.loads(line) for line in Path(res.step_metrics.replace("pipe2x2", "ar2")).read_text().splitlines()]
    pp_rows = [json.loads(line) for line in Path(res.step_metrics).read_text().splitlines()]
    assert [r["loss"] for r in pp_rows] == pytest.approx([r["loss"] for r in ar_rows], rel=1e-5)


# ----- FSDP options: meta-device init, bf16 parameters (CPU offload pins memory: GPU only) -----

def _fsdp_options(rank, world, out):
    from torch.distributed.tensor import DTensor

    from sparkdl.train.parallel import MeshLayout, build_mesh
    from sparkdl.train.parallel.fsdp import materialize_meta, shard_model

    mesh = build_mesh(MeshLayout("fsdp", 1, world), torch.device("cpu"))["shard"]
    with torch.device("meta"):
        model = _TokenNet()
    shard_model(model, mesh, classes=["TransformerEncoderLayer"], param_dtype=torch.bfloat16)
    materialize_meta(model, torch.device("cpu"), seed=0)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    init = {k: v.full_tensor() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    losses = []
    for step in range(STEPS):
        x, y = _token_data(step, BATCH * world)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        loss = _loss(model({"tokens": x["tokens"][mine]}).float(), y[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"full": full, "init": init, "losses": losses, "local": local, "total": total,
                    "dtypes": sorted({str(p.dtype) for p in model.parameters()})}, out)


def test_fsdp_meta_init_and_bf16(tmp_path):
    _spawn(_fsdp_options, 2, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["local"] * 2 >= out["total"] and out["local"] < 0.55 * out["total"]  # each rank holds half
    assert out["dtypes"] == ["torch.float32"]  # sharded master weights stay fp32; compute was bf16
    assert all(math.isfinite(v) for v in out["losses"])
    assert all(torch.isfinite(v).all() for v in out["full"].values())
    full = out["init"]
    # reset_parameters ran on every module: padding row zero, LayerNorm ones, attention biases zero,
    # and layers drawn independently (not left as uninitialised memory).
    assert torch.equal(full["tokens.weight"][0], torch.zeros(16))
    assert full["tokens.weight"][1:].std() > 0.5
    assert torch.equal(full["encoder.layers.0.norm1.bias"], torch.zeros(16))
    assert not torch.equal(full["encoder.layers.0.linear1.weight"], full["encoder.layers.1.linear1.weight"])
