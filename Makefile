# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparkdl-installed
LAKEHOUSE ?= $(CURDIR)/lakehouse

.PHONY: demo test venv check-java bench clean jars hdfs-up hdfs-down

check-java:
	@command -v java >/dev/null 2>&1 || { echo "error: Java 17 is required by Spark 4 and was not found on PATH; install it (e.g. 'apt-get install openjdk-17-jre-headless') or set JAVA_HOME." >&2; exit 1; }
	@java -version 2>&1 | head -1 | grep -Eq '"(17|21)[."]' || { echo "error: Spark 4 needs Java 17 (or 21); found: $$(java -version 2>&1 | head -1). Install openjdk-17 and put it first on PATH or set JAVA_HOME." >&2; exit 1; }

# The venv is rebuilt only when the packaging changes. A .venv made by another Python is
# replaced (pip would refuse the install later with a requires-python error). pip is not
# upgraded: the one venv ships is new enough, and the rebuild needs no extra index access.
$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'." >&2; exit 1; }
	@if [ -e $(VENV) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then \
		echo "$(VENV) was not made by Python 3.11: recreating it with $(PYTHON)"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is installed first and pinned, so pip takes the CPU wheel on disk instead of a CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: check-java $(STAMP)
	$(PY) jobs/pipeline.py --lakehouse $(LAKEHOUSE) --tracking

# JVM jars of the storage tests (HDFS daemons, s3a, delta-spark) from Maven Central, cached
# under ~/.cache/sparkdl-jars (SPARKDL_JARS_CACHE); a no-op once cached. See docs/storage.md.
jars: $(STAMP)
	@$(PY) -m storage.jars

test: check-java $(STAMP) jars
	$(PY) -m pytest -q

# A single-node HDFS on 127.0.0.1:$(HDFS_PORT) for trying sparkdl on hdfs:// by hand.
HDFS_PORT ?= 9000
hdfs-up: check-java jars
	@$(PY) -m storage.minihdfs up --dir .hdfs --port $(HDFS_PORT)

hdfs-down: $(STAMP)
	@$(PY) -m storage.minihdfs down --dir .hdfs

bench: check-java $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(LAKEHOUSE) .pytest_cache .hdfs
