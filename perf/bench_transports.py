"""The load processes' client transports against one real local server: what each costs the
client per call, and how close the Python generator comes to h2load.

    python -m medserve.perf.bench_transports            # about 5 min on 2 cores (more when repetitions are rerun)
    python -m medserve.perf.bench_transports --levels 1,16,64 --repetitions 5 --json /tmp/t.json

The server is `perf/fixed_server.py` answering with the real response of a tiny model
(y = 2x + 1, FP32[1, 4]; captured from a `medserve serve` started for the purpose and stopped
again), so the server's own cost per call is as small as a grpc.aio server's gets; with one
process (`--server-workers 1`) and with two (2: the server can use every core of a 2-core host,
so each microsecond the client spends is taken from it, the case the generator is built for).
The harness (`medserve.perf.Runner`) drives it closed loop, one load process with `--channels`
connections, the generators interleaved level by level and repetition by repetition:

  rawh2   - load processes over `perf/rawh2.py` (hand-framed HTTP/2);
  grpcio  - load processes over grpc.aio;
  h2load  - nghttp2's C load generator, the yardstick.

Each repetition is a run of its own (new connections, the generators' order rotated). Reported
per generator and level, as medians over the repetitions: throughput (req/s), the client's CPU
per call (the load process's CPU time over the window / the calls answered in it, getrusage:
every thread of the process; for h2load its /proc CPU time), and throughput / h2load's in the
same repetition (target: at least 0.9). Also one `loop.run_in_executor` round trip (the
machine's thread hand-off cost), for reading the per-call figures against.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .measure import executor_round_trip_us
from .report import bench_parser, write_result

GENERATORS = {"h2load": "h2load", "rawh2": "python", "grpcio": "grpcio"}  # name -> harness generator
TARGET_RATIO = 0.9  # the Python generator within 10 % of h2load's throughput


@contextlib.contextmanager
def fixed_target(work: Path, workers: int) -> Any:
    """The fixed-response server (`workers` processes) answering with a tiny model's real responses."""
    from .bench_client import tiny_server
    from .serverproc import fixed_server

    with contextlib.ExitStack() as outer:
        with contextlib.ExitStack() as inner:
            source = inner.enter_context(tiny_server(4))
            handle = outer.enter_context(fixed_server(source, "affine", workers=workers, log_dir=work))
        yield handle  # the medserve it copied from is stopped by now


def bench(levels: tuple[int, ...], repetitions: int, warmup_s: float, measure_s: float, channels: int,
          generators: tuple[str, ...], server_workers: tuple[int, ...], work: Path,
          max_other_cores: float = 0.1, retries: int = 3, log: Any = print) -> dict[str, Any]:
    """A repetition during which other processes used more than `max_other_cores` of the host
    (the harness's `host_other_cores`) is run again, up to `retries` times; the last try is
    kept either way and counted in `disturbed`."""
    hand_off = executor_round_trip_us()
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    disturbed = 0
    for workers in server_workers:
        with fixed_target(work, workers) as server:
            runs = []
            for rep in range(repetitions):
                for attempt in range(retries + 1):
                    results = _run_once(server.address, server.pid, workers, levels, warmup_s, measure_s, channels,
                                        generators, rep, work)
                    other = _other_cores(results)
                    if other is None or other <= max_other_cores:
                        break
                    log(f"{workers} server workers, repetition {rep + 1}: other processes used {other:.2f} cores"
                        + (", again" if attempt < retries else ", kept"))
                else:
                    disturbed += 1
                runs.append(results)
                warnings += [f"{workers} server workers: {w}" for w in results["warnings"]]
        rows += _rows(runs, workers, generators, levels)
    return {
        "scenario": {"levels": list(levels), "repetitions": repetitions, "warmup_s": warmup_s, "measure_s": measure_s,
                     "channels": channels, "processes": 1, "server": "perf/fixed_server.py",
                     "server_workers": list(server_workers)},
        "executor_round_trip": hand_off,
        "rows": rows,
        "client_cpu_us_per_call": per_call(rows),
        "disturbed_repetitions": disturbed,
        "warnings": sorted(set(warnings)),
    }


def per_call(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each generator's client CPU per call: the median of every measurement (all levels,
    server workers and repetitions), the one figure to quote."""
    out = {}
    for name in dict.fromkeys(r["generator"] for r in rows):
        values = [v for r in rows if r["generator"] == name for v in r["client_cpu_us_per_call_reps"]]
        if values:
            out[name] = round(float(np.median(values)), 1)
    return out


def _other_cores(results: dict[str, Any]) -> float | None:
    """The most CPU that neither server nor harness used in any window of a run."""
    values = [rep.get("host_other_cores") for cfg in results["configs"] for lv in cfg["levels"]
              for rep in lv["repetitions"]]
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _run_once(address: str, pid: int, workers: int, levels: tuple[int, ...], warmup_s: float, measure_s: float,
              channels: int, generators: tuple[str, ...], rep: int, work: Path) -> dict[str, Any]:
    """One repetition: every generator at every level, interleaved, in an order rotated by
    `rep`. A run of its own, so its load process opens new connections: with several server
    workers the kernel spreads connections (not calls) over them, and each repetition draws
    that spread anew, as h2load does for every measurement."""
    from .runner import Runner
    from .scenario import ModelLoad, Scenario, Target

    order = [*generators[rep % len(generators):], *generators[:rep % len(generators)]]
    targets = tuple(Target(n, address, pid=pid, workers=workers, generator=GENERATORS[n]) for n in order)
    sc = Scenario(name="transports", mode="closed", levels=tuple(float(c) for c in levels), warmup_s=warmup_s,
                  measure_s=measure_s, repetitions=1, processes=1, channels=channels,
                  models=(ModelLoad("affine"),), targets=targets)
    return Runner(sc, work_dir=work / "runner", progress=None).run()


def _rows(runs: list[dict[str, Any]], workers: int, generators: tuple[str, ...],
          levels: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per generator and level over the repetitions: medians of throughput, client CPU per call
    and throughput / h2load's in the same run."""
    def rep_of(results: dict[str, Any], name: str, level: int) -> dict[str, Any]:
        cfg = next(c for c in results["configs"] if c["name"] == name)
        return next(lv for lv in cfg["levels"] if lv["level"] == level)["repetitions"][0]

    rows = []
    for name in generators:
        for level in levels:
            reps = [rep_of(r, name, level) for r in runs]
            tput = [r["throughput_rps"] for r in reps]
            cpu_us = []
            for r in reps:
                h = r["harness"]
                cores = h.get("h2load_cores") if name == "h2load" else sum(h["load_process_cores"])
                if cores is not None and r["throughput_rps"]:
                    cpu_us.append(round(cores / r["throughput_rps"] * 1e6, 1))
            ratios = []
            if "h2load" in generators:
                base = [rep_of(r, "h2load", level)["throughput_rps"] for r in runs]
                ratios = [round(t / b, 3) for t, b in zip(tput, base, strict=True) if b]
            server = [(r["server"]["process"] or {}).get("cpu_cores") for r in reps]
            other = [r.get("host_other_cores") for r in reps]
            rows.append({
                "server_workers": workers, "generator": name, "level": level,
                "throughput_rps": round(float(np.median(tput)), 1), "throughput_rps_reps": tput,
                "client_cpu_us_per_call": round(float(np.median(cpu_us)), 1) if cpu_us else None,
                "client_cpu_us_per_call_reps": cpu_us,
                "ratio_to_h2load": round(float(np.median(ratios)), 3) if ratios else None,
                "ratio_to_h2load_reps": ratios,
                "server_cpu_cores": _median([c for c in server if c is not None]),
                "host_other_cores_max": max((x for x in other if x is not None), default=None),
                "p50_us": _median([r["latency_us"]["p50"] for r in reps if r["latency_us"]["p50"] is not None]),
                "statuses": {k: sum(r["statuses"].get(k, 0) for r in reps) for k in {k for r in reps for k in r["statuses"]}},
            })
    return rows


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 2) if values else None


def table(report: dict[str, Any]) -> str:
    lines = [f"medians of {report['scenario']['repetitions']} repetitions; srv = fixed-server processes",
             f"{'srv':>3} {'generator':<8} {'c':>4} {'req/s':>8} {'/h2load':>8} {'client µs/call':>15} {'srvCPU':>7} {'p50 µs':>8}"]
    for r in report["rows"]:
        ratio = "-" if r["ratio_to_h2load"] is None else f"{r['ratio_to_h2load']:.3f}"
        cpu = "-" if r["client_cpu_us_per_call"] is None else f"{r['client_cpu_us_per_call']:.1f}"
        srv = "-" if r["server_cpu_cores"] is None else f"{r['server_cpu_cores']:.2f}"
        p50 = "-" if r["p50_us"] is None else f"{r['p50_us']:.0f}"
        lines.append(f"{r['server_workers']:>3} {r['generator']:<8} {r['level']:>4} {r['throughput_rps']:>8.0f} "
                     f"{ratio:>8} {cpu:>15} {srv:>7} {p50:>8}")
    lines.append("client CPU per call, median of every measurement: "
                 + ", ".join(f"{k} {v:.0f} µs" for k, v in report["client_cpu_us_per_call"].items()))
    hand = report["executor_round_trip"]
    lines.append(f"thread hand-off (one loop.run_in_executor round trip): {hand['median_us']:.1f} µs median, "
                 f"{hand['mean_us']:.1f} µs mean")
    lines.append(f"target: the Python generator within 10 % of h2load (ratio >= {TARGET_RATIO})")
    if report["disturbed_repetitions"]:
        lines.append(f"{report['disturbed_repetitions']} repetitions kept although other processes were busy "
                     "(not a quiet machine)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_transports", __doc__, out=False)
    parser.add_argument("--levels", default="16,64", help="closed-loop concurrencies")
    parser.add_argument("--server-workers", default="1,2",
                        help="fixed-server processes, one measurement each (2: the server can take both cores of a "
                             "small host, so what the client costs is taken from it)")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--measure-s", type=float, default=2.0)
    parser.add_argument("--channels", type=int, default=8,
                        help="connections of the load process (h2load: -c); several, so they spread over server workers")
    parser.add_argument("--generators", default=",".join(GENERATORS),
                        help=f"any of {','.join(GENERATORS)} (ratios need h2load)")
    parser.add_argument("--max-other-cores", type=float, default=0.1,
                        help="run a repetition again when other processes used more of the host than this")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    generators = tuple(g for g in args.generators.split(",") if g)
    unknown = set(generators) - set(GENERATORS)
    if unknown:
        parser.error(f"unknown generators {sorted(unknown)}: expected {','.join(GENERATORS)}")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-transports-") as tmp:
        report = bench(tuple(int(c) for c in args.levels.split(",") if c), args.repetitions, args.warmup_s,
                       args.measure_s, args.channels, generators,
                       tuple(int(w) for w in args.server_workers.split(",") if w), Path(tmp),
                       max_other_cores=args.max_other_cores, log=lambda line: print(line, file=sys.stderr))
    print(table(report))
    for w in report["warnings"]:
        print(f"warning: {w}")
    if args.json:
        write_result("bench_transports", report, started_unix=started, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
