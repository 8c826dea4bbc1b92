"""Run every benchmark in turn (`make bench`); each prints its own side-by-side ratio.

Every script runs even when an earlier one fails; the exit status says whether any did."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ("bench_etl.py", "bench_loader.py", "bench_launch.py", "bench_scaling.py", "bench_gpu.py", "bench_storage.py",
           "bench_strategies.py", "bench_parallelism.py")

failed = []
for script in SCRIPTS:
    print(f"=== {script}", flush=True)
    rc = subprocess.run([sys.executable, str(HERE / script)], check=False).returncode
    if rc != 0:
        failed.append(f"{script} (exit {rc})")
if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
sys.exit(1 if failed else 0)
