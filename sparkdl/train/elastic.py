"""Elastic training: what changes when a run continues on another number of ranks (docs/elastic.md).

A resize is always a relaunch from the run's last checkpoint (a barrier stage cannot change its
task count while it runs). Three things follow from the new world size M and the run's first
size N (``base_ranks``, kept in the checkpoint): the learning rate and accumulation of the
resize policy, the world sizes a relaunch may pick, and how each rank's saved state maps onto
the new ranks (``remap_rule``)."""

from __future__ import annotations

from dataclasses import dataclass

from sparkdl.train.config import TrainConfig

__all__ = ["ResizeSettings", "allowed_sizes", "check_resizable", "remap_rule", "resize_settings"]

# What each strategy does with per-rank state on a resize (docs/elastic.md repeats this table).
_RULES = {
    "allreduce": "model and optimizer state are the same on every rank and load as they are; PowerSGD's "
                 "per-rank error feedback and warm-start matrices are reset (they belong to one rank's gradients)",
    "local_sgd": "every new rank starts from the averaged model; new rank r takes saved rank (r mod N)'s "
                 "optimizer state; the outer optimizer and anchor (the same on every rank) load from rank 0",
    "easgd": "every replica restarts from the center; the center loads as saved; new rank r takes saved rank "
             "(r mod N)'s optimizer state",
    "bmuf": "every replica restarts from the global model; global model and block momentum load as saved; new "
            "rank r takes saved rank (r mod N)'s optimizer state",
    "fedavg": "no per-rank state: clients are reassigned (client j to rank j mod M) and rounds sample the same "
              "global client ids, so the rounds go on as before",
}


def remap_rule(strategy: str) -> str:
    """The documented resize rule of ``strategy``."""
    return _RULES[strategy]


@dataclass(frozen=True, kw_only=True)
class ResizeSettings:
    """What a world of ``world`` ranks trains with, for a run that started on ``base_ranks``."""

    base_ranks: int
    world: int
    policy: str | None
    lr: float
    accumulation_steps: int

    def record(self, *, attempt: int, step: int, from_ranks: int) -> dict:
        """One entry of the run's resize history (checkpoint, TrainResult.lineage, the model's lineage)."""
        return {"attempt": attempt, "from_ranks": from_ranks, "to_ranks": self.world, "step": step,
                "policy": self.policy, "lr": self.lr, "accumulation_steps": self.accumulation_steps}


def resize_settings(cfg: TrainConfig, *, base_ranks: int, world: int) -> ResizeSettings:
    """The lr and accumulation of a world of ``world`` ranks; ValueError naming the numbers when
    the policy cannot hold (or none is set and the size changed)."""
    if world == base_ranks:
        return ResizeSettings(base_ranks=base_ranks, world=world, policy=cfg.resize_policy, lr=cfg.lr,
                              accumulation_steps=cfg.accumulation_steps)
    if cfg.resize_policy is None:
        raise ValueError(f"the run started on {base_ranks} ranks and now runs on {world}; set resize_policy="
                         "'scale_lr' (lr x new/old ranks) or 'keep_global_batch' (accumulation_steps x old/new "
                         "ranks) so the change of global batch is explicit (docs/elastic.md)")
    if cfg.resize_policy == "scale_lr":
        return ResizeSettings(base_ranks=base_ranks, world=world, policy="scale_lr",
                              lr=cfg.lr * world / base_ranks, accumulation_steps=cfg.accumulation_steps)
    micro = cfg.accumulation_steps * base_ranks  # micro-batches per optimizer step, all ranks together
    if micro % world:
        raise ValueError(f"resize_policy='keep_global_batch' cannot keep the global batch of {micro} micro-batches "
                         f"(accumulation_steps={cfg.accumulation_steps} x {base_ranks} ranks, batch_size="
                         f"{cfg.batch_size}) on {world} ranks: {micro} is not a multiple of {world}; use a world "
                         f"size that divides {micro}, or resize_policy='scale_lr'")
    return ResizeSettings(base_ranks=base_ranks, world=world, policy="keep_global_batch", lr=cfg.lr,
                          accumulation_steps=micro // world)


def check_resizable(cfg: TrainConfig, strategy: str, *, saved_ranks: int, world: int) -> None:
    """ValueError (before launch) when a checkpoint of ``saved_ranks`` ranks cannot continue on ``world``."""
    if saved_ranks == world:
        return
    if cfg.parallelism != "data":
        raise ValueError(f"the run was checkpointed by {saved_ranks} ranks with parallelism={cfg.parallelism!r}; its "
                         f"model and optimizer are sharded over that device mesh and sparkdl does not reshard them, "
                         f"so it cannot continue on {world} ranks: resume with num_ranks={saved_ranks}")
    if strategy in ("ssp", "async"):
        raise ValueError(f"strategy={strategy!r} keeps its parameter-server shards and their optimizer state cut "
                         f"for {saved_ranks} ranks, and sparkdl does not re-cut them yet, so the run cannot continue "
                         f"on {world} ranks: resume with num_ranks={saved_ranks} (or leave min_ranks/max_ranks unset)")
    if strategy not in _RULES:
        raise ValueError(f"strategy={strategy!r} has no resize rule; resume with num_ranks={saved_ranks}")
    if strategy == "easgd" and cfg.easgd_alpha > 1 / world:
        raise ValueError(f"easgd_alpha={cfg.easgd_alpha} is above 1/{world}, unstable on {world} ranks; lower "
                         f"easgd_alpha to 0.9/{world} or resume on fewer ranks")


def allowed_sizes(cfg: TrainConfig, *, base_ranks: int) -> list[int]:
    """World sizes in [min_ranks, max_ranks] a relaunch may pick (the policy holds on each)."""
    out = []
    for m in range(cfg.min_ranks or cfg.num_ranks, (cfg.max_ranks or cfg.num_ranks) + 1):
        try:
            resize_settings(cfg, base_ranks=base_ranks, world=m)
            check_resizable(cfg, cfg.strategy, saved_ranks=base_ranks, world=m)
        except ValueError:
            continue
        out.append(m)
    return out
