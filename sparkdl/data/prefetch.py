"""A background producer thread feeding a queue bounded by item count and by bytes."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Iterator

__all__ = ["Prefetcher", "Closed", "STOPPED"]


class Closed(Exception):
    """The prefetcher was closed while a put or get waited."""


class _End:
    pass


STOPPED = object()
"""Yielded by iteration when ``close()`` cut it short."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Runs ``produce(put)`` in a daemon thread; ``get()`` hands the items out in order.

    ``put(item, nbytes, count)`` blocks while adding ``count`` (an item may stand for several,
    e.g. a group of batches handed over at once) would exceed ``max_items``, or adding ``nbytes``
    would exceed ``max_bytes`` (one item is always let through, however big, so progress never
    stalls). An exception in ``produce`` is re-raised by ``get()``. ``close()`` wakes and
    joins the thread; a blocked ``put`` then raises :class:`Closed`, which ends ``produce``.
    """

    def __init__(
        self,
        produce: Callable[[Callable[[Any, int], None]], None],
        *,
        max_items: int,
        max_bytes: int | None,
        name: str = "sparkdl-loader-prefetch",
    ) -> None:
        self._cond = threading.Condition()
        self._items: deque[tuple[Any, int, int]] = deque()
        self._bytes = 0
        self._count = 0
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._closed = False
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def _full(self, nbytes: int, count: int) -> bool:
        if not self._items:
            return False
        if self._count + count > self._max_items:
            return True
        return self._max_bytes is not None and self._bytes + nbytes > self._max_bytes

    def put(self, item: Any, nbytes: int = 0, count: int = 1) -> None:
        with self._cond:
            while not self._closed and self._full(nbytes, count):
                self._cond.wait()
            if self._closed:
                raise Closed()
            self._items.append((item, nbytes, count))
            self._bytes += nbytes
            self._count += count
            self._cond.notify_all()

    def _finish(self, marker: Any) -> None:
        with self._cond:
            self._items.append((marker, 0, 0))
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self._produce(self.put)
        except Closed:
            return
        except BaseException as e:  # handed to the consumer, who re-raises it
            self._finish(_Failure(e))
            return
        self._finish(_End())

    def get(self) -> Any:
        """The next item; raises StopIteration at the end, the producer's error if it failed."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                raise Closed()
            item, nbytes, count = self._items.popleft()
            self._bytes -= nbytes
            self._count -= count
            self._cond.notify_all()
        if isinstance(item, _End):
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def __iter__(self) -> Iterator[Any]:
        """The items, then ``STOPPED`` once if the prefetcher was closed before the end."""
        while True:
            try:
                yield self.get()
            except StopIteration:
                return
            except Closed:
                yield STOPPED
                return

    @property
    def bytes_waiting(self) -> int:
        return self._bytes

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the producer and drop what it prepared; idempotent."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._count = 0
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
