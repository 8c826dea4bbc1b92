"""Executor/process side of a launch: rendezvous, process group, the user function.

These are top-level functions (not closures) so Spark and multiprocessing pickle them by
reference, and the driver-side launcher stays readable.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

from pyspark import cloudpickle

from sparkdl._gpu import cuda_ordinal
from sparkdl.errors import NonRetryableError, is_retryable
from sparkdl.train import context as _context
from sparkdl.train._progress_channel import ProgressClient
from sparkdl.train._progress_files import ProgressFileWriter

__all__: list[str] = []  # internal to sparkdl.train

FAILURE_MARKER = "SPARKDL_RANK_FAILURE"
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
             "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def listen_socket(host: str) -> socket.socket:
    """A socket listening on ``host`` (never all interfaces) on a port the kernel picks.

    It is handed to the TCPStore as ``master_listen_fd``: the port is never released and
    re-bound, so no other process can take it in between (the race of a "free port" probe)."""
    return socket.create_server((host, 0), backlog=1024)


def interface_of(address: str) -> str | None:
    """Name of the network interface holding IPv4 ``address`` (``lo`` for 127.0.0.1), or None.

    Gloo and NCCL pick their listening interface from the host name (or *_SOCKET_IFNAME):
    pointing them at the rendezvous address's interface keeps their listeners there too."""
    try:
        ip = socket.gethostbyname(address)
        if ip.startswith("127."):
            return "lo"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _idx, name in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(raw[20:24]) == ip:
                    return name
    except OSError:
        pass
    return None


def failure_text(info: dict) -> str:
    """The marker the driver parses out of Spark's (or the local queue's) error text."""
    return f"{FAILURE_MARKER}{json.dumps(info)}{FAILURE_MARKER}"


def _failure_info(rank: int, attempt: int, e: BaseException) -> dict:
    # A NonRetryableError (or one raised from it: bad data, config, model or checkpoint) would
    # only fail again: the driver raises it at once instead of relaunching the stage. A bare
    # NonRetryableError that wraps another error shows that error's own type and text.
    shown = e.__cause__ if type(e) is NonRetryableError and e.__cause__ is not None else e
    return {"rank": rank, "attempt": attempt, "time": time.time(), "error": f"{type(shown).__name__}: {shown}",
            "traceback": traceback.format_exc(), "retry": is_retryable(e)}


def run_rank(payload: bytes, *, rank: int, world_size: int, local_rank: int, master_addr: str,
             master_port: int, attempt: int, local_mode: bool, gpu: str | None,
             listen_fd: int | None = None, host: str | None = None) -> bytes | None:
    """Initialize torch.distributed, run the function, always tear the group down.

    The TCPStore lives at ``master_addr:master_port``: this rank serves it on ``listen_fd`` (a
    socket already listening there, see ``listen_socket``) when given, else connects to it.
    ``host``: this rank's own address (default ``master_addr``); gloo/NCCL listen on its interface.

    Returns rank 0's result pickled (None on other ranks). Any exception leaves as a RuntimeError
    carrying a JSON marker with the rank, the error, its traceback and when it happened; the
    driver turns it back into ``RankFailedError``."""
    import torch
    import torch.distributed as dist

    try:
        spec = cloudpickle.loads(payload)
    except Exception as e:  # e.g. the function's module is not installed on the executor
        if listen_fd is not None:
            os.close(listen_fd)
        raise RuntimeError(failure_text(_failure_info(rank, attempt, e))) from None
    saved_env = {k: os.environ.get(k) for k in (*_ENV_KEYS, *spec["env"])}
    saved_threads = torch.get_num_threads()
    # Process-wide torch state a training function may change; Python workers are reused.
    saved_deterministic = (torch.are_deterministic_algorithms_enabled(),
                           torch.is_deterministic_algorithms_warn_only_enabled())
    saved_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    saved_rng = torch.get_rng_state()
    backend = spec["backend"]
    reporter: Any = None
    if spec.get("progress"):
        reporter = ProgressClient(spec["progress"], rank, attempt, token=spec.get("progress_token", ""))
    elif spec.get("progress_dir") and spec.get("user_events"):
        reporter = ProgressFileWriter(spec["progress_dir"], rank, attempt)
    store = None
    try:
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        ifname = interface_of(host or master_addr)
        if ifname is not None:  # the user's own *_SOCKET_IFNAME (spec["env"] or the executor's) wins
            for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                if saved_env.get(key) is None:
                    os.environ[key] = ifname
        os.environ.update(spec["env"])
        if spec["torch_threads"]:
            torch.set_num_threads(spec["torch_threads"])
            os.environ["OMP_NUM_THREADS"] = str(spec["torch_threads"])
        if backend == "nccl":
            # A Spark gpu address is a physical id; under CUDA_VISIBLE_DEVICES this process sees
            # the GPUs renumbered from 0. Local mode: one GPU per local rank.
            device = torch.device("cuda", cuda_ordinal(gpu) if gpu is not None else local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        timeout = timedelta(seconds=spec["pg_timeout_s"])
        fd, listen_fd = listen_fd, None  # the store owns (and closes) the socket from here on
        store = dist.TCPStore(master_addr, master_port, world_size if fd is not None else None,
                              is_master=fd is not None, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=fd)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        _context._set(_context.RankContext(
            rank=rank, world_size=world_size, local_rank=local_rank, device=device, attempt=attempt,
            local_mode=local_mode, backend=backend,
            _reporter=reporter if spec.get("user_events") else None))
        result = spec["fn"](*spec["args"], **spec["kwargs"])
        return cloudpickle.dumps(result) if rank == 0 else None
    except BaseException as e:
        info = _failure_info(rank, attempt, e)
        # Sent (and flushed, in finally) before the group is destroyed, so the driver hears of the
        # root cause before the peers' "connection closed" errors it is about to trigger.
        if reporter is not None:
            reporter.send(info, internal="failure")
        raise RuntimeError(failure_text(info)) from None
    finally:
        _context._set(None)
        if reporter is not None:
            reporter.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        if listen_fd is not None:  # failed before the store took the socket over
            os.close(listen_fd)
        del store
        # Python workers are reused: leave no rank identity behind for the next task.
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic[0], warn_only=saved_deterministic[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_cudnn
        torch.set_rng_state(saved_rng)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def barrier_task(payload: bytes, attempt: int, master: str | None) -> bytes | None:
    """Body of one barrier task: rank = partition id. ``master`` is the rendezvous store
    (host:port) the driver serves; None when the caller cannot be reached (a Spark Connect
    client): rank 0 then serves it on its own address and shares the port with its peers.
    gloo/NCCL listen on this task's executor address, as Spark's barrier tasks see it."""
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    rank = ctx.partitionId()
    hosts = [i.address.rsplit(":", 1)[0] for i in ctx.getTaskInfos()]  # local: no barrier RPC
    host = hosts[rank]
    listen_fd = None
    if master is None:
        sock = listen_socket(host) if rank == 0 else None
        ports = ctx.allGather(str(sock.getsockname()[1]) if sock is not None else "")
        master = f"{hosts[0]}:{ports[0]}"
        listen_fd = sock.detach() if sock is not None else None
    master_addr, master_port = master.rsplit(":", 1)
    gpus = ctx.resources().get("gpu")
    gpu = gpus.addresses[0] if gpus is not None and gpus.addresses else None
    return run_rank(payload, rank=rank, world_size=len(hosts), local_rank=hosts[:rank].count(host),
                    master_addr=master_addr, master_port=int(master_port), attempt=attempt, local_mode=False,
                    gpu=gpu, host=host, listen_fd=listen_fd)


def local_process_main(payload: bytes, rank: int, world_size: int, port: int, attempt: int, results: Any,
                       log_path: str) -> None:
    """Body of one local-mode process; stdout/stderr go to ``log_path`` for the error report.
    The TCPStore on 127.0.0.1:``port`` is served by the driver for the attempt."""
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        result = run_rank(payload, rank=rank, world_size=world_size, local_rank=rank, master_addr="127.0.0.1",
                          master_port=port, attempt=attempt, local_mode=True, gpu=None)
        results.put((rank, "ok", result))
    except BaseException as e:
        text = str(e)
        if FAILURE_MARKER not in text:  # failed outside run_rank's guard (e.g. unpickling the payload)
            text = failure_text(_failure_info(rank, attempt, e))
        results.put((rank, "error", text))
        log.flush()
        sys.exit(1)
