"""loop_profile: `perf report`'s lines parsed and folded into the parts of the request path, and
(where Linux perf may sample here) the benchmark end to end on a tiny model. Speed is never
asserted; the figures must be consistent with each other."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medserve.perf.loop_profile import SERVERS, parse_report, part_of, per_request_us

import onnx_models

REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 3K of event 'cpu-clock:ppp'
# Overhead       Samples  Shared Object
# ........  ............  ..........................
#
    52.20%          1890  libpython3.11.so.1.0
    16.14%           584  [kernel.kallsyms]
    13.26%           480  cygrpc.cpython-311-x86_64-linux-gnu.so
     5.08%           184  onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so
     4.53%           164  libc.so.6
     3.18%           115  _multiarray_umath.cpython-311-x86_64-linux-gnu.so
     2.96%           107  _message.abi3.so
     0.80%            29  _asyncio.cpython-311-x86_64-linux-gnu.so
     0.11%             4  ld-linux-x86-64.so.2
     0.05%             2  [vdso]
"""


def test_a_perf_report_is_read_as_samples_per_shared_object() -> None:
    samples = parse_report(REPORT)
    assert samples["libpython3.11.so.1.0"] == 1890 and samples["[kernel.kallsyms]"] == 584
    assert samples["[vdso]"] == 2 and len(samples) == 10  # header and comment lines are not objects


def test_shared_objects_fold_into_the_parts_of_the_request_path() -> None:
    assert part_of("libpython3.11.so.1.0") == "interpreter"
    assert part_of("cygrpc.cpython-311-x86_64-linux-gnu.so") == "grpc (cygrpc)"
    assert part_of("[kernel.kallsyms]") == "kernel"
    assert part_of("_multiarray_umath.cpython-311-x86_64-linux-gnu.so") == "numpy"
    assert part_of("_message.abi3.so") == "protobuf"
    assert part_of("ld-linux-x86-64.so.2") == "libc / libstdc++"
    assert part_of("[vdso]") == "other"
    # 1,000 Hz for a window of 2,000 requests: one sample is 0.5 µs per request
    us = per_request_us(parse_report(REPORT), 1000, 2000)
    assert us["interpreter"] == 945.0 and us["kernel"] == 292.0 and us["other"] == 1.0
    assert us["libc / libstdc++"] == 84.0  # libc and the loader together
    assert list(us) == sorted(us, key=lambda k: -us[k])  # largest first
    assert sum(us.values()) == pytest.approx(sum(parse_report(REPORT).values()) / 2, abs=0.5)


def _perf_may_sample() -> bool:
    if shutil.which("perf") is None or shutil.which("h2load") is None:
        return False
    probe = subprocess.run(["perf", "record", "-q", "-o", "/dev/null", "--", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _perf_may_sample(), reason="needs linux-perf allowed to sample here, and h2load")
def test_loop_profile_end_to_end(make_repo, tmp_path: Path) -> None:
    repo = make_repo(affine=onnx_models.affine)
    done = subprocess.run([sys.executable, "-m", "medserve.perf.loop_profile", "--repository", str(repo),
                           "--model", "affine", "--concurrency", "4", "--warmup-s", "0.3", "--measure-s", "1.5",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "medserve - minimal" in done.stdout
    (path,) = tmp_path.glob("loop_profile-*.json")
    result = json.loads(path.read_text())
    assert result["schema"] == "medserve.perf.loop_profile/1"
    points = {p["server"]: p for p in result["points"]}
    assert set(points) == set(SERVERS)
    for p in points.values():
        assert p["throughput_rps"] > 0 and p["samples"] > 100, p
        assert 0 < p["loop_thread_us_per_request"] <= p["process_us_per_request"] * 1.05, p
        assert p["by_part_us"]["interpreter"] > 0
        # the samples account for the thread's CPU time (sampling error only)
        assert sum(p["by_part_us"].values()) == pytest.approx(p["loop_thread_us_per_request"], rel=0.35), p
    assert points["fixed"]["by_part_us"].get("onnxruntime", 0) < points["medserve"]["by_part_us"]["onnxruntime"]
