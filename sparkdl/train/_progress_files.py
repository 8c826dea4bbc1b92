"""Progress when the caller cannot be reached: ranks leave their events in the run's folder.

A Spark Connect client is usually unreachable from the executors, so the TCP channel of
``_progress_channel`` cannot be used. Each rank instead rewrites one JSON-lines file under the
launch's ``progress_dir`` (``attempt-<a>-rank-<r>.jsonl``) at most every ``flush_s`` seconds, and
the caller polls those files through ``pyarrow.fs`` when it can reach the storage (a notebook on
the cluster, a shared folder). A caller that cannot read them gets the epochs' rows with the
result instead (``DriverProgress.finish``): progress is best effort, the result is not.

The files hold JSON only; the reader parses them and never executes anything from them. A file
is rewritten whole (atomically, by ``_fs.write_bytes``) because object stores cannot append: it
keeps every epoch event and the newest ``keep_steps`` step events, each with a sequence number,
so the reader hands every event to ``on_event`` once, in order, per rank and attempt.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from sparkdl import _fs
from sparkdl.train._progress_channel import json_default

__all__: list[str] = []  # internal to sparkdl.train

log = logging.getLogger("sparkdl.train")
_SEQ = "_seq"


class ProgressFileWriter:
    """Rank side, with ``ProgressClient``'s ``send``/``close``: a thread rewrites the rank's file."""

    def __init__(self, folder: str, rank: int, attempt: int, *, flush_s: float = 2.0, keep_steps: int = 50) -> None:
        self._path = _fs.join(folder, f"attempt-{attempt}-rank-{rank}.jsonl")
        self._rank = rank
        self._flush_s = flush_s
        self._keep_steps = keep_steps
        self._events: list[dict] = []
        self._seq = 0
        self._dirty = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sparkdl-progress-file-rank{rank}", daemon=True)
        self._thread.start()

    def send(self, event: dict, *, internal: str | None = None) -> None:
        if internal:  # failures travel in the stage's error text; start/end are the TCP channel's
            return
        with self._lock:
            self._seq += 1
            self._events.append({**event, "rank": self._rank, _SEQ: self._seq})
            steps = [i for i, e in enumerate(self._events) if e.get("kind") == "step"]
            if len(steps) > self._keep_steps:  # the reader only needs the newest ones for the bar
                drop = set(steps[: len(steps) - self._keep_steps])
                self._events = [e for i, e in enumerate(self._events) if i not in drop]
            self._dirty = True

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        self._flush()

    def _loop(self) -> None:
        while not self._stop.wait(self._flush_s):
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            body = "".join(json.dumps(e, default=json_default) + "\n" for e in self._events)
            self._dirty = False
        try:
            _fs.write_text(self._path, body)
        except Exception as e:  # progress must never fail the training step
            log.debug("rank %d could not write its progress file %s: %s", self._rank, self._path, e)


class ProgressFileReader:
    """Caller side: a thread polls the ranks' files and hands each new event to ``on_event`` once."""

    def __init__(self, folder: str, on_event: Callable[[dict], None] | None, *, poll_s: float = 2.0) -> None:
        self._folder = folder
        self._on_event = on_event
        self._poll_s = poll_s
        self._seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sparkdl-progress-files", daemon=True)

    def __enter__(self) -> "ProgressFileReader":
        if self._on_event is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._poll_s + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.poll()
            except Exception as e:  # no access to the storage from here: the result still comes back
                log.debug("progress files under %s cannot be read here (%s); progress comes with the result",
                          self._folder, e)
                return

    def poll(self) -> int:
        """Read the files once; the number of new events delivered."""
        if not _fs.exists(self._folder):
            return 0
        delivered = 0
        for name in sorted(_fs.listdir(self._folder)):
            if not name.endswith(".jsonl"):
                continue
            try:
                text = _fs.read_text(_fs.join(self._folder, name))
            except FileNotFoundError:  # replaced between the listing and the read
                continue
            for line in text.splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict) or not isinstance(event.get(_SEQ), int):
                    continue
                seq = event.pop(_SEQ)
                if seq <= self._seen.get(name, 0):
                    continue
                self._seen[name] = seq
                delivered += 1
                self._deliver(event)
        return delivered

    def _deliver(self, event: dict[str, Any]) -> None:
        try:
            self._on_event(event)  # type: ignore[misc]
        except Exception:  # a broken callback must not stop the reader (or the run)
            log.exception("on_progress raised on event %r; continuing", event)
