"""Driver side of live progress: rank 0's events from the launcher's channel drive a tqdm bar
(terminal or notebook) and the ``on_epoch`` callback.

Rank 0 reports ``{"kind": "step", ...}`` after every optimizer step and ``{"kind": "epoch",
...}`` (the epoch's history row) after each epoch's checkpoint. Events arrive on the
channel's thread; the channel is best effort, so ``finish`` delivers any epoch row that did not
arrive from the run's final history. The bar counts optimizer steps with ``update(delta)``, so
tqdm's rate and ETA are real; a retried attempt that restarts from an earlier checkpoint
resets the bar's timer instead of moving it backwards.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any, Callable

__all__ = ["DriverProgress"]

log = logging.getLogger("sparkdl.train")


def _tqdm():
    # tqdm.auto picks the notebook widget when ipywidgets is installed; without it, it warns and
    # falls back to the text bar, which renders fine in a notebook too, so the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm


class DriverProgress:
    """``on_progress`` handler of ``fit``: a progress bar plus the ``on_epoch`` callback."""

    def __init__(self, *, on_epoch: Callable[[dict], None] | None, earlier: list[dict[str, Any]] = (),
                 show: bool = True) -> None:
        self._on_epoch = on_epoch
        # Rows an earlier fit of a resumed run already delivered; a partial epoch (max_steps) is
        # delivered again once a resume completes it.
        self._delivered = {self._key(r) for r in earlier}
        self._show = show
        self._bar: Any = None
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "step":
            with self._lock:
                self._step(event)
        elif kind == "epoch":
            self._epoch(event)

    def _step(self, ev: dict) -> None:
        if not self._show:
            return
        step = int(ev["step"])
        bar = self._bar
        if bar is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bar = self._bar = _tqdm()(total=int(ev["total_steps"]), initial=step - 1, desc="train",
                                          unit="step", dynamic_ncols=True)
        if step <= bar.n:  # a relaunched attempt resumed from an earlier checkpoint
            bar.reset(total=int(ev["total_steps"]))
            bar.initial = bar.n = bar.last_print_n = step - 1
        bar.set_postfix({"epoch": f"{ev['epoch']}/{ev['epochs']}", "loss": f"{ev['loss']:.4f}",
                         "samples/s": f"{ev['samples_per_s']:,.0f}"}, refresh=False)
        bar.update(step - bar.n)

    def _epoch(self, row: dict) -> None:
        row = {k: v for k, v in row.items() if k not in ("kind", "rank")}
        with self._lock:
            if self._key(row) in self._delivered:
                return
            self._delivered.add(self._key(row))
        if self._on_epoch is not None:
            try:
                self._on_epoch(row)
            except Exception:  # a broken callback (e.g. a tracking server down) must not fail the run
                log.exception("on_epoch raised on %r; continuing", row)

    @staticmethod
    def _key(row: dict) -> tuple[int, bool]:
        return int(row["epoch"]), bool(row.get("partial"))

    def finish(self, history: list[dict[str, Any]] | None) -> None:
        """Close the bar; deliver the epochs whose row the channel did not bring."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        for row in history or []:
            self._epoch(row)
