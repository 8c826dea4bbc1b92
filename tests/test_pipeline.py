"""The pipeline job's contract with a scheduler: bad input exits non-zero with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparkdl.pipeline import PipelineConfig, PipelineResult, format_summary

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_stage_exits_1_with_a_one_line_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--lakehouse", str(tmp_path), "--stages", "etl,deploy"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    reason = [ln for ln in proc.stderr.splitlines() if ln.startswith("sparkdl pipeline failed")]
    assert reason == ["sparkdl pipeline failed: unknown stages ['deploy']; choose from ['etl', 'train', 'evaluate', 'predict']"]


def test_missing_tables_fail_the_train_stage_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--lakehouse", str(tmp_path), "--stages", "train"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "pipeline stage 'train' failed: TableNotFoundError: no Delta table at" in proc.stderr


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="valid_fraction"):
        PipelineConfig(valid_fraction=1.5)
    with pytest.raises(ValueError, match="num_ranks"):
        PipelineConfig(num_ranks=0)


def test_summary_lists_stage_times_and_versions():
    r = PipelineResult(lakehouse="/l", seconds={"etl": 1.0, "train": 2.0},
                       etl={"rows_in": 10, "rows_out": 8, "rows_rejected": 2, "skipped": False},
                       train={"model_name": "m", "model_version": 3, "run_id": "r", "metrics": {"val_auc": 0.9},
                              "curves_png": "/l/runs/r/curves.png"})
    text = format_summary(r)
    assert "rows in 10, out 8, rejected 2" in text and "model m v3" in text
    assert "etl 1.0s, train 2.0s" in text and "/l/runs/r/curves.png" in text
