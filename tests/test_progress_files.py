"""Progress through the run folder, for callers the executors cannot reach (Spark Connect clients)."""

from __future__ import annotations

import json
import time

from sparkdl.train._progress_files import ProgressFileReader, ProgressFileWriter


def test_every_event_reaches_the_reader_once_in_order(tmp_path):
    got = []
    reader = ProgressFileReader(str(tmp_path), got.append, poll_s=60)
    w0 = ProgressFileWriter(str(tmp_path), 0, 0, flush_s=60, keep_steps=3)
    w1 = ProgressFileWriter(str(tmp_path), 1, 0, flush_s=60)
    for step in range(1, 6):
        w0.send({"kind": "step", "step": step})
    w0.send({"kind": "epoch", "epoch": 0})
    w0.send({"rank": 0, "error": "x"}, internal="failure")  # the stage's error text carries failures
    w1.send({"kind": "step", "step": 1})
    w0.close()
    w1.close()
    assert reader.poll() == 5
    assert [e["step"] for e in got if e.get("rank") == 0 and e["kind"] == "step"] == [3, 4, 5]
    assert {"kind": "epoch", "epoch": 0, "rank": 0} in got
    assert reader.poll() == 0  # nothing twice


def test_a_reader_polling_while_the_rank_writes_gets_only_new_events(tmp_path):
    got = []
    reader = ProgressFileReader(str(tmp_path), got.append, poll_s=60)
    writer = ProgressFileWriter(str(tmp_path), 0, 1, flush_s=0.05)
    writer.send({"kind": "epoch", "epoch": 0})
    time.sleep(0.5)
    assert reader.poll() == 1
    writer.send({"kind": "epoch", "epoch": 1})
    writer.close()
    assert reader.poll() == 1
    assert [e["epoch"] for e in got] == [0, 1]


def test_files_hold_json_only_and_a_garbled_line_is_skipped(tmp_path):
    (tmp_path / "attempt-0-rank-0.jsonl").write_text('{"kind": "epoch", "_seq": 1}\nnot json\n[1]\n'
                                                     + json.dumps({"kind": "epoch", "_seq": 2}) + "\n")
    got = []
    assert ProgressFileReader(str(tmp_path), got.append).poll() == 2
    assert got == [{"kind": "epoch"}, {"kind": "epoch"}]


def test_a_missing_folder_is_no_progress_not_an_error(tmp_path):
    assert ProgressFileReader(str(tmp_path / "none"), print).poll() == 0
