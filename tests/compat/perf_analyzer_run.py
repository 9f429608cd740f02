"""Triton's perf_analyzer (shipped in the tritonclient wheel) against a served model, over gRPC
or HTTP, briefly and with loose stability (CI shares 2 cores)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def perf_analyzer() -> str | None:
    found = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    return found if Path(found).exists() else None


def run_perf_analyzer(protocol: str, url: str, tmp_path: Path, model: str = "affine") -> list[float]:
    """Throughput at concurrency 1 and 2; fails the test on a non-zero exit."""
    tool = perf_analyzer()
    assert tool is not None
    env = dict(os.environ)
    import nvidia.cuda_runtime  # perf_analyzer links libcudart even for CPU-only runs

    lib = Path(nvidia.cuda_runtime.__path__[0]) / "lib"
    env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
    csv = tmp_path / "pa.csv"
    done = subprocess.run(
        [tool, "-m", model, "-i", protocol, "-u", url, "-b", "1", "--concurrency-range", "1:2",
         "-p", "500", "-s", "100", "-r", "10", "-f", str(csv)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = csv.read_text().strip().splitlines()[1:]
    return [float(row.split(",")[1]) for row in rows]
