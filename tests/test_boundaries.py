"""Module boundaries that a test can hold: classic Spark and Spark Connect differ in one module."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Attribute access to the driver's SparkContext or the JVM gateway; a docstring or error message
# that names `spark.sparkContext.addPyFile` for the user is text, not a call, and is allowed.
_JVM_ACCESS = re.compile(r"\.(sparkContext|_jvm|_jsc|_jsparkSession|_gateway)\b")


def _code_lines(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        # drop string literals: messages may name the API the user should call
        code = re.sub(r"(\"[^\"]*\"|'[^']*')", "\"\"", code)
        out.append((n, code))
    return out


def test_only_session_touches_sparkcontext_or_the_jvm():
    """A Spark Connect client has neither; everything else goes through sparkdl.session."""
    offenders = []
    for path in sorted((ROOT / "sparkdl").rglob("*.py")):
        if path == ROOT / "sparkdl" / "session.py":
            continue
        for n, code in _code_lines(path):
            if _JVM_ACCESS.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {code.strip()}")
    assert not offenders, "sparkContext/JVM access outside sparkdl/session.py:\n" + "\n".join(offenders)


def test_the_boundary_check_sees_an_offence(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f(spark):\n    return spark.sparkContext.master  # no\nmsg = 'call spark.sparkContext.addPyFile'\n")
    hits = [n for n, code in _code_lines(bad) if _JVM_ACCESS.search(code)]
    assert hits == [2]


def test_jobs_import_no_py4j():
    """jobs/*.py run from a pyspark-client-only Python (no py4j) as well as under spark-submit."""
    for path in sorted((ROOT / "jobs").glob("*.py")):
        assert not re.search(r"^\s*(from|import) py4j", path.read_text(), re.M), path
