"""``ssp`` and ``async``: a parameter server hosted inside the training job.

The flattened parameters are split into one contiguous shard per rank; each rank runs a server
thread for its shard next to its worker (the training loop). A worker computes gradients on its
copy of the parameters, pushes each shard its slice and pulls the shard's parameters back in the
reply, one round trip per shard and step. The server applies the configured optimizer.

- ``async`` (Downpour, Dean et al. 2012): each push is applied on arrival (gradient / workers)
  and answered at once; no bound on staleness, not deterministic.
- ``ssp`` (Ho et al. 2013; Petuum Bosen's min-clock read): a worker's clock is the number of
  steps it has pushed. A shard applies a clock once every worker has pushed it (averaging the
  gradients in worker order, so the result is deterministic), and answers a worker that has
  pushed clock c-1 only when the slowest worker's clock is >= c - staleness: the fastest worker
  is never more than ``staleness`` clocks ahead of the slowest. ``staleness=0`` is bulk-synchronous
  training, step for step.

Transport: torch.distributed point-to-point on two dedicated gloo groups (requests, replies),
not ``torch.distributed.rpc`` (maintenance mode; its parameter-server example hangs past two
workers, pytorch/examples#780). No extra listening socket: the groups rendezvous through the
job's own store. A worker waits for each reply at most ``ps_timeout_s``, so a dead worker or
shard fails the stage (which resumes from the last checkpoint) instead of hanging it.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from sparkdl.train.nonfinite import NonFinite
from sparkdl.train.optim import build_optimizer, lr_factor
from sparkdl.train.strategies.base import Strategy, cpu_copy, flat_params, set_flat_params

__all__ = ["Asynchronous", "StaleSynchronous"]

PUSH, PULL, DONE, STOP = 1.0, 2.0, 3.0, 4.0
_HEADER = 4
_IDLE = timedelta(days=1)
_STOP_WHAT = {1: ("loss", float("nan")), 2: ("loss", float("inf")), 3: ("gradient norm", float("nan")),
              4: ("gradient norm", float("inf"))}


class _Shard:
    """One shard of the parameters with its optimizer and the workers' clocks (thread-safe)."""

    def __init__(self, strategy: "_ParameterServer", lo: int, hi: int, init: torch.Tensor) -> None:
        cfg = strategy.cfg
        self.cfg, self.world, self.me = cfg, strategy.world, strategy.rank
        self.staleness = strategy.staleness  # None: asynchronous
        self.w = init[lo:hi].clone()
        self.opt = build_optimizer(cfg, [self.w])
        self.factor = lr_factor(cfg, strategy.total_steps)
        self.clocks = [0] * self.world
        self.applied = 0  # ssp: clocks applied so far
        self.pending: dict[int, dict[int, torch.Tensor]] = {}
        self.waiting: list[tuple[int, float, int]] = []  # (worker, min clock needed, its clock)
        self.stop = 0
        self.max_gap = 0
        self.cv = threading.Condition()
        self.local_reply: torch.Tensor | None = None

    def _apply(self, grad: torch.Tensor, clock: int) -> None:
        self.w.grad = grad
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * self.factor(clock)
        self.opt.step()
        self.w.grad = None

    def handle(self, kind: float, worker: int, clock: int, arg: int, payload: torch.Tensor | None
               ) -> list[tuple[int, torch.Tensor]]:
        """Serve one request; returns the replies to send to remote workers (a reply to this
        rank's own worker is handed over in ``local_reply``)."""
        with self.cv:
            if kind == STOP:
                self.stop = self.stop or arg
            elif kind == PUSH and not self.stop:
                self.clocks[worker] = clock + 1
                if self.staleness is None:
                    self._apply(payload / self.world, clock)
                else:
                    self.pending.setdefault(clock, {})[worker] = payload.clone()
                    while len(self.pending.get(self.applied, ())) == self.world:
                        grads = self.pending.pop(self.applied)
                        total = grads[0].clone()
                        for w in range(1, self.world):
                            total += grads[w]
                        self._apply(total / self.world, self.applied)
                        self.applied += 1
            if kind == PUSH:
                need = -1.0 if self.staleness is None else clock + 1 - self.staleness
                self.waiting.append((worker, need, clock + 1))
            elif kind == PULL:
                self.waiting.append((worker, -1.0, -1))
            return self._release()

    def _release(self) -> list[tuple[int, torch.Tensor]]:
        low = min(self.clocks)
        out, keep = [], []
        for worker, need, clock in self.waiting:
            if not (self.stop or low >= need):
                keep.append((worker, need, clock))
                continue
            if clock >= 0:
                self.max_gap = max(self.max_gap, clock - low)
            reply = torch.cat([torch.tensor([float(self.stop), float(low), 0.0, 0.0]), self.w])
            if worker == self.me:
                self.local_reply = reply
                self.cv.notify_all()
            else:
                out.append((worker, reply))
        self.waiting = keep
        return out

    def take_local_reply(self, deadline: float, server_error: Callable[[], BaseException | None]) -> torch.Tensor:
        with self.cv:
            while self.local_reply is None:
                if server_error() is not None:
                    raise RuntimeError("this rank's parameter-server thread failed") from server_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no reply from this rank's parameter-server shard: a worker it waits "
                                       "for is dead or stuck (ps_timeout_s)")
                self.cv.wait(min(left, 1.0))
            reply, self.local_reply = self.local_reply, None
            return reply

    def state_dict(self) -> dict[str, Any]:
        with self.cv:
            if self.pending or self.waiting:
                raise RuntimeError("parameter-server shard checkpointed with requests in flight")
            return {"w": self.w.clone(), "optimizer": self.opt.state_dict(), "clocks": list(self.clocks),
                    "applied": self.applied, "max_gap": self.max_gap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.cv:
            self.w.copy_(state["w"])
            self.opt.load_state_dict(state["optimizer"])
            self.clocks = [int(c) for c in state["clocks"]]
            self.applied, self.max_gap = int(state["applied"]), int(state["max_gap"])


class _ParameterServer(Strategy):
    replicas_diverge = True
    staleness: int | None = None

    def __init__(self, cfg, *, device, group=None) -> None:
        super().__init__(cfg, device=device, group=group)
        # Dedicated groups (all ranks create them, in the same order): requests go worker -> shard,
        # replies shard -> worker, so a rank's worker and server threads never share a direction.
        self.req_group = dist.new_group(backend="gloo") if self.world > 1 else None
        self.rep_group = dist.new_group(backend="gloo") if self.world > 1 else None
        self.total_steps = 1
        self.shard: _Shard | None = None
        self.thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._send_lock = threading.Lock()
        self._server_error: BaseException | None = None
        self._stopped_sent = False

    # ----- setup -----
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        self.broadcast_parameters()
        self.params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in self.params)
        cuts = [numel * j // self.world for j in range(self.world + 1)]
        self.bounds = list(zip(cuts[:-1], cuts[1:]))
        return model

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = total_steps
        lo, hi = self.bounds[self.rank]
        self.shard = _Shard(self, lo, hi, flat_params(self.params).float().cpu())

    def _start(self) -> None:
        if self.thread is None and self.world > 1:
            self.thread = threading.Thread(target=self._serve, name=f"sparkdl-ps-shard-{self.rank}", daemon=True)
            self.thread.start()

    # ----- the server thread -----
    def _serve(self) -> None:
        lo, hi = self.bounds[self.rank]
        remaining = self.world - 1
        try:
            while remaining > 0:
                buf = torch.empty(_HEADER + hi - lo)
                # A gloo receive completes only inside wait() (is_completed() stays False until
                # then), and a timed-out receive cannot be re-posted safely: block for as long as
                # a run may idle (validation, checkpoints). On the normal path every peer's DONE
                # ends the loop; otherwise this daemon thread ends with the process group.
                dist.irecv(buf, src=None, group=self.req_group).wait(_IDLE)
                kind, worker, clock, arg = buf[:_HEADER].tolist()
                if kind == DONE:
                    remaining -= 1
                    continue
                self._send_replies(self.shard.handle(kind, int(worker), int(clock), int(arg), buf[_HEADER:]))
        except BaseException as e:  # the worker side raises it on its next exchange
            self._server_error = e
            with self.shard.cv:
                self.shard.cv.notify_all()

    def _send_replies(self, replies: list[tuple[int, torch.Tensor]]) -> None:
        for worker, reply in replies:
            with self._send_lock:
                dist.send(reply, dst=worker, group=self.rep_group)
            self.bytes_sent += reply.numel() * 4

    # ----- the worker side -----
    def _exchange(self, kind: float, clock: int, grad: torch.Tensor | None) -> torch.Tensor:
        """One request to every shard (the push of ``grad`` at ``clock``, or a pull); returns the
        new flat parameters, assembled from the shards' replies."""
        self._start()
        deadline = time.monotonic() + self.cfg.ps_timeout_s
        recvs = []
        for j, (lo, hi) in enumerate(self.bounds):
            if j == self.rank:
                continue
            payload = grad[lo:hi] if grad is not None else torch.zeros(hi - lo)
            request = torch.cat([torch.tensor([kind, float(self.rank), float(clock), 0.0]), payload])
            reply = torch.empty(_HEADER + hi - lo)
            recvs.append((j, reply, dist.irecv(reply, src=j, group=self.rep_group)))
            dist.isend(request, dst=j, group=self.req_group).wait()
            self.bytes_sent += request.numel() * 4
        lo, hi = self.bounds[self.rank]
        self._send_replies(self.shard.handle(kind, self.rank, clock, 0, grad[lo:hi] if grad is not None else None))
        parts = {self.rank: self.shard.take_local_reply(deadline, lambda: self._server_error)}
        for j, reply, work in recvs:
            try:
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
            except RuntimeError as e:
                raise TimeoutError(f"parameter-server shard on rank {j} did not answer within "
                                   f"ps_timeout_s={self.cfg.ps_timeout_s}s: that rank is dead or stuck") from e
            parts[j] = reply
        stop = max(int(p[0]) for p in parts.values())
        if stop and kind == PUSH:
            what, value = _STOP_WHAT[stop]
            raise NonFinite(clock + 1, what, value)
        return torch.cat([parts[j][_HEADER:] for j in range(self.world)])

    def reduce_flags(self, tensor: torch.Tensor) -> torch.Tensor:
        """Local check only (no per-step collective between workers); a bad step is announced to
        every shard, and the other workers stop on their next exchange."""
        flags = tensor.tolist()
        bad = 1 if flags[0] else 2 if flags[1] else 3 if flags[3] else 4 if flags[4] else 0
        if bad and not self._stopped_sent:
            self._stopped_sent = True
            self._start()
            for j in range(self.world):
                if j != self.rank:
                    dist.isend(torch.cat([torch.tensor([STOP, float(self.rank), 0.0, float(bad)]),
                                          torch.zeros(self.bounds[j][1] - self.bounds[j][0])]),
                               dst=j, group=self.req_group).wait()
            self._send_replies(self.shard.handle(STOP, self.rank, 0, bad, None))
        return tensor

    def step(self, opt, precision, step: int) -> None:
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                           for p in self.params]).float().cpu()
        set_flat_params(self.params, self._exchange(PUSH, step, grads).to(self.device))

    def metrics(self) -> dict[str, float]:
        return {"clock_gap_max": self.shard.max_gap} if self.shard is not None and self.world > 1 else {}

    @contextmanager
    def consensus(self) -> Iterator[None]:
        # After the barrier every worker's pushes so far are applied (each waited for its replies).
        if self.world > 1:
            dist.barrier(group=self.group)
        mine = flat_params(self.params).clone()
        set_flat_params(self.params, self._exchange(PULL, -1, None).to(self.device))
        try:
            yield
        finally:
            set_flat_params(self.params, mine)

    # ----- checkpoints -----
    def state_dict(self) -> dict[str, Any]:
        if self.world > 1:
            dist.barrier(group=self.group)  # a consistent cut: no push of this step is in flight
        return {"replica": cpu_copy(self.model.state_dict()), "ps_shard": cpu_copy(self.shard.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["replica"])
        self.shard.load_state_dict(state["ps_shard"])

    def close(self) -> None:
        if self.thread is None:
            return
        try:
            for j in range(self.world):
                if j != self.rank:
                    dist.isend(torch.cat([torch.tensor([DONE, float(self.rank), 0.0, 0.0]),
                                          torch.zeros(self.bounds[j][1] - self.bounds[j][0])]),
                               dst=j, group=self.req_group).wait()
            self.thread.join(self.cfg.ps_timeout_s)
        finally:
            self._closing.set()
            self.thread.join(5.0)

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "shards": self.world, "transport": "c10d p2p (gloo groups)"}
        if self.staleness is not None:
            d["staleness"] = self.staleness
        return d


class StaleSynchronous(_ParameterServer):
    name = "ssp"

    def __init__(self, cfg, *, device, group=None) -> None:
        super().__init__(cfg, device=device, group=group)
        self.staleness = cfg.staleness


class Asynchronous(_ParameterServer):
    name = "async"
