"""Explanations beside predictions: do they starve plain requests, and how long do they take?

    python -m medserve.perf.bench_explain                 # about a minute on 2 cores
    python -m medserve.perf.bench_explain --rate 200 --measure-s 20 --rounds 5

In one run, against one `medserve serve` started here on a fresh demo repository:
  1. plain requests to the random forest (breast cancer, 30 features) at a fixed rate (open loop:
     latency from each request's intended send time), alone and with explanation requests
     running beside them back to back (they ride the batcher at background priority), the two
     conditions alternated over a few rounds after a discarded warm-up; p50/p99 of the plain
     requests pooled per condition and the p99 ratio (target: with explanations <= 1.5 x alone);
  2. the latency of one explanation per family: tables (the forest: KernelSHAP over 30
     features; the linear regression: 10 features), images (digits CNN: occlusion) and signals
     (ECG 1-D CNN: occlusion), median of a few.
Prints a table and writes perf/results/bench_explain-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .serverproc import medserve

FAMILIES = {"table (forest, 30 features)": "breast_cancer_rf", "table (linear, 10 features)": "diabetes_linear",
            "image (digits CNN)": "digits_cnn", "signal (ECG 1-D CNN)": "ecg_cnn1d"}


def _zeros(client: Any, model: str) -> dict[str, np.ndarray]:
    from medserve.protos.wire import numpy_dtype

    meta = client.model_metadata(model)
    return {t.name: np.zeros(tuple(1 if d < 0 else d for d in t.shape), numpy_dtype(t.datatype)) for t in meta.inputs}


def _open_loop(target: str, inputs: dict[str, np.ndarray], rate: float, seconds: float) -> list[float]:
    """Latencies (s) of plain requests sent at `rate` per second, from their intended send times."""
    from concurrent.futures import ThreadPoolExecutor

    from medserve.clients import Client

    latencies: list[float] = []
    lock = threading.Lock()
    with Client(target, timeout_s=10) as client, ThreadPoolExecutor(16) as pool:
        start = time.perf_counter()

        def one(intended: float) -> None:
            client.infer("breast_cancer_rf", inputs)
            with lock:
                latencies.append(time.perf_counter() - intended)

        futures = []
        n = int(rate * seconds)
        for i in range(n):
            intended = start + i / rate
            delay = intended - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, intended))
        for f in futures:
            f.result()
    return latencies


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.perf.bench_explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="plain requests per second")
    parser.add_argument("--measure-s", type=float, default=12.0, help="seconds per condition, over all rounds")
    parser.add_argument("--rounds", type=int, default=4, help="alone / with explanations, alternated this often")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from medserve.clients import Client
    from medserve.exporters.demo import build_demo_repository

    with tempfile.TemporaryDirectory(prefix="medserve-bench-explain-") as tmp:
        repo = Path(tmp) / "repo"
        print("building the demo models ...", file=sys.stderr)
        build_demo_repository(repo, models=list(FAMILIES.values()))
        with medserve(repo, log_dir=Path(tmp)) as server, Client(server.address, timeout_s=120) as client:
            plain = _zeros(client, "breast_cancer_rf")
            client.infer("breast_cancer_rf", plain)
            per_family = {}
            for family, model in FAMILIES.items():
                inputs = _zeros(client, model)
                client.explain(model, inputs)  # warm
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    why = client.explain(model, inputs)
                    times.append(time.perf_counter() - t0)
                per_family[family] = {"model": model, "method": why.method, "median_ms": round(float(np.median(times)) * 1e3, 1)}
            _open_loop(server.address, plain, args.rate, 2.0)  # warm-up, discarded
            phases: dict[str, list[float]] = {"alone": [], "with explanations": []}
            explained = [0]
            for _ in range(args.rounds):  # alternating phases: a slow spell of the machine hits both
                phases["alone"] += _open_loop(server.address, plain, args.rate, args.measure_s / args.rounds)
                stop = threading.Event()

                def explain_beside(stop: threading.Event = stop) -> None:
                    with Client(server.address, timeout_s=120) as c:
                        inputs = _zeros(c, "breast_cancer_rf")
                        while not stop.is_set():
                            c.explain("breast_cancer_rf", inputs)
                            explained[0] += 1

                worker = threading.Thread(target=explain_beside, daemon=True)
                worker.start()
                phases["with explanations"] += _open_loop(server.address, plain, args.rate,
                                                          args.measure_s / args.rounds)
                stop.set()
                worker.join(120)
    rows = {name: {"p50_us": round(_pct(v, 50)), "p99_us": round(_pct(v, 99)), "requests": len(v)}
            for name, v in phases.items()}
    ratio = round(rows["with explanations"]["p99_us"] / rows["alone"]["p99_us"], 2)
    print(f"plain requests to breast_cancer_rf at {args.rate:g}/s, {args.measure_s:g} s per condition "
          f"in {args.rounds} alternating rounds:")
    for name, r in rows.items():
        print(f"  {name:<18} p50 {r['p50_us']:>7} µs   p99 {r['p99_us']:>7} µs   ({r['requests']} requests)")
    print(f"  p99 with / without explanations: {ratio} (target <= 1.5); {explained[0]} explanations ran beside")
    print("one explanation per family (median of 5):")
    for family, r in per_family.items():
        print(f"  {family:<28} {r['method']:<14} {r['median_ms']:>8} ms")
    out = args.out or Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_explain-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"rate": args.rate, "phases": rows, "p99_ratio": ratio, "explained_beside": explained[0],
                                "families": per_family}, indent=1) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
