"""Run every benchmark in turn (`make bench`); each prints its own side-by-side ratio."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script in ("bench_etl.py", "bench_loader.py", "bench_launch.py", "bench_scaling.py"):
    print(f"=== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=False)
