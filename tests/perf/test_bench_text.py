"""bench_text end to end with tiny settings: the token-id Transformer only (the quickest text
model to build), c = 1 and 8, short texts, a second of load per point. Speed is never asserted;
only that the JSON has its keys and its figures are sane on any machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the demo build
pytest.importorskip("tokenizers")

TINY = ["--models", "notes_transformer", "--concurrency", "1,8", "--measure-s", "1", "--warmup-s", "0.3",
        "--requests", "256", "--max-words", "12", "--in-process-s", "0.05", "--hand-off-calls", "2000"]


def test_bench_text_writes_sane_figures(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "medserve.perf.bench_text", *TINY, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=55)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "thread hand-off" in done.stdout and "pad waste" in done.stdout and "fixed/s" in done.stdout
    (path,) = tmp_path.glob("bench_text-*.json")
    result = json.loads(path.read_text())

    assert result["schema"] == "medserve.perf.bench_text/1"
    assert result["host"]["hand_off_us"]["median_us"] > 0
    assert result["lengths"]["words_pct"][-1] <= 12
    assert result["served"]["notes_transformer"]["pad"] and result["served"]["notes_transformer_shape_groups"]["pad"] is None
    points = result["points"]
    assert [(p["concurrency"], p["variant"]) for p in points] == [
        (1, "padded"), (1, "shape groups"), (8, "padded"), (8, "shape groups")]
    for p in points:
        assert p["model"] == "notes_transformer"
        assert p["requests"] > 0 and p["throughput_rps"] > 0
        assert 0 < p["latency_us"]["p50"] <= p["latency_us"]["p99"]
        assert p["executions"] > 0 and p["mean_batch"] >= 1 and p["server_engine_us_per_batch"] > 0
        waste = p["padding_waste"]  # from the server's medserve_input_elements_total
        assert waste is not None and 0 <= waste < 1
        assert p["input_elements"]["executed"] >= p["input_elements"]["requested"] > 0
        if p["variant"] == "shape groups":
            assert waste == 0
        elif p["mean_batch"] > 1.05:  # padded batches of several lengths ran some padding
            assert waste > 0
        assert p["in_process"]["batch"] == max(1, round(p["mean_batch"]))
        assert p["in_process"]["rows_per_s"] > 0 and p["ratio_to_in_process"] > 0
        # the transport's ceiling: the fixed response under the same loop, one figure per level
        assert p["fixed_rps"] > 0 and p["fixed_ratio"] == round(p["fixed_rps"] / p["in_process"]["rows_per_s"], 3)
        assert p["transport_bound"] == (p["fixed_ratio"] < 0.5)
        assert p["fixed_rps"] == next(q["fixed_rps"] for q in points if q["concurrency"] == p["concurrency"])
        cores = p["cpu_cores"]  # the server and the client both worked in the window, within the host's cores
        assert cores["server"] > 0 and cores["client"] > 0, cores
        assert cores["server"] + cores["client"] + cores["rest_of_host"] <= 1.25 * (os.cpu_count() or 1), cores
