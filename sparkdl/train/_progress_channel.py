"""Driver <-> rank event channel: JSON lines over one TCP connection per rank.

The driver runs a small server thread; each rank connects lazily and sends one JSON object per
line. It carries progress events and failure reports, never code, and listens only on the
driver's address (``spark.driver.bindAddress`` / ``spark.driver.host``; 127.0.0.1 in local
mode) for the duration of ``run_distributed``.

Every line carries the run's token: a random value made per ``run_distributed`` call and sent to
the ranks inside the task payload (over Spark's own channel to the executors, or the spawn pipe
in local mode). Lines without it are dropped, so another process that can reach the port cannot
fail or abort a run with a forged failure report (``"retry": false``). Malformed lines are
dropped and logged; nothing a peer sends can stop the server thread. The token authenticates,
it does not encrypt: events travel in clear text (see docs/security.md).
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import secrets
import selectors
import socket
import threading
import time
from typing import Any, Callable

__all__: list[str] = []  # internal to sparkdl.train

log = logging.getLogger("sparkdl.train")

# Events carrying this key are the launcher's own (rank failures); they never reach on_progress.
INTERNAL_KEY = "_sparkdl"
TOKEN_KEY = "_sparkdl_token"
_MAX_LINE = 1 << 20


def json_default(obj: Any) -> Any:
    """Make numpy/torch scalars and other odd values JSON-safe instead of failing the send."""
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except Exception:  # a multi-element tensor/array has no .item()
            pass
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(obj)


class ProgressServer:
    """Receives rank events; calls ``on_event`` for user events (on the server thread) and keeps
    the launcher's failure reports in ``failures`` in arrival order."""

    def __init__(self, on_event: Callable[[dict], None] | None, *, bind_host: str, advertise_host: str) -> None:
        self._on_event = on_event
        self.token = secrets.token_hex(16)
        """Per-run secret the ranks put in every line (``ProgressClient(token=)``)."""
        self._listener = socket.create_server((bind_host, 0))
        self._listener.setblocking(False)
        self.address = f"{advertise_host}:{self._listener.getsockname()[1]}"
        self.failures: list[dict] = []
        # (attempt, rank) -> "running" | "done" | "died"; "died" = connection lost before "end".
        self.states: dict[tuple[int, int], str] = {}
        self.deaths: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sparkdl-progress", daemon=True)
        self._drain_deadline = float("inf")

    def __enter__(self) -> "ProgressServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, drain_timeout_s: float = 2.0) -> None:
        """Stop accepting, read what connected ranks still have in flight (up to the timeout), stop."""
        self._drain_deadline = time.monotonic() + drain_timeout_s
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=drain_timeout_s + 1.0)

    def snapshot(self, attempt: int) -> tuple[list[dict], dict[int, str], dict[int, float]]:
        """(failure reports in arrival order, rank -> state, rank -> driver time of death) of one attempt."""
        with self._lock:
            failures = [f for f in self.failures if f.get("attempt") == attempt]
            states = {r: s for (a, r), s in self.states.items() if a == attempt}
            deaths = {r: t for (a, r), t in self.deaths.items() if a == attempt}
        return failures, states, deaths

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        buffers: dict[socket.socket, bytearray] = {}
        owners: dict[socket.socket, tuple[int, int]] = {}
        try:
            while True:
                if self._stop.is_set():
                    if self._listener.fileno() != -1:
                        sel.unregister(self._listener)
                        self._listener.close()
                    # Ranks close their connection when they finish: wait for those EOFs.
                    if not buffers or time.monotonic() > self._drain_deadline:
                        break
                for key, _ in sel.select(timeout=0.1):
                    if key.data is None:
                        try:
                            conn, _addr = self._listener.accept()
                        except OSError:
                            continue
                        conn.setblocking(False)
                        buffers[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ, "conn")
                        continue
                    conn = key.fileobj  # type: ignore[assignment]
                    try:
                        chunk = conn.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    buf = buffers[conn]
                    buf.extend(chunk)
                    *lines, rest = bytes(buf).split(b"\n")
                    buffers[conn] = bytearray(rest if len(rest) < _MAX_LINE else b"")
                    for line in lines:
                        try:
                            owner = self._dispatch(line)
                        except Exception:  # a malformed line must never stop the channel
                            log.warning("dropping a progress line that could not be handled (%d bytes)", len(line),
                                        exc_info=True)
                            owner = None
                        if owner is not None:
                            owners[conn] = owner
                    if not chunk:
                        sel.unregister(conn)
                        conn.close()
                        del buffers[conn]
                        self._closed(owners.pop(conn, None))
        finally:
            for conn in buffers:
                conn.close()
            if self._listener.fileno() != -1:
                self._listener.close()
            sel.close()

    def _closed(self, owner: tuple[int, int] | None) -> None:
        if owner is None:
            return
        with self._lock:
            if self.states.get(owner) == "running":
                self.states[owner] = "died"
                self.deaths[owner] = time.time()

    def _dispatch(self, line: bytes) -> tuple[int, int] | None:
        """Handle one line; returns (attempt, rank) when it identifies the sender."""
        if not line.strip():
            return None
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("dropping a malformed progress line (%d bytes)", len(line))
            return None
        if not isinstance(event, dict):
            return None
        token = event.pop(TOKEN_KEY, None)
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.token.encode()):
            log.warning("dropping a progress line without this run's token (%d bytes)", len(line))
            return None
        kind = event.pop(INTERNAL_KEY, None)
        if kind is not None:
            try:
                owner = (int(event.get("attempt", -1)), int(event.get("rank", -1)))
            except (TypeError, ValueError):
                log.warning("dropping an internal progress line with a malformed attempt or rank")
                return None
            with self._lock:
                if kind == "start":
                    self.states[owner] = "running"
                elif kind == "end":
                    self.states[owner] = "done"
                elif kind == "failure":
                    self.failures.append(event)
            return owner
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken callback must not stop the channel (or the run)
                log.exception("on_progress raised on event %r; continuing", event)
        return None


class ProgressClient:
    """Rank side: ``send`` queues and returns at once; a thread writes to the driver.

    Best effort by design: when the queue is full or the driver is unreachable, events are
    dropped rather than slowing the training step."""

    def __init__(self, address: str, rank: int, attempt: int, *, token: str, max_pending: int = 10_000,
                 io_timeout_s: float = 5.0) -> None:
        host, port = address.rsplit(":", 1)
        self._addr = (host, int(port))
        self._token = token
        self._rank = rank
        self._attempt = attempt
        self._timeout = io_timeout_s
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max_pending)
        self._dropped = 0
        self._thread = threading.Thread(target=self._pump, name=f"sparkdl-progress-rank{rank}", daemon=True)
        self._thread.start()
        # Connect at once: a connection lost before "end" tells the driver this rank died hard.
        self.send({}, internal="start")

    def send(self, event: dict, *, internal: str | None = None) -> None:
        try:
            body = {**event, "rank": self._rank, TOKEN_KEY: self._token}
            if internal:
                body.update({INTERNAL_KEY: internal, "attempt": self._attempt})
            line = json.dumps(body, default=json_default).encode() + b"\n"
            self._queue.put_nowait(line)
        except Exception:  # queue.Full, unserializable event: never the caller's problem
            self._dropped += 1

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush what is queued (up to ``timeout_s``) and close the connection."""
        self.send({}, internal="end")
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout_s)
        if self._dropped:
            log.warning("rank %d dropped %d progress events", self._rank, self._dropped)

    def _pump(self) -> None:
        sock: socket.socket | None = None
        broken = False
        try:
            while True:
                line = self._queue.get()
                if line is None:
                    return
                if broken:
                    self._dropped += 1
                    continue
                try:
                    if sock is None:
                        sock = socket.create_connection(self._addr, timeout=self._timeout)
                    sock.sendall(line)
                except OSError:
                    broken = True
                    self._dropped += 1
        finally:
            if sock is not None:
                sock.close()
