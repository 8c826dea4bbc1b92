"""``fedavg``: federated averaging over simulated clients (McMahan et al. 2017).

Rows belong to clients by the value of ``fedavg_client_column`` (non-IID by design); clients are
numbered in sorted key order and client j lives on rank j mod num_ranks, which holds its rows
in memory. Each round (one loop step) samples ``fedavg_clients_per_round`` clients with a
seeded generator (every rank draws the same sample); each sampled client starts from the
global model, runs ``fedavg_local_epochs`` passes over its rows with a fresh local optimizer,
and the global model moves by the clients' updates averaged with weights = their row counts:
one all-reduce of the parameters per round.

With ``dp_clip``: each client's update is clipped to that L2 norm, the clipped updates are
summed unweighted, rank 0 adds Gaussian noise of std ``dp_noise_multiplier * dp_clip`` and the
sum is divided by the number of sampled clients (DP-FedAvg, McMahan et al. 2018). The
(epsilon, delta) is Opacus's RDP accountant over the rounds run, with sampling rate
clients_per_round / clients. Protected: whether any one client took part, against whoever sees
the published model or its per-round global models. Not protected: the server and the ranks
see every client's raw update (no secure aggregation, the server is trusted); the clients are
simulated on the job's own ranks; the accountant assumes Poisson sampling, this samples a fixed
number of clients without replacement (the usual approximation, as in Opacus).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.distributed as dist

from sparkdl.train.optim import build_optimizer
from sparkdl.train.strategies.base import Strategy, flat_params, set_flat_params

__all__ = ["FedAvg", "dp_epsilon"]


def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """(epsilon at ``delta``) after ``rounds`` subsampled Gaussian rounds, from Opacus's RDP accountant."""
    if rounds == 0:
        return 0.0
    try:
        from opacus.accountants.analysis import rdp
    except ImportError as e:
        raise RuntimeError("client-level DP needs Opacus for its privacy accountant: "
                           "pip install 'sparkdl[privacy]' (or opacus)") from e
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    curve = rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    eps, _ = rdp.get_privacy_spent(orders=orders, rdp=curve, delta=delta)
    return float(eps)


class FedAvg(Strategy):
    name = "fedavg"
    runs_rounds = True

    @property
    def data_parallel(self) -> tuple[int, int]:
        return 0, 1  # clients are placed by key, not by the loader's row ranges

    def extra_columns(self) -> list[str]:
        return [self.cfg.fedavg_client_column]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        self.broadcast_parameters()
        self.params = [p for p in model.parameters() if p.requires_grad]
        return model

    def prepare(self, *, loader: Any, open_table: Callable[[Any], Any]) -> None:
        from sparkdl.data import LoaderConfig

        key = self.cfg.fedavg_client_column
        rows: dict[str, list[torch.Tensor]] = {}
        with open_table(LoaderConfig(batch_size=8192, columns=loader.config.columns, shuffle=False,
                                     drop_last=False)) as table:
            for batch in table:
                for name, t in batch.items():
                    rows.setdefault(name, []).append(t)
        if key not in rows:
            raise ValueError(f"fedavg_client_column={key!r} is not a column of the training table")
        data = {name: torch.cat(parts) for name, parts in rows.items()}
        keys = data[key]
        if keys.is_floating_point() or keys.dim() != 1:
            raise ValueError(f"fedavg_client_column={key!r} must be an integer column (client ids); "
                             f"found {keys.dtype} of shape {list(keys.shape)}")
        ids = torch.unique(keys)  # sorted: the same client numbering on every rank
        self.num_clients = len(ids)
        if self.num_clients < self.world:
            raise ValueError(f"fedavg_client_column={key!r} has {self.num_clients} distinct values, fewer than "
                             f"num_ranks={self.world}: use a column with more clients or fewer ranks")
        per_round = self.cfg.fedavg_clients_per_round or self.num_clients
        if per_round > self.num_clients:
            raise ValueError(f"fedavg_clients_per_round={per_round} is more than the {self.num_clients} clients "
                             f"of column {key!r}")
        self.per_round = per_round
        self.clients: dict[int, dict[str, torch.Tensor]] = {}
        for j in range(self.rank, self.num_clients, self.world):
            mask = keys == ids[j]
            self.clients[j] = {name: t[mask] for name, t in data.items() if name != key}
        self.local_cfg = replace(self.cfg, lr=self.cfg.fedavg_local_lr or self.cfg.lr) \
            if self.cfg.fedavg_local_lr else self.cfg

    def steps_per_epoch(self, batches_per_rank: int) -> int:
        """A round samples ``per_round`` clients: an epoch is enough rounds to sample each once on average."""
        return math.ceil(self.num_clients / self.per_round)

    def _sample(self, round_: int) -> list[int]:
        if self.per_round == self.num_clients:
            return list(range(self.num_clients))
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + round_)
        return sorted(torch.randperm(self.num_clients, generator=g)[:self.per_round].tolist())

    def run_round(self, step: int, *, forward_loss: Callable, guard: Any, precision: Any) -> tuple[float, int, int]:
        cfg = self.cfg
        start = flat_params(self.params).clone()
        total = torch.zeros_like(start)
        rows = loss_sum = steps = 0.0
        samples = 0
        for c in (c for c in self._sample(step) if c in self.clients):
            data = self.clients[c]
            n = len(next(iter(data.values())))
            set_flat_params(self.params, start)
            opt = build_optimizer(self.local_cfg, self.params)  # client state starts fresh every round
            for epoch in range(cfg.fedavg_local_epochs):
                g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 65_537 + c * 257 + epoch)
                order = torch.randperm(n, generator=g) if cfg.shuffle else torch.arange(n)
                for lo in range(0, n, cfg.batch_size):
                    idx = order[lo:lo + cfg.batch_size]
                    batch = {k: v[idx].to(self.device) for k, v in data.items()}
                    loss = forward_loss(batch)
                    precision.backward(loss)
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                    precision.step(opt)
                    opt.zero_grad(set_to_none=True)
                    loss_sum += float(loss.detach())
                    steps += 1
                    samples += len(idx)
            update = flat_params(self.params) - start
            if cfg.dp_clip is not None:
                norm = float(update.norm())
                total += update * min(1.0, cfg.dp_clip / (norm + 1e-12))
            else:
                total += update * n
            rows += n
        # Stop before the non-finite update reaches the global model, on every rank at once.
        guard.add_loss(torch.tensor(loss_sum / steps if steps else 0.0))
        guard.check(step + 1, [], total.norm(), self.reduce)
        stats = torch.tensor([rows, loss_sum, steps], dtype=total.dtype, device=total.device)
        packed = self.reduce(torch.cat([total, stats]))
        self.bytes_sent += int(2 * (self.world - 1) / self.world * packed.numel() * 4)
        total, (rows, loss_sum, steps) = packed[:-3], packed[-3:].tolist()
        if cfg.dp_clip is not None:
            if self.rank == 0:
                g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
                noise = torch.randn(total.shape, generator=g) * (cfg.dp_noise_multiplier * cfg.dp_clip)
                total = total + noise.to(total)
            if self.world > 1:  # one noise draw, rank 0's, for every rank
                dist.broadcast(total, src=0, group=self.group)
            delta = total / self.per_round
        else:
            delta = total / max(rows, 1.0)
        set_flat_params(self.params, start + delta)
        self.rounds_done = step + 1
        return (loss_sum / steps if steps else 0.0), 1, samples

    def metrics(self) -> dict[str, float]:
        eps = self.epsilon()
        return {} if eps is None else {"dp_epsilon": eps}

    def epsilon(self) -> float | None:
        """The (epsilon, dp_delta) spent by the rounds run so far; None without DP."""
        if self.cfg.dp_clip is None:
            return None
        return dp_epsilon(self.cfg.dp_noise_multiplier, self.per_round / self.num_clients,
                          getattr(self, "rounds_done", 0), self.cfg.dp_delta)

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "client_column": self.cfg.fedavg_client_column,
             "clients_per_round": self.cfg.fedavg_clients_per_round, "local_epochs": self.cfg.fedavg_local_epochs,
             "local_lr": self.cfg.fedavg_local_lr or self.cfg.lr}
        if getattr(self, "num_clients", None):
            d["clients"] = self.num_clients
        if self.cfg.dp_clip is not None:
            d.update(dp_clip=self.cfg.dp_clip, dp_noise_multiplier=self.cfg.dp_noise_multiplier,
                     dp_delta=self.cfg.dp_delta, dp_epsilon=self.epsilon(),
                     dp_accountant="opacus RDP (Poisson-sampling bound)")
        return d
